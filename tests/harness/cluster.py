# SPDX-License-Identifier: Apache-2.0
"""A real control plane on loopback: etcd, kube-apiserver, kube-scheduler,
kube-controller-manager, built from the pinned k8s.io/kubernetes module.

Used by the pytest fixtures, `make cluster-up`/`cluster-down` and the demo:

    python -m tests.harness.cluster up [--dir DIR]    # prints the kubeconfig path
    python -m tests.harness.cluster down [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .pki import CA, write_rsa_key

REPO = Path(__file__).resolve().parents[2]
K8S_MODULES = REPO / "hack" / "k8s-bin"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet")
RESOURCE_RUNTIME_CONFIG = (
    "resource.k8s.io/v1=true,resource.k8s.io/v1beta1=true,resource.k8s.io/v1beta2=true"
)
# Node names with static kubelet tokens ready, so real kubelets can join later.
NODE_TOKENS = tuple(f"node-{i}" for i in range(8))


def k8s_release() -> str:
    """The Kubernetes minor release the harness runs: K8S_RELEASE, else the default pin."""
    release = os.environ.get("K8S_RELEASE") or (K8S_MODULES / "DEFAULT").read_text().strip()
    return release.removeprefix("v")


def k8s_minor(release: str | None = None) -> int:
    """The minor number of a release such as 1.32 (the harness's release by default)."""
    return int((release or k8s_release()).split(".")[1])


def k8s_version(release: str | None = None) -> str:
    """The pinned patch of a release, e.g. v1.37.2 for 1.37 (from its tool module)."""
    go_mod = K8S_MODULES / f"v1.{k8s_minor(release)}" / "go.mod"
    if not go_mod.exists():
        known = sorted(p.name for p in K8S_MODULES.glob("v1.*"))
        raise RuntimeError(f"no tool module {go_mod} for Kubernetes {release}; known: {known}")
    for line in go_mod.read_text().splitlines():
        if line.startswith("require k8s.io/kubernetes "):
            return line.split()[2]
    raise RuntimeError(f"no k8s.io/kubernetes requirement in {go_mod}")


def cache_root() -> Path:
    """Build caches shared by clones and CI runs (POWER_DRA_CACHE overrides)."""
    env = os.environ.get("POWER_DRA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "power-dra-driver"


def k8s_bin_dir(release: str | None = None) -> Path:
    """Where a release's built binaries live (K8S_BIN_DIR overrides for the default)."""
    env = os.environ.get("K8S_BIN_DIR")
    if env and release is None:
        return Path(env)
    return cache_root() / "k8s" / k8s_version(release) / "bin"


@dataclass(frozen=True)
class Release:
    """What one Kubernetes release needs and offers for DRA, as its users run it.

    `resource_version` is the newest resource.k8s.io version it serves;
    `feature_gates` the gates its users turn on for DRA (OpenShift 4.19's
    TechPreviewNoUpgrade does this for 1.32), set on every component and the
    kubelet; `consumable_capacity` whether the server keeps a device's
    `allowMultipleAllocations` and a request's `capacity` (shared mode);
    `device_status` whether it keeps a claim's `status.devices`.
    """

    minor: int
    resource_version: str
    runtime_config: str
    feature_gates: dict[str, bool]
    controllers: str
    consumable_capacity: bool
    device_status: bool

    @property
    def name(self) -> str:
        return f"1.{self.minor}"

    @property
    def feature_gates_flag(self) -> str:
        return ",".join(f"{k}={str(v).lower()}" for k, v in sorted(self.feature_gates.items()))

    @property
    def device_mode(self) -> str:
        return "shared" if self.consumable_capacity else "slots"

    @property
    def examples(self) -> Path:
        """The examples directory written for this release (manifests/examples/README.md)."""
        if self.minor <= 33:
            return REPO / "manifests" / "examples" / "k8s-1.32"
        if not self.consumable_capacity:
            return REPO / "manifests" / "examples" / "k8s-1.34"
        return REPO / "manifests" / "examples"


def release_info(release: str | None = None) -> Release:
    """The profile of a release (the harness's release by default)."""
    minor = k8s_minor(release)
    if minor < 32:
        raise RuntimeError(f"Kubernetes 1.{minor} is older than the oldest release we serve (1.32)")
    beta_only = minor <= 33
    gates = {"DynamicResourceAllocation": True} if beta_only else {}
    if minor == 32:
        runtime_config = "resource.k8s.io/v1beta1=true"
    elif minor == 33:
        runtime_config = "resource.k8s.io/v1beta1=true,resource.k8s.io/v1beta2=true"
    else:
        runtime_config = RESOURCE_RUNTIME_CONFIG
    # 1.37 dropped the cloud controllers from kube-controller-manager.
    controllers = (
        "*,-nodeipam" if minor >= 37 else "*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller"
    )
    return Release(
        minor=minor,
        resource_version="v1beta1" if minor == 32 else "v1beta2" if minor == 33 else "v1",
        runtime_config=runtime_config,
        feature_gates=gates,
        controllers=controllers,
        consumable_capacity=minor >= 36,
        device_status=minor >= 33,
    )


def matrix_releases() -> list[str]:
    """Every release with a tool module (hack/k8s-bin/v1.*), oldest first; K8S_MATRIX
    (space- or comma-separated minors) narrows it for a quicker local run."""
    known = sorted((p.name.removeprefix("v") for p in K8S_MODULES.glob("v1.*")), key=k8s_minor)
    wanted = os.environ.get("K8S_MATRIX", "").replace(",", " ").split()
    return [r for r in known if not wanted or r in wanted]


def ensure_binaries(names: Sequence[str] = BINARIES, release: str | None = None) -> Path:
    """Build a release's missing binaries once (see hack/build-k8s.sh); return their folder."""
    bin_dir = k8s_bin_dir(release)
    missing = [n for n in names if not (bin_dir / n).exists()]
    if missing:
        env = {**os.environ, "K8S_RELEASE": release or k8s_release()}
        subprocess.run([str(REPO / "hack" / "build-k8s.sh"), *missing], check=True, env=env)
    return bin_dir


def find_etcd() -> str:
    """The etcd binary (Debian's etcd-server package)."""
    path = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if not path:
        raise RuntimeError("etcd not found: apt-get install etcd-server (see .ci/run)")
    return path


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str) -> Path:
    """A kubeconfig with a bearer token."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def yaml_stream(objs: Sequence[dict[str, Any]]) -> str:
    """Objects as one YAML stream (kubectl 1.32 cannot read JSON documents joined by ---)."""
    return yaml.safe_dump_all(list(objs), sort_keys=False)


def resource_path(cp: ControlPlane, rest: str) -> str:
    """An API path in the newest resource.k8s.io version `cp` serves."""
    return f"/apis/resource.k8s.io/{cp.release.resource_version}/{rest.lstrip('/')}"


class Process:
    """A child process with its log file; stopped by PID, never by name."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ControlPlane:
    """etcd + kube-apiserver + kube-scheduler + kube-controller-manager on loopback."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        feature_gates: str = "",
        runtime_config: str | None = None,
        scheduler: bool = True,
        controller_manager: bool = True,
        extra_apiserver_args: Sequence[str] = (),
        release: str | None = None,
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="power-dra-cp-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.release = release_info(release)
        # The release's own DRA gates first; gates a test passes win.
        gates = [g for g in (self.release.feature_gates_flag, feature_gates) if g]
        self.feature_gates = ",".join(gates)
        self.runtime_config = runtime_config or self.release.runtime_config
        self.with_scheduler = scheduler
        self.with_controller_manager = controller_manager
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.bin_dir = ensure_binaries(
            ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
            release=self.release.name,
        )
        self.version = k8s_version(self.release.name)
        self.processes: dict[str, Process] = {}
        self.component_ports: dict[str, int] = {}
        self.pki = self.workdir / "pki"
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.tokens: dict[str, str] = {}
        self.kubeconfig = str(self.workdir / "admin.kubeconfig")

    # --- set-up -----------------------------------------------------------------

    def _prepare(self) -> None:
        self.pki.mkdir(exist_ok=True)
        ca = CA(self.pki, "ca")
        self.ca_file = ca.cert_file
        self.ca_key_file = ca.key_file
        self.serving_cert, self.serving_key = ca.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ips=("127.0.0.1", "10.0.0.1"),
        )
        self.kubelet_client_cert, self.kubelet_client_key = ca.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            org="kubeadm:cluster-admins",
            client=True,
        )
        front = CA(self.pki, "front-proxy-ca")
        self.front_proxy_ca = front.cert_file
        self.front_proxy_cert, self.front_proxy_key = front.issue(
            "front-proxy-client", "front-proxy-client", client=True
        )
        self.sa_key = write_rsa_key(self.pki / "sa.key")
        rows = [("admin", "admin", "system:masters")]
        rows.append(("system:kube-scheduler", "system:kube-scheduler", ""))
        rows.append(("system:kube-controller-manager", "system:kube-controller-manager", ""))
        rows += [(f"system:node:{n}", f"system:node:{n}", "system:nodes") for n in NODE_TOKENS]
        lines = []
        for user, uid, groups in rows:
            token = secrets.token_hex(16)
            self.tokens[user] = token
            lines.append(f'{token},{user},{uid},"{groups}"' if groups else f"{token},{user},{uid}")
        (self.pki / "tokens.csv").write_text("\n".join(lines) + "\n")
        write_kubeconfig(
            Path(self.kubeconfig), self.server, self.ca_file, self.tokens["admin"], "admin"
        )
        for component in ("kube-scheduler", "kube-controller-manager"):
            write_kubeconfig(
                self.workdir / f"{component}.kubeconfig",
                self.server,
                self.ca_file,
                self.tokens[f"system:{component}"],
                component,
            )

    def node_kubeconfig(self, node: str) -> Path:
        """A kubeconfig with the static token of `system:node:<node>`."""
        return write_kubeconfig(
            self.workdir / f"node-{node}.kubeconfig",
            self.server,
            self.ca_file,
            self.tokens[f"system:node:{node}"],
            f"system:node:{node}",
        )

    def _start_etcd(self) -> None:
        self.etcd_port, peer = free_port(), free_port()
        data = self.workdir / "etcd"
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.processes["etcd"] = Process(
            "etcd",
            [
                find_etcd(),
                "--name",
                "default",
                "--data-dir",
                str(data),
                "--listen-client-urls",
                client_url,
                "--advertise-client-urls",
                client_url,
                "--listen-peer-urls",
                peer_url,
                "--initial-advertise-peer-urls",
                peer_url,
                "--initial-cluster",
                f"default={peer_url}",
                "--log-level",
                "warn",
                "--unsafe-no-fsync"
                if _etcd_supports_unsafe_no_fsync()
                else "--quota-backend-bytes=0",
            ],
            self.workdir,
        )

    def apiserver_args(self) -> list[str]:
        p = self.pki
        args = [
            str(self.bin_dir / "kube-apiserver"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self.serving_cert}",
            f"--tls-private-key-file={self.serving_key}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={p / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            # Nodes are reached by their InternalIP for exec/logs (names do not resolve here).
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={self.kubelet_client_cert}",
            f"--kubelet-client-key={self.kubelet_client_key}",
            f"--requestheader-client-ca-file={self.front_proxy_ca}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-username-headers=X-Remote-User",
            f"--proxy-client-cert-file={self.front_proxy_cert}",
            f"--proxy-client-key-file={self.front_proxy_key}",
            f"--runtime-config={self.runtime_config}",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]
        if self.feature_gates:
            args.append(f"--feature-gates={self.feature_gates}")
        return args + self.extra_apiserver_args

    def start_apiserver(self) -> None:
        """Start (or restart) kube-apiserver and wait for /readyz."""
        self.processes["kube-apiserver"] = Process(
            "kube-apiserver", self.apiserver_args(), self.workdir
        )
        self.wait_ready()

    def _component_args(self, name: str) -> list[str]:
        kubeconfig = self.workdir / f"{name}.kubeconfig"
        self.component_ports[name] = free_port()
        args = [
            str(self.bin_dir / name),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.component_ports[name]}",
            f"--cert-dir={self.workdir / (name + '-certs')}",
            "--leader-elect=false",
            "--v=1",
        ]
        if self.feature_gates:
            args.append(f"--feature-gates={self.feature_gates}")
        return args

    def _start_scheduler(self) -> None:
        self.processes["kube-scheduler"] = Process(
            "kube-scheduler", self._component_args("kube-scheduler"), self.workdir
        )

    def _start_controller_manager(self) -> None:
        self.processes["kube-controller-manager"] = Process(
            "kube-controller-manager",
            [
                *self._component_args("kube-controller-manager"),
                "--use-service-account-credentials",
                f"--service-account-private-key-file={self.sa_key}",
                f"--root-ca-file={self.ca_file}",
                f"--cluster-signing-cert-file={self.ca_file}",
                f"--cluster-signing-key-file={self.ca_key_file}",
                "--node-monitor-grace-period=1h",
                f"--controllers={self.release.controllers}",
            ],
            self.workdir,
        )

    def _wait_component_healthy(self, name: str, timeout: float = 60.0) -> None:
        # Both exit when the apiserver vanishes during their start-up; wait them past it.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.processes[name]
            if not proc.alive():
                raise RuntimeError(f"{name} exited:\n{proc.tail()}")
            url = f"https://127.0.0.1:{self.component_ports[name]}/healthz"
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not healthy after {timeout}s:\n{self.processes[name].tail()}")

    def ensure_components(self) -> None:
        """Restart the scheduler / controller-manager if they died; wait until healthy."""
        starters = {
            "kube-scheduler": (self.with_scheduler, self._start_scheduler),
            "kube-controller-manager": (
                self.with_controller_manager,
                self._start_controller_manager,
            ),
        }
        for name, (wanted, starter) in starters.items():
            if not wanted:
                continue
            proc = self.processes.get(name)
            if proc is None or not proc.alive():
                if proc is not None:
                    proc.stop()
                starter()
        for name, (wanted, _) in starters.items():
            if wanted:
                self._wait_component_healthy(name)
        self._write_state()

    def start(self, attempts: int = 3) -> ControlPlane:
        """Start everything; return self when the API server and components are ready.

        A port picked free can be taken by another process before our server binds
        it; then everything starts again on new ports.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._prepare()
                self._start_etcd()
                self.start_apiserver()
                self.ensure_components()
                return self
            except RuntimeError as exc:
                self.stop()
                if "address already in use" not in str(exc) or attempt == attempts:
                    raise
                self.processes.clear()
                shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
                self.port = free_port()
                self.server = f"https://127.0.0.1:{self.port}"
            except BaseException:
                self.stop()
                raise
        return self

    def _write_state(self) -> None:
        state = {
            "kubeconfig": self.kubeconfig,
            "server": self.server,
            "pids": {name: proc.pid for name, proc in self.processes.items()},
        }
        (self.workdir / "state.json").write_text(json.dumps(state, indent=2))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for /readyz 200 (raises with the apiserver's log tail when it never comes)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.processes.get("kube-apiserver")
            if proc is not None and not proc.alive():
                raise RuntimeError(f"kube-apiserver exited:\n{proc.tail()}")
            req = urllib.request.Request(
                f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.tokens['admin']}"}
            )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        tail = self.processes["kube-apiserver"].tail()
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({last}):\n{tail}")

    def restart_apiserver(self, down_for: float = 0.0) -> None:
        """Stop kube-apiserver, optionally stay down a while, start it again."""
        self.processes["kube-apiserver"].stop()
        if down_for:
            time.sleep(down_for)
        self.start_apiserver()
        self.ensure_components()

    def stop(self) -> None:
        """Stop every process this object started, newest first."""
        for name in reversed(list(self.processes)):
            self.processes[name].stop()

    # --- helpers for tests --------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this control plane (admin unless told otherwise)."""
        proc = subprocess.run(
            [
                str(self.bin_dir / "kubectl"),
                f"--kubeconfig={kubeconfig or self.kubeconfig}",
                # Discovery cached per control plane: kubectl keys its cache by
                # host:port, and a port reused by another release's server would
                # serve that release's API versions.
                f"--cache-dir={self.workdir / 'kubectl-cache'}",
                *args,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def apply(self, obj: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Server-side apply objects as admin."""
        objs = obj if isinstance(obj, list) else [obj]
        self.kubectl(
            "apply", "--server-side", "--field-manager=tests", "-f", "-", input=yaml_stream(objs)
        )

    def create_namespace(self, name: str, timeout: float = 30.0) -> None:
        """Create a namespace and wait for its `default` ServiceAccount (pods need it)."""
        self.kubectl("create", "namespace", name)
        if not self.with_controller_manager:
            return  # nobody creates ServiceAccounts without the controller-manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"namespace {name}: no default ServiceAccount after {timeout}s")

    def create_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        allocatable: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create a Node object that is Ready with allocatable resources (no kubelet)."""
        alloc = allocatable or {"cpu": "16", "memory": "64Gi", "pods": "110"}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "ppc64le",
                    **(labels or {}),
                },
            },
        }
        self.kubectl("create", "-f", "-", input=json.dumps(node))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "status": {
                "capacity": alloc,
                "allocatable": alloc,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "fake node",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
            }
        }
        self.kubectl(
            "patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        out = self.kubectl("get", "node", name, "-o", "json").stdout
        result: dict[str, Any] = json.loads(out)
        return result


def _etcd_supports_unsafe_no_fsync() -> bool:
    try:
        out = subprocess.run([find_etcd(), "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--unsafe-no-fsync" in (out.stdout + out.stderr)


# --- command line: make cluster-up / cluster-down ---------------------------------

DEFAULT_DIR = REPO / ".cache" / "cluster"


def _up(directory: Path) -> None:
    if (directory / "state.json").exists():
        _down(directory)
    shutil.rmtree(directory, ignore_errors=True)
    cp = ControlPlane(directory).start()
    print(f"control plane up at {cp.server}")
    print(f"export KUBECONFIG={cp.kubeconfig}")
    print(f"kubectl: {cp.bin_dir / 'kubectl'}   logs: {directory}/*.log")
    print("stop it with: make cluster-down")


def _down(directory: Path) -> None:
    state_file = directory / "state.json"
    if not state_file.exists():
        print(f"no control plane recorded in {directory}")
        return
    pids = json.loads(state_file.read_text()).get("pids", {})
    for name, pid in reversed(list(pids.items())):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(int(pid), signal.SIGKILL)
        print(f"stopped {name} (pid {pid})")
    state_file.unlink()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.cluster")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.action == "up":
        _up(args.dir)
    else:
        _down(args.dir)


if __name__ == "__main__":
    main(sys.argv[1:])
