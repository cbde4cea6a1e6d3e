# SPDX-License-Identifier: Apache-2.0
"""The `power-dra-controller` command: flags, configuration errors, and surviving restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.deviceclasses import DRIVER
from controller.kube.client import ApiClient
from controller.kube.errors import NotFound, Unavailable
from controller.kube.resources import NODES, resource_kinds
from controller.main import RunState, build_parser, load_settings, run_controllers
from controller.process.metrics import ReconcileMetrics, new_registry
from tests.harness.cluster import ControlPlane

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "POD_NAMESPACE")}
    return subprocess.run(
        [sys.executable, "-m", "controller.main", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert "traceback" not in entry
    return str(entry["msg"])


def test_help_works_without_a_cluster() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in (
        "--device-classes-config",
        "--orphan-grace",
        "--leader-elect",
        "--lease-duration",
        "--manage-plugin-daemonset",
        "--metrics-bind-address",
    ):
        assert flag in proc.stdout


def test_a_missing_kubeconfig_is_one_clear_line() -> None:
    msg = _one_error(_run("--kubeconfig=/nonexistent/kubeconfig"))
    assert msg.startswith("cannot read kubeconfig /nonexistent/kubeconfig")


def test_an_unreadable_device_classes_config_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "classes.yaml"
    msg = _one_error(_run(f"--device-classes-config={missing}", env={"KUBECONFIG": "/x"}))
    assert msg.startswith(f"device classes config {missing}: cannot read")


def test_an_invalid_class_nxconfig_from_the_environment_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "classes.yaml"
    path.write_text(
        "deviceClasses:\n"
        "  - name: debug\n"
        "    config:\n"
        "      - opaque:\n"
        f"          driver: {DRIVER}\n"
        "          parameters: {apiVersion: nx.device.power.ibm.com/v1alpha1, kind: NxConfig,"
        " verbose: loud}\n"
    )
    msg = _one_error(_run(env={"DEVICE_CLASSES_CONFIG": str(path)}))
    assert "DeviceClass debug" in msg
    assert "deviceClasses[0].config[0].opaque.parameters.verbose: must be an integer" in msg


def test_operator_mode_without_its_config_is_one_clear_line() -> None:
    msg = _one_error(_run("--manage-plugin-daemonset", env={"KUBECONFIG": "/x"}))
    assert "needs --plugin-daemonset-config" in msg


@pytest.mark.parametrize(
    "args",
    [
        ["--orphan-grace=soon"],
        ["--metrics-bind-address=8080"],
        ["--leader-elect", "--lease-duration=2s", "--renew-deadline=5s"],
    ],
)
def test_bad_flags_exit_2(args: list[str]) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    assert "error:" in proc.stderr


def test_flags_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORPHAN_GRACE", "90s")
    monkeypatch.setenv("LEADER_ELECT", "true")
    monkeypatch.setenv("METRICS_BIND_ADDRESS", "127.0.0.1:0")
    args = build_parser().parse_args([])
    assert (args.orphan_grace, args.leader_elect, args.metrics_bind_address) == (
        90.0,
        True,
        "127.0.0.1:0",
    )
    assert build_parser().parse_args(["--orphan-grace=1s"]).orphan_grace == 1.0


# --- convergence across an API server restart -------------------------------------------


async def _eventually(check: Any, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                if await check():
                    return
            except Unavailable:
                pass  # a keep-alive connection from before the restart
            await anyio.sleep(0.1)


@pytest.mark.cluster
@pytest.mark.anyio
async def test_changes_around_an_apiserver_restart_still_converge(
    api: ApiClient, control_plane: ControlPlane, unique_name: str, tmp_path: Path
) -> None:
    version = await api.resource_api_version()
    classes = resource_kinds(version)["DeviceClass"]
    slices = resource_kinds(version)["ResourceSlice"]
    extra = f"{unique_name}-class"
    node = f"{unique_name}-node"
    config = tmp_path / "classes.yaml"
    config.write_text(f"deviceClasses:\n  - name: {DRIVER}\n  - name: {extra}\n")
    control_plane.create_node(node)
    await api.create(
        slices,
        {
            "metadata": {"name": f"{node}-nx"},
            "spec": {
                "driver": DRIVER,
                "nodeName": node,
                "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                "devices": [{"name": "nx-gzip"}],
            },
        },
    )
    args = build_parser().parse_args(
        [f"--device-classes-config={config}", "--orphan-grace=1s", "--namespace=default"]
    )
    settings = load_settings(args)
    state = RunState()

    async def exists(res: Any, name: str) -> bool:
        try:
            await api.get(res, name)
        except NotFound:
            return False
        return True

    async def class_back() -> bool:
        return await exists(classes, extra)

    async def slice_gone() -> bool:
        return not await exists(slices, f"{node}-nx")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_controllers, api, settings, ReconcileMetrics(new_registry(), "t"), state)
        await _eventually(lambda: _true(state.synced), 10)
        await _eventually(class_back, 10)
        # Changes right before the restart: their events may or may not reach the watch.
        await api.delete(classes, extra)
        await api.delete(NODES, node)
        await anyio.to_thread.run_sync(control_plane.restart_apiserver)
        await _eventually(class_back, 40)
        await _eventually(slice_gone, 40)
        # And the watches work again afterwards.
        await api.delete(classes, extra)
        await _eventually(class_back, 20)
        tg.cancel_scope.cancel()
    await api.delete(classes, extra)


async def _true(value: bool) -> bool:
    return value


# --- liveness: /healthz says whether the controller loops still move -------------------------


class _FakeLoops:
    """A controller's moving parts as the liveness check sees them (real objects)."""

    name = "test-controller"

    def __init__(self) -> None:
        from controller.kube.client import ApiClient
        from controller.kube.informer import Informer
        from controller.kube.kubeconfig import ClusterConfig
        from controller.kube.resources import NODES
        from controller.kube.workqueue import WorkQueue

        client = ApiClient(ClusterConfig(server="https://127.0.0.1:1"), watch_timeout=60)
        self.informer = Informer(client, NODES)
        self.now = time.monotonic()
        self.queue = WorkQueue("test", clock=lambda: self.now)


def test_a_controller_whose_loops_move_is_healthy() -> None:
    state = RunState(controllers=[_FakeLoops()])  # type: ignore[list-item]
    assert state.healthy()
    assert state.unhealthy_reason() == ""


def test_an_informer_that_stopped_moving_makes_the_controller_unhealthy() -> None:
    loops = _FakeLoops()
    loops.informer.last_progress -= 3600  # stuck on a watch for an hour
    state = RunState(controllers=[loops])  # type: ignore[list-item]
    assert not state.healthy()
    assert "test-controller: informer nodes: no progress for 36" in state.unhealthy_reason()


@pytest.mark.anyio
async def test_a_reconcile_that_never_ends_makes_the_controller_unhealthy() -> None:
    loops = _FakeLoops()
    loops.queue.add("ns/stuck")
    assert await loops.queue.get() == "ns/stuck"
    loops.now += 3600  # an hour later, still not done
    state = RunState(controllers=[loops])  # type: ignore[list-item]
    assert "reconcile of ns/stuck running for 36" in state.unhealthy_reason()
    loops.queue.done("ns/stuck")
    assert state.healthy()


def test_a_flag_with_choices_refuses_a_bad_value_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubeletplugin.main import build_parser as plugin_parser

    monkeypatch.setenv("CLAIM_READ", "fast")
    with pytest.raises(SystemExit) as exited:
        plugin_parser().parse_args(["--node-name", "n1"])
    assert exited.value.code == 2
    assert (
        "argument --claim-read: invalid choice: 'fast' (from $CLAIM_READ) "
        "(choose from cache, quorum)" in capsys.readouterr().err
    )
    monkeypatch.setenv("CLAIM_READ", "quorum")
    assert plugin_parser().parse_args(["--node-name", "n1"]).claim_read == "quorum"
    assert plugin_parser().parse_args(["--claim-read=cache"]).claim_read == "cache"
