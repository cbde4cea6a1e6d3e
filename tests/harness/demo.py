# SPDX-License-Identifier: Apache-2.0
"""`make demo`: the driver's main job on an embedded local setup.

Starts the real control plane (etcd, kube-apiserver, kube-scheduler,
kube-controller-manager). Then, where this machine can run a real node (root, unshare, runc, CNI
plugins, busybox-static, containerd from hack/fetch-containerd.sh, buildah):

- the driver's image, built from the Containerfile (tests/harness/driver_image.py);
- two real nodes, `node-0` and `node-1` (tests/harness/node.py: kubelet +
  containerd with CDI, each in a private mount namespace, with a fake NX-gzip
  sysfs tree and device node), the image imported into their containerd;
- `manifests/base` installed with a generated overlay of the one-machine
  changes only (tests/harness/image_install.py): the plugin DaemonSet's pods
  and the controller Deployment's pod run from the image under the kubelets;
- `manifests/examples` with the pods rewritten for this machine (the local
  busybox image, `imagePullPolicy: Never`, `hostNetwork: true`); the kubelets
  prepare the claims with our plugins and start the containers;
- it prints the slices, which pod got which credits on which node, what a
  container sees (`kubectl exec`), the CDI spec and the claims' status, and
  tears it all down, checking that the nodes left the host as it was.

Elsewhere (or with `--fake-nodes`) the nodes are plain Node objects, one
plugin process each and the controller as a process with its ServiceAccount
token, and the demo plays the kubelet's gRPC part (grpcio).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import grpc
import yaml

from kubeletplugin.cdi import spec_file_name
from tests import grpc_stubs
from tests.harness.cluster import (
    REPO,
    ControlPlane,
    Process,
    ensure_binaries,
    resource_path,
    write_kubeconfig,
    yaml_stream,
)
from tests.harness.driver_image import build_image
from tests.harness.image_install import (
    BASE,
    CONTROLLER_LABEL,
    PLUGIN_LABEL,
    OneMachine,
    container_rss_mib,
    install_rendered,
    per_node_daemonsets,
    pod_log,
    wait_plugin_registered,
    wait_running,
    write_overlay,
)
from tests.harness.images import BUSYBOX_IMAGE
from tests.harness.node import (
    Api,
    RealNode,
    allow_kubelet_api_access,
    down_from_state,
    ensure_containerd,
    kill_pids,
    missing_requirements,
)
from tests.harness.plugin import DRIVER, PluginProcess

FAKE_NODES = {"power10-lpar-a": 10, "power10-lpar-b": 6}  # node -> NX-gzip default credits
# Real nodes use the control plane's static kubelet tokens (node-0 ... node-7).
REAL_NODES = {"node-0": 10, "node-1": 6}
NAMESPACE = "power-dra-driver"
EXAMPLES_NS = "nx-examples"
WORKDIR = REPO / ".cache" / "demo"
# What the demo runs in one example container (`kubectl exec`).
EXEC_SCRIPT = "ls -l /dev/crypto/nx-gzip; env | grep '^NX_' | sort"


class Mode:
    """How this run ends: `keep` (make dev-setup) skips the teardown."""

    keep = False


def say(text: str = "") -> None:
    print(text, flush=True)


def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def sa_kubeconfig(cp: ControlPlane, sa: str, path: Path, *extra: str) -> str:
    """A kubeconfig holding a token of one of our ServiceAccounts (the shipped RBAC applies)."""
    token = cp.kubectl("create", "token", sa, "-n", NAMESPACE, "--duration=1h", *extra).stdout
    return str(write_kubeconfig(path, cp.server, cp.ca_file, token.strip(), sa))


def bound_plugin_kubeconfig(cp: ControlPlane, node: str, pod: str) -> str:
    """Like the DaemonSet's pod: a token bound to the plugin pod on `node`, so the
    slice admission policy lets the plugin write only that node's slice."""
    return sa_kubeconfig(
        cp,
        "power-dra-kubeletplugin",
        WORKDIR / f"plugin-{node}.kubeconfig",
        "--bound-object-kind=Pod",
        f"--bound-object-name={pod}",
    )


def wait(what: str, pred: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"demo: {what} did not happen within {timeout:.0f}s")


def plugin_pod_on(cp: ControlPlane, node: str) -> str | None:
    pods = get_json(cp, "pods", "-n", NAMESPACE, "-l", PLUGIN_LABEL)
    for pod in pods["items"]:
        if pod["spec"].get("nodeName") == node:
            return str(pod["metadata"]["name"])
    return None


def render(cp: ControlPlane, directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would apply."""
    out = cp.kubectl("kustomize", str(directory)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def apply_objects(cp: ControlPlane, objs: list[dict[str, Any]]) -> None:
    cp.kubectl("apply", "--server-side", "-f", "-", input=yaml_stream(objs))


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        spec: dict[str, Any] = obj["spec"]
        return spec
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        spec = obj["spec"]["template"]["spec"]
        return spec
    return None


def for_this_machine(spec: dict[str, Any], image: str | None = None) -> None:
    """What a pod needs on the real nodes: host network (the nodes' CNI config is never
    run) and no image pulls (with `image`, that image instead of the pod's own)."""
    spec["hostNetwork"] = True
    for container in spec.get("initContainers", []) + spec["containers"]:
        if image:
            container["image"] = image
        container["imagePullPolicy"] = "Never"


def record_pid(process: Process | None) -> None:
    """Note a process we started, for `clean_leftovers` after a run that was killed."""
    if process is None:
        return
    path = WORKDIR / "pids.json"
    pids = json.loads(path.read_text()) if path.exists() else {}
    pids[process.name] = process.pid
    path.write_text(json.dumps(pids))


def _ours(pid: int) -> bool:
    """The process runs with our work dir in its command line (its PID was not reused)."""
    try:
        return str(WORKDIR).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def clean_leftovers() -> bool:
    """Stop what an earlier run that was killed left running: its nodes (the processes
    in their mount namespaces and cgroups) and the processes its state files name."""
    nodes = sorted(WORKDIR.glob("node-*/node-state.json"))
    for state in nodes:
        with contextlib.suppress(Exception):
            down_from_state(state)
    pids: list[int] = []
    for path in (WORKDIR / "pids.json", WORKDIR / "cluster" / "state.json"):
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(path.read_text())
            pids += [int(p) for p in recorded.get("pids", recorded).values()]
    alive = [p for p in pids if _ours(p)]
    kill_pids(alive)
    return bool(nodes or alive)


def hold_lock() -> IO[bytes]:
    """One demo at a time: a second one would tear down the first one's work dir."""
    lock = (REPO / ".cache" / "demo.lock").open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("ERROR: another demo is running (it holds .cache/demo.lock)")
        raise SystemExit(1) from None
    return lock


def real_node_unavailable() -> str:
    """Why this machine cannot run real nodes ("" when it can)."""
    missing = missing_requirements()
    if missing:
        return "this machine lacks " + "; ".join(missing)
    if not shutil.which("buildah") or not shutil.which("debootstrap"):
        return "this machine lacks buildah and debootstrap (hack/install-deps.sh) for the image"
    try:
        ensure_containerd()
        ensure_binaries(("kubelet", "kubectl"))
    except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
        return f"containerd or the kubelet is unavailable ({exc})"
    return ""


def print_slices(cp: ControlPlane) -> None:
    say("\n-- ResourceSlices published by the plugins --")
    for s in get_json(cp, "resourceslices")["items"]:
        if s["spec"]["driver"] != DRIVER:
            continue
        for d in s["spec"].get("devices", []):
            fields = d.get("basic", d)  # resource.k8s.io/v1beta1 wraps them in `basic`
            cap = (fields.get("capacity") or {}).get("credits", {}).get("value", "?")
            multi = "shared by many pods" if fields.get("allowMultipleAllocations") else "exclusive"
            say(f"  {s['spec']['nodeName']:16} device {d['name']:8} credits {cap:>3}  ({multi})")


def claim_statuses(cp: ControlPlane) -> list[tuple[str, str]]:
    out = []
    for c in get_json(cp, "resourceclaims", "-n", EXAMPLES_NS)["items"]:
        for d in (c.get("status") or {}).get("devices") or []:
            ready = [x["status"] for x in d.get("conditions") or [] if x["type"] == "Ready"]
            out.append((c["metadata"]["name"], f"{d['device']} Ready={ready[0] if ready else '?'}"))
    return out


STATUS_DROPPED = "the API server dropped status.devices"


def print_claim_statuses(
    cp: ControlPlane, expected: int, controller_log: Callable[[], str]
) -> None:
    say("\n-- claim status written by the controller (status.devices) --")

    def dropped() -> str:
        log = controller_log()
        return next((line for line in log.splitlines() if STATUS_DROPPED in line), "")

    def settled() -> tuple[list[tuple[str, str]], str] | None:
        rows = claim_statuses(cp)
        said = dropped()
        return (rows, said) if len(rows) >= expected or said else None

    try:
        rows, said = wait("controller status", settled, 30)
    except TimeoutError as exc:
        say(f"  {exc}")
        rows, said = claim_statuses(cp), ""
    for name, text in sorted(rows):
        say(f"  {name:44} {text}")
    if said:
        message = json.loads(said).get("msg", said) if said.startswith("{") else said
        say(f"  none: the controller said: {message}")


def print_pending(cp: ControlPlane) -> None:
    pending = [
        p["metadata"]["name"]
        for p in get_json(cp, "pods", "-n", EXAMPLES_NS)["items"]
        if not p["spec"].get("nodeName")
    ]
    if pending:
        say(f"\npods still pending (no credits left): {', '.join(pending)}")


def print_credit_rows(rows: list[dict[str, Any]], nodes: dict[str, int], how: str) -> None:
    say(f"\n-- which pod got which credits on which node ({how}) --")
    for r in sorted(rows, key=lambda r: (r["node"], r["pod"])):
        say(
            f"  {r['node']:16} {r['pod']:38} {','.join(r['devices']):8} "
            f"credits {r['credits']}  {r['status']}"
        )
    for node, total in nodes.items():
        used = sum(r["credits"] for r in rows if r["node"] == node)
        say(f"  {node}: {used} of {total - 1} schedulable credits in use")


def print_cdi_spec(spec_file: Path, pod: str) -> None:
    spec = json.loads(spec_file.read_text())
    spec.pop("annotations", None)
    say(f"\n-- CDI spec the container runtime gets for {pod} ({spec_file.name}) --")
    say(json.dumps(spec, indent=2))


def allocated(claim: dict[str, Any]) -> tuple[list[str], int]:
    """The devices and credits of a claim's allocation."""
    results = ((claim.get("status") or {}).get("allocation") or {}).get("devices", {}).get(
        "results"
    ) or []
    credits = sum(int((r.get("consumedCapacity") or {}).get("credits", "1")) for r in results)
    return [r["device"] for r in results], credits


def start_controller(cp: ControlPlane) -> Process:
    ctl_kubeconfig = sa_kubeconfig(
        cp, "power-dra-controller", WORKDIR / "controller.kube.kubeconfig"
    )
    ctl = Process(
        "controller",
        [
            sys.executable,
            "-m",
            "controller",
            f"--kubeconfig={ctl_kubeconfig}",
            "--leader-elect=true",
            f"--leader-election-namespace={NAMESPACE}",
            "--metrics-bind-address=0",
        ],
        WORKDIR,
    )
    record_pid(ctl)
    say("controller running as ServiceAccount power-dra-controller (shipped RBAC)")
    return ctl


# --- the real nodes ----------------------------------------------------------------------


def pod_ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def pod_unschedulable(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(
        c["type"] == "PodScheduled"
        and c["status"] == "False"
        and c.get("reason") == "Unschedulable"
        for c in conds
    )


def pod_state(pod: dict[str, Any]) -> str:
    if pod_ready(pod):
        return "Running"
    for status in pod.get("status", {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting")
        if waiting:
            return f"ERROR {waiting.get('reason')}: {waiting.get('message', '')}"
    return f"ERROR pod {pod.get('status', {}).get('phase', '?')}"


def expected_pods(objs: list[dict[str, Any]]) -> int:
    return sum(
        1 if o["kind"] == "Pod" else int(o["spec"].get("replicas", 1))
        for o in objs
        if o["kind"] in ("Pod", "Deployment")
    )


def apply_examples(cp: ControlPlane, examples: list[dict[str, Any]]) -> None:
    """Apply the examples, the Deployments first: the three pods that must share one node
    then find one with enough credits free, whichever node the scheduler picks for them
    (were nx-4-credits there first, the smaller node could not take all three)."""
    api = Api(cp)
    apply_objects(cp, [o for o in examples if o["kind"] == "Namespace"])
    wait(
        "default ServiceAccount in nx-examples",
        lambda: api.get(f"/api/v1/namespaces/{EXAMPLES_NS}/serviceaccounts/default"),
        30,
    )
    workloads = [o for o in examples if o["kind"] not in ("Namespace", "Pod")]
    apply_objects(cp, workloads)

    def workload_pods_placed() -> bool:
        pods = api.request("GET", f"/api/v1/namespaces/{EXAMPLES_NS}/pods")["items"]
        placed = [p for p in pods if p["spec"].get("nodeName") or pod_unschedulable(p)]
        return len(placed) >= expected_pods(workloads)

    wait("the Deployments' pods scheduled", workload_pods_placed, 60, 0.1)
    apply_objects(cp, [o for o in examples if o["kind"] == "Pod"])


def wait_for_example_pods(api: Api, nodes: Sequence[RealNode], count: int) -> list[dict[str, Any]]:
    """Until `count` example pods exist and each is Ready or unschedulable."""

    def settled() -> list[dict[str, Any]] | None:
        for node in nodes:
            for proc in (node.kubelet, node.plugin.process if node.plugin else None):
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.name} of {node.name} exited:\n{proc.tail(40)}")
        pods: list[dict[str, Any]] = api.request("GET", f"/api/v1/namespaces/{EXAMPLES_NS}/pods")[
            "items"
        ]
        if len(pods) < count or not all(pod_ready(p) or pod_unschedulable(p) for p in pods):
            return None
        return pods

    try:
        pods: list[dict[str, Any]] = wait("example pods Running", settled, 120, 0.25)
    except TimeoutError:
        pods = api.request("GET", f"/api/v1/namespaces/{EXAMPLES_NS}/pods")["items"]
        for p in pods:
            say(f"  ERROR {p['metadata']['name']} not Running: {pod_state(p)}")
        events = api.request("GET", f"/api/v1/namespaces/{EXAMPLES_NS}/events")["items"]
        for e in events:
            if e.get("type") == "Warning":
                say(f"  event {e['reason']}: {e['involvedObject'].get('name')}: {e.get('message')}")
        raise
    return pods


def stop_real_nodes(nodes: Sequence[RealNode]) -> list[str]:
    """Stop the nodes, then compare the host with before each one started."""
    problems = []
    for node in nodes:
        try:
            node.stop()
        except Exception as exc:  # keep stopping the others
            problems.append(f"{node.name}: {exc}")
    for node in nodes:
        if node.host_before:
            problems += [f"{node.name}: {change}" for change in node.host_changes()]
    return problems


def run_real_nodes(cp: ControlPlane) -> None:
    api = Api(cp)
    allow_kubelet_api_access(cp)  # kubectl exec and logs: the API server calls the kubelet
    say("building the driver's image from the Containerfile (buildah, cached layers) ...")
    image = build_image()
    for line in image.figures().splitlines():
        say(f"  {line}")
    nodes = [
        RealNode(cp, WORKDIR / name, name, total_credits=credits)
        for name, credits in REAL_NODES.items()
    ]
    processes: list[Process] = []
    problems: list[str] = []
    try:
        say(
            f"starting real nodes {', '.join(REAL_NODES)}: kubelet + containerd (CDI), each "
            "in a private mount namespace,\n  fake Power10 sysfs (credits "
            + ", ".join(f"{n}: {c}" for n, c in REAL_NODES.items())
            + ") and /dev/crypto/nx-gzip; the image imported into containerd ..."
        )
        started = time.monotonic()
        with ThreadPoolExecutor(len(nodes)) as pool:
            for future in [
                pool.submit(node.start, with_plugin=False, images=[image.tarball]) for node in nodes
            ]:
                future.result()
        machine = OneMachine.for_node(cp, nodes[0], image.name)
        overlay = write_overlay(
            WORKDIR / "overlay", [os.path.relpath(BASE, WORKDIR / "overlay")], machine
        )
        # Two nodes on one host network: one plugin DaemonSet per node (own health port).
        objs = per_node_daemonsets(render(cp, overlay), [n.name for n in nodes])
        applied_at = install_rendered(cp, objs)
        say(
            "installed manifests/base (server-side apply of a generated overlay): namespace, "
            "RBAC, plugin DaemonSet,\n  controller Deployment, slice admission policy; the "
            "one-machine changes: image "
            f"{image.name} (pull Never),\n  hostNetwork, KUBERNETES_SERVICE_HOST/PORT = "
            f"{machine.api_host}:{machine.api_port}, free health/metrics ports, the DaemonSet's"
            f"\n  arch = {machine.arch}, /sys hostPath = the node's fake tree, controller "
            f"replicas 1 on {nodes[0].name};\n  and as both nodes share this machine's network, "
            "the DaemonSet split into one per node (each its own health port)"
        )
        for node in nodes:
            pod = wait_running(cp, node, PLUGIN_LABEL)
            wait_plugin_registered(cp, pod)
            wait(f"the slice of {node.name}", node.slices, 60, 0.05)
            say(
                f"  {node.name}: Ready in {time.monotonic() - started:.0f}s; plugin registered "
                f"with the kubelet (DaemonSet pod {pod['metadata']['name']}, from the image)"
            )
        say(
            f"  DaemonSet applied -> slices of both nodes visible in {time.monotonic() - applied_at:.1f}s"
        )
        controller = wait_running(cp, nodes[0], CONTROLLER_LABEL)
        say(f"  controller pod {controller['metadata']['name']} Ready (leader election on)")
        say(
            "  RSS in their containers: plugin "
            f"{container_rss_mib(nodes[0], 'power-dra-kubeletplugin'):.1f} MiB, controller "
            f"{container_rss_mib(nodes[0], 'power-dra-controller'):.1f} MiB"
        )
        print_slices(cp)

        examples = render(cp, cp.release.examples)
        for obj in examples:
            spec = pod_spec(obj)
            if spec is not None:
                for_this_machine(spec, BUSYBOX_IMAGE)
                spec["automountServiceAccountToken"] = False
                spec["enableServiceLinks"] = False
        apply_examples(cp, examples)
        say(
            f"\napplied {cp.release.examples.relative_to(REPO)} (pods with ResourceClaimTemplates; "
            "the Deployments "
            f"first),\n  for this machine: image {BUSYBOX_IMAGE}, imagePullPolicy Never, "
            "hostNetwork: true"
        )
        pods = wait_for_example_pods(api, nodes, expected_pods(examples))
        claims = {
            c["metadata"]["name"]: c
            for c in api.request(
                "GET", resource_path(cp, f"namespaces/{EXAMPLES_NS}/resourceclaims")
            )["items"]
        }
        rows = []
        for pod in pods:
            node = pod["spec"].get("nodeName")
            if not node:
                continue
            for ref in pod["status"].get("resourceClaimStatuses") or []:
                claim = claims.get(ref.get("resourceClaimName") or "")
                if claim is None:
                    continue
                devices, credits = allocated(claim)
                rows.append(
                    {
                        "pod": pod["metadata"]["name"],
                        "node": node,
                        "uid": claim["metadata"]["uid"],
                        "devices": devices,
                        "credits": credits,
                        "status": pod_state(pod),
                    }
                )
        print_credit_rows(
            rows, REAL_NODES, "claims' allocation; the kubelets prepared them and started the pods"
        )

        shown = next(
            (r for r in rows if r["pod"] == "nx-configured" and r["status"] == "Running"),
            next((r for r in rows if r["status"] == "Running"), None),
        )
        if shown is not None:
            pod, node = shown["pod"], shown["node"]
            say(f'\n-- inside {pod} on {node}: kubectl exec {pod} -- sh -c "{EXEC_SCRIPT}" --')
            out = cp.kubectl(
                "exec", "-n", EXAMPLES_NS, shown["pod"], "--", "sh", "-c", EXEC_SCRIPT
            ).stdout
            for line in out.splitlines():
                say(f"  {line}")
            node_obj = next(n for n in nodes if n.name == shown["node"])
            print_cdi_spec(node_obj.cdi_dir / spec_file_name(shown["uid"]), shown["pod"])
        else:
            say("\nERROR: no example pod is Running")

        print_claim_statuses(cp, len(rows), lambda: pod_log(cp, controller))
        print_pending(cp)
        say("\ndemo done: " + ("left running (--keep)" if Mode.keep else "tearing down"))
    finally:
        problems = [] if Mode.keep else stop_real_nodes(nodes)
        for proc in processes if not Mode.keep else []:
            proc.stop()
        if problems:
            say(
                "ERROR: the real nodes changed the host or did not stop:\n  "
                + "\n  ".join(problems)
            )
    if problems:
        raise SystemExit(1)
    if Mode.keep:
        return
    say(
        f"real nodes {', '.join(REAL_NODES)} stopped; the host is as before "
        "(iptables, links, mounts, cgroups, kubelet/containerd/CNI/CDI paths, sysctls)"
    )


# --- fake nodes: plugin processes, the demo plays the kubelet ------------------------------


def prepare_pod_claims(
    cp: ControlPlane, plugins: dict[str, PluginProcess], apis: grpc_stubs.KubeletApis
) -> list[dict[str, Any]]:
    """What the kubelet does before starting each pod: NodePrepareResources for its claims."""
    pb2 = apis.dra_v1.pb2
    rows = []
    claims = {
        (c["metadata"]["namespace"], c["metadata"]["name"]): c
        for c in get_json(cp, "resourceclaims", "-A")["items"]
    }
    for pod in get_json(cp, "pods", "-n", EXAMPLES_NS)["items"]:
        node = pod["spec"].get("nodeName")
        if node not in plugins:
            continue
        ns = pod["metadata"]["namespace"]
        names = [s.get("resourceClaimName") for s in pod["status"].get("resourceClaimStatuses", [])]
        refs = [claims[(ns, n)] for n in names if n and (ns, n) in claims]
        if not refs:
            continue
        with grpc.insecure_channel(f"unix:{plugins[node].dra_socket}") as channel:
            stub = apis.dra_v1.grpc.DRAPluginStub(channel)
            req = pb2.NodePrepareResourcesRequest(
                claims=[
                    pb2.Claim(namespace=ns, name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in refs
                ]
            )
            resp = stub.NodePrepareResources(req, timeout=45)
        for c in refs:
            answer = resp.claims[c["metadata"]["uid"]]
            devices, credits = allocated(c)
            rows.append(
                {
                    "pod": pod["metadata"]["name"],
                    "node": node,
                    "claim": c["metadata"]["name"],
                    "uid": c["metadata"]["uid"],
                    "devices": devices,
                    "credits": credits,
                    "cdi": [i for d in answer.devices for i in d.cdi_device_ids],
                    "status": "prepared" if not answer.error else f"ERROR {answer.error}",
                }
            )
    return rows


def run_fake_nodes(cp: ControlPlane) -> None:
    for node in FAKE_NODES:
        cp.create_node(node)
    say(f"  fake Power nodes (API objects): {', '.join(FAKE_NODES)}")
    cp.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "base"))
    say(
        "installed manifests/base (server-side apply): namespace, RBAC, DeviceClass, "
        "plugin DaemonSet, controller Deployment, slice admission policy"
    )
    processes = [start_controller(cp)]
    plugins: dict[str, PluginProcess] = {}
    try:
        for node, credits in FAKE_NODES.items():
            pod = wait(f"plugin pod scheduled on {node}", lambda n=node: plugin_pod_on(cp, n))
            plugins[node] = PluginProcess(
                cp,
                node,
                WORKDIR / node,
                total_credits=credits,
                kubeconfig=bound_plugin_kubeconfig(cp, node, pod),
            ).start()
            record_pid(plugins[node].process)
        for plugin in plugins.values():
            plugin.wait_for_slices(30)
        print_slices(cp)

        apply_examples(cp, render(cp, cp.release.examples))
        say(
            f"\napplied {cp.release.examples.relative_to(REPO)} (pods with ResourceClaimTemplates; "
            "the Deployments first)"
        )

        def all_bound() -> bool:
            pods = get_json(cp, "pods", "-n", EXAMPLES_NS)["items"]
            return bool(pods) and all(p["spec"].get("nodeName") for p in pods)

        wait("example pods scheduled", all_bound)
        rows = prepare_pod_claims(cp, plugins, grpc_stubs.load())
        print_credit_rows(rows, FAKE_NODES, "NodePrepareResources over gRPC")
        if rows:
            first = rows[0]
            spec_file = plugins[first["node"]].cdi_root / spec_file_name(first["uid"])
            print_cdi_spec(spec_file, first["pod"])
        controller_log = processes[0].log_path
        print_claim_statuses(
            cp,
            len(rows),
            lambda: controller_log.read_text(errors="replace") if controller_log.exists() else "",
        )
        print_pending(cp)
        say("\ndemo done: " + ("left running (--keep)" if Mode.keep else "tearing down"))
    finally:
        for plugin in plugins.values() if not Mode.keep else []:
            plugin.stop()
        for proc in processes if not Mode.keep else []:
            proc.stop()


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # run the `finally` blocks that tear down


def run(fake_nodes: bool) -> None:
    started = time.monotonic()
    cleaned = clean_leftovers()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    say("== power-dra-driver demo: NX-gzip shared by many pods on Power10 nodes ==")
    if cleaned:
        say("(stopped what an earlier demo, killed midway, left running)")
    why_not = "--fake-nodes given" if fake_nodes else real_node_unavailable()
    if why_not:
        say(f"real node skipped: {why_not}; the demo plays the kubelet's gRPC part instead")
    say("starting etcd, kube-apiserver, kube-scheduler, kube-controller-manager on loopback ...")
    cp = ControlPlane(WORKDIR / "cluster").start()
    try:
        say(
            f"  API server {cp.server} (Kubernetes {cp.version}, resource.k8s.io/"
            f"{cp.release.resource_version})"
        )
        if why_not:
            run_fake_nodes(cp)
        else:
            run_real_nodes(cp)
    finally:
        if not Mode.keep:
            cp.stop()
    if Mode.keep:
        say(f"\nthe cluster keeps running: export KUBECONFIG={cp.kubeconfig}")
        say(f"kubectl: {cp.bin_dir / 'kubectl'}; stop everything with: make dev-teardown")
        return
    say(f"all stopped; the demo took {time.monotonic() - started:.0f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.demo")
    parser.add_argument(
        "--fake-nodes",
        action="store_true",
        help="no real nodes: plugin processes for Node objects, the demo plays the kubelet",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster, nodes, plugins and controller running (make dev-setup)",
    )
    parser.add_argument(
        "--down",
        action="store_true",
        help="stop what an earlier --keep run left running (make dev-teardown)",
    )
    args = parser.parse_args(argv)
    if args.down:
        with hold_lock():
            stopped = clean_leftovers()
        say("stopped the development cluster" if stopped else "nothing was running")
        return
    Mode.keep = args.keep
    signal.signal(signal.SIGTERM, _sigterm)
    (REPO / ".cache").mkdir(exist_ok=True)
    with hold_lock():
        run(args.fake_nodes)


if __name__ == "__main__":
    main()
