# SPDX-License-Identifier: Apache-2.0
"""The kubelet-facing gRPC servers, called the way a kubelet calls them.

Our grpclib servers run on unix sockets in a temporary directory; the
kubelet's side is played by grpcio (stubs generated from the same protos by
tests/grpc_stubs.py), an independent gRPC implementation. grpcio's blocking
client runs in worker threads so the servers keep the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from kubeletplugin.claims import ClaimRef, PreparedDevice
from kubeletplugin.dra_service import MIN_HEALTH_INTERVAL
from kubeletplugin.grpc_service import (
    ChangeSignal,
    DeviceHealth,
    PluginServers,
    SocketPaths,
    listen_unix,
)
from kubeletplugin.state import PrepareResult
from tests import grpc_stubs

DRIVER = "nx.device.power.ibm.com"
POOL = "node-a"
CALL_TIMEOUT = 5.0

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpclib runs on asyncio only


class StuckSignal:
    """A change signal that is always set, as from a backend that forgets to reset it."""

    async def wait(self) -> None:
        return None


class RecordingBackend:
    """A small real backend: prepares every claim as one shared device,
    except claims named `bad-*` (per-claim error) and `lost-*` (left out of
    the answer); `raise_error` makes whole calls fail."""

    def __init__(self) -> None:
        self.prepared: dict[str, ClaimRef] = {}
        self.calls: list[tuple[str, list[ClaimRef]]] = []
        self.budgets: list[float] = []
        self.raise_error: Exception | None = None
        self.gate: asyncio.Event | None = None  # when set, prepare waits for it
        self.entered = asyncio.Event()
        self.stuck_signal = False  # health_changed() fires at once, every time
        self._health = [DeviceHealth(POOL, "nx-gzip", True, "credits available")]
        self._changed = asyncio.Event()

    def _check(self, method: str, claims: list[ClaimRef]) -> None:
        self.calls.append((method, claims))
        if self.raise_error is not None:
            raise self.raise_error

    async def prepare_claims(
        self, claims: list[ClaimRef], *, budget: float
    ) -> dict[str, PrepareResult]:
        self._check("prepare", claims)
        self.budgets.append(budget)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        out: dict[str, PrepareResult] = {}
        for c in claims:
            if c.name.startswith("lost-"):
                continue
            if c.name.startswith("bad-"):
                out[c.uid] = PrepareResult(error=f"claim {c.namespace}/{c.name}: bad config")
                continue
            self.prepared[c.uid] = c
            device = PreparedDevice(
                request_names=("nx",),
                pool_name=POOL,
                device_name="nx-gzip",
                cdi_device_ids=(f"k8s.nx.device.power.ibm.com/nx=claim-{c.uid}",),
                credits=1,
                share_id=f"share-{c.uid}" if c.name.startswith("shared-") else "",
            )
            out[c.uid] = PrepareResult((device,))
        return out

    async def unprepare_claims(self, claims: list[ClaimRef], *, budget: float) -> dict[str, str]:
        self._check("unprepare", claims)
        out: dict[str, str] = {}
        for c in claims:
            if c.name.startswith("lost-"):
                continue
            self.prepared.pop(c.uid, None)
            out[c.uid] = "cannot remove CDI spec" if c.name.startswith("bad-") else ""
        return out

    def device_health(self) -> list[DeviceHealth]:
        return list(self._health)

    def health_changed(self) -> ChangeSignal:
        return StuckSignal() if self.stuck_signal else self._changed

    def set_health(self, devices: list[DeviceHealth]) -> None:
        self._health = devices
        self._changed.set()
        self._changed = asyncio.Event()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short and world-traversable: unix socket paths are limited to 107
    # bytes, and one test connects as an unprivileged user.
    d = Path(tempfile.mkdtemp(prefix="dra-", dir="/tmp"))
    d.chmod(0o755)
    (d / "registry").mkdir(mode=0o755)
    (d / "plugin").mkdir(mode=0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sockets(sock_dir: Path) -> SocketPaths:
    return SocketPaths.for_driver(
        DRIVER, registry_dir=sock_dir / "registry", plugin_data_dir=sock_dir / "plugin"
    )


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
async def servers(backend: RecordingBackend, sockets: SocketPaths) -> AsyncIterator[PluginServers]:
    async with PluginServers(
        backend, driver_name=DRIVER, sockets=sockets, health_resend_interval=30.0
    ) as s:
        yield s


class Kubelet:
    """The kubelet's side: grpcio stubs on channels to our sockets."""

    def __init__(self, apis: grpc_stubs.KubeletApis, sockets: SocketPaths) -> None:
        self.apis = apis
        self.sockets = sockets
        self._channels: dict[Path, grpc.Channel] = {}

    def channel(self, path: Path) -> grpc.Channel:
        if path not in self._channels:
            self._channels[path] = grpc.insecure_channel(f"unix:{path}")
        return self._channels[path]

    def registration(self) -> tuple[Any, Any]:
        api = self.apis.registration
        return api.pb2, api.grpc.RegistrationStub(self.channel(self.sockets.registration))

    def dra(self, version: str) -> tuple[Any, Any]:
        api = self.apis.dra[version]
        return api.pb2, api.grpc.DRAPluginStub(self.channel(self.sockets.dra))

    def health(self, version: str) -> tuple[Any, Any]:
        api = self.apis.health[version]
        return api.pb2, api.grpc.DRAResourceHealthStub(self.channel(self.sockets.dra))

    def raw(self, method_path: str) -> Any:
        """A unary call on the DRA socket that sends and returns raw bytes."""
        return self.channel(self.sockets.dra).unary_unary(method_path)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


@pytest.fixture
def kubelet(sockets: SocketPaths) -> Iterator[Kubelet]:
    k = Kubelet(grpc_stubs.load(), sockets)
    yield k
    k.close()


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking grpcio call in a worker thread."""
    kwargs.setdefault("timeout", CALL_TIMEOUT)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def grpc_error(fn: Callable[..., Any], *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        await call(fn, *args)
    return info.value


def claims_msg(pb2: Any, *names: str) -> list[Any]:
    return [pb2.Claim(namespace="default", uid=f"uid-{n}", name=n) for n in names]


# Raw HTTP/2 pieces, for clients that misbehave below gRPC.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = struct.pack(">I", 0)[1:] + b"\x04\x00" + struct.pack(">I", 0)  # empty SETTINGS


def _frame(length: int, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    header = struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id)
    return header + payload


# --- socket naming (pure) --------------------------------------------------------


def test_socket_paths_default_names() -> None:
    p = SocketPaths.for_driver(
        DRIVER,
        registry_dir=Path("/var/lib/kubelet/plugins_registry"),
        plugin_data_dir=Path("/var/lib/kubelet/plugins") / DRIVER,
    )
    assert p.registration == Path(
        "/var/lib/kubelet/plugins_registry/nx.device.power.ibm.com-reg.sock"
    )
    assert p.dra == Path("/var/lib/kubelet/plugins/nx.device.power.ibm.com/dra.sock")


def test_socket_paths_with_pod_uid_for_rolling_update() -> None:
    uid = "0b5a6c1e-94c1-4f5e-9d43-6e0f7f2c1a77"
    p = SocketPaths.for_driver(
        DRIVER,
        registry_dir=Path("/var/lib/kubelet/plugins_registry"),
        plugin_data_dir=Path("/var/lib/kubelet/plugins") / DRIVER,
        pod_uid=uid,
    )
    assert p.registration.name == f"nx.device.power.ibm.com-{uid}-reg.sock"
    assert p.dra.name == f"dra-{uid}.sock"
    assert len(os.fsencode(p.registration)) <= 107


def test_too_long_socket_path_is_refused_with_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        listen_unix(tmp_path / ("x" * 120) / "dra.sock")


def test_missing_socket_directory_is_reported_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"cannot create unix socket {tmp_path}/no/"):
        listen_unix(tmp_path / "no" / "dra.sock")


# --- registration ---------------------------------------------------------------


async def test_get_info_names_driver_endpoint_and_services_newest_first(
    servers: PluginServers, kubelet: Kubelet
) -> None:
    pb2, stub = kubelet.registration()
    info = await call(stub.GetInfo, pb2.InfoRequest())
    assert info.type == "DRAPlugin"
    assert info.name == DRIVER
    assert info.endpoint == str(kubelet.sockets.dra)
    assert list(info.supported_versions) == [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1.DRAResourceHealth",
        "v1beta1.DRAResourceHealth",
        "v1alpha1.DRAResourceHealth",
    ]


async def test_refused_registration_is_logged_with_kubelet_reason(
    servers: PluginServers, kubelet: Kubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pb2, stub = kubelet.registration()
    reason = 'none of services supported by the plugin (["v9.DRAPlugin"]) are supported'
    with caplog.at_level(logging.ERROR, logger="kubeletplugin.grpc_service"):
        await call(
            stub.NotifyRegistrationStatus,
            pb2.RegistrationStatus(plugin_registered=False, error=reason),
        )
    assert servers.registration.registered is False
    assert servers.registration.error == reason
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert reason in errors[0].getMessage()


async def test_a_repeated_refusal_is_logged_once(
    servers: PluginServers, kubelet: Kubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pb2, stub = kubelet.registration()
    with caplog.at_level(logging.DEBUG, logger="kubeletplugin.grpc_service"):
        for _ in range(20):  # anyone who can reach the socket can send this
            await call(
                stub.NotifyRegistrationStatus,
                pb2.RegistrationStatus(plugin_registered=False, error="forged"),
            )
    assert [r.levelno for r in caplog.records if "forged" in r.getMessage()] == [
        logging.ERROR,
        *[logging.DEBUG] * 19,
    ]


async def test_accepted_registration_is_recorded(servers: PluginServers, kubelet: Kubelet) -> None:
    assert servers.registration.registered is None
    pb2, stub = kubelet.registration()
    await call(stub.NotifyRegistrationStatus, pb2.RegistrationStatus(plugin_registered=True))
    assert servers.registration.registered is True
    assert servers.registration.error == ""


# --- DRA v1 and v1beta1 ----------------------------------------------------------

VERSIONS = ["v1", "v1beta1"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_prepare_answers_devices_and_cdi_ids_per_claim(
    version: str, servers: PluginServers, kubelet: Kubelet
) -> None:
    pb2, stub = kubelet.dra(version)
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "a", "b"))
    resp = await call(stub.NodePrepareResources, req)
    assert set(resp.claims) == {"uid-a", "uid-b"}
    got = resp.claims["uid-a"]
    assert got.error == ""
    assert len(got.devices) == 1
    dev = got.devices[0]
    assert (list(dev.request_names), dev.pool_name, dev.device_name) == (["nx"], POOL, "nx-gzip")
    assert list(dev.cdi_device_ids) == ["k8s.nx.device.power.ibm.com/nx=claim-uid-a"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_prepare_error_stays_in_that_claims_entry(
    version: str, servers: PluginServers, kubelet: Kubelet
) -> None:
    pb2, stub = kubelet.dra(version)
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "good", "bad-cfg", "lost-x"))
    resp = await call(stub.NodePrepareResources, req)
    assert set(resp.claims) == {"uid-good", "uid-bad-cfg", "uid-lost-x"}
    assert resp.claims["uid-good"].error == ""
    assert len(resp.claims["uid-good"].devices) == 1
    assert resp.claims["uid-bad-cfg"].error == "claim default/bad-cfg: bad config"
    assert "no result" in resp.claims["uid-lost-x"].error


@pytest.mark.parametrize("version", VERSIONS)
async def test_unprepare_answers_an_entry_for_every_claim(
    version: str, servers: PluginServers, kubelet: Kubelet
) -> None:
    pb2, stub = kubelet.dra(version)
    req = pb2.NodeUnprepareResourcesRequest(
        claims=claims_msg(pb2, "never-prepared", "bad-x", "lost-y")
    )
    resp = await call(stub.NodeUnprepareResources, req)
    assert set(resp.claims) == {"uid-never-prepared", "uid-bad-x", "uid-lost-y"}
    assert resp.claims["uid-never-prepared"].error == ""
    assert resp.claims["uid-bad-x"].error == "cannot remove CDI spec"
    assert "no result" in resp.claims["uid-lost-y"].error


@pytest.mark.parametrize("version", VERSIONS)
async def test_empty_request_gets_empty_map_without_backend_call(
    version: str, servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    pb2, stub = kubelet.dra(version)
    resp = await call(stub.NodePrepareResources, pb2.NodePrepareResourcesRequest())
    assert dict(resp.claims) == {}
    assert backend.calls == []


async def test_duplicate_claims_reach_the_backend_once(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    pb2, stub = kubelet.dra("v1")
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "a", "a"))
    resp = await call(stub.NodePrepareResources, req)
    assert set(resp.claims) == {"uid-a"}
    assert backend.calls == [("prepare", [ClaimRef("default", "uid-a", "a")])]


async def test_claim_without_uid_is_invalid_argument(
    servers: PluginServers, kubelet: Kubelet
) -> None:
    pb2, stub = kubelet.dra("v1")
    req = pb2.NodePrepareResourcesRequest(claims=[pb2.Claim(namespace="default", name="no-uid")])
    err = await grpc_error(stub.NodePrepareResources, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "NodePrepareResources: claim #0 (default/no-uid) has an empty uid"


async def test_backend_exception_becomes_internal_status_with_message(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    backend.raise_error = RuntimeError("state file is corrupt")
    pb2, stub = kubelet.dra("v1")
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "a"))
    err = await grpc_error(stub.NodePrepareResources, req)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "NodePrepareResources: RuntimeError: state file is corrupt"


async def test_backend_timeout_becomes_deadline_exceeded(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    backend.raise_error = TimeoutError("API server did not answer")
    pb2, stub = kubelet.dra("v1beta1")
    req = pb2.NodeUnprepareResourcesRequest(claims=claims_msg(pb2, "a"))
    err = await grpc_error(stub.NodeUnprepareResources, req)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.details() == "NodeUnprepareResources: TimeoutError: API server did not answer"


async def test_undecodable_request_is_invalid_argument(
    servers: PluginServers, kubelet: Kubelet
) -> None:
    raw = kubelet.raw("/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources")
    err = await grpc_error(raw, b"\x08\xff\xff")  # field 1 as a varint that never ends
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode request" in (err.details() or "")


async def test_claim_with_invalid_wire_type_is_invalid_argument(
    servers: PluginServers, kubelet: Kubelet
) -> None:
    raw = kubelet.raw("/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources")
    err = await grpc_error(raw, b"\x0f")  # field 1 with wire type 7, which does not exist
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "NodeUnprepareResources: claim #0 is malformed"


async def test_claim_field_of_the_wrong_type_is_invalid_argument_naming_it(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    raw = kubelet.raw("/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources")
    claim = b"\x08\x05" + b"\x12\x01u" + b"\x1a\x01n"  # namespace (1) sent as the number 5
    err = await grpc_error(raw, b"\x0a" + bytes([len(claim)]) + claim)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "NodePrepareResources: claim #0: field namespace (1) must be a string, got int"
    )
    assert backend.calls == []


async def test_a_message_over_4_mib_is_refused_before_it_is_read(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    pb2, stub = kubelet.dra("v1")
    claims = [pb2.Claim(namespace="default", uid=f"u{i}", name="x" * 100) for i in range(50_000)]
    req = pb2.NodePrepareResourcesRequest(claims=claims)
    assert req.ByteSize() > 4 * 1024 * 1024
    err = await grpc_error(stub.NodePrepareResources, req)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than the limit of 4194304 bytes" in (err.details() or "")
    assert backend.calls == []
    # The connection still serves.
    resp = await call(stub.NodePrepareResources, pb2.NodePrepareResourcesRequest())
    assert dict(resp.claims) == {}


async def test_the_backend_gets_the_callers_deadline_as_its_budget(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    pb2, stub = kubelet.dra("v1")
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "a"))
    await call(stub.NodePrepareResources, req, timeout=3.0)
    await call(stub.NodePrepareResources, req, timeout=None)
    short, unbounded = backend.budgets
    assert 0 < short <= 3.0 - 0.5  # answered with a margin before the caller gives up
    assert unbounded == 40.0  # never longer than the kubelet's 45 s allow


async def test_share_id_is_answered_on_dra_v1(servers: PluginServers, kubelet: Kubelet) -> None:
    pb2, stub = kubelet.dra("v1")
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "shared-a", "b"))
    resp = await call(stub.NodePrepareResources, req)
    assert resp.claims["uid-shared-a"].devices[0].share_id == "share-uid-shared-a"
    assert not resp.claims["uid-b"].devices[0].HasField("share_id")


async def test_v1beta1_answers_without_share_id(servers: PluginServers, kubelet: Kubelet) -> None:
    pb2, stub = kubelet.dra("v1beta1")
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "shared-a"))
    resp = await call(stub.NodePrepareResources, req)
    assert resp.claims["uid-shared-a"].error == ""
    assert "share_id" not in pb2.Device.DESCRIPTOR.fields_by_name


async def test_unknown_method_is_unimplemented(servers: PluginServers, kubelet: Kubelet) -> None:
    err = await grpc_error(kubelet.raw("/k8s.io.kubelet.pkg.apis.dra.v2.DRAPlugin/Nope"), b"")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_thousand_claims_in_one_request(servers: PluginServers, kubelet: Kubelet) -> None:
    pb2, stub = kubelet.dra("v1")
    names = [f"c{i:04d}" for i in range(1000)]
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, *names))
    resp = await call(stub.NodePrepareResources, req)
    assert len(resp.claims) == 1000
    assert all(resp.claims[f"uid-{n}"].error == "" for n in names)
    assert resp.claims["uid-c0999"].devices[0].cdi_device_ids == [
        "k8s.nx.device.power.ibm.com/nx=claim-uid-c0999"
    ]


# --- health -----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1alpha1", "v1beta1", "v1"])
async def test_health_stream_sends_full_list_on_connect_and_on_change(
    version: str, servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    pb2, stub = kubelet.health(version)
    stream = stub.NodeWatchResources(pb2.NodeWatchResourcesRequest(), timeout=CALL_TIMEOUT)
    try:
        before = int(time.time())
        first = await anyio.to_thread.run_sync(next, stream)
        assert [
            (d.device.pool_name, d.device.device_name, d.health, d.message) for d in first.devices
        ] == [(POOL, "nx-gzip", pb2.HEALTHY, "credits available")]
        assert first.devices[0].last_updated_time >= before
        assert first.devices[0].health_check_timeout_seconds == 30

        backend.set_health(
            [
                DeviceHealth(POOL, "nx-gzip", False, "/dev/crypto/nx-gzip is gone"),
                DeviceHealth(POOL, "nx-gzip-1", None),
            ]
        )
        second = await anyio.to_thread.run_sync(next, stream)
        assert [(d.device.device_name, d.health, d.message) for d in second.devices] == [
            ("nx-gzip", pb2.UNHEALTHY, "/dev/crypto/nx-gzip is gone"),
            ("nx-gzip-1", pb2.UNKNOWN, ""),
        ]
    finally:
        stream.cancel()


async def test_health_stream_is_rate_limited_when_the_signal_stays_set(
    servers: PluginServers, kubelet: Kubelet, backend: RecordingBackend
) -> None:
    backend.stuck_signal = True
    pb2, stub = kubelet.health("v1")
    stream = stub.NodeWatchResources(pb2.NodeWatchResourcesRequest(), timeout=CALL_TIMEOUT)
    try:
        started = time.monotonic()
        for _ in range(4):
            await anyio.to_thread.run_sync(next, stream)
        assert time.monotonic() - started >= 3 * MIN_HEALTH_INTERVAL
    finally:
        stream.cancel()


async def test_health_stream_resends_the_list_periodically(
    backend: RecordingBackend, sockets: SocketPaths, kubelet: Kubelet
) -> None:
    async with PluginServers(
        backend, driver_name=DRIVER, sockets=sockets, health_resend_interval=0.1
    ):
        pb2, stub = kubelet.health("v1alpha1")
        stream = stub.NodeWatchResources(pb2.NodeWatchResourcesRequest(), timeout=CALL_TIMEOUT)
        try:
            for _ in range(3):  # connect + two resends without any change
                resp = await anyio.to_thread.run_sync(next, stream)
                assert len(resp.devices) == 1
        finally:
            stream.cancel()


# --- start and stop -----------------------------------------------------------------


async def test_shutdown_ends_an_open_health_stream_cleanly(
    backend: RecordingBackend, sockets: SocketPaths, kubelet: Kubelet
) -> None:
    pb2, stub = kubelet.health("v1")
    async with PluginServers(backend, driver_name=DRIVER, sockets=sockets):
        stream = stub.NodeWatchResources(pb2.NodeWatchResourcesRequest(), timeout=CALL_TIMEOUT)
        await anyio.to_thread.run_sync(next, stream)
    # The kubelet sees EOF (not its own deadline running out: close did not wait for it), which it logs as a normal end of the stream.
    assert await anyio.to_thread.run_sync(next, stream, None) is None
    assert stream.code() == grpc.StatusCode.OK


async def test_shutdown_lets_a_running_prepare_finish(
    backend: RecordingBackend, sockets: SocketPaths, kubelet: Kubelet
) -> None:
    backend.gate = asyncio.Event()
    pb2, stub = kubelet.dra("v1")
    req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "slow"))
    result: list[Any] = []
    servers = PluginServers(backend, driver_name=DRIVER, sockets=sockets)
    await servers.start()
    async with anyio.create_task_group() as tg:

        async def kubelet_call() -> None:
            result.append(await call(stub.NodePrepareResources, req))

        tg.start_soon(kubelet_call)
        await backend.entered.wait()
        tg.start_soon(servers.close)
        # close() stops listening first (the socket file goes), then waits for the call.
        with anyio.fail_after(CALL_TIMEOUT):
            while sockets.dra.exists():
                await anyio.sleep(0.005)
        assert not result  # the call is still held by the backend
        backend.gate.set()
    assert result[0].claims["uid-slow"].error == ""


async def test_shutdown_closes_open_connections(
    backend: RecordingBackend, sockets: SocketPaths
) -> None:
    def connect(path: Path) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CALL_TIMEOUT)
        s.connect(str(path))
        s.sendall(PREFACE + SETTINGS)
        return s

    async with PluginServers(backend, driver_name=DRIVER, sockets=sockets):
        conns = [
            await anyio.to_thread.run_sync(connect, sockets.registration),
            await anyio.to_thread.run_sync(connect, sockets.dra),
        ]
    try:
        for s in conns:

            def read_to_eof(s: socket.socket = s) -> bytes:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

            await anyio.to_thread.run_sync(read_to_eof)  # returns at EOF, times out otherwise
    finally:
        for s in conns:
            s.close()


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays behind, as after a crash


async def test_stale_sockets_are_replaced_at_start(
    backend: RecordingBackend, sockets: SocketPaths, kubelet: Kubelet
) -> None:
    _stale_socket(sockets.registration)
    _stale_socket(sockets.dra)
    async with PluginServers(backend, driver_name=DRIVER, sockets=sockets):
        reg_pb2, reg = kubelet.registration()
        info = await call(reg.GetInfo, reg_pb2.InfoRequest())
        assert info.name == DRIVER
        pb2, dra = kubelet.dra("v1")
        resp = await call(dra.NodeUnprepareResources, pb2.NodeUnprepareResourcesRequest())
        assert dict(resp.claims) == {}


async def test_sockets_are_removed_at_shutdown_and_nothing_else_is_left(
    backend: RecordingBackend, sockets: SocketPaths
) -> None:
    async with PluginServers(backend, driver_name=DRIVER, sockets=sockets):
        assert sockets.registration.is_socket()
        assert sockets.dra.is_socket()
    assert list(sockets.registration.parent.iterdir()) == []
    assert list(sockets.dra.parent.iterdir()) == []


async def test_shutdown_leaves_a_newer_instances_socket_alone(
    backend: RecordingBackend, sockets: SocketPaths
) -> None:
    async with PluginServers(backend, driver_name=DRIVER, sockets=sockets):
        newer = listen_unix(sockets.registration)  # what a replacing pod does
    try:
        assert sockets.registration.is_socket()
        assert not sockets.dra.exists()
    finally:
        newer.close()


async def test_sockets_are_owner_only(servers: PluginServers, sockets: SocketPaths) -> None:
    for path in (sockets.registration, sockets.dra):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try as another user")
async def test_unprivileged_users_cannot_connect(
    servers: PluginServers, sockets: SocketPaths
) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run as another user")
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except PermissionError:\n sys.exit(13)\n"
    )
    for path in (sockets.registration, sockets.dra):
        result = await anyio.run_process(
            [python, "-I", "-S", "-c", code, str(path)],
            check=False,
            user=65534,
            group=65534,
            extra_groups=[],
        )
        assert result.returncode == 13, result.stderr


# --- protocol abuse -----------------------------------------------------------------

ABUSE = [
    random.Random(4).randbytes(4096),  # fixed seed: the same bytes every run
    PREFACE + _frame(6, 0x4, 0, 0)[:7],  # SETTINGS header cut short
    PREFACE + SETTINGS + _frame(1000, 0x1, 0x4, 1, b"\x82"),  # HEADERS promising 1000 bytes
    PREFACE + SETTINGS + _frame(5, 0x0, 0x1, 7, b"\0" * 5),  # DATA on a stream never opened
    PREFACE + SETTINGS + _frame(0xFFFFFF, 0x0, 0, 1, b"x" * 64),  # frame over the size limit
    PREFACE[:10],  # preface cut short
]


def _abuse(path: Path, payload: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CALL_TIMEOUT)
    s.connect(str(path))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(payload)  # the server may hang up first: fine
    return s


async def test_garbage_on_both_sockets_does_not_stop_serving(
    servers: PluginServers, sockets: SocketPaths, kubelet: Kubelet
) -> None:
    held: list[socket.socket] = []
    try:
        for path in (sockets.registration, sockets.dra):
            for payload in ABUSE:
                held.append(await anyio.to_thread.run_sync(_abuse, path, payload))
        for s in held[::2]:  # the others stay open while the kubelet calls
            s.close()

        reg_pb2, reg = kubelet.registration()
        info = await call(reg.GetInfo, reg_pb2.InfoRequest())
        assert info.name == DRIVER
        pb2, dra = kubelet.dra("v1")
        req = pb2.NodePrepareResourcesRequest(claims=claims_msg(pb2, "after-abuse"))
        resp = await call(dra.NodePrepareResources, req)
        assert resp.claims["uid-after-abuse"].error == ""
    finally:
        for s in held:
            s.close()
