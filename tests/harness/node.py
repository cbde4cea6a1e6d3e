# SPDX-License-Identifier: Apache-2.0
"""A real node on this machine: containerd + kubelet + our plugin, no docker.

All three run in ONE private mount namespace (held by a `sleep` started with
`unshare --mount --propagation private`; daemons join it with `nsenter`), in
which the paths a node uses are our own temp dirs:

- `/var/lib/kubelet`: bind mount of `<workdir>/kubelet` (on an overlay of
  `/var/lib`, so the mount point exists without creating it on the host);
- `/run` (so `/var/run/cdi`, containerd's state and socket) and `/var/log`:
  bind mounts of temp dirs;
- `/dev`: an overlay over the host's `/dev` with the fake NX-gzip device node
  `/dev/crypto/nx-gzip` (`c 1 3`, the numbers of /dev/null) in its upper dir;
- the kernel tunables the kubelet writes: bind mounts of plain files.

The host keeps its iptables (`makeIPTablesUtilChains: false`; pods use
hostNetwork, so the CNI bridge conf that makes the node Ready is never run),
its network links and its `/var/lib/kubelet`. Pods run in cgroups under a
cgroup root of our own, removed at teardown. Processes are stopped by PID:
the daemons we started, every process in our mount namespace (the containerd
shims) and every process in our cgroup root (the containers).
See ../shared/docs/REAL-NODE.md.

    python -m tests.harness.node up [--dir DIR]     # control plane + node-0
    python -m tests.harness.node down [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubeletplugin.checkpoint import read_state
from tests.dra_objects import device_class
from tests.fake_sysfs import make_powervm_tree

from .cluster import (
    REPO,
    ControlPlane,
    Process,
    cache_root,
    ensure_binaries,
    free_port,
    resource_path,
)
from .images import BUSYBOX_IMAGE, PAUSE_IMAGE, build_test_images, find_static_busybox
from .plugin import DRIVER, PluginProcess

CONTAINERD_FETCH = REPO / "hack" / "fetch-containerd.sh"
CNI_BIN_DIR = Path(os.environ.get("CNI_BIN_DIR", "/usr/lib/cni"))
# What the kubelet writes under /proc/sys at start (cm.setupKernelTunables).
KERNEL_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
BOOT_ID = "kernel/random/boot_id"
# Host paths a node (kubelet, containerd, CNI, CDI) would use if it escaped
# its namespace; each must look the same after the node is gone.
WATCHED_HOST_PATHS = (
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/run/cdi",
    "/run/containerd",
    "/run/netns",
    "/etc/cdi",
    "/etc/cni",
    "/etc/containerd",
    "/opt/containerd",
    "/opt/cni",
    "/dev/crypto",
    "/var/log/pods",
    "/var/log/containers",
)
# Paths the namespace covers with its own mounts; the workdir may not be under them.
COVERED = ("/dev", "/run", "/var/run", "/var/lib", "/var/log", "/proc", "/sys")
# The node's fake sysfs tree as its namespace sees it, the same path on every node:
# the plugin DaemonSet's /sys hostPath points here on this machine.
NODE_SYSFS = "/var/lib/power-dra-fake-sys"
DEFAULT_CREDITS = 4  # shared mode publishes 4 - 1 reserved = 3 credits


# `kubectl exec/logs` go from the API server to the kubelet, which it dials at the
# node's Hostname address first by default ("node-0": no DNS knows it).


def allow_kubelet_api_access(cp: ControlPlane) -> None:
    """Let the API server's kubelet client certificate use the kubelet API (as kubeadm
    does): the kubelet authorizes it with a SubjectAccessReview (webhook authz)."""
    cp.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "power-dra-test:apiserver-kubelet-client"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:kubelet-api-admin",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": "kube-apiserver-kubelet-client",
                }
            ],
        }
    )


# --- requirements -------------------------------------------------------------------


def containerd_bin_dir() -> Path:
    """Where containerd, ctr and the runc shim are (CONTAINERD_BIN_DIR overrides)."""
    env = os.environ.get("CONTAINERD_BIN_DIR")
    return Path(env) if env else cache_root() / "containerd" / "root" / "usr" / "bin"


def ensure_containerd() -> Path:
    """Fetch containerd once (hack/fetch-containerd.sh) unless it is there already."""
    bin_dir = containerd_bin_dir()
    if not (bin_dir / "containerd").exists() and "CONTAINERD_BIN_DIR" not in os.environ:
        subprocess.run([str(CONTAINERD_FETCH)], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def find_runc() -> str | None:
    return shutil.which("runc") or next(
        (p for p in ("/usr/sbin/runc", "/usr/bin/runc") if Path(p).exists()), None
    )


def missing_requirements() -> list[str]:
    """What this machine lacks to run a real node (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (mount namespaces, mknod, cgroups)")
    for tool in ("unshare", "nsenter", "mount", "umount", "mknod"):
        if not shutil.which(tool):
            missing.append(f"{tool} (util-linux)")
    if not find_runc():
        missing.append("runc (apt-get install runc)")
    for plugin in ("bridge", "host-local"):
        if not (CNI_BIN_DIR / plugin).exists():
            missing.append(f"CNI plugin {CNI_BIN_DIR / plugin} (containernetworking-plugins)")
    try:
        find_static_busybox()
    except RuntimeError:
        missing.append("a static busybox (apt-get install busybox-static)")
    if "overlay" not in Path("/proc/filesystems").read_text():
        missing.append("overlayfs in the kernel")
    if not cgroup_mounts():
        missing.append("a mounted cgroup file system")
    if os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
        )
        if probe.returncode != 0:
            missing.append(f"unshare --mount ({probe.stderr.decode().strip()})")
    return missing


def node_ip() -> str:
    """A non-loopback IPv4 address of this machine (the kubelet refuses loopback)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    raise RuntimeError("no global IPv4 address on this machine for the kubelet's --node-ip")


# --- host state: what must be the same after the node is gone -------------------------


def _mountinfo(pid: str = "self") -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount of a process's mount namespace."""
    rows = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        rows.append((left.split()[4], right.split()[0]))
    return rows


def cgroup_mounts() -> list[Path]:
    """The host's cgroup (v1 and v2) hierarchies."""
    return [Path(m) for m, fs in _mountinfo() if fs in ("cgroup", "cgroup2")]


def _cgroup_dirs() -> set[str]:
    found = set()
    for mount in cgroup_mounts():
        for dirpath, _dirs, _files in os.walk(mount):
            found.add(dirpath)
    return found


def _iptables() -> dict[str, str]:
    rules = {}
    for tool in (
        "iptables-save",
        "ip6tables-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ):
        path = shutil.which(tool)
        if path:
            out = subprocess.run([path], capture_output=True, text=True)
            # Comment lines carry the time of the dump (and without -c, no counters).
            rules[tool] = "\n".join(
                line for line in out.stdout.splitlines() if not line.startswith("#")
            )
    return rules


def _describe(path: str) -> str:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if stat.S_ISDIR(st.st_mode):
        return f"dir {sorted(os.listdir(path))}"
    return f"mode {oct(st.st_mode)} size {st.st_size}"


def host_state() -> dict[str, Any]:
    """A snapshot of what a node could change on the host."""
    return {
        "iptables": _iptables(),
        "links": sorted(os.listdir("/sys/class/net")),
        "mounts": sorted(m for m, _ in _mountinfo()),
        "cgroups": sorted(_cgroup_dirs()),
        "paths": {p: _describe(p) for p in WATCHED_HOST_PATHS},
        "sysctl": {t: (Path("/proc/sys") / t).read_text().strip() for t in KERNEL_TUNABLES},
    }


def host_changes(
    before: dict[str, Any], after: dict[str, Any], own_cgroup_root: str | None = None
) -> list[str]:
    """How `after` differs from `before` (new cgroups only: others may remove theirs).

    With `own_cgroup_root`, the cgroup roots of other harness nodes (another test
    run on this machine) are not counted: each node's own teardown checks that its
    root is gone."""
    changes = []
    for tool in sorted(set(before["iptables"]) | set(after["iptables"])):
        if before["iptables"].get(tool) != after["iptables"].get(tool):
            changes.append(f"{tool} output changed")
    if before["links"] != after["links"]:
        changes.append(f"network links {before['links']} -> {after['links']}")
    new_mounts = sorted(set(after["mounts"]) - set(before["mounts"]))
    if new_mounts:
        changes.append(f"new host mounts {new_mounts}")
    new_cgroups = sorted(set(after["cgroups"]) - set(before["cgroups"]))
    if own_cgroup_root is not None:
        new_cgroups = [c for c in new_cgroups if not _other_nodes_cgroup(c, own_cgroup_root)]
    if new_cgroups:
        changes.append(f"new cgroups {new_cgroups}")
    for kind in ("paths", "sysctl"):
        for key, was in before[kind].items():
            now = after[kind].get(key)
            if now != was:
                changes.append(f"{key}: {was} -> {now}")
    return changes


def _other_nodes_cgroup(path: str, own_root: str) -> bool:
    """`path` lies under the cgroup root of another harness node than `own_root`."""
    parts = Path(path).parts
    return any(p.startswith("power-dra-") and p != own_root for p in parts)


# --- processes, namespace, cgroups -----------------------------------------------------


def _ns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def namespace_members(inode: int, exclude: Sequence[int] = ()) -> list[int]:
    """PIDs of the processes in the mount namespace `inode` (all started by us)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in exclude and _ns_inode(entry) == inode:
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def kill_pids(pids: Sequence[int], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Signal each PID, wait for all to go, SIGKILL what stays."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def create_cgroup_root(name: str) -> None:
    """The kubelet's --cgroup-root, in every hierarchy (the kubelet wants it to exist)."""
    for mount in cgroup_mounts():
        path = mount / name
        path.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # empty cpusets take no tasks
            parent = mount / knob
            if parent.exists() and not (path / knob).read_text().strip():
                (path / knob).write_text(parent.read_text())
        controllers = mount / "cgroup.controllers"
        if controllers.exists() and mount == Path("/sys/fs/cgroup"):  # unified only
            wanted = " ".join(f"+{c}" for c in controllers.read_text().split())
            with contextlib.suppress(OSError):
                (path / "cgroup.subtree_control").write_text(wanted)


def _cgroup_procs(name: str) -> list[int]:
    pids: set[int] = set()
    for mount in cgroup_mounts():
        for dirpath, _dirs, files in os.walk(mount / name):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    text = (Path(dirpath) / "cgroup.procs").read_text()
                    pids.update(int(p) for p in text.split())
    return sorted(pids)


def remove_cgroup_root(name: str, timeout: float = 60.0) -> list[str]:
    """Kill what runs under our cgroup root and remove it everywhere; returns leftovers.

    Under load a killed container's cgroup stays busy for seconds after its last task
    died, so the loop retries well past that before reporting a leftover."""
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while True:
        kill_pids(_cgroup_procs(name), signal.SIGKILL, timeout=2)
        left = []
        for mount in cgroup_mounts():
            root = mount / name
            if not root.exists():
                continue
            for dirpath, _dirs, _files in os.walk(root, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    left.append(dirpath)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class MountNamespace:
    """A private mount namespace, held open by a `sleep` process."""

    def __init__(self, log_dir: Path) -> None:
        self.holder = Process(
            "mount-namespace",
            ["unshare", "--mount", "--propagation", "private", "sleep", "2147483647"],
            log_dir,
        )
        host = _ns_inode("self")
        deadline = time.monotonic() + 10
        while _ns_inode(self.holder.pid) in (None, host):
            if not self.holder.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"unshare --mount failed:\n{self.holder.tail()}")
            time.sleep(0.01)
        inode = _ns_inode(self.holder.pid)
        assert inode is not None
        self.inode = inode

    @property
    def pid(self) -> int:
        return self.holder.pid

    def argv(self, command: Sequence[str], wd: str = "/") -> list[str]:
        """`command` run inside the namespace (nsenter execs it: same PID)."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", f"--wd={wd}", "--", *command]

    def run(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(command), capture_output=True, text=True, **kwargs)
        if proc.returncode != 0:
            raise RuntimeError(
                f"in namespace: {' '.join(command)} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def members(self) -> list[int]:
        return namespace_members(self.inode, exclude=(self.pid,))

    def stop(self) -> None:
        """Kill every process left in the namespace, then its holder (mounts go with it)."""
        kill_pids(self.members(), signal.SIGKILL, timeout=5)
        self.holder.stop(timeout=5)


# --- the plugin, as the DaemonSet runs it, inside the namespace --------------------------


class NodePlugin(PluginProcess):
    """Our plugin with the DaemonSet's paths inside the node's namespace.

    The attributes inherited from PluginProcess (`registration_socket`,
    `checkpoint`, `cdi_root`, ...) are the host's view of those paths.
    """

    def __init__(self, node: RealNode, pod_uid: str) -> None:
        super().__init__(
            node.cp,
            node.name,
            node.workdir / "plugin" / pod_uid,
            kubeconfig=node.cp.kubeconfig,
            pod_uid=pod_uid,
            make_tree=False,
        )
        self.node = node
        self.sysfs_root = node.sysfs_root
        self.registry_dir = node.kubelet_dir / "plugins_registry"
        self.plugins_dir = node.kubelet_dir / "plugins"
        self.plugin_dir = self.plugins_dir / DRIVER
        self.cdi_root = node.cdi_dir

    def argv(self) -> list[str]:
        ns = self.node.ns
        assert ns is not None, "the node's namespace is not up"
        return ns.argv(
            [
                sys.executable,
                "-m",
                "kubeletplugin",
                f"--node-name={self.node_name}",
                f"--pod-uid={self.pod_uid}",
                f"--kubeconfig={self.kubeconfig}",
                f"--sysfs-root={self.sysfs_root}",
                "--host-dev-root=/",
                f"--device-mode={self.device_mode}",
                "--kubelet-registrar-directory-path=/var/lib/kubelet/plugins_registry",
                "--kubelet-plugins-directory-path=/var/lib/kubelet/plugins",
                "--cdi-root=/var/run/cdi",
                f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
                "-v=1",
                *self.extra_args,
            ],
            wd=str(REPO),
        )

    def start(self, wait: bool = True) -> NodePlugin:
        # A restart (same pod UID) appends to the same log: read only this run's part.
        log = self.workdir / f"plugin-{self.node_name}-{self.pod_uid}.log"
        self.log_offset = log.stat().st_size if log.exists() else 0
        super().start(wait=wait)
        return self

    def log(self) -> str:
        """This run's log."""
        if self.process is None:
            return ""
        with self.process.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def registered(self) -> bool:
        """The kubelet has registered this run of the plugin."""
        return "kubelet registered DRA driver" in self.log()

    def wait_registered(self, timeout: float = 15.0) -> None:
        self.wait_for(self.registered, timeout, "registration by the kubelet")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text: str = resp.read().decode()
            return text


# --- a tiny API client for polling and watching (kubectl is slow to spawn) ---------------


class Api:
    """Admin access to the control plane with urllib."""

    def __init__(self, cp: ControlPlane) -> None:
        self.server = cp.server
        self.token = cp.tokens["admin"]
        self.ssl = ssl.create_default_context(cafile=str(cp.ca_file))

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.ssl, timeout=timeout) as resp:
            return json.loads(resp.read())

    def get(self, path: str) -> Any:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def watch(self, path: str, timeout: float) -> Iterator[dict[str, Any]]:
        """Watch events of a collection (`path` with its query) for at most `timeout` s."""
        sep = "&" if "?" in path else "?"
        req = urllib.request.Request(
            f"{self.server}{path}{sep}watch=true&timeoutSeconds={int(timeout) + 1}",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, context=self.ssl, timeout=timeout + 5) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)


def wait_for(what: str, pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(interval)


# --- the node -------------------------------------------------------------------------


class RealNode:
    """containerd + kubelet + our plugin for one node of `cp`, in a private mount namespace."""

    def __init__(
        self,
        cp: ControlPlane,
        workdir: Path,
        name: str = "node-0",
        *,
        total_credits: int = DEFAULT_CREDITS,
        kubelet_verbosity: int = 2,
    ) -> None:
        self.cp = cp
        self.workdir = workdir.resolve()
        for covered in COVERED:
            if self.workdir.is_relative_to(covered):
                raise ValueError(f"node workdir {self.workdir} is under {covered}")
        self.name = name
        self.total_credits = total_credits
        self.kubelet_verbosity = kubelet_verbosity
        self.api = Api(cp)
        self.log_dir = self.workdir / "logs"
        self.kubelet_dir = self.workdir / "kubelet"  # /var/lib/kubelet
        self.run_dir = self.workdir / "run"  # /run
        self.cdi_dir = self.run_dir / "cdi"  # /var/run/cdi
        self.sysfs_root = self.workdir / "sys"
        self.containerd_root = self.workdir / "containerd"
        self.cgroup_root = f"power-dra-{name}-{secrets.token_hex(3)}"
        self.ns: MountNamespace | None = None
        self.containerd: Process | None = None
        self.kubelet: Process | None = None
        self.plugin: NodePlugin | None = None
        self.plugins: list[NodePlugin] = []  # every instance started, in order
        self.host_before: dict[str, Any] = {}
        self.kubelet_port = 0
        self.ip = ""
        self.ready_at = 0.0  # time.monotonic() when wait_ready last returned

    # --- start -------------------------------------------------------------------------

    def start(self, with_plugin: bool = True, images: Sequence[Path] = ()) -> RealNode:
        """Bring the node up: Ready, plugin registered, our slice published.

        Without `with_plugin` no plugin process is started (another driver's plugin,
        ours later with `start_plugin`, or the DaemonSet's pod from the driver's
        image, one of `images`: docker-archive or OCI tarballs imported into
        containerd); the node is then only Ready."""
        missing = missing_requirements()
        if missing:
            raise RuntimeError("cannot run a real node here: " + "; ".join(missing))
        self.bin_dir = ensure_binaries(("kubelet", "kubectl"), release=self.cp.release.name)
        self.containerd_bin = ensure_containerd()
        self.host_before = host_state()
        try:
            self._layout()
            self.ns = MountNamespace(self.log_dir)
            self._write_state()
            self._mount()
            create_cgroup_root(self.cgroup_root)
            self.start_containerd()
            self._import_images()
            for tarball in images:
                self.import_image(tarball)
            self.start_kubelet()
            if with_plugin:
                self.start_plugin(registered=False)
                self.wait_ready()
            else:
                self.wait_node_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _layout(self) -> None:
        for d in (
            self.log_dir,
            # The kubelet makes it too; the DaemonSet's hostPath wants it to exist.
            self.kubelet_dir / "plugins_registry",
            self.cdi_dir,
            self.workdir / "log",
            self.workdir / "hostdev",
            self.workdir / "overlay" / "dev" / "upper",
            self.workdir / "overlay" / "dev" / "work",
            self.workdir / "overlay" / "varlib" / "upper",
            self.workdir / "overlay" / "varlib" / "work",
            self.workdir / "sysctl",
            self.workdir / "cni" / "net.d",
            self.containerd_root,
        ):
            d.mkdir(parents=True, exist_ok=True)
        make_powervm_tree(self.sysfs_root, total_credits=self.total_credits)
        for tunable in (*KERNEL_TUNABLES, BOOT_ID):
            src = Path("/proc/sys") / tunable
            (self.workdir / "sysctl" / tunable.replace("/", ".")).write_text(src.read_text())
        self._write_cni_conf()
        self._write_containerd_config()

    def _mount(self) -> None:
        """Set up the namespace's view (one shell script, run inside it)."""
        assert self.ns is not None
        w = self.workdir
        dev_submounts = sorted(
            {
                m[len("/dev/") :]
                for m, _ in _mountinfo()
                if m.startswith("/dev/") and m.count("/") == 2
            }
        )
        lines = [
            "set -eu",
            # /dev: the host's, plus /dev/crypto/nx-gzip in an overlay's upper dir.
            f"mount --rbind /dev {w}/hostdev",
            f"mount -t overlay power-dra-dev -o lowerdir=/dev,upperdir={w}/overlay/dev/upper,"
            f"workdir={w}/overlay/dev/work /dev",
            *(f"mount --rbind {w}/hostdev/{sub} /dev/{sub}" for sub in dev_submounts),
            "mkdir -p /dev/crypto",
            "mknod -m 666 /dev/crypto/nx-gzip c 1 3",
            # /var/lib: an overlay, so /var/lib/kubelet can be a mount point.
            f"mount -t overlay power-dra-varlib -o lowerdir=/var/lib,"
            f"upperdir={w}/overlay/varlib/upper,workdir={w}/overlay/varlib/work /var/lib",
            "mkdir -p /var/lib/kubelet",
            f"mount --bind {self.kubelet_dir} /var/lib/kubelet",
            f"mkdir -p {NODE_SYSFS}",
            f"mount --bind {self.sysfs_root} {NODE_SYSFS}",
            f"mount --bind {self.run_dir} /run",
            f"mount --bind {w}/log /var/log",
            *(
                f"mount --bind {w}/sysctl/{t.replace('/', '.')} /proc/sys/{t}"
                for t in (*KERNEL_TUNABLES, BOOT_ID)
            ),
        ]
        self.ns.run(["sh", "-c", "\n".join(lines)])

    def _write_cni_conf(self) -> None:
        # Makes the node Ready; never run, as every test pod uses hostNetwork.
        conf = {
            "cniVersion": "0.4.0",
            "name": "power-dra-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "pdra0",
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.244.250.0/24"}]],
                        "dataDir": "/run/power-dra-cni",
                    },
                }
            ],
        }
        path = self.workdir / "cni" / "net.d" / "10-power-dra-test.conflist"
        path.write_text(json.dumps(conf, indent=2))

    def _write_containerd_config(self) -> None:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runc = find_runc()
        config = f"""version = 2
root = "{self.containerd_root}/root"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.containerd_root}/opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_cdi = true
  cdi_spec_dirs = ["/var/run/cdi"]
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{runc}"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{self.workdir}/cni/net.d"
"""
        (self.containerd_root / "config.toml").write_text(config)

    @property
    def containerd_socket(self) -> Path:
        """The host's view of containerd's socket (/run/containerd/containerd.sock inside)."""
        return self.run_dir / "containerd" / "containerd.sock"

    def _daemon_env(self) -> dict[str, str]:
        path = f"{self.containerd_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return {**os.environ, "PATH": path}

    def start_containerd(self) -> None:
        assert self.ns is not None
        self.containerd = Process(
            "containerd",
            self.ns.argv(
                [
                    str(self.containerd_bin / "containerd"),
                    "--config",
                    str(self.containerd_root / "config.toml"),
                ]
            ),
            self.log_dir,
            env=self._daemon_env(),
        )
        proc = self.containerd
        wait_for(
            "containerd socket",
            lambda: self.containerd_socket.exists() or not proc.alive(),
            30,
            0.02,
        )
        if not proc.alive():
            raise RuntimeError(f"containerd exited:\n{proc.tail()}")
        self._write_state()

    def ctr(self, *args: str) -> str:
        """Run ctr against our containerd, in the k8s.io namespace."""
        assert self.ns is not None
        proc = self.ns.run(
            [
                str(self.containerd_bin / "ctr"),
                "--address",
                "/run/containerd/containerd.sock",
                "--namespace",
                "k8s.io",
                *args,
            ],
            timeout=120,
        )
        return proc.stdout

    def _import_images(self) -> None:
        for tarball in build_test_images(self.workdir / "images").values():
            self.ctr("images", "import", str(tarball))
        names = self.ctr("images", "list", "--quiet").split()
        for image in (PAUSE_IMAGE, BUSYBOX_IMAGE):
            if image not in names:
                raise RuntimeError(f"image {image} missing after import: {names}")

    def import_image(self, tarball: Path) -> list[str]:
        """Import an image tarball into containerd's k8s.io namespace; the names it brought."""
        before = set(self.ctr("images", "list", "--quiet").split())
        self.ctr("images", "import", str(tarball))
        return sorted(set(self.ctr("images", "list", "--quiet").split()) - before)

    def _kubelet_config(self) -> Path:
        cp = self.cp
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(cp.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "registerNode": True,
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "shutdownGracePeriod": "0s",
            "shutdownGracePeriodCriticalPods": "0s",
            "resolvConf": "/etc/resolv.conf",
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "2s",
            "nodeStatusReportFrequency": "10s",
            "volumeStatsAggPeriod": "0s",
        }
        if cp.release.feature_gates:
            config["featureGates"] = dict(cp.release.feature_gates)
        path = self.workdir / "kubelet-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_kubelet(self) -> None:
        """Start (or start again) the kubelet."""
        assert self.ns is not None
        if not self.ip:
            self.ip = node_ip()
            self.kubelet_port = free_port()
            self.healthz_port = free_port()
        argv = [
            str(self.bin_dir / "kubelet"),
            f"--config={self._kubelet_config()}",
            f"--kubeconfig={self.cp.node_kubeconfig(self.name)}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.ip}",
            "--root-dir=/var/lib/kubelet",
            f"--v={self.kubelet_verbosity}",
            # The DRA plugin manager's calls and health stream (V(3)/V(4)).
            "--vmodule=dra_plugin=4,dra_plugin_manager=4",
        ]
        self.kubelet = Process("kubelet", self.ns.argv(argv), self.log_dir, env=self._daemon_env())
        self._write_state()

    def stop_kubelet(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop(timeout=15)

    def start_plugin(
        self, pod_uid: str | None = None, registered: bool = True, kubeconfig: str | None = None
    ) -> NodePlugin:
        """Start a plugin instance (a DaemonSet pod); it becomes `self.plugin`.

        With `registered`, wait until the kubelet has registered it (else only
        until it serves its sockets). `kubeconfig` replaces the admin one."""
        plugin = NodePlugin(self, pod_uid or str(uuid.uuid4()))
        if kubeconfig is not None:
            plugin.kubeconfig = kubeconfig
        plugin.start()
        if registered:
            plugin.wait_registered()
        self.plugins.append(plugin)
        self.plugin = plugin
        self._write_state()
        return plugin

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Node Ready, our plugin registered with the kubelet, our slice published."""
        self.wait_node_ready(timeout)
        assert self.plugin is not None
        self.plugin.wait_registered(timeout)
        wait_for("our ResourceSlice", self.slices, timeout, 0.05)
        self.ready_at = time.monotonic()

    def wait_node_ready(self, timeout: float = 60.0) -> None:
        """The Node object Ready (kubelet and runtime up, CNI configured)."""

        def ready() -> bool:
            kubelet = self.kubelet
            if kubelet is not None and not kubelet.alive():
                raise RuntimeError(f"kubelet exited:\n{kubelet.tail(40)}")
            node = self.api.get(f"/api/v1/nodes/{self.name}")
            conds = {
                c["type"]: c["status"] for c in (node or {}).get("status", {}).get("conditions", [])
            }
            return conds.get("Ready") == "True"

        wait_for(f"node {self.name} Ready", ready, timeout, 0.1)
        self.ready_at = time.monotonic()

    # --- observation ----------------------------------------------------------------------

    def slices(self) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(
            {"fieldSelector": f"spec.nodeName={self.name},spec.driver={DRIVER}"}
        )
        items: list[dict[str, Any]] = self.api.request(
            "GET", resource_path(self.cp, f"resourceslices?{query}")
        )["items"]
        return items

    def kubelet_log(self) -> str:
        path = self.log_dir / "kubelet.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def checkpoint_claims(self) -> dict[str, Any]:
        """The claims in the plugin's state file, its journal included (by UID)."""
        path = self.kubelet_dir / "plugins" / DRIVER / "checkpoint.json"
        if not path.exists():
            return {}
        return {uid: claim.to_dict() for uid, claim in read_state(path).items()}

    def cdi_specs(self) -> list[str]:
        return sorted(p.name for p in self.cdi_dir.iterdir() if p.suffix in (".json", ".yaml"))

    def remove_device_node(self) -> None:
        """The NX-gzip device node vanishes (module unloaded, DLPAR)."""
        assert self.ns is not None
        self.ns.run(["rm", "-f", "/dev/crypto/nx-gzip"])

    def create_device_node(self) -> None:
        assert self.ns is not None
        self.ns.run(["mknod", "-m", "666", "/dev/crypto/nx-gzip", "c", "1", "3"])

    # --- node events ----------------------------------------------------------------------

    def restart_kubelet(self) -> None:
        self.stop_kubelet()
        self.start_kubelet()

    def restart_plugin(self) -> NodePlugin:
        """Stop the plugin and start it again (same pod UID: a container restart)."""
        assert self.plugin is not None
        old = self.plugin
        old.stop()
        self.plugin = None
        return self.start_plugin(old.pod_uid)

    def reboot(self) -> None:
        """A reboot, as far as the node's software can tell: every container and daemon
        dies, `/run` (a tmpfs: CDI specs, containerd's state) comes back empty, the boot
        ID is new; `/var/lib/kubelet` (the plugin's state file, the kubelet's) is kept.
        Then containerd, our plugin and the kubelet start again; the kubelet finds its
        pods' sandboxes gone and starts them again, preparing their claims first."""
        assert self.ns is not None and self.plugin is not None
        pod_uid = self.plugin.pod_uid
        self._stop_processes()
        self.ns.run(["umount", "--recursive", "--lazy", "/run"])
        for entry in self.run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.cdi_dir.mkdir()
        self.ns.run(["mount", "--bind", str(self.run_dir), "/run"])
        (self.workdir / "sysctl" / BOOT_ID.replace("/", ".")).write_text(f"{uuid.uuid4()}\n")
        self.start_containerd()
        self.start_plugin(pod_uid, registered=False)
        self.start_kubelet()

    # --- stop -----------------------------------------------------------------------------

    def _stop_processes(self) -> None:
        """Stop the kubelet and plugins (SIGTERM), kill the containers, stop containerd
        and its shims; the namespace and cgroup root stay."""
        if self.kubelet is not None:
            self.kubelet.stop(timeout=15)
        for plugin in self.plugins:
            plugin.stop()
        self.plugin = None
        kill_pids(_cgroup_procs(self.cgroup_root), signal.SIGKILL, timeout=5)
        if self.containerd is not None:
            self.containerd.stop(timeout=10)
        if self.ns is not None:  # the shims (their containers are gone, they would exit)
            kill_pids(self.ns.members(), signal.SIGKILL, timeout=5)

    def stop(self) -> None:
        """Stop everything by PID, remove our cgroups and mounts; see `host_changes`."""
        self._stop_processes()
        if self.ns is not None:
            self.ns.stop()
        leftovers = remove_cgroup_root(self.cgroup_root)
        if leftovers:
            raise RuntimeError(f"cgroups left behind: {leftovers}")
        # Keep the logs; the rest (images, snapshots, overlay uppers) can go.
        for name in ("containerd", "overlay", "images", "run", "hostdev"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)
        state = self.workdir / "node-state.json"
        if state.exists():
            state.unlink()

    def host_changes(self) -> list[str]:
        """What differs on the host from before `start` (call after `stop`)."""
        return host_changes(self.host_before, host_state(), self.cgroup_root)

    def tear_down(self, namespace: str) -> None:
        """A test's end: its pods in `namespace` deleted (not waited for), the node
        stopped, its Node object deleted (a later test's pods must not be scheduled
        to a node that is gone), and the host asserted unchanged."""
        self.cp.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false", check=False)
        try:
            self.stop()
        finally:
            self.cp.kubectl("delete", "node", self.name, "--wait=false", check=False)
            changes = self.host_changes()
            assert not changes, "the real node changed the host:\n" + "\n".join(changes)

    def _write_state(self) -> None:
        """What `python -m tests.harness.node down` needs to clean up without us."""
        procs = {
            "kubelet": self.kubelet,
            "containerd": self.containerd,
            **{f"plugin-{p.pod_uid}": p.process for p in self.plugins},
        }
        state = {
            "workdir": str(self.workdir),
            "cgroupRoot": self.cgroup_root,
            "namespace": {"pid": self.ns.pid, "inode": self.ns.inode} if self.ns else None,
            "pids": {n: p.pid for n, p in procs.items() if p is not None},
            "hostBefore": self.host_before,
        }
        (self.workdir / "node-state.json").write_text(json.dumps(state, indent=1))


def down_from_state(state_file: Path) -> list[str]:
    """Clean up a node recorded by `_write_state` (its Python objects are gone)."""
    state = json.loads(state_file.read_text())
    ns = state.get("namespace")
    inode = ns["inode"] if ns else None
    # Only PIDs still in our namespace are ours (a PID may have been reused).
    ours = [p for p in state["pids"].values() if inode is not None and _ns_inode(p) == inode]
    kill_pids(ours, signal.SIGTERM, timeout=15)
    remove_cgroup_root(state["cgroupRoot"], timeout=1)
    if inode is not None:
        kill_pids(namespace_members(inode), signal.SIGKILL, timeout=5)
    leftovers = remove_cgroup_root(state["cgroupRoot"])
    if leftovers:
        raise RuntimeError(f"cgroups left behind: {leftovers}")
    state_file.unlink()
    return host_changes(state["hostBefore"], host_state())


# --- command line: make node-up / node-down ------------------------------------------------

DEFAULT_DIR = REPO / ".cache" / "node"


def _up(directory: Path) -> None:
    if (directory / "node" / "node-state.json").exists() or (
        directory / "control-plane" / "state.json"
    ).exists():
        _down(directory)
    shutil.rmtree(directory, ignore_errors=True)
    cp = ControlPlane(directory / "control-plane")
    cp.start()
    try:
        allow_kubelet_api_access(cp)
        cp.apply(device_class(DRIVER, version=cp.release.resource_version))
        node = RealNode(cp, directory / "node").start()
    except BaseException:
        cp.stop()
        raise
    print(f"node {node.name} Ready with our plugin; control plane at {cp.server}")
    print(f"export KUBECONFIG={cp.kubeconfig}")
    print(f"kubectl: {cp.bin_dir / 'kubectl'}   logs: {node.log_dir}/*.log")
    print(f"pods need imagePullPolicy: Never, hostNetwork: true and image {BUSYBOX_IMAGE}")
    print("stop it with: make node-down")


def _down(directory: Path) -> None:
    """Stop what `_up` started in `directory`; also takes a node's own workdir (e.g.
    a test's real-node dir left behind by a killed pytest)."""
    from .cluster import _down as cluster_down

    changes: list[str] = []
    for state_file in (directory / "node" / "node-state.json", directory / "node-state.json"):
        if state_file.exists():
            changes = down_from_state(state_file)
            print(f"node stopped ({state_file.parent})")
    if (directory / "control-plane").exists():
        cluster_down(directory / "control-plane")
    if changes:
        print("the host differs from before the node:\n  " + "\n  ".join(changes))
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.node")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.action == "up":
        _up(args.dir)
    else:
        _down(args.dir)


if __name__ == "__main__":
    main(sys.argv[1:])
