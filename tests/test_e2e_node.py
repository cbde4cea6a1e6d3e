# SPDX-License-Identifier: Apache-2.0
"""End to end on a real node: a kubelet and containerd (with CDI) run pods with
NX-gzip claims that our plugin prepares, next to the session's control plane.

The node (tests/harness/node.py) lives in a private mount namespace; the fake
NX-gzip device node is `c 1 3` and the sysfs tree is fake (4 credits, so 3
are published: one is reserved). Teardown asserts the host is as it was.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from kubeletplugin.cdi import spec_file_name
from tests.dra_objects import ready_for_real_nodes, real_node_pod
from tests.harness.cluster import ControlPlane, yaml_stream
from tests.harness.node import (
    Api,
    RealNode,
    wait_for,
)
from tests.harness.plugin import DRIVER
from tests.metrics_text import sample

pytestmark = [pytest.mark.cluster]

NS = "nx-e2e"
PLAIN = "nx-gzip"
CONFIGURED = "nx-gzip-verbose"
FIRST_AVAILABLE = "nx-gzip-first-available"
# PID 1 ignores SIGTERM without a handler: trap it so pods stop at once.
WORKLOAD = (
    "trap 'exit 0' TERM; ls -l /dev/crypto/nx-gzip && env | grep '^NX_' ; sleep 2147483647 & wait"
)


# --- fixtures ------------------------------------------------------------------------------


def _templates() -> list[dict[str, Any]]:
    def template(name: str, config: list[dict[str, Any]]) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "devices": {
                "requests": [{"name": "nx", "exactly": {"deviceClassName": DRIVER}}],
                **({"config": config} if config else {}),
            }
        }
        return {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"spec": spec},
        }

    nx_config = {
        "requests": ["nx"],
        "opaque": {
            "driver": DRIVER,
            "parameters": {
                "apiVersion": f"{DRIVER}/v1alpha1",
                "kind": "NxConfig",
                "typeSelector": "nx",
                "verbose": 1,
            },
        },
    }
    prioritized = template(FIRST_AVAILABLE, [])
    prioritized["spec"]["spec"]["devices"]["requests"] = [first_available_request()]
    return [template(PLAIN, []), template(CONFIGURED, [nx_config]), prioritized]


def first_available_request() -> dict[str, Any]:
    """Request `nx`: all the node's credits and more if possible, else one credit."""
    return {
        "name": "nx",
        "firstAvailable": [
            {
                "name": "big",
                "deviceClassName": DRIVER,
                "capacity": {"requests": {"credits": "100000"}},
            },
            {"name": "small", "deviceClassName": DRIVER},
        ],
    }


@pytest.fixture(scope="module")
def real_node(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealNode]:
    """One real node (`node-0`) joined to the session's control plane, with our
    DeviceClass, a namespace and claim templates; the host is checked after it."""
    cp = control_plane
    ready_for_real_nodes(cp, NS)
    cp.apply(_templates())
    node = RealNode(cp, tmp_path_factory.mktemp("real-node")).start()
    try:
        yield node
    finally:
        node.tear_down(NS)


@pytest.fixture
def node(real_node: RealNode) -> Iterator[RealNode]:
    """The real node; the test's pods are deleted (and gone) afterwards."""
    yield real_node
    delete_pods(real_node, [p["metadata"]["name"] for p in list_pods(real_node)])


# --- helpers ---------------------------------------------------------------------------------


def create_pods(
    node: RealNode, *names: str, template: str = PLAIN, request: str | None = None
) -> None:
    doc = yaml_stream(
        [real_node_pod(NS, n, "node-0", template, WORKLOAD, request=request) for n in names]
    )
    node.cp.kubectl("create", "-f", "-", input=doc)


def list_pods(node: RealNode) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = node.api.request("GET", f"/api/v1/namespaces/{NS}/pods")["items"]
    return items


def get_pod(node: RealNode, name: str) -> dict[str, Any] | None:
    pod: dict[str, Any] | None = node.api.get(f"/api/v1/namespaces/{NS}/pods/{name}")
    return pod


def _ready(pod: dict[str, Any] | None) -> bool:
    conds = (pod or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def wait_running(node: RealNode, *names: str, timeout: float = 60.0) -> None:
    def all_ready() -> bool:
        for proc in (node.kubelet, node.plugin.process if node.plugin else None):
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail(40)}")
        return all(_ready(get_pod(node, n)) for n in names)

    try:
        wait_for(f"pods {names} Ready", all_ready, timeout, 0.1)
    except TimeoutError:
        states = {n: (get_pod(node, n) or {}).get("status") for n in names}
        raise TimeoutError(
            f"pods not Ready: {json.dumps(states, indent=1)[:3000]}\n{events(node)}"
        ) from None


def delete_pods(node: RealNode, names: list[str], timeout: float = 60.0) -> None:
    if not names:
        return
    # Without a kubelet (a test broke it) nobody confirms the deletion: force it.
    force = () if node.kubelet and node.kubelet.alive() else ("--force", "--grace-period=0")
    node.cp.kubectl(
        "delete", "pods", "-n", NS, "--wait=false", "--ignore-not-found", *force, *names
    )
    wait_for(f"pods {names} gone", lambda: not any(get_pod(node, n) for n in names), timeout, 0.1)
    # Their generated claims go too, which frees the node's credits.
    wait_for("claims gone", lambda: not claims(node), timeout, 0.1)


def claims(node: RealNode) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = node.api.request(
        "GET", f"/apis/resource.k8s.io/v1/namespaces/{NS}/resourceclaims"
    )["items"]
    return items


def claim_of(node: RealNode, pod_name: str) -> dict[str, Any]:
    pod = get_pod(node, pod_name)
    assert pod is not None
    statuses = pod["status"].get("resourceClaimStatuses") or []
    assert statuses, f"pod {pod_name} has no generated claim yet"
    claim: dict[str, Any] = node.api.get(
        f"/apis/resource.k8s.io/v1/namespaces/{NS}/resourceclaims/"
        f"{statuses[0]['resourceClaimName']}"
    )
    return claim


def exec_in(node: RealNode, pod_name: str, script: str) -> str:
    return node.cp.kubectl("exec", "-n", NS, pod_name, "--", "sh", "-c", script).stdout


def events(node: RealNode, reason: str | None = None) -> list[str]:
    items = node.api.request("GET", f"/api/v1/namespaces/{NS}/events")["items"]
    return [
        f"{e['reason']}: {e['involvedObject'].get('name')}: {e.get('message', '')}"
        for e in items
        if reason is None or e["reason"] == reason
    ]


# The kubelet can read a new pod's claim before the API server's Node authorizer
# has linked the claim to the node, and then retries on its next pod sync: an
# upstream race, not a prepare call that failed.
AUTHORIZER_RACE = "no relationship found between node"


def prepare_errors(node: RealNode, *pods: str) -> list[str]:
    """Failed prepares of these pods' claims, from the kubelet's and the plugins' sides."""
    found = [
        e
        for e in events(node, "FailedPrepareDynamicResources")
        if e.split(": ")[1] in pods and AUTHORIZER_RACE not in e
    ]
    uids = [claim_of(node, p)["metadata"]["uid"] for p in pods if get_pod(node, p)]
    for plugin in node.plugins:
        found += [
            line
            for line in plugin.log().splitlines()
            if "prepare failed" in line and any(uid in line for uid in uids)
        ]
    return found


# --- registration ------------------------------------------------------------------------------


def test_kubelet_registers_the_plugin_over_dra_v1(node: RealNode) -> None:
    # The kubelet chose the service from our GetInfo answer, then told us so.
    log = node.kubelet_log()
    registered = [
        line for line in log.splitlines() if "Registered DRA plugin" in line and DRIVER in line
    ]
    assert registered, "kubelet log has no 'Registered DRA plugin' for our driver"
    assert 'chosenService="v1.DRAPlugin"' in registered[0]
    assert node.plugin is not None
    assert "kubelet registered DRA driver" in node.plugin.log()


# --- pods -----------------------------------------------------------------------------------


def test_pod_gets_the_device_node_and_nxconfig_environment(node: RealNode) -> None:
    create_pods(node, "configured", template=CONFIGURED)
    wait_running(node, "configured")
    out = exec_in(node, "configured", "ls -l /dev/crypto/nx-gzip; env | sort")
    assert re.search(r"^crw-rw-rw-\s.*\s1,\s+3\s.*/dev/crypto/nx-gzip$", out, re.MULTILINE), out
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("NX_"))
    assert env["NX_GZIP_VERBOSE"] == "1"
    assert env["NX_GZIP_TYPE_SELECTOR"] == "2", env  # "nx"
    assert env.get("NX_DRA_CREDITS") == "1", env
    claim = claim_of(node, "configured")
    uid = claim["metadata"]["uid"]
    assert spec_file_name(uid) in node.cdi_specs()
    assert uid in node.checkpoint_claims()


def test_a_first_available_claim_gives_the_container_naming_its_request_the_device(
    node: RealNode,
) -> None:
    # The scheduler allocates the subrequest `nx/small`; the container names the
    # request `nx`, which the kubelet matches against the request names we answer.
    create_pods(node, "prioritized", template=FIRST_AVAILABLE, request="nx")
    wait_running(node, "prioritized")
    (result,) = claim_of(node, "prioritized")["status"]["allocation"]["devices"]["results"]
    assert result["request"] == "nx/small"
    out = exec_in(node, "prioritized", "ls -l /dev/crypto/nx-gzip; env | sort")
    assert re.search(r"^crw-rw-rw-\s.*\s1,\s+3\s.*/dev/crypto/nx-gzip$", out, re.MULTILINE), out
    assert "NX_DRA_CREDITS=1" in out


def test_three_pods_share_the_credits_and_a_fourth_stays_pending(node: RealNode) -> None:
    create_pods(node, "share-1", "share-2", "share-3")
    wait_running(node, "share-1", "share-2", "share-3")
    for name in ("share-1", "share-2", "share-3"):
        (result,) = claim_of(node, name)["status"]["allocation"]["devices"]["results"]
        assert result["device"] == "nx-gzip"
        assert result["consumedCapacity"] == {"credits": "1"}
    assert node.plugin is not None
    text = node.plugin.metrics()
    assert sample(text, "power_dra_plugin_credits_allocated", node="node-0") == 3
    assert sample(text, "power_dra_plugin_credits_total", node="node-0") == 3

    create_pods(node, "share-4")

    def unschedulable() -> str:
        pod = get_pod(node, "share-4") or {}
        for cond in pod.get("status", {}).get("conditions", []):
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                return str(cond.get("message", ""))
        return ""

    message = wait_for("share-4 unschedulable", unschedulable, 30, 0.1)
    assert "cannot allocate all claims" in message, message
    # The scheduler's answer, in the same object: no node.
    assert not (get_pod(node, "share-4") or {}).get("spec", {}).get("nodeName")

    # A credit comes free: the waiting pod gets it.
    node.cp.kubectl("delete", "pod", "-n", NS, "share-1", "--wait=false")
    wait_running(node, "share-4", timeout=60)


def test_deleting_a_pod_unprepares_its_claim(node: RealNode) -> None:
    create_pods(node, "short-lived")
    wait_running(node, "short-lived")
    uid = claim_of(node, "short-lived")["metadata"]["uid"]
    assert spec_file_name(uid) in node.cdi_specs()
    assert uid in node.checkpoint_claims()

    node.cp.kubectl("delete", "pod", "-n", NS, "short-lived", "--wait=false")
    wait_for(
        "CDI spec and checkpoint entry removed",
        lambda: spec_file_name(uid) not in node.cdi_specs() and uid not in node.checkpoint_claims(),
        30,
    )
    assert "Calling NodeUnprepareResource" in node.kubelet_log()


def device_health(node: RealNode, pod_name: str) -> str:
    """The health the kubelet reports for the pod's NX-gzip device ("" if none yet)."""
    statuses = (get_pod(node, pod_name) or {}).get("status", {}).get("containerStatuses") or []
    for status in statuses[0].get("allocatedResourcesStatus") or [] if statuses else []:
        for resource in status.get("resources") or []:
            return str(resource.get("health", ""))
    return ""


def test_kubelet_keeps_the_health_stream_open_without_errors(node: RealNode) -> None:
    # A pod's device health is what the kubelet received on the stream: once it shows,
    # the stream was set up and delivered, and any failure before it is in the log.
    create_pods(node, "health-stream")
    wait_running(node, "health-stream")
    wait_for("device Healthy", lambda: device_health(node, "health-stream") == "Healthy", 15)
    log = node.kubelet_log()
    assert "Successfully started WatchResources health stream" in log
    for bad in (
        "Failed to establish WatchResources stream",
        "NodeWatchResources RPC call failed",
        "Error receiving from WatchResources stream",
        "Failed to update health info cache",
        "WatchResources health stream has ended",
    ):
        assert bad not in log


def test_device_health_reaches_the_pod_status(node: RealNode) -> None:
    assert node.plugin is not None
    create_pods(node, "watched")
    wait_running(node, "watched")
    wait_for("device Healthy", lambda: device_health(node, "watched") == "Healthy", 15)
    # A fault and its repair both reach the pod (all credits in use is load, not a
    # fault: tests/test_plugin_health.py).
    try:
        node.remove_device_node()
        node.plugin.reload()
        wait_for("device Unhealthy", lambda: device_health(node, "watched") == "Unhealthy", 10)
    finally:
        node.create_device_node()
        node.plugin.reload()
    wait_for("device Healthy again", lambda: device_health(node, "watched") == "Healthy", 10)


def test_vanished_device_node_shows_unhealthy_in_the_pod_status(node: RealNode) -> None:
    assert node.plugin is not None
    create_pods(node, "orphaned")
    wait_running(node, "orphaned")
    wait_for("device Healthy", lambda: device_health(node, "orphaned") == "Healthy", 15)
    try:
        node.remove_device_node()
        node.plugin.reload()
        wait_for("device Unhealthy", lambda: device_health(node, "orphaned") == "Unhealthy", 5)
    finally:
        node.create_device_node()
        node.plugin.reload()
        wait_for("our slice has its device again", lambda: _slice_devices(node), 10)


def _slice_devices(node: RealNode) -> list[str]:
    return [d["name"] for s in node.slices() for d in s["spec"].get("devices") or []]


# --- node events ------------------------------------------------------------------------------


class SliceWatch:
    """Records (monotonic time, event type) of our node's slices from a watch."""

    def __init__(self, node: RealNode, seconds: float) -> None:
        query = urllib.parse.urlencode(
            {"fieldSelector": f"spec.nodeName={node.name},spec.driver={DRIVER}"}
        )
        path = f"/apis/resource.k8s.io/v1/resourceslices?{query}"
        rv = node.api.request("GET", path)["metadata"]["resourceVersion"]
        self.events: list[tuple[float, str]] = []
        self._api: Api = node.api
        self._path = f"{path}&resourceVersion={rv}"
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()

    def _run(self, seconds: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            for event in self._api.watch(self._path, seconds):
                self.events.append((time.monotonic(), event["type"]))

    def gap_after_delete(self) -> float | None:
        """Seconds from the first deletion to the next creation, if both happened."""
        deleted = next((t for t, kind in self.events if kind == "DELETED"), None)
        if deleted is None:
            return None
        added = next((t for t, kind in self.events if kind == "ADDED" and t >= deleted), None)
        return None if added is None else added - deleted


def test_kubelet_restart_our_slice_is_published_again(node: RealNode) -> None:
    # The watch starts at the version read before the restart: it sees every event after.
    watch = SliceWatch(node, seconds=40)
    node.restart_kubelet()
    wait_for(
        "slice deleted by the kubelet and published again",
        lambda: watch.gap_after_delete() is not None,
        30,
    )
    print(f"slice back {watch.gap_after_delete():.2f}s after the kubelet deleted it")
    node.wait_ready()
    create_pods(node, "after-kubelet-restart")
    wait_running(node, "after-kubelet-restart")


def test_plugin_restart_keeps_claims_and_new_pods_start(node: RealNode) -> None:
    create_pods(node, "before-plugin-restart")
    wait_running(node, "before-plugin-restart")
    uid = claim_of(node, "before-plugin-restart")["metadata"]["uid"]

    node.restart_plugin()  # returns once the kubelet has registered it again
    assert uid in node.checkpoint_claims()
    create_pods(node, "after-plugin-restart")
    wait_running(node, "after-plugin-restart")
    assert _ready(get_pod(node, "before-plugin-restart"))
    assert not prepare_errors(node, "before-plugin-restart", "after-plugin-restart")
    # The claim prepared by the old process is unprepared by the new one.
    node.cp.kubectl("delete", "pod", "-n", NS, "before-plugin-restart", "--wait=false")
    wait_for(
        "old claim unprepared",
        lambda: uid not in node.checkpoint_claims() and spec_file_name(uid) not in node.cdi_specs(),
        30,
    )


def _container_id(node: RealNode, pod_name: str) -> str:
    statuses = (get_pod(node, pod_name) or {}).get("status", {}).get("containerStatuses") or []
    return str(statuses[0].get("containerID", "")) if statuses else ""


def test_reboot_running_claims_are_prepared_again_and_new_pods_start(node: RealNode) -> None:
    create_pods(node, "survivor")
    wait_running(node, "survivor")
    uid = claim_of(node, "survivor")["metadata"]["uid"]
    container_before = _container_id(node, "survivor")
    log_offset = len(node.kubelet_log())

    node.reboot()
    assert node.plugin is not None
    plugin = node.plugin
    # The plugin puts back the specs of the claims in its state file at start ...
    wait_for("spec re-created", lambda: spec_file_name(uid) in node.cdi_specs(), 15)
    assert "written before the node rebooted" in plugin.log()
    node.wait_ready()
    # ... and the kubelet prepares the claim again before it starts the pod again.
    wait_for(
        "kubelet prepared the running claim again",
        lambda: any(
            "Calling NodePrepareResources rpc" in line and uid in line
            for line in node.kubelet_log()[log_offset:].splitlines()
        ),
        30,
    )
    wait_for(
        "survivor restarted",
        lambda: (
            _container_id(node, "survivor") not in ("", container_before)
            and _ready(get_pod(node, "survivor"))
        ),
        30,
        0.1,
    )
    assert "crw" in exec_in(node, "survivor", "ls -l /dev/crypto/nx-gzip")
    create_pods(node, "after-reboot")
    wait_running(node, "after-reboot")
    assert not prepare_errors(node, "survivor", "after-reboot")


def test_rolling_update_of_the_plugin_fails_no_prepare(node: RealNode) -> None:
    old = node.plugin
    assert old is not None
    create_pods(node, "rolling-1")
    # The new DaemonSet pod starts next to the old one (maxSurge 1) ...
    new = node.start_plugin()
    assert re.search(r'"Registered DRA plugin".*numPlugins=2', node.kubelet_log())
    create_pods(node, "rolling-2")
    # ... and the old one stops while pods start.
    old.stop()
    create_pods(node, "rolling-3")
    wait_running(node, "rolling-1", "rolling-2", "rolling-3")
    assert not prepare_errors(node, "rolling-1", "rolling-2", "rolling-3")
    assert new.process is not None and new.process.alive()
    assert not old.registration_socket.exists()
    assert new.registration_socket.exists()
    assert node.slices(), "our slice must survive the old plugin's exit"
