# SPDX-License-Identifier: Apache-2.0
"""`make demo`: the driver's main job on an embedded local setup.

Starts the real control plane (etcd, kube-apiserver, kube-scheduler,
kube-controller-manager), installs `manifests/base` with server-side apply,
runs the controller and one plugin per fake Power10 LPAR node as processes
(with their own ServiceAccount tokens and the shipped RBAC), applies
`manifests/examples`, plays the kubelet's part over gRPC (grpcio) for every
pod bound to those nodes, and prints what happened. Then tears it all down.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from tests import grpc_stubs
from tests.harness.cluster import REPO, ControlPlane, Process, write_kubeconfig
from tests.harness.plugin import DRIVER, PluginProcess

NODES = {"power10-lpar-a": 10, "power10-lpar-b": 6}  # node -> NX-gzip default credits
NAMESPACE = "power-dra-driver"
WORKDIR = REPO / ".cache" / "demo"


def say(text: str = "") -> None:
    print(text, flush=True)


def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def sa_kubeconfig(cp: ControlPlane, sa: str, path: Path, *extra: str) -> str:
    """A kubeconfig holding a token of one of our ServiceAccounts (the shipped RBAC applies)."""
    token = cp.kubectl("create", "token", sa, "-n", NAMESPACE, "--duration=1h", *extra).stdout
    return str(write_kubeconfig(path, cp.server, cp.ca_file, token.strip(), sa))


def wait(what: str, pred: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"demo: {what} did not happen within {timeout:.0f}s")


def plugin_pod_on(cp: ControlPlane, node: str) -> str | None:
    pods = get_json(cp, "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=kubeletplugin")
    for pod in pods["items"]:
        if pod["spec"].get("nodeName") == node:
            return str(pod["metadata"]["name"])
    return None


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
    for pod in get_json(cp, "pods", "-n", "nx-examples")["items"]:
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
            results = c["status"]["allocation"]["devices"]["results"]
            credits = sum(
                int((r.get("consumedCapacity") or {}).get("credits", "1")) for r in results
            )
            rows.append(
                {
                    "pod": pod["metadata"]["name"],
                    "node": node,
                    "claim": c["metadata"]["name"],
                    "uid": c["metadata"]["uid"],
                    "devices": [r["device"] for r in results],
                    "credits": credits,
                    "cdi": [i for d in answer.devices for i in d.cdi_device_ids],
                    "error": answer.error,
                }
            )
    return rows


def main() -> None:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    say("== power-dra-driver demo: NX-gzip shared by many pods on Power10 nodes ==")
    say("starting etcd, kube-apiserver, kube-scheduler, kube-controller-manager on loopback ...")
    cp = ControlPlane(WORKDIR / "cluster").start()
    processes: list[Process] = []
    plugins: dict[str, PluginProcess] = {}
    try:
        say(f"  API server {cp.server} (Kubernetes v1.36)")
        for node in NODES:
            cp.create_node(node)
        say(f"  fake Power nodes (API objects): {', '.join(NODES)}")
        cp.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "base"))
        say(
            "installed manifests/base (server-side apply): namespace, RBAC, DeviceClass, "
            "plugin DaemonSet, controller Deployment, slice admission policy"
        )

        ctl_kubeconfig = sa_kubeconfig(
            cp, "power-dra-controller", WORKDIR / "controller.kubeconfig"
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
        processes.append(ctl)
        say("controller running as ServiceAccount power-dra-controller (shipped RBAC)")

        for node, credits in NODES.items():
            # Like the DaemonSet's pod: a token bound to the plugin pod on that node, so the
            # admission policy lets it write only that node's slice.
            pod = wait(f"plugin pod scheduled on {node}", lambda n=node: plugin_pod_on(cp, n))
            kubeconfig = sa_kubeconfig(
                cp,
                "power-dra-kubeletplugin",
                WORKDIR / f"plugin-{node}.kubeconfig",
                "--bound-object-kind=Pod",
                f"--bound-object-name={pod}",
            )
            plugins[node] = PluginProcess(
                cp, node, WORKDIR / node, total_credits=credits, kubeconfig=kubeconfig
            ).start()
        for plugin in plugins.values():
            plugin.wait_for_slices(30)
        say("\n-- ResourceSlices published by the plugins --")
        for s in get_json(cp, "resourceslices")["items"]:
            if s["spec"]["driver"] != DRIVER:
                continue
            for d in s["spec"].get("devices", []):
                cap = (d.get("capacity") or {}).get("credits", {}).get("value", "?")
                multi = "shared by many pods" if d.get("allowMultipleAllocations") else "exclusive"
                say(
                    f"  {s['spec']['nodeName']:16} device {d['name']:8} credits {cap:>3}  ({multi})"
                )

        cp.kubectl("apply", "--server-side", "-k", str(REPO / "manifests" / "examples"))
        say("\napplied manifests/examples (pods with ResourceClaimTemplates)")

        def all_bound() -> bool:
            pods = get_json(cp, "pods", "-n", "nx-examples")["items"]
            return bool(pods) and all(p["spec"].get("nodeName") for p in pods)

        wait("example pods scheduled", all_bound)
        rows = prepare_pod_claims(cp, plugins, grpc_stubs.load())
        say("\n-- which pod got which credits on which node (NodePrepareResources over gRPC) --")
        for r in sorted(rows, key=lambda r: (r["node"], r["pod"])):
            status = "prepared" if not r["error"] else f"ERROR {r['error']}"
            say(
                f"  {r['node']:16} {r['pod']:38} {','.join(r['devices']):8} "
                f"credits {r['credits']}  {status}"
            )
        for node, total in NODES.items():
            used = sum(r["credits"] for r in rows if r["node"] == node)
            say(f"  {node}: {used} of {total - 1} schedulable credits in use")

        if rows:
            first = rows[0]
            spec_file = next(plugins[first["node"]].cdi_root.glob(f"*{first['uid']}*.json"))
            spec = json.loads(spec_file.read_text())
            spec.pop("annotations", None)
            say(
                f"\n-- CDI spec the container runtime gets for {first['pod']} ({spec_file.name}) --"
            )
            say(json.dumps(spec, indent=2))

        def statuses() -> list[tuple[str, str]]:
            out = []
            for c in get_json(cp, "resourceclaims", "-n", "nx-examples")["items"]:
                for d in (c.get("status") or {}).get("devices") or []:
                    ready = [x["status"] for x in d.get("conditions") or [] if x["type"] == "Ready"]
                    out.append(
                        (c["metadata"]["name"], f"{d['device']} Ready={ready[0] if ready else '?'}")
                    )
            return out

        say("\n-- claim status written by the controller (status.devices) --")
        try:
            for name, text in wait("controller status", statuses, 30):
                say(f"  {name:44} {text}")
        except TimeoutError as exc:
            say(f"  {exc}")
        pending = [
            p["metadata"]["name"]
            for p in get_json(cp, "pods", "-n", "nx-examples")["items"]
            if not p["spec"].get("nodeName")
        ]
        if pending:
            say(f"\npods still pending (no credits left): {', '.join(pending)}")
        say("\ndemo done: tearing down")
    finally:
        for plugin in plugins.values():
            plugin.stop()
        for proc in processes:
            proc.stop()
        cp.stop()


if __name__ == "__main__":
    main()
