# SPDX-License-Identifier: Apache-2.0
"""Crash safety of the plugin's state: SIGKILL at random points of a
prepare/unprepare loop, and corrupt checkpoints, against the real process.

The kubelet's side is grpcio (tests.kubelet_standin.DraClient); the claims
are real ones the scheduler allocated on the plugin's node.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from kubeletplugin.checkpoint import read_state
from kubeletplugin.ibm_state import (
    IBM_COMMON_SPEC_FILE,
    decode_ibm_checkpoint,
    ibm_cdi_device_ids,
    ibm_claim_spec_file,
)
from tests.dra_objects import allocate_claims, claim, device_class, pod
from tests.harness.cluster import ControlPlane, write_kubeconfig
from tests.harness.plugin import PluginProcess
from tests.harness.tcpproxy import TcpProxy
from tests.ibm_driver_standin import write_ibm_files
from tests.kubelet_standin import ClaimName, DraClient, PrepareAnswer, get_plugin_info

pytestmark = pytest.mark.cluster

SPEC_PREFIX = "k8s.nx.device.power.ibm.com-nx_"
SPEC_SUFFIX = ".json"
CLAIMS = 16
ITERATIONS = 36
CALL_TIMEOUT = 20.0
START_TIMEOUT = 30.0
FAULT_ITERATIONS = 16
FAULT_DEADLINE = 4.0  # the kubelet allows 45 s; the plugin answers within what it is given


@dataclass
class Cluster:
    cp: ControlPlane
    node: str
    claims: list[ClaimName]
    root: Path

    def plugin(self, name: str, kubeconfig: str | None = None) -> PluginProcess:
        return PluginProcess(
            self.cp, self.node, self.root / name, total_credits=64, kubeconfig=kubeconfig
        )


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> Iterator[Cluster]:
    """A node with CLAIMS claims allocated on it (the plugin of the first
    test publishes the slice the scheduler allocates from)."""
    suffix = uuid.uuid4().hex[:6]
    node, ns, cls = f"crash-{suffix}", f"crash-{suffix}", f"nx-crash-{suffix}"
    root = Path(tempfile.mkdtemp(prefix="nxc-", dir="/tmp"))  # short socket paths
    control_plane.create_node(node)
    control_plane.create_namespace(ns)
    control_plane.apply(device_class(cls))
    publisher = PluginProcess(control_plane, node, root / "publisher", total_credits=64).start()
    try:
        publisher.wait_for_slices(START_TIMEOUT)
        claims = allocate_claims(control_plane, ns, node, device_class_name=cls, count=CLAIMS)
        claims.append(allocate_first_available_claim(control_plane, ns, node, cls))
    finally:
        publisher.stop()
    yield Cluster(control_plane, node, claims, root)
    control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    control_plane.kubectl("delete", "deviceclass", cls, "--wait=false", check=False)
    control_plane.kubectl("delete", "node", node, "--wait=false", check=False)
    shutil.rmtree(root, ignore_errors=True)


def allocate_first_available_claim(cp: ControlPlane, ns: str, node: str, cls: str) -> ClaimName:
    """A prioritized-list claim the scheduler allocates from its second subrequest."""
    request = {
        "name": "nx",
        "firstAvailable": [
            {
                "name": "big",  # more credits than the node has
                "deviceClassName": cls,
                "capacity": {"requests": {"credits": "100000"}},
            },
            {"name": "small", "deviceClassName": cls},
        ],
    }
    cp.apply(
        [
            claim(ns, "prioritized", {"devices": {"requests": [request]}}),
            pod(ns, "holder-prioritized", node, claims={"nx": "prioritized"}),
        ]
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        obj = json.loads(
            cp.kubectl("get", "resourceclaim", "prioritized", "-n", ns, "-o", "json").stdout
        )
        allocation = (obj.get("status") or {}).get("allocation")
        if allocation:
            [result] = allocation["devices"]["results"]
            assert result["request"] == "nx/small"
            return ClaimName(ns, obj["metadata"]["uid"], "prioritized")
        time.sleep(0.1)
    raise TimeoutError("the prioritized claim was not allocated")


# --- the plugin's files ---------------------------------------------------------------


def checkpoint_claims(plugin: PluginProcess) -> set[str]:
    if not plugin.checkpoint.exists():
        return set()
    return set(read_state(plugin.checkpoint))  # the snapshot and its journal


def spec_claims(plugin: PluginProcess) -> set[str]:
    return {
        name[len(SPEC_PREFIX) : -len(SPEC_SUFFIX)]
        for name in os.listdir(plugin.cdi_root)
        if name.startswith(SPEC_PREFIX) and name.endswith(SPEC_SUFFIX)
    }


def leftovers(plugin: PluginProcess) -> list[str]:
    """Files in the CDI root and plugin dir that are neither specs, the
    checkpoint, its lock, sockets, nor moved-aside checkpoints."""
    found = [n for n in os.listdir(plugin.cdi_root) if not n.startswith(SPEC_PREFIX)]
    for n in os.listdir(plugin.plugin_dir):
        if n in ("checkpoint.json", "checkpoint.journal", "checkpoint.lock") or n.endswith(".sock"):
            continue
        if n.startswith("checkpoint.json.corrupt-"):
            continue
        found.append(n)
    return found


def socket_inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def start_serving(plugin: PluginProcess) -> None:
    """Start the plugin and wait until its (new) registration socket answers, then
    until its DRA socket does (only after the start-up repair of its state)."""
    stale = socket_inode(plugin.registration_socket)
    plugin.start(wait=False)

    def serving() -> bool:
        inode = socket_inode(plugin.registration_socket)
        if inode is None or inode == stale:
            return False
        try:
            get_plugin_info(plugin.registration_socket)
        except grpc.RpcError:
            return False
        return True

    plugin.wait_for(serving, START_TIMEOUT, "fresh registration socket answering GetInfo")
    plugin.wait_for_dra(START_TIMEOUT)


def kill(plugin: PluginProcess) -> None:
    assert plugin.process is not None
    plugin.process.popen.send_signal(signal.SIGKILL)
    plugin.process.popen.wait(10)
    plugin.process.stop()


def kill_mid_churn(
    plugin: PluginProcess, kubelet: Kubelet, client: DraClient, rng: random.Random
) -> None:
    """The kubelet stand-in prepares and unprepares in a thread while the plugin is
    killed -9 at a random moment (the sleep picks the kill point)."""
    stop = threading.Event()
    worker = threading.Thread(target=kubelet.churn, args=(client, stop))
    worker.start()
    time.sleep(rng.uniform(0.0, 0.3))
    kill(plugin)
    stop.set()
    worker.join(CALL_TIMEOUT)
    assert not worker.is_alive()


# --- kill -9 in a prepare/unprepare loop ----------------------------------------------


@dataclass
class Kubelet:
    """What the kubelet knows: the last answer per claim, and the first devices."""

    claims: list[ClaimName]
    rng: random.Random
    state: dict[str, str] = field(default_factory=dict)  # prepared / unprepared / unknown
    devices: dict[str, PrepareAnswer] = field(default_factory=dict)
    failures: list[BaseException] = field(default_factory=list)
    calls: int = 0

    def __post_init__(self) -> None:
        self.state = {c.uid: "unprepared" for c in self.claims}

    # With the API server down, a claim the plugin has not prepared before
    # cannot be read: it fails alone, with the call's deadline.
    api_down: bool = False
    deadline: float = CALL_TIMEOUT

    def record_prepared(self, answers: dict[str, PrepareAnswer], batch: list[ClaimName]) -> None:
        for c in batch:
            answer = answers[c.uid]
            # The prioritized claim's device is answered under its parent request.
            assert all(d.request_names == ("nx",) for d in answer.devices), answer
            if answer.error and self.api_down:
                assert "deadline exceeded" in answer.error, f"{c.name}: {answer.error}"
                self.state[c.uid] = "unprepared"  # nothing of it was written
                continue
            assert answer.error == "", f"{c.name}: {answer.error}"
            assert answer.devices, f"{c.name}: no devices"
            first = self.devices.setdefault(c.uid, answer)
            assert answer == first, f"{c.name}: answer changed: {first} -> {answer}"
            self.state[c.uid] = "prepared"

    def churn(self, client: DraClient, stop: threading.Event) -> None:
        """Prepare and unprepare random batches until the plugin dies or `stop`."""
        try:
            while not stop.is_set():
                batch = self.rng.sample(self.claims, self.rng.randint(1, 6))
                for c in batch:
                    self.state[c.uid] = "unknown"  # until the answer arrives
                self.calls += 1
                if self.rng.random() < 0.5:
                    self.record_prepared(client.prepare(batch, timeout=self.deadline), batch)
                else:
                    answers = client.unprepare(batch, timeout=CALL_TIMEOUT)
                    assert answers == {c.uid: "" for c in batch}, answers
                    for c in batch:
                        self.state[c.uid] = "unprepared"
        except grpc.RpcError:
            return  # the plugin was killed under the call
        except BaseException as exc:
            self.failures.append(exc)

    def by_state(self, state: str) -> set[str]:
        return {uid for uid, s in self.state.items() if s == state}


def check_files_agree(plugin: PluginProcess, kubelet: Kubelet, where: str) -> None:
    in_checkpoint, specs = checkpoint_claims(plugin), spec_claims(plugin)
    assert in_checkpoint == specs, f"{where}: checkpoint and CDI specs disagree"
    assert kubelet.by_state("prepared") <= in_checkpoint, f"{where}: answered claim lost"
    assert not kubelet.by_state("unprepared") & in_checkpoint, f"{where}: unprepared claim back"
    assert leftovers(plugin) == [], f"{where}: files left behind"


def test_state_survives_kill_9_at_random_points(cluster: Cluster) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    plugin = cluster.plugin("loop")
    kubelet = Kubelet(cluster.claims, rng)
    started = time.monotonic()
    try:
        for i in range(ITERATIONS):
            where = f"seed {seed}, after kill {i}"
            start_serving(plugin)
            check_files_agree(plugin, kubelet, where)
            with DraClient(plugin.dra_socket) as client:
                prepared = [c for c in cluster.claims if kubelet.state[c.uid] == "prepared"]
                if prepared:
                    kubelet.record_prepared(
                        client.prepare(prepared, timeout=CALL_TIMEOUT), prepared
                    )
                kill_mid_churn(plugin, kubelet, client, rng)
            if kubelet.failures:
                raise AssertionError(where) from kubelet.failures[0]
        start_serving(plugin)
        check_files_agree(plugin, kubelet, f"seed {seed}, at the end")
        with DraClient(plugin.dra_socket) as client:
            answers = client.unprepare(cluster.claims, timeout=CALL_TIMEOUT)
        assert set(answers.values()) == {""}
        assert spec_claims(plugin) == set()
        assert checkpoint_claims(plugin) == set()
        assert leftovers(plugin) == []
        assert kubelet.calls > ITERATIONS  # the loop really prepared and unprepared
    finally:
        plugin.stop()
    print(f"{ITERATIONS} kills, {kubelet.calls} calls in {time.monotonic() - started:.1f} s")


def test_state_survives_kill_9_while_the_api_server_comes_and_goes(cluster: Cluster) -> None:
    """The loop above, with the plugin's API server down in a random half of the
    runs (the plugin starts and prepares without it): claims prepared before
    answer from the state file, others fail alone within the call's deadline,
    and nothing of a failed claim is left behind."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    proxy = TcpProxy("127.0.0.1", cluster.cp.port).start()
    kubeconfig = str(
        write_kubeconfig(
            cluster.root / "faults.kubeconfig",
            f"https://127.0.0.1:{proxy.port}",
            cluster.cp.ca_file,
            cluster.cp.tokens["admin"],
            "admin",
        )
    )
    plugin = cluster.plugin("faults", kubeconfig=kubeconfig)
    kubelet = Kubelet(cluster.claims, rng, deadline=FAULT_DEADLINE)
    listening, downs = True, 0
    try:
        for i in range(FAULT_ITERATIONS):
            down = i == 0 or rng.random() < 0.5
            if down and listening:
                proxy.refuse()
            elif not down and not listening:
                proxy.accept()
            listening, kubelet.api_down = not down, down
            downs += down
            where = f"seed {seed}, after kill {i} (API server {'down' if down else 'up'})"
            start_serving(plugin)
            check_files_agree(plugin, kubelet, where)
            with DraClient(plugin.dra_socket) as client:
                prepared = [c for c in cluster.claims if kubelet.state[c.uid] == "prepared"]
                if prepared:  # known claims need no API server
                    answers = client.prepare(prepared, timeout=FAULT_DEADLINE)
                    assert {answers[c.uid].error for c in prepared} == {""}, where
                    kubelet.record_prepared(answers, prepared)
                kill_mid_churn(plugin, kubelet, client, rng)
            if kubelet.failures:
                raise AssertionError(where) from kubelet.failures[0]
        if not listening:
            proxy.accept()
        kubelet.api_down = False
        start_serving(plugin)
        check_files_agree(plugin, kubelet, f"seed {seed}, at the end")
        with DraClient(plugin.dra_socket) as client:
            answers = client.unprepare(cluster.claims, timeout=CALL_TIMEOUT)
        assert set(answers.values()) == {""}
        assert spec_claims(plugin) == set() == checkpoint_claims(plugin)
        assert leftovers(plugin) == []
        assert downs > 0
    finally:
        plugin.stop()
        proxy.stop()


# --- corrupt checkpoints ---------------------------------------------------------------


def garbage(data: bytes) -> bytes:
    return random.Random(7).randbytes(len(data))


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def empty(data: bytes) -> bytes:
    return b""


def edited(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["bootId"] = "edited-by-hand"  # valid JSON, wrong checksum
    return json.dumps(doc).encode()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "garbage": garbage,
    "truncated": truncated,
    "empty": empty,
    "edited": edited,
}


@dataclass
class Corrupted:
    plugin: PluginProcess
    claims: list[ClaimName]
    answers: dict[str, PrepareAnswer]
    bad_bytes: bytes


@contextlib.contextmanager
def corrupted_plugin(cluster: Cluster, kind: str) -> Iterator[Corrupted]:
    """A plugin that prepared 3 claims, was killed, found its checkpoint
    corrupted (`kind`) and was started again."""
    plugin = cluster.plugin(f"corrupt-{uuid.uuid4().hex[:6]}")
    claims = cluster.claims[:3]
    try:
        start_serving(plugin)
        with DraClient(plugin.dra_socket) as client:
            answers = client.prepare(claims, timeout=CALL_TIMEOUT)
        kill(plugin)
        bad = CORRUPTIONS[kind](plugin.checkpoint.read_bytes())
        plugin.checkpoint.write_bytes(bad)
        start_serving(plugin)
        yield Corrupted(plugin, claims, answers, bad)
    finally:
        plugin.stop()


@pytest.fixture(scope="module", params=sorted(CORRUPTIONS))
def corrupted(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Corrupted]:
    """Shared by the tests that only look (re-preparing is idempotent)."""
    with corrupted_plugin(cluster, request.param) as c:
        yield c


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupted_own(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Corrupted]:
    """For a test that changes the plugin's state."""
    with corrupted_plugin(cluster, request.param) as c:
        yield c


def test_plugin_with_a_corrupt_checkpoint_keeps_running(corrupted: Corrupted) -> None:
    # Past start-up it does the kubelet's work: answers GetInfo and a prepare of every
    # claim, and is alive after both.
    info = get_plugin_info(corrupted.plugin.registration_socket)
    assert info.name == "nx.device.power.ibm.com"
    with DraClient(corrupted.plugin.dra_socket) as client:
        again = client.prepare(corrupted.claims, timeout=CALL_TIMEOUT)
    assert all(not answer.error for answer in again.values()), again
    assert corrupted.plugin.process is not None and corrupted.plugin.process.alive()


def test_corrupt_checkpoint_is_moved_aside(corrupted: Corrupted) -> None:
    aside = list(corrupted.plugin.plugin_dir.glob("checkpoint.json.corrupt-*"))
    assert [p.read_bytes() for p in aside] == [corrupted.bad_bytes]


def test_claims_are_rebuilt_from_specs_after_corruption(corrupted: Corrupted) -> None:
    assert checkpoint_claims(corrupted.plugin) == {c.uid for c in corrupted.claims}


def test_rebuilt_claims_prepare_to_the_same_answer(corrupted: Corrupted) -> None:
    with DraClient(corrupted.plugin.dra_socket) as client:
        again = client.prepare(corrupted.claims, timeout=CALL_TIMEOUT)
    assert again == corrupted.answers


def test_rebuilt_claims_unprepare_and_leave_no_spec(corrupted_own: Corrupted) -> None:
    with DraClient(corrupted_own.plugin.dra_socket) as client:
        answers = client.unprepare(corrupted_own.claims, timeout=CALL_TIMEOUT)
    assert set(answers.values()) == {""}
    assert spec_claims(corrupted_own.plugin) == set()
    assert checkpoint_claims(corrupted_own.plugin) == set()


def test_each_repair_at_start_is_logged_once(corrupted: Corrupted) -> None:
    assert corrupted.plugin.log().count("is unusable") == 1


# --- kill -9 while taking a node over from IBM's driver --------------------------------

ADOPTION_ROUNDS = 12


def write_ibm_node(plugin: PluginProcess, uids: list[str]) -> None:
    """IBM's driver's files for `uids`, and nothing else, in the plugin's directories."""
    for p in [*plugin.cdi_root.iterdir(), *plugin.plugin_dir.glob("checkpoint*")]:
        p.unlink()
    write_ibm_files(plugin.plugin_dir, plugin.cdi_root, plugin.node_name, uids)


def adopted_state(plugin: PluginProcess) -> tuple[str, set[str]]:
    """Whose state file is on disk ("ibm" or "ours") and the claims it holds."""
    data = plugin.checkpoint.read_bytes()
    if b'"version"' not in data:
        return "ibm", set(decode_ibm_checkpoint(data))  # raises if damaged
    return "ours", set(read_state(plugin.checkpoint))


def test_adoption_of_ibm_state_survives_kill_9(cluster: Cluster) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    plugin = cluster.plugin("adopt")
    refs = [ClaimName("ns", str(uuid.uuid4()), f"ibm-claim-{i}") for i in range(3)]
    uids = [r.uid for r in refs]
    ibm_specs = sorted([IBM_COMMON_SPEC_FILE, *(ibm_claim_spec_file(u) for u in uids)])
    seen: dict[str, int] = {"ibm": 0, "ours": 0}
    try:
        for i in range(ADOPTION_ROUNDS):
            where = f"seed {seed}, round {i}"
            write_ibm_node(plugin, uids)
            plugin.start(wait=False)
            time.sleep(rng.uniform(0.0, 1.2))  # start-up (imports, then adoption) takes ~1 s
            kill(plugin)
            owner, claims = adopted_state(plugin)
            seen[owner] += 1
            assert claims == set(uids), f"{where}: {owner} state lost claims"
            assert sorted(n for n in os.listdir(plugin.cdi_root) if not n.startswith(".")) == (
                ibm_specs
            ), f"{where}: IBM's specs changed"
            start_serving(plugin)
            assert adopted_state(plugin) == ("ours", set(uids)), where
            assert leftovers(plugin) == [], f"{where}: files left behind"
            with DraClient(plugin.dra_socket) as client:
                answers = client.prepare(refs, timeout=CALL_TIMEOUT)
            for u in uids:
                assert answers[u].error == "", answers[u].error
                assert [tuple(d.cdi_device_ids) for d in answers[u].devices] == [
                    ibm_cdi_device_ids(u)
                ], where
            kill(plugin)
        start_serving(plugin)
        with DraClient(plugin.dra_socket) as client:
            assert set(client.unprepare(refs, timeout=CALL_TIMEOUT).values()) == {""}
        assert os.listdir(plugin.cdi_root) == []
        assert checkpoint_claims(plugin) == set()
    finally:
        plugin.stop()
    print(f"{ADOPTION_ROUNDS} kills during adoption: state file found {seen}")
