# SPDX-License-Identifier: Apache-2.0
"""Run `power-dra-kubeletplugin` as a real process for one fake Power node."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.fake_sysfs import make_powervm_tree, write_dev_node

from .cluster import ControlPlane, Process, free_port

DRIVER = "nx.device.power.ibm.com"


class PluginProcess:
    """One plugin process with its own sysfs, /dev, kubelet dirs and CDI root under `workdir`.

    The sysfs tree is a PowerVM LPAR with `total_credits` credits unless
    `make_tree=False` (then lay out `self.sysfs_root` yourself).
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        node_name: str,
        workdir: Path,
        *,
        total_credits: int = 8,
        device_mode: str = "shared",
        extra_args: tuple[str, ...] = (),
        kubeconfig: str | None = None,
        pod_uid: str = "",
        make_tree: bool = True,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.cp = control_plane
        self.python = python
        self.node_name = node_name
        self.workdir = workdir
        self.sysfs_root = workdir / "sys"
        self.dev_root = workdir / "hostdev"
        self.registry_dir = workdir / "plugins_registry"
        self.plugins_dir = workdir / "plugins"
        self.cdi_root = workdir / "cdi"
        self.plugin_dir = self.plugins_dir / DRIVER
        self.kubeconfig = kubeconfig or control_plane.kubeconfig
        self.device_mode = device_mode
        self.extra_args = extra_args
        self.pod_uid = pod_uid
        self.env = env
        self.metrics_port = 0
        self.process: Process | None = None
        self._log_start = 0  # where this run's lines begin in the log file
        for d in (self.registry_dir, self.plugins_dir, self.cdi_root):
            d.mkdir(parents=True, exist_ok=True)
        if make_tree and not self.sysfs_root.exists():
            make_powervm_tree(self.sysfs_root, total_credits=total_credits)
            write_dev_node(self.dev_root)

    @property
    def checkpoint(self) -> Path:
        return self.plugin_dir / "checkpoint.json"

    @property
    def dra_socket(self) -> Path:
        suffix = f"-{self.pod_uid}" if self.pod_uid else ""
        return self.plugin_dir / f"dra{suffix}.sock"

    @property
    def registration_socket(self) -> Path:
        suffix = f"-{self.pod_uid}" if self.pod_uid else ""
        return self.registry_dir / f"{DRIVER}{suffix}-reg.sock"

    def argv(self) -> list[str]:
        return [
            self.python,
            "-m",
            "kubeletplugin",
            f"--node-name={self.node_name}",
            f"--kubeconfig={self.kubeconfig}",
            f"--sysfs-root={self.sysfs_root}",
            f"--host-dev-root={self.dev_root}",
            f"--device-mode={self.device_mode}",
            f"--kubelet-registrar-directory-path={self.registry_dir}",
            f"--kubelet-plugins-directory-path={self.plugins_dir}",
            f"--cdi-root={self.cdi_root}",
            f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            f"--pod-uid={self.pod_uid}",
            "-v1",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> PluginProcess:
        """Start the process; with `wait`, until the DRA socket answers."""
        self.metrics_port = free_port()
        env = {**os.environ, **(self.env or {})}
        name = f"plugin-{self.node_name}{'-' + self.pod_uid if self.pod_uid else ''}"
        log_path = self.workdir / f"{name}.log"  # appended to by every run
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        self.process = Process(name, self.argv(), self.workdir, env=env)
        if wait:
            self.wait_for(self.registration_socket.exists, 15, "registration socket")
            self.wait_for_dra(15)
        return self

    def wait_for_dra(self, timeout: float) -> None:
        """Until this run serves its DRA socket (its "serving the kubelet" log line).
        Registration answers while the plugin still loads; DRA calls are served
        after its start-up repair."""

        def serving() -> bool:
            assert self.process is not None
            with self.process.log_path.open("rb") as f:
                f.seek(self._log_start)
                return b'"msg":"serving the kubelet"' in f.read()

        self.wait_for(serving, timeout, "DRA socket serving")

    def wait_for(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.process is not None and not self.process.alive():
                raise RuntimeError(f"plugin exited waiting for {what}:\n{self.process.tail(50)}")
            time.sleep(0.02)
        tail = self.process.tail(50) if self.process else ""
        raise TimeoutError(f"plugin: no {what} after {timeout}s:\n{tail}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.stop(sig=sig)

    def kill(self) -> None:
        """SIGKILL, no clean-up (crash tests)."""
        if self.process is not None:
            self.process.popen.kill()
            self.process.popen.wait(10)
            self.process.stop()

    def reload(self) -> None:
        """SIGHUP: rediscover now."""
        assert self.process is not None
        self.process.popen.send_signal(signal.SIGHUP)

    def slices(self) -> list[dict[str, Any]]:
        out = self.cp.kubectl(
            "get",
            "resourceslices",
            f"--field-selector=spec.nodeName={self.node_name}",
            "-o",
            "json",
        ).stdout
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return [s for s in items if s["spec"]["driver"] == DRIVER]

    def wait_for_slices(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        self.wait_for(lambda: bool(self.slices()), timeout, "ResourceSlice")
        return self.slices()

    def log(self) -> str:
        return self.process.tail(400) if self.process else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The plugin's JSON log lines (of the last 400), parsed; other lines skipped."""
        records = []
        for line in self.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records
