# SPDX-License-Identifier: Apache-2.0
"""The running plugin process against clients that misbehave: garbage and
truncated frames on both sockets, malformed gRPC messages, huge requests,
thousands of claims, empty and unsafe UIDs, idle connections.

After each abuse the plugin must still answer a normal kubelet (grpcio):
GetInfo on the registration socket and a prepare of a real claim, from the
same process.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import struct
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from tests.dra_objects import allocate_claims, device_class
from tests.harness.cluster import ControlPlane
from tests.harness.plugin import DRIVER, PluginProcess
from tests.kubelet_standin import ClaimName, DraClient, PrepareAnswer, get_plugin_info

pytestmark = pytest.mark.cluster

CALL_TIMEOUT = 45.0
MIB = 1024 * 1024
PREPARE_V1 = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"
UNPREPARE_V1 = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources"
GET_INFO = "/pluginregistration.Registration/GetInfo"


@dataclass
class Target:
    plugin: PluginProcess
    pid: int
    claim: ClaimName
    answer: PrepareAnswer

    def socket(self, which: str) -> Path:
        return (
            self.plugin.registration_socket if which == "registration" else self.plugin.dra_socket
        )

    def assert_serving(self) -> None:
        """Same process; GetInfo and a normal prepare answer as before."""
        assert self.plugin.process is not None and self.plugin.process.alive()
        assert self.plugin.process.pid == self.pid
        # Serving is the point here, not latency (the kubelet's own 1 s GetInfo limit
        # belongs in `make bench`): a loaded machine must not fail this.
        info = get_plugin_info(self.plugin.registration_socket, timeout=CALL_TIMEOUT)
        assert info.name == DRIVER
        with DraClient(self.plugin.dra_socket) as client:
            assert client.prepare([self.claim], timeout=CALL_TIMEOUT) == {
                self.claim.uid: self.answer
            }


@pytest.fixture(scope="module")
def target(control_plane: ControlPlane) -> Iterator[Target]:
    suffix = uuid.uuid4().hex[:6]
    node, ns, cls = f"abuse-{suffix}", f"abuse-{suffix}", f"nx-abuse-{suffix}"
    root = Path(tempfile.mkdtemp(prefix="nxa-", dir="/tmp"))  # short socket paths
    control_plane.create_node(node)
    control_plane.create_namespace(ns)
    control_plane.apply(device_class(cls))
    plugin = PluginProcess(control_plane, node, root).start()
    try:
        plugin.wait_for_slices(60)
        [claim] = allocate_claims(control_plane, ns, node, device_class_name=cls, count=1)
        with DraClient(plugin.dra_socket) as client:
            answer = client.prepare([claim], timeout=CALL_TIMEOUT)[claim.uid]
        assert answer.error == "" and answer.devices
        assert plugin.process is not None
        yield Target(plugin, plugin.process.pid, claim, answer)
    finally:
        plugin.stop()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        control_plane.kubectl("delete", "deviceclass", cls, "--wait=false", check=False)
        control_plane.kubectl("delete", "node", node, "--wait=false", check=False)
        shutil.rmtree(root, ignore_errors=True)


# --- raw bytes -------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(length: int, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    header = struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id)
    return header + payload


SETTINGS = frame(0, 0x4, 0, 0)
GARBAGE = {
    "random-bytes": random.Random(11).randbytes(64 * 1024),
    "preface-cut-short": PREFACE[:10],
    "settings-header-cut-short": PREFACE + frame(6, 0x4, 0, 0)[:7],
    "headers-promising-more": PREFACE + SETTINGS + frame(1000, 0x1, 0x4, 1, b"\x82"),
    "data-on-unopened-stream": PREFACE + SETTINGS + frame(5, 0x0, 0x1, 7, b"\0" * 5),
    "frame-over-size-limit": PREFACE + SETTINGS + frame(0xFFFFFF, 0x0, 0, 1, b"x" * 64),
    "bad-hpack": PREFACE + SETTINGS + frame(4, 0x1, 0x5, 1, b"\xff\xff\xff\xff"),
    "even-stream-id": PREFACE + SETTINGS + frame(1, 0x1, 0x5, 2, b"\x82"),
}


def send_raw(path: Path, payload: bytes, *, close: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(payload)  # the server may hang up first: fine
    if close:
        s.close()
    return s


@pytest.mark.parametrize("which", ["registration", "dra"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_on_a_socket_does_not_stop_serving(target: Target, which: str, kind: str) -> None:
    held = send_raw(target.socket(which), GARBAGE[kind], close=False)
    try:
        target.assert_serving()  # while the abusive connection is still open
    finally:
        held.close()
    target.assert_serving()


def test_many_idle_connections_do_not_stop_serving(target: Target) -> None:
    idle = [
        send_raw(target.socket(which), PREFACE + SETTINGS, close=False)
        for which in ("registration", "dra")
        for _ in range(100)
    ]
    try:
        target.assert_serving()
    finally:
        for s in idle:
            s.close()


# --- malformed gRPC messages (HTTP/2 done right by h2, the gRPC framing wrong) ---------


def grpc_call(path: Path, method: str, body: bytes) -> tuple[str | None, str | None]:
    """One gRPC call with a hand-made body; returns (grpc-status, grpc-message), or
    (None, None) when the server closed the connection without a status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    try:
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(stream, body, end_stream=True)
        s.sendall(conn.data_to_send())
        headers: dict[str, str] = {}
        while True:
            data = s.recv(65536)
            if not data:
                return None, None
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update(
                        (
                            k.decode() if isinstance(k, bytes) else k,
                            v.decode() if isinstance(v, bytes) else v,
                        )
                        for k, v in event.headers
                    )
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return headers.get("grpc-status"), headers.get("grpc-message")
                if isinstance(event, h2.events.ConnectionTerminated):
                    return None, None
            pending = conn.data_to_send()
            if pending:
                s.sendall(pending)
    finally:
        s.close()


def grpc_frame(message: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    declared = len(message) if length is None else length
    return struct.pack(">?I", compressed, declared) + message


MALFORMED = {
    "length-prefix-longer-than-body": grpc_frame(b"\x0a\x02ab", length=100),
    "length-prefix-of-4-gib": grpc_frame(b"\x0a\x02ab", length=0xFFFFFFFF),
    "length-prefix-cut-short": grpc_frame(b"")[:3],
    "compressed-flag-without-compression": grpc_frame(b"\x0a\x00", compressed=True),
    "undecodable-protobuf": grpc_frame(b"\x08\xff\xff"),
    "claim-with-invalid-wire-type": grpc_frame(b"\x0f"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_grpc_message_gets_an_error_status(target: Target, kind: str) -> None:
    status, message = grpc_call(target.plugin.dra_socket, PREPARE_V1, MALFORMED[kind])
    assert status not in (None, "0"), (status, message)
    target.assert_serving()


def test_malformed_get_info_gets_an_error_status(target: Target) -> None:
    body = MALFORMED["length-prefix-longer-than-body"]
    status, message = grpc_call(target.plugin.registration_socket, GET_INFO, body)
    assert status not in (None, "0"), (status, message)
    target.assert_serving()


# --- huge and wide requests --------------------------------------------------------------


def random_claims(count: int, name_size: int = 20) -> list[ClaimName]:
    return [
        ClaimName("nowhere", str(uuid.uuid4()), f"n{i}-" + "x" * name_size) for i in range(count)
    ]


def test_huge_unprepare_request_answers_every_claim(target: Target) -> None:
    claims = random_claims(30_000, name_size=60)  # 3.5 MiB, under the kubelet's 4 MiB
    with DraClient(target.plugin.dra_socket) as client:
        assert 3 * MIB < client.unprepare_request(claims).ByteSize() < 4 * MIB
        answers = client.unprepare(claims, timeout=CALL_TIMEOUT)
    assert answers == {c.uid: "" for c in claims}
    target.assert_serving()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("method", ["prepare", "unprepare"])
def test_a_64_mib_request_is_refused_before_decoding_and_rss_stays(
    target: Target, method: str
) -> None:
    huge = [ClaimName("default", str(uuid.uuid4()), "x" * (64 * MIB))]
    before = rss_bytes(target.pid)
    with DraClient(target.plugin.dra_socket) as client, pytest.raises(grpc.RpcError) as info:
        getattr(client, method)(huge, timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than the limit of 4194304 bytes" in (info.value.details() or "")
    # Decoding it took 230 MB; refused from its length prefix, at most one
    # HTTP/2 flow-control window (4 MiB) of it is ever buffered.
    assert rss_bytes(target.pid) - before < 16 * MIB
    target.assert_serving()


@pytest.mark.parametrize(
    "claim_bytes,field",
    [
        (b"\x08\x05\x12\x01u\x1a\x01n", "namespace (1)"),
        (b"\x0a\x02ns\x10\x07\x1a\x01n", "uid (2)"),
        (b"\x0a\x02ns\x12\x01u\x18\x01", "name (3)"),
    ],
)
def test_a_claim_field_of_the_wrong_type_is_invalid_argument_naming_it(
    target: Target, claim_bytes: bytes, field: str
) -> None:
    with DraClient(target.plugin.dra_socket) as client, pytest.raises(grpc.RpcError) as info:
        client.raw(PREPARE_V1)(
            b"\x0a" + bytes([len(claim_bytes)]) + claim_bytes, timeout=CALL_TIMEOUT
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"claim #0: field {field} must be a string, got int" in (info.value.details() or "")
    target.assert_serving()


def test_claim_with_a_huge_name_fails_alone(target: Target) -> None:
    huge = ClaimName(target.claim.namespace, str(uuid.uuid4()), "x" * HUGE)
    with DraClient(target.plugin.dra_socket) as client:
        answers = client.prepare([huge, target.claim], timeout=CALL_TIMEOUT)
    assert answers[huge.uid].error
    assert answers[huge.uid].devices == ()
    assert answers[target.claim.uid] == target.answer
    target.assert_serving()


# grpc-go clients (the kubelet) refuse answers over 4 MiB by default, and a
# huge error line helps nobody: errors quote at most a short prefix. Requests
# over 4 MiB are refused whole, so "huge" here is the most a kubelet could send.
HUGE = 3 * MIB


def test_claim_with_a_huge_name_gets_a_short_error(target: Target) -> None:
    huge = ClaimName(target.claim.namespace, str(uuid.uuid4()), "x" * HUGE)
    with DraClient(target.plugin.dra_socket) as client:
        answers = client.prepare([huge], timeout=CALL_TIMEOUT)
    assert 0 < len(answers[huge.uid].error) < 1000


def test_claim_with_a_huge_uid_gets_a_short_error(target: Target) -> None:
    huge = ClaimName(target.claim.namespace, "u" * HUGE, target.claim.name)
    with DraClient(target.plugin.dra_socket) as client:
        answers = client.prepare([huge, target.claim], timeout=CALL_TIMEOUT)
        unprepared = client.unprepare([huge], timeout=CALL_TIMEOUT)
    assert 0 < len(answers[huge.uid].error) < 1000
    assert answers[target.claim.uid] == target.answer
    assert 0 < len(unprepared[huge.uid]) < 1000


def test_empty_uid_with_a_huge_name_gets_a_short_status(target: Target) -> None:
    claims = [ClaimName("default", "", "x" * HUGE)]
    with DraClient(target.plugin.dra_socket) as client, pytest.raises(grpc.RpcError) as info:
        client.prepare(claims, timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details() or "") < 1000
    target.assert_serving()


def test_thousand_unknown_claims_get_an_error_each(target: Target) -> None:
    claims = random_claims(1000)
    with DraClient(target.plugin.dra_socket) as client:
        answers = client.prepare(claims, timeout=CALL_TIMEOUT)
    assert set(answers) == {c.uid for c in claims}
    for c in claims:
        assert f"claim nowhere/{c.name} (uid {c.uid}) does not exist" in answers[c.uid].error
    target.assert_serving()


# --- bad claim references ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prepare", "unprepare"])
def test_empty_uid_is_invalid_argument(target: Target, method: str) -> None:
    claims = [target.claim, ClaimName("default", "", "no-uid")]
    with DraClient(target.plugin.dra_socket) as client, pytest.raises(grpc.RpcError) as info:
        getattr(client, method)(claims, timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "claim #1 (default/no-uid) has an empty uid" in (info.value.details() or "")
    target.assert_serving()


@pytest.mark.parametrize("uid", ["../../escape", "a/b", ".hidden", "x" * 200, "uid\nnewline"])
def test_unsafe_uid_fails_that_claim_and_writes_nothing(target: Target, uid: str) -> None:
    before = sorted(p.name for p in target.plugin.cdi_root.iterdir())
    bad = ClaimName(target.claim.namespace, uid, target.claim.name)
    with DraClient(target.plugin.dra_socket) as client:
        answers = client.prepare([bad, target.claim], timeout=CALL_TIMEOUT)
        unprepared = client.unprepare([bad], timeout=CALL_TIMEOUT)
    assert "is not a safe token" in answers[uid].error
    assert answers[target.claim.uid] == target.answer
    assert "is not a safe token" in unprepared[uid]
    assert sorted(p.name for p in target.plugin.cdi_root.iterdir()) == before
    target.assert_serving()


@pytest.mark.parametrize(
    "namespace,name,problem",
    [
        ("nowhere", "a/../../../../api/v1/namespaces/kube-system/secrets/x", "name"),
        ("nowhere", "x?watch=1", "name"),
        ("nowhere", "", "name"),
        ("nowhere", "Upper", "name"),
        ("nowhere", "x" * 254, "name"),
        ("a/b", "x", "namespace"),
        ("", "x", "namespace"),
    ],
)
def test_claim_reference_that_is_not_a_kubernetes_name_fails_alone(
    target: Target, namespace: str, name: str, problem: str
) -> None:
    bad = ClaimName(namespace, str(uuid.uuid4()), name)
    with DraClient(target.plugin.dra_socket) as client:
        answers = client.prepare([bad, target.claim], timeout=CALL_TIMEOUT)
    expected = (
        "is not a ResourceClaim name" if problem == "name" else "is not a Kubernetes namespace"
    )
    assert expected in answers[bad.uid].error
    assert answers[bad.uid].devices == ()
    assert answers[target.claim.uid] == target.answer
    target.assert_serving()
