# SPDX-License-Identifier: Apache-2.0
"""Prepare and unprepare end to end: the real scheduler allocates devices of the
plugin's ResourceSlice, the plugin runs as a process, and the kubelet stand-in
(grpcio) registers it and prepares the claims of the pods bound to the node."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeletplugin.checkpoint import read_state
from tests.dra_objects import allocate_claims, claim, claim_spec, device_class, pod, template
from tests.harness.cluster import ControlPlane
from tests.harness.plugin import DRIVER, PluginProcess
from tests.kubelet_standin import ClaimName, DraClient, KubeletStandin, PodResult

pytestmark = pytest.mark.cluster

CDI_KIND = "k8s.nx.device.power.ibm.com/nx"
SPEC_PREFIX = "k8s.nx.device.power.ibm.com-nx_"
TIMEOUT = 60.0


# --- a node with the plugin and a kubelet stand-in ------------------------------------


@dataclass
class Node:
    cp: ControlPlane
    name: str
    nx_class: str
    plugin: PluginProcess
    standin: KubeletStandin

    def spec_path(self, uid: str) -> Path:
        return self.plugin.cdi_root / f"{SPEC_PREFIX}{uid}.json"

    def spec(self, uid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.spec_path(uid).read_text())
        return data

    def checkpoint_claims(self) -> dict[str, Any]:
        # The snapshot and its journal.
        return {uid: c.to_dict() for uid, c in read_state(self.plugin.checkpoint).items()}

    def claim_uid(self, ns: str, name: str) -> str:
        obj = json.loads(
            self.cp.kubectl("get", "resourceclaim", name, "-n", ns, "-o", "json").stdout
        )
        return str(obj["metadata"]["uid"])

    def run_pod(self, objects: list[dict[str, Any]], pod_name: str, ns: str) -> PodResult:
        """Apply objects (one of them the pod) and wait for the stand-in's prepare round."""
        self.cp.apply(objects)
        return self.standin.wait_prepared(f"{ns}/{pod_name}", TIMEOUT)

    def delete_pod(self, ns: str, name: str) -> PodResult:
        started = time.time()
        self.cp.kubectl("delete", "pod", name, "-n", ns, "--wait=false")
        return self.standin.wait_unprepared(f"{ns}/{name}", TIMEOUT, after=started)


@pytest.fixture(scope="module")
def nx_class(control_plane: ControlPlane) -> Iterator[str]:
    name = f"nx-{uuid.uuid4().hex[:8]}"
    control_plane.apply(device_class(name))
    yield name
    control_plane.kubectl("delete", "deviceclass", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep the plugin's dirs short.
    d = Path(tempfile.mkdtemp(prefix="nxp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_node(
    cp: ControlPlane, workdir: Path, nx_class: str, api_versions: tuple[str, ...]
) -> Node:
    name = f"prep-{uuid.uuid4().hex[:6]}"
    cp.create_node(name)
    plugin = PluginProcess(cp, name, workdir, total_credits=200).start()
    plugin.wait_for_slices(TIMEOUT)
    standin = KubeletStandin(
        name, plugin.registry_dir, cp.kubeconfig, api_version_preference=api_versions
    ).start()
    standin.wait_registered(DRIVER, TIMEOUT)
    return Node(cp, name, nx_class, plugin, standin)


def stop_node(node: Node) -> None:
    node.standin.stop()
    node.plugin.stop()
    node.cp.kubectl("delete", "node", node.name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def node(control_plane: ControlPlane, nx_class: str, short_tmp: Path) -> Iterator[Node]:
    n = start_node(control_plane, short_tmp / "v1", nx_class, ("v1", "v1beta1"))
    yield n
    stop_node(n)


@pytest.fixture
def ns(control_plane: ControlPlane, unique_name: str) -> Iterator[str]:
    control_plane.create_namespace(unique_name)
    yield unique_name
    control_plane.kubectl("delete", "namespace", unique_name, "--wait=false", check=False)


def one_claim_pod(node: Node, ns: str, name: str = "p") -> PodResult:
    return node.run_pod(
        [
            template(ns, "nx", claim_spec({"nx": node.nx_class})),
            pod(ns, name, node.name, templates={"nx": "nx"}),
        ],
        name,
        ns,
    )


# --- prepare through the kubelet stand-in -----------------------------------------------


def test_pod_claim_from_template_is_prepared_with_its_cdi_device(node: Node, ns: str) -> None:
    result = one_claim_pod(node, ns)
    assert result.ok, result.errors()
    got = result.claim("nx")
    assert [(d.request_names, d.pool_name, d.device_name) for d in got.devices] == [
        (("nx",), node.name, "nx-gzip")
    ]
    assert got.devices[0].cdi_device_ids == (f"{CDI_KIND}={got.uid}-nx-gzip",)


def test_prepared_claim_spec_passes_the_device_node_read_write(node: Node, ns: str) -> None:
    uid = one_claim_pod(node, ns).claim("nx").uid
    spec = node.spec(uid)
    assert spec["kind"] == CDI_KIND
    [device] = spec["devices"]
    assert device["name"] == f"{uid}-nx-gzip"
    assert device["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/crypto/nx-gzip", "permissions": "rw"}
    ]


def test_prepared_claim_spec_sets_nx_and_credit_share_environment(node: Node, ns: str) -> None:
    result = one_claim_pod(node, ns)
    got = result.claim("nx")
    env = dict(e.split("=", 1) for e in node.spec(got.uid)["devices"][0]["containerEdits"]["env"])
    assert env == {
        "NX_DRA_CLAIM": f"{ns}/{got.name}",
        "NX_DRA_CREDITS": "1",
        "NX_DRA_DEVICES": "nx-gzip",
        "NX_GZIP_LOGFILE": "/dev/stderr",
    }


def test_claim_nxconfig_becomes_container_environment(node: Node, ns: str) -> None:
    spec = claim_spec({"nx": node.nx_class}, {"typeSelector": "nx", "verbose": 2})
    result = node.run_pod(
        [template(ns, "nx", spec), pod(ns, "p", node.name, templates={"nx": "nx"})], "p", ns
    )
    env = node.spec(result.claim("nx").uid)["devices"][0]["containerEdits"]["env"]
    assert {"NX_GZIP_TYPE_SELECTOR=2", "NX_GZIP_VERBOSE=2"} <= set(env)


def test_prepared_claim_is_in_the_checkpoint(node: Node, ns: str) -> None:
    got = one_claim_pod(node, ns).claim("nx")
    entry = node.checkpoint_claims()[got.uid]
    assert (entry["namespace"], entry["name"]) == (ns, got.name)
    assert [d["deviceName"] for d in entry["devices"]] == ["nx-gzip"]


def test_pod_deletion_unprepares_its_claim(node: Node, ns: str) -> None:
    uid = one_claim_pod(node, ns).claim("nx").uid
    assert node.spec_path(uid).exists()
    result = node.delete_pod(ns, "p")
    assert result.ok, result.errors()
    assert [c.uid for c in result.claims] == [uid]
    assert not node.spec_path(uid).exists()
    assert uid not in node.checkpoint_claims()


def test_terminal_pod_is_unprepared_and_its_spec_removed(node: Node, ns: str) -> None:
    uid = one_claim_pod(node, ns).claim("nx").uid
    started = time.time()
    node.cp.kubectl(
        "patch",
        "pod",
        "p",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Succeeded"}}),
    )
    result = node.standin.wait_unprepared(f"{ns}/p", TIMEOUT, after=started)
    assert result.ok, result.errors()
    assert not node.spec_path(uid).exists()


# --- v1beta1 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1beta1_node(control_plane: ControlPlane, nx_class: str, short_tmp: Path) -> Iterator[Node]:
    n = start_node(control_plane, short_tmp / "b1", nx_class, ("v1beta1",))
    yield n
    stop_node(n)


def test_kubelet_without_v1_registers_the_plugin_on_v1beta1(v1beta1_node: Node) -> None:
    assert v1beta1_node.standin.wait_registered(DRIVER).api_version == "v1beta1"


def test_v1beta1_prepare_and_unprepare_round_trip(v1beta1_node: Node, ns: str) -> None:
    node = v1beta1_node
    uid = one_claim_pod(node, ns).claim("nx").uid
    assert node.spec_path(uid).exists()
    assert node.delete_pod(ns, "p").ok
    assert not node.spec_path(uid).exists()
    dra_calls = [c for c in node.standin.calls if c.claim_uids == (uid,)]
    assert [(c.method, c.api_version, c.error) for c in dra_calls] == [
        ("NodePrepareResources", "v1beta1", ""),
        ("NodeUnprepareResources", "v1beta1", ""),
    ]


# --- claims with other drivers and bad configs -------------------------------------------


@pytest.fixture(scope="module")
def other_driver(control_plane: ControlPlane, node: Node) -> Iterator[str]:
    """A second (fake) driver with a hand-made slice on the node; returns its class name."""
    driver = f"other-{uuid.uuid4().hex[:6]}.example.com"
    control_plane.apply(
        [
            device_class(driver, driver),
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceSlice",
                "metadata": {"name": f"{driver}-{node.name}"},
                "spec": {
                    "driver": driver,
                    "nodeName": node.name,
                    "pool": {"name": node.name, "generation": 1, "resourceSliceCount": 1},
                    "devices": [{"name": f"gpu-{i}"} for i in range(8)],
                },
            },
        ]
    )
    yield driver
    control_plane.kubectl("delete", "resourceslice", f"{driver}-{node.name}", check=False)
    control_plane.kubectl("delete", "deviceclass", driver, "--wait=false", check=False)


def test_claim_of_another_driver_fails_alone_in_a_shared_request(
    node: Node, ns: str, other_driver: str
) -> None:
    result = node.run_pod(
        [
            template(ns, "nx", claim_spec({"nx": node.nx_class})),
            template(ns, "gpu", claim_spec({"gpu": other_driver})),
            pod(ns, "p", node.name, templates={"nx": "nx", "gpu": "gpu"}),
        ],
        "p",
        ns,
    )
    ours, theirs = result.claim("nx", DRIVER), result.claim("gpu", other_driver)
    # The kubelet would send only our claim; the plugin must cope with both in one request.
    answers = node.standin.client(DRIVER).prepare(
        [ClaimName(ns, ours.uid, ours.name), ClaimName(ns, theirs.uid, theirs.name)]
    )
    assert answers[ours.uid].error == ""
    assert answers[ours.uid].devices == ours.devices
    assert f"nothing of {DRIVER} is allocated" in answers[theirs.uid].error
    assert answers[theirs.uid].devices == ()
    assert not node.spec_path(theirs.uid).exists()


def test_results_of_another_driver_in_our_claim_are_skipped(
    node: Node, ns: str, other_driver: str
) -> None:
    spec = claim_spec({"nx": node.nx_class, "gpu": other_driver})
    result = node.run_pod(
        [template(ns, "both", spec), pod(ns, "p", node.name, templates={"both": "both"})], "p", ns
    )
    ours = result.claim("both", DRIVER)
    assert ours.ok, ours.error
    assert [(d.request_names, d.device_name) for d in ours.devices] == [(("nx",), "nx-gzip")]
    assert [d["name"] for d in node.spec(ours.uid)["devices"]] == [f"{ours.uid}-nx-gzip"]


def test_bad_nxconfig_fails_only_its_claim_in_the_request(node: Node, ns: str) -> None:
    bad = claim_spec({"nx": node.nx_class}, {"verbose": "loud"})
    good = claim_spec({"nx": node.nx_class})
    result = node.run_pod(
        [
            template(ns, "bad", bad),
            template(ns, "good", good),
            pod(ns, "p", node.name, templates={"bad": "bad", "good": "good"}),
        ],
        "p",
        ns,
    )
    bad_result, good_result = result.claim("bad"), result.claim("good")
    [call] = [c for c in node.standin.calls if bad_result.uid in c.claim_uids][:1]
    assert set(call.claim_uids) == {bad_result.uid, good_result.uid}  # one request
    assert "parameters.verbose: must be an integer 0..255" in bad_result.error
    assert "status.allocation.devices.config[0]" in bad_result.error
    assert good_result.ok and good_result.devices
    assert node.spec_path(good_result.uid).exists()
    assert not node.spec_path(bad_result.uid).exists()


def test_sixty_four_claims_in_one_request(node: Node, ns: str) -> None:
    names = [f"c{i:02d}" for i in range(64)]
    objects = [claim(ns, n, claim_spec({"nx": node.nx_class})) for n in names]
    objects.append(pod(ns, "p", node.name, claims={n: n for n in names}))
    result = node.run_pod(objects, "p", ns)
    assert result.ok, result.errors()
    uids = {c.uid for c in result.claims}
    assert len(uids) == 64
    prepare_calls = [
        c
        for c in node.standin.calls
        if c.method == "NodePrepareResources" and uids & set(c.claim_uids)
    ]
    assert [len(c.claim_uids) for c in prepare_calls] == [64]
    assert all(node.spec_path(uid).exists() for uid in uids)
    assert uids <= set(node.checkpoint_claims())


# --- idempotency ------------------------------------------------------------------------


def test_preparing_a_claim_again_answers_the_same_devices(node: Node, ns: str) -> None:
    got = one_claim_pod(node, ns).claim("nx")
    again = node.standin.client(DRIVER).prepare([ClaimName(ns, got.uid, got.name)])
    assert again[got.uid].error == ""
    assert again[got.uid].devices == got.devices


def test_preparing_again_recreates_a_deleted_spec(node: Node, ns: str) -> None:
    got = one_claim_pod(node, ns).claim("nx")
    before = node.spec_path(got.uid).read_bytes()
    node.spec_path(got.uid).unlink()
    again = node.standin.client(DRIVER).prepare([ClaimName(ns, got.uid, got.name)])
    assert again[got.uid].devices == got.devices
    assert node.spec_path(got.uid).read_bytes() == before


def test_unknown_claims_unprepare_successfully(node: Node) -> None:
    unknown = [ClaimName("nowhere", str(uuid.uuid4()), f"gone-{i}") for i in range(3)]
    answers = node.standin.client(DRIVER).unprepare(unknown)
    assert answers == {c.uid: "" for c in unknown}


# --- rolling update: two plugin instances on one node -------------------------------------


@dataclass
class Rolling:
    cp: ControlPlane
    node: str
    old: PluginProcess
    new: PluginProcess
    standin: KubeletStandin
    claims: list[ClaimName]

    def checkpoint_claims(self) -> set[str]:
        return set(read_state(self.new.checkpoint))

    def spec_path(self, uid: str) -> Path:
        return self.new.cdi_root / f"{SPEC_PREFIX}{uid}.json"


@pytest.fixture
def rolling(
    control_plane: ControlPlane, nx_class: str, short_tmp: Path, ns: str
) -> Iterator[Rolling]:
    """The old plugin pod and its replacement serving one node side by side,
    registered in that order, with 16 claims allocated on the node."""
    name = f"roll-{uuid.uuid4().hex[:6]}"
    control_plane.create_node(name)
    workdir = short_tmp / name
    old = PluginProcess(control_plane, name, workdir, total_credits=64, pod_uid="old-0")
    new = PluginProcess(control_plane, name, workdir, total_credits=64, pod_uid="new-1")
    # The tests make the DRA calls; pods are handled only when a test asks.
    standin = KubeletStandin(name, old.registry_dir, control_plane.kubeconfig, handle_pods=False)
    try:
        old.start()
        old.wait_for_slices(TIMEOUT)
        standin.start()
        standin.wait_registered(DRIVER, TIMEOUT, socket=old.registration_socket)
        new.start()
        standin.wait_registered(DRIVER, TIMEOUT, socket=new.registration_socket)
        claims = allocate_claims(control_plane, ns, name, device_class_name=nx_class, count=16)
        yield Rolling(control_plane, name, old, new, standin, claims)
    finally:
        standin.stop()
        new.stop()
        old.stop()
        control_plane.kubectl("delete", "node", name, "--wait=false", check=False)


def test_two_instances_register_side_by_side_and_the_newest_is_used(
    rolling: Rolling, ns: str
) -> None:
    registered = rolling.standin.registrations[DRIVER]
    assert [r.endpoint for r in registered] == [rolling.old.dra_socket, rolling.new.dra_socket]
    rolling.standin.handle_pods = True
    result = rolling.standin.wait_prepared(f"{ns}/holder", TIMEOUT)
    assert result.ok, result.errors()
    [call] = [c for c in rolling.standin.calls if c.method == "NodePrepareResources"]
    assert call.target == str(rolling.new.dra_socket)


def test_checkpoint_holds_claims_prepared_by_both_instances(rolling: Rolling) -> None:
    halves = {rolling.old: rolling.claims[:8], rolling.new: rolling.claims[8:]}
    failures: list[BaseException] = []

    def prepare_one_by_one(plugin: PluginProcess, claims: list[ClaimName]) -> None:
        try:
            with DraClient(plugin.dra_socket) as client:
                for c in claims:  # interleaved with the other instance's writes
                    assert client.prepare([c])[c.uid].error == ""
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=prepare_one_by_one, args=item) for item in halves.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert failures == []
    assert rolling.checkpoint_claims() == {c.uid for c in rolling.claims}
    assert all(rolling.spec_path(c.uid).exists() for c in rolling.claims)


def test_stopping_the_old_instance_leaves_the_new_one_serving(rolling: Rolling) -> None:
    claim = rolling.claims[0]
    with DraClient(rolling.old.dra_socket) as client:
        first = client.prepare([claim])[claim.uid]
    rolling.old.stop()
    assert not rolling.old.registration_socket.exists()
    assert not rolling.old.dra_socket.exists()
    rolling.standin.wait_deregistered(DRIVER, rolling.old.registration_socket, TIMEOUT)
    assert [r.endpoint for r in rolling.standin.registrations[DRIVER]] == [rolling.new.dra_socket]
    with DraClient(rolling.new.dra_socket) as client:
        assert client.prepare([claim])[claim.uid] == first
        assert client.unprepare([claim]) == {claim.uid: ""}
    assert not rolling.spec_path(claim.uid).exists()
    assert claim.uid not in rolling.checkpoint_claims()
