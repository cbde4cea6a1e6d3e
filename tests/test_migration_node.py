# SPDX-License-Identifier: Apache-2.0
"""Taking a real node over from IBM's Go driver, with its pods still running.

A stand-in for IBM's driver (tests/ibm_driver_standin.py) publishes IBM's
slice with the node's credentials, the real scheduler allocates its device
`cryptonxgzip`, the real kubelet asks the stand-in to prepare, and the
stand-in writes IBM's files as IBM's driver does (state file with the kubelet
checkpoint manager's checksum, CDI specs in YAML); containerd starts the pod
with IBM's CDI IDs. Then the stand-in goes away and our plugin starts in its
place, and the node goes through what a node goes through: a new pod, a
kubelet restart, a reboot (sandboxes re-created), the adopted pod's deletion.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.claim_status import EVENT_REASON_INEFFECTIVE, ClaimStatusController
from controller.kube.client import ApiClient
from controller.kube.kubeconfig import load_cluster_config
from controller.kube.resources import EVENTS
from kubeletplugin.ibm_state import (
    IBM_COMMON_SPEC_FILE,
    IBM_DEVICE_NAME,
    decode_ibm_checkpoint,
    ibm_cdi_device_ids,
    ibm_claim_spec_file,
)
from tests.dra_objects import ready_for_real_nodes, real_node_pod
from tests.harness.cluster import ControlPlane
from tests.harness.node import (
    RealNode,
    wait_for,
)
from tests.harness.plugin import DRIVER
from tests.ibm_driver_standin import IbmDriverStandin
from tests.metrics_text import sample

pytestmark = [pytest.mark.cluster]

NODE = "node-3"
NS = "nx-migration"
IBM_CONFIG_TEMPLATE = "nx-gzip-ibm-config"
WORKLOAD = "trap 'exit 0' TERM; sleep 2147483647 & wait"
IBM_NX_CONFIG = {
    "apiVersion": "device.power.ibm.com/v1alpha1",
    "kind": "NxConfig",
    "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
}


def _template() -> dict[str, Any]:
    """A claim template as IBM's users wrote them: IBM's NxConfig with `sharing`."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": IBM_CONFIG_TEMPLATE, "namespace": NS},
        "spec": {
            "spec": {
                "devices": {
                    "requests": [
                        {"name": "crypto-nx-gzip", "exactly": {"deviceClassName": DRIVER}}
                    ],
                    "config": [{"opaque": {"driver": DRIVER, "parameters": IBM_NX_CONFIG}}],
                }
            }
        },
    }


@pytest.fixture(scope="module")
def ibm_node(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RealNode, IbmDriverStandin]]:
    """A real node whose NX-gzip is served by IBM's driver (the stand-in), registered."""
    cp = control_plane
    ready_for_real_nodes(cp, NS)
    cp.apply([_template()])
    node = RealNode(cp, tmp_path_factory.mktemp("migration-node"), NODE)
    node.start(with_plugin=False)
    ibm = IbmDriverStandin(node)
    try:
        ibm.start()
        ibm.wait_registered()
        yield node, ibm
    finally:
        ibm.stop()
        node.tear_down(NS)


# --- helpers ---------------------------------------------------------------------------------


def create_pod(node: RealNode, name: str) -> None:
    pod = real_node_pod(NS, name, NODE, IBM_CONFIG_TEMPLATE, WORKLOAD)
    node.cp.kubectl("create", "-f", "-", input=json.dumps(pod))


def get_pod(node: RealNode, name: str) -> dict[str, Any] | None:
    pod: dict[str, Any] | None = node.api.get(f"/api/v1/namespaces/{NS}/pods/{name}")
    return pod


def ready(node: RealNode, name: str) -> bool:
    conds = (get_pod(node, name) or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def container_id(node: RealNode, name: str) -> str:
    statuses = (get_pod(node, name) or {}).get("status", {}).get("containerStatuses") or []
    return str(statuses[0].get("containerID", "")) if statuses else ""


def wait_running(node: RealNode, name: str, timeout: float = 60.0) -> None:
    try:
        wait_for(f"pod {name} Ready", lambda: ready(node, name), timeout, 0.1)
    except TimeoutError:
        status = json.dumps((get_pod(node, name) or {}).get("status"), indent=1)[:3000]
        raise TimeoutError(f"pod {name} not Ready: {status}\n{events(node)}") from None


def claim_of(node: RealNode, name: str) -> dict[str, Any]:
    pod = get_pod(node, name)
    assert pod is not None
    (status,) = pod["status"]["resourceClaimStatuses"]
    claim: dict[str, Any] = node.api.get(
        f"/apis/resource.k8s.io/v1/namespaces/{NS}/resourceclaims/{status['resourceClaimName']}"
    )
    return claim


def allocated_device(claim: dict[str, Any]) -> str:
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    return str(result["device"])


def events(node: RealNode, reason: str | None = None) -> list[str]:
    items = node.api.request("GET", f"/api/v1/namespaces/{NS}/events")["items"]
    return [
        f"{e['reason']}: {e['involvedObject'].get('name')}: {e.get('message', '')}"
        for e in items
        if reason is None or e["reason"] == reason
    ]


def exec_in(node: RealNode, name: str, script: str) -> str:
    return node.cp.kubectl("exec", "-n", NS, name, "--", "sh", "-c", script).stdout


def slice_credits(node: RealNode) -> dict[str, int]:
    """Devices of the node's slices of our driver name, with their credits (0: none)."""
    found = {}
    for s in node.slices():
        for d in s["spec"].get("devices") or []:
            found[d["name"]] = int((d.get("capacity") or {}).get("credits", {}).get("value", 0))
    return found


def ibm_files(node: RealNode) -> list[str]:
    return [n for n in node.cdi_specs() if n.endswith(".yaml")]


def kubelet_prepared_since(node: RealNode, offset: int, uid: str) -> bool:
    return any(
        "Calling NodePrepareResources rpc" in line and uid in line
        for line in node.kubelet_log()[offset:].splitlines()
    )


def prepare_failures(node: RealNode) -> list[str]:
    bad = [e for e in events(node, "FailedPrepareDynamicResources")]
    for plugin in node.plugins:
        bad += [line for line in plugin.log().splitlines() if "prepare failed" in line]
    return [b for b in bad if "no relationship found between node" not in b]


def kill_sandbox(pod_uid: str) -> int:
    """SIGKILL the pod's sandbox process (the harness's pause image traps TERM and INT)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroup = (proc / "cgroup").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"pod{pod_uid}" in cgroup and b"TERM INT" in cmdline and cmdline.startswith(b"sh"):
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    return killed


async def _ineffective_config_events(cp: ControlPlane, claims: set[str]) -> list[dict[str, Any]]:
    """Run the controller's claim-status reconciler until it reported `claims`."""
    config = await load_cluster_config(cp.kubeconfig)
    async with ApiClient(config) as client:
        version = await client.resource_api_version()
        controller = ClaimStatusController(client, version, reporting_instance="migration-test")

        async def reported() -> list[dict[str, Any]]:
            listing = await client.list(EVENTS, NS)
            return [
                e
                for e in listing["items"]
                if e.get("reason") == EVENT_REASON_INEFFECTIVE
                and e["regarding"].get("name") in claims
            ]

        async with anyio.create_task_group() as tg:
            await tg.start(controller.run)
            with anyio.fail_after(30):
                while len(found := await reported()) < len(claims):
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        return found


# --- the take-over ---------------------------------------------------------------------------


def test_our_plugin_takes_over_ibm_pods_and_leaves_nothing_of_ibm(
    ibm_node: tuple[RealNode, IbmDriverStandin],
) -> None:
    node, ibm = ibm_node

    # IBM's driver runs a pod: the scheduler allocated IBM's device, its files are on disk.
    create_pod(node, "ibm-pod")
    wait_running(node, "ibm-pod")
    claim = claim_of(node, "ibm-pod")
    uid = claim["metadata"]["uid"]
    assert allocated_device(claim) == IBM_DEVICE_NAME
    assert set(decode_ibm_checkpoint(ibm.checkpoint.read_bytes())) == {uid}  # checksum holds
    assert ibm_files(node) == sorted([IBM_COMMON_SPEC_FILE, ibm_claim_spec_file(uid)])
    out = exec_in(node, "ibm-pod", "ls -l /dev/crypto/nx-gzip; env")
    assert "crw" in out and "NX_DEVICE_CLAIM=added" in out, out
    container = container_id(node, "ibm-pod")

    # IBM's DaemonSet pod goes, ours comes.
    ibm.stop()
    plugin = node.start_plugin()
    assert "written by IBM's driver: adopted its 1 prepared claims" in plugin.log()
    # 4 credits, 1 reserved, 1 held by the adopted claim: IBM's slice gives way to ours.
    wait_for("our slice in place of IBM's", lambda: slice_credits(node) == {"nx-gzip": 2}, 15)
    assert uid in node.checkpoint_claims()  # our format now
    assert ibm_files(node) == sorted([IBM_COMMON_SPEC_FILE, ibm_claim_spec_file(uid)])
    assert ready(node, "ibm-pod") and container_id(node, "ibm-pod") == container
    assert sample(plugin.metrics(), "power_dra_plugin_credits_allocated", node=NODE) == 1

    # A claim template written for IBM's driver keeps working on our device.
    create_pod(node, "new-pod")
    wait_running(node, "new-pod")
    new_claim = claim_of(node, "new-pod")
    assert allocated_device(new_claim) == "nx-gzip"
    assert "NX_DRA_CREDITS=1" in exec_in(node, "new-pod", "env")
    found = anyio.run(
        _ineffective_config_events,
        node.cp,
        {claim["metadata"]["name"], new_claim["metadata"]["name"]},
    )
    for event in found:
        assert event["type"] == "Warning"
        assert "parameters.sharing (TimeSlicing, interval Long) has no effect" in event["note"]
        assert "credits" in event["note"]

    # A kubelet restart: the adopted pod keeps running (kubelets >= 1.37 prepare a claim
    # only when they create a sandbox; older ones prepare it again now, through our plugin).
    node.restart_kubelet()
    node.wait_ready()
    assert ready(node, "ibm-pod") and container_id(node, "ibm-pod") == container

    # Its sandbox dies: the kubelet (whose claim cache is new since its restart) prepares
    # the adopted claim through our plugin and starts the pod again on IBM's CDI IDs.
    offset = len(node.kubelet_log())
    pod_uid = (get_pod(node, "ibm-pod") or {})["metadata"]["uid"]
    assert kill_sandbox(pod_uid) == 1
    wait_for("adopted claim prepared again", lambda: kubelet_prepared_since(node, offset, uid), 60)
    wait_for(
        "adopted pod running in a new sandbox",
        lambda: container_id(node, "ibm-pod") not in ("", container) and ready(node, "ibm-pod"),
        60,
        0.1,
    )
    container = container_id(node, "ibm-pod")
    assert "NX_DEVICE_CLAIM=added" in exec_in(node, "ibm-pod", "env")

    # A reboot: IBM's specs (a tmpfs) come back from our state, the sandbox is re-created.
    offset = len(node.kubelet_log())
    node.reboot()
    wait_for(
        "IBM's specs re-created",
        lambda: ibm_files(node) == sorted([IBM_COMMON_SPEC_FILE, ibm_claim_spec_file(uid)]),
        15,
    )
    node.wait_ready()
    wait_for("adopted claim prepared again", lambda: kubelet_prepared_since(node, offset, uid), 30)
    wait_for(
        "adopted pod running again",
        lambda: container_id(node, "ibm-pod") not in ("", container) and ready(node, "ibm-pod"),
        60,
        0.1,
    )
    out = exec_in(node, "ibm-pod", "ls -l /dev/crypto/nx-gzip; env")
    assert "crw" in out and "NX_DEVICE_CLAIM=added" in out, out
    assert node.plugin is not None
    assert sample(node.plugin.metrics(), "power_dra_plugin_credits_allocated", node=NODE) == 2
    assert node.checkpoint_claims()[uid]["devices"][0]["cdiDeviceIds"] == list(
        ibm_cdi_device_ids(uid)
    )

    # The adopted pod goes: our plugin unprepares it and IBM's last files go with it.
    node.cp.kubectl("delete", "pod", "-n", NS, "ibm-pod", "--wait=false")
    wait_for(
        "adopted claim unprepared",
        lambda: uid not in node.checkpoint_claims() and not ibm_files(node),
        60,
    )
    wait_for("its credit back in our slice", lambda: slice_credits(node) == {"nx-gzip": 3}, 15)
    assert not prepare_failures(node), prepare_failures(node)
    assert "Calling NodeUnprepareResource" in node.kubelet_log()[offset:]
    assert ready(node, "new-pod")
