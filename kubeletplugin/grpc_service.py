# SPDX-License-Identifier: Apache-2.0
"""The gRPC services the kubelet calls on a DRA plugin, served with grpclib.

Two unix sockets:

- the registration socket in the kubelet's plugins_registry directory
  (`pluginregistration.Registration`): the kubelet finds it, asks `GetInfo`
  and reports the outcome with `NotifyRegistrationStatus`;
- the DRA socket in the plugin's data directory, named in `GetInfo`: DRA
  `v1` and `v1beta1` (`NodePrepareResources`, `NodeUnprepareResources`) and
  the device health stream (`v1alpha1`, `v1beta1`, `v1`).

The services only translate between wire messages and a `DraBackend`; what
preparing a claim means lives in the backend. Errors about one claim go into
that claim's entry of the response; a request that cannot be answered at all
gets a gRPC status with a message, never grpclib's bare "Internal Server
Error".
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

import anyio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.server import Server

from kubeletplugin.claims import ClaimRef, clip
from proto_gen.generated import pluginregistration as registration_api
from proto_gen.generated import v1 as health_v1
from proto_gen.generated import v1alpha1 as health_v1alpha1
from proto_gen.generated import v1beta1 as health_v1beta1
from proto_gen.generated.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from proto_gen.generated.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1

if TYPE_CHECKING:
    from kubeletplugin.state import PrepareResult

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"
# Advertised in PluginInfo.supported_versions as "<proto package>.<service>".
# The kubelet uses the first DRA service of this list that it knows, so the
# newest comes first. Kubelets up to 1.36 ignore the health entries and call
# v1alpha1 whenever their ResourceHealthStatus gate is on; newer ones open a
# health stream only for an advertised health service, their newest known.
SUPPORTED_SERVICES = (
    "v1.DRAPlugin",
    "v1beta1.DRAPlugin",
    "v1.DRAResourceHealth",
    "v1beta1.DRAResourceHealth",
    "v1alpha1.DRAResourceHealth",
)
# Shortest time between two health lists on one stream.
MIN_HEALTH_INTERVAL = 0.1
# Longest status message we send: it travels in an HTTP/2 header, which
# clients cap (grpc-go at 16 KiB), and encoding a huge one stalls the server.
MAX_STATUS_MESSAGE = 2000
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# The largest request message we decode: the kubelet's own gRPC limit (grpc-go's
# default receive size). A bigger one is refused from its length prefix, before
# a byte of it is buffered or parsed.
MAX_REQUEST_MESSAGE = 4 * 1024 * 1024
# The kubelet gives a DRA call 45 s. A call answers within its own gRPC
# deadline, never later than this, keeping a margin for the answer's way back.
MAX_CALL_BUDGET = 40.0
MIN_DEADLINE_MARGIN = 0.5


# --- what the backend sees ---------------------------------------------------
# (plus ClaimRef, the kubelet's name for a claim, shared with kubeletplugin.claims)

__all__ = [
    "ChangeSignal",
    "ClaimRef",
    "DeviceHealth",
    "DraBackend",
    "PluginServers",
    "RegistrationState",
    "SocketPaths",
    "listen_unix",
]


@dataclass(frozen=True)
class DeviceHealth:
    """Health of one device; `healthy=None` means unknown."""

    pool_name: str
    device_name: str
    healthy: bool | None
    message: str = ""


class ChangeSignal(Protocol):
    """Something to wait on, such as `asyncio.Event` or `anyio.Event`."""

    def wait(self) -> Awaitable[object]: ...


class DraBackend(Protocol):
    """What the services need from the plugin."""

    async def prepare_claims(
        self, claims: list[ClaimRef], *, budget: float
    ) -> Mapping[str, PrepareResult]:
        """Prepare claims (unique, non-empty UIDs); result keyed by claim UID.

        Per-claim failures go into that claim's result. A claim missing from
        the answer is reported to the kubelet as failed. `budget` is how many
        seconds the caller waits for the answer (its gRPC deadline, capped).
        """
        ...

    async def unprepare_claims(self, claims: list[ClaimRef], *, budget: float) -> Mapping[str, str]:
        """Unprepare claims (unique, non-empty UIDs); claim UID -> error message, "" for
        success. `budget` as for `prepare_claims`."""
        ...

    def device_health(self) -> list[DeviceHealth]:
        """Current health of every device of the driver on this node."""
        ...

    def health_changed(self) -> ChangeSignal:
        """A signal that fires at the first change of `device_health()` after this call.

        Typically an event that is set and replaced on every change. The
        health stream calls this right before `device_health()`, so no change
        can slip between reading the list and waiting.
        """
        ...


@dataclass
class RegistrationState:
    """What the kubelet last said about our registration."""

    registered: bool | None = None  # None: the kubelet has not reported yet
    error: str = ""


# --- socket paths --------------------------------------------------------------


@dataclass(frozen=True)
class SocketPaths:
    registration: Path
    dra: Path

    @classmethod
    def for_driver(
        cls,
        driver_name: str,
        *,
        registry_dir: Path,
        plugin_data_dir: Path,
        pod_uid: str = "",
    ) -> SocketPaths:
        """Socket paths as the upstream kubelet plugin helper names them.

        Without a pod UID: `<registry_dir>/<driver>-reg.sock` and
        `<plugin_data_dir>/dra.sock`. With one (rolling updates, kubelet 1.33+;
        two plugin pods of one driver serve side by side):
        `<driver>-<uid>-reg.sock` and `dra-<uid>.sock`.
        """
        suffix = f"-{pod_uid}" if pod_uid else ""
        return cls(
            registration=registry_dir / f"{driver_name}{suffix}-reg.sock",
            dra=plugin_data_dir / f"dra{suffix}.sock",
        )


# --- wire <-> backend ------------------------------------------------------------


_CLAIM_FIELDS = (("namespace", 1), ("uid", 2), ("name", 3))


def _claim_refs(method: str, api: Any, claims: list[Any]) -> list[ClaimRef]:
    """Claims of a request, first occurrence of each UID; empty UIDs are a bad request."""
    refs: dict[str, ClaimRef] = {}
    for i, claim in enumerate(claims):
        # betterproto2 turns a claim with an invalid wire type into None, and
        # a string field sent as a number into an int.
        if not isinstance(claim, api.Claim):
            raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: claim #{i} is malformed")
        for name, number in _CLAIM_FIELDS:
            value = getattr(claim, name, None)
            if not isinstance(value, str):
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"{method}: claim #{i}: field {name} ({number}) must be a string, "
                    f"got {type(value).__name__}",
                )
        if not claim.uid:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"{method}: claim #{i} ({clip(claim.namespace)}/{clip(claim.name)}) "
                "has an empty uid",
            )
        refs.setdefault(claim.uid, ClaimRef(claim.namespace, claim.uid, claim.name))
    return list(refs.values())


def _prepare_response(
    api: Any, claims: list[ClaimRef], results: Mapping[str, PrepareResult], shares: bool
) -> Any:
    """The wire answer to NodePrepareResources: the one place results become messages.

    `shares`: the API version's Device has `share_id` (DRA v1, not v1beta1).
    """
    device_type, answer_type = api.Device, api.NodePrepareResourceResponse
    out: dict[str, Any] = {}
    for claim in claims:
        result = results.get(claim.uid)
        if result is None:
            out[claim.uid] = answer_type(error=_missing(claim))
        elif result.error:
            out[claim.uid] = answer_type(error=result.error)
        else:
            out[claim.uid] = answer_type(
                devices=[
                    device_type(
                        request_names=list(d.request_names),
                        pool_name=d.pool_name,
                        device_name=d.device_name,
                        cdi_device_ids=list(d.cdi_device_ids),
                        **({"share_id": d.share_id} if shares and d.share_id else {}),
                    )
                    for d in result.devices
                ]
            )
    return api.NodePrepareResourcesResponse(claims=out)


def _unprepare_response(api: Any, claims: list[ClaimRef], errors: Mapping[str, str]) -> Any:
    """The wire answer to NodeUnprepareResources."""
    answer_type = api.NodeUnprepareResourceResponse
    out: dict[str, Any] = {}
    for claim in claims:
        error = errors.get(claim.uid)
        out[claim.uid] = answer_type(error=_missing(claim) if error is None else error)
    return api.NodeUnprepareResourcesResponse(claims=out)


def _missing(claim: ClaimRef) -> str:
    return f"claim {claim} ({claim.uid}): the plugin returned no result (plugin bug)"


class _DraService:
    """NodePrepareResources / NodeUnprepareResources for one DRA API version."""

    def __init__(self, api: Any, backend: DraBackend) -> None:
        self._api = api
        self._backend = backend
        self._shares = "share_id" in api.Device.__dataclass_fields__  # DRA v1, not v1beta1

    async def node_prepare_resources(self, request: Any, budget: float) -> Any:
        claims = _claim_refs("NodePrepareResources", self._api, request.claims)
        results = await self._backend.prepare_claims(claims, budget=budget) if claims else {}
        return _prepare_response(self._api, claims, results, self._shares)

    async def node_unprepare_resources(self, request: Any, budget: float) -> Any:
        claims = _claim_refs("NodeUnprepareResources", self._api, request.claims)
        errors = await self._backend.unprepare_claims(claims, budget=budget) if claims else {}
        return _unprepare_response(self._api, claims, errors)


class _HealthService:
    """NodeWatchResources for one health API version: the full device list
    on connect, on every change, and at least every `resend_interval` seconds.

    The periodic resend matters: the kubelet stamps each device with the time
    it received the list and turns it "Unknown" once that is older than
    health_check_timeout_seconds (30 s when unset), so a list sent only on
    change would go stale on a healthy node.
    """

    def __init__(
        self,
        api: Any,
        backend: DraBackend,
        lifecycle: _Lifecycle,
        resend_interval: float,
        check_timeout: int,
    ) -> None:
        self._api = api
        self._backend = backend
        self._lifecycle = lifecycle
        self._resend_interval = resend_interval
        self._check_timeout = check_timeout

    def _response(self, devices: list[DeviceHealth]) -> Any:
        api = self._api
        now = int(time.time())
        return api.NodeWatchResourcesResponse(
            devices=[
                api.DeviceHealth(
                    device=api.DeviceIdentifier(pool_name=d.pool_name, device_name=d.device_name),
                    health=(
                        api.HealthStatus.UNKNOWN
                        if d.healthy is None
                        else api.HealthStatus.HEALTHY
                        if d.healthy
                        else api.HealthStatus.UNHEALTHY
                    ),
                    last_updated_time=now,
                    health_check_timeout_seconds=self._check_timeout,
                    message=d.message,
                )
                for d in devices
            ]
        )

    async def node_watch_resources(self, request: Any, send: Send) -> None:
        # Returning ends the stream with status OK, which the kubelet takes
        # as a clean end (it reconnects every 5 s while we are registered).
        while not self._lifecycle.stopping:
            changed = self._backend.health_changed()
            await send(self._response(self._backend.device_health()))
            with self._lifecycle.interruptible(self._resend_interval):
                await changed.wait()
                # Coalesce bursts of changes (and bound a backend whose
                # signal never resets) to one list per MIN_HEALTH_INTERVAL.
                await anyio.sleep(MIN_HEALTH_INTERVAL)


# A refusal with the same reason is logged as an error at most this often
# (anything that can reach the socket can send NotifyRegistrationStatus).
REFUSAL_LOG_INTERVAL = 60.0


class _RegistrationService:
    def __init__(self, driver_name: str, endpoint: Path) -> None:
        self._driver_name = driver_name
        self._endpoint = endpoint
        self.state = RegistrationState()
        self._last_refusal: tuple[str, float] | None = None  # (reason, when logged)
        self._refusals_not_logged = 0
        self.info_answered = anyio.Event()

    async def get_info(self, request: Any, budget: float) -> Any:
        self.info_answered.set()
        return registration_api.PluginInfo(
            type=PLUGIN_TYPE,
            name=self._driver_name,
            endpoint=str(self._endpoint),
            supported_versions=list(SUPPORTED_SERVICES),
        )

    async def notify_registration_status(self, request: Any, budget: float) -> Any:
        self.state = RegistrationState(request.plugin_registered, request.error)
        if request.plugin_registered:
            log.info("kubelet registered DRA driver %s at %s", self._driver_name, self._endpoint)
        else:
            self._log_refusal(clip(request.error or "no reason given", 500))
        return registration_api.RegistrationStatusResponse()

    def _log_refusal(self, reason: str) -> None:
        now = time.monotonic()
        last = self._last_refusal
        if last is not None and last[0] == reason and now - last[1] < REFUSAL_LOG_INTERVAL:
            self._refusals_not_logged += 1
            log.debug("kubelet refused registration again: %s", reason)
            return
        log.error(
            "kubelet refused to register DRA driver %s: %s "
            "(check the kubelet version and its DynamicResourceAllocation feature gate)",
            self._driver_name,
            reason,
            extra={"repeatsNotLogged": self._refusals_not_logged},
        )
        self._last_refusal = (reason, now)
        self._refusals_not_logged = 0


# --- grpclib plumbing ------------------------------------------------------------


def _snake_case(method: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in method).lstrip("_")


def _status_for(method: str, exc: Exception) -> Any:
    if isinstance(exc, GRPCError):
        if exc.message is not None and len(exc.message) > MAX_STATUS_MESSAGE:
            return GRPCError(exc.status, clip(exc.message, MAX_STATUS_MESSAGE))
        return exc
    status = Status.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else Status.INTERNAL
    log.error("%s failed", method, exc_info=exc)
    return GRPCError(status, clip(f"{method}: {type(exc).__name__}: {exc}", MAX_STATUS_MESSAGE))


async def _recv_message(method: str, stream: Any) -> Any:
    """grpclib's `Stream.recv_message`, refusing a message over MAX_REQUEST_MESSAGE
    from its length prefix: grpclib has no receive limit and would buffer and
    decode any size. Flow control then holds the unread rest at most one
    HTTP/2 window (4 MiB) per stream, until the stream ends.

    Uses grpclib 0.4 internals (pinned in constraints.txt): the protocol
    stream's `recv_data`, the codec and the request type.
    """
    inner = stream._stream
    meta = await inner.recv_data(5)
    if not meta:
        return None
    if len(meta) != 5:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: message prefix cut short")
    compressed, size = struct.unpack(">?I", meta)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, f"{method}: compressed messages are not supported")
    if size > MAX_REQUEST_MESSAGE:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"{method}: request message of {size} bytes is larger than the limit of "
            f"{MAX_REQUEST_MESSAGE} bytes (the kubelet's own); refused without reading it",
        )
    data = await inner.recv_data(size)
    if len(data) != size:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: message shorter than its prefix")
    message = stream._codec.decode(data, stream._recv_type)
    (message,) = await stream._dispatch.recv_message(message)
    return message


def _call_budget(stream: Any) -> float:
    """Seconds this call may take: its gRPC deadline minus a margin, at most MAX_CALL_BUDGET."""
    deadline = getattr(stream, "deadline", None)
    if deadline is None:
        return MAX_CALL_BUDGET
    remaining = float(deadline.time_remaining())
    margin = max(MIN_DEADLINE_MARGIN, remaining * 0.05)
    return max(0.0, min(MAX_CALL_BUDGET, remaining - margin))


async def _recv_request(method: str, stream: Any) -> Any:
    try:
        request = await _recv_message(method, stream)
    except (GRPCError, StreamTerminatedError, ProtocolError):
        raise
    except Exception as exc:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"{method}: cannot decode request: {type(exc).__name__}: {clip(str(exc), 500)}",
        ) from exc
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: request has no message")
    return request


Send = Callable[[Any], Awaitable[None]]


class _Lifecycle:
    """Calls in flight on one server, and the shutdown signal for streams."""

    def __init__(self) -> None:
        self.stopping = False
        self._active = 0
        self._idle: anyio.Event | None = None  # made by wait_idle, set by the last call
        self._waits: set[anyio.CancelScope] = set()

    def enter(self) -> None:
        """A call starts (pair with `leave` in a `finally`)."""
        self._active += 1

    def leave(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    @contextmanager
    def interruptible(self, timeout: float) -> Iterator[None]:
        """A wait of at most `timeout` seconds that shutdown cuts short."""
        with anyio.move_on_after(timeout) as scope:
            if self.stopping:
                scope.cancel()
            self._waits.add(scope)
            try:
                yield
            finally:
                self._waits.discard(scope)

    def stop(self) -> None:
        self.stopping = True
        for scope in self._waits:
            scope.cancel()

    async def wait_idle(self) -> None:
        while self._active:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()


def _unary_handler(
    method: str, impl: Callable[[Any, float], Awaitable[Any]], lifecycle: _Lifecycle
) -> Callable[[Any], Awaitable[None]]:
    async def handle(stream: Any) -> None:
        lifecycle.enter()
        try:
            request = await _recv_request(method, stream)
            try:
                reply = await impl(request, _call_budget(stream))
            except Exception as exc:
                raise _status_for(method, exc) from exc
            await stream.send_message(reply)
        finally:
            lifecycle.leave()

    return handle


def _server_stream_handler(
    method: str, impl: Callable[[Any, Send], Awaitable[None]], lifecycle: _Lifecycle
) -> Callable[[Any], Awaitable[None]]:
    async def handle(stream: Any) -> None:
        lifecycle.enter()
        try:
            request = await _recv_request(method, stream)
            try:
                await impl(request, stream.send_message)
            except (StreamTerminatedError, ProtocolError):
                raise
            except Exception as exc:
                raise _status_for(method, exc) from exc
        finally:
            lifecycle.leave()

    return handle


class _Servable:
    """A grpclib service: method paths and message types from the generated
    code, implementations from `impl` (methods named in snake case; server
    streams get a `send` callback)."""

    def __init__(self, generated_base: Any, impl: object, lifecycle: _Lifecycle) -> None:
        self._mapping: dict[str, Any] = {}
        for path, handler in generated_base().__mapping__().items():
            method = path.rsplit("/", 1)[1]
            func = getattr(impl, _snake_case(method))
            if handler.cardinality is Cardinality.UNARY_UNARY:
                wrapped = _unary_handler(method, func, lifecycle)
            elif handler.cardinality is Cardinality.UNARY_STREAM:
                wrapped = _server_stream_handler(method, func, lifecycle)
            else:
                raise TypeError(f"{path}: {handler.cardinality} is not supported")
            self._mapping[path] = Handler(
                wrapped, handler.cardinality, handler.request_type, handler.reply_type
            )

    def __mapping__(self) -> Mapping[str, Any]:
        return self._mapping


def _dra_services(
    backend: DraBackend,
    lifecycle: _Lifecycle,
    health_resend_interval: float,
    health_check_timeout: int,
) -> list[_Servable]:
    """All services of the DRA socket: DRA v1 and v1beta1, health v1alpha1, v1beta1, v1."""
    services = [
        _Servable(dra_v1.DraPluginBase, _DraService(dra_v1, backend), lifecycle),
        _Servable(dra_v1beta1.DraPluginBase, _DraService(dra_v1beta1, backend), lifecycle),
    ]
    for api in (health_v1alpha1, health_v1beta1, health_v1):
        impl = _HealthService(api, backend, lifecycle, health_resend_interval, health_check_timeout)
        services.append(_Servable(api.DraResourceHealthBase, impl, lifecycle))
    return services


# --- sockets -------------------------------------------------------------------


def listen_unix(path: Path, *, mode: int = 0o600, backlog: int = 128) -> socket.socket:
    """A listening unix socket at `path` with `mode`, replacing whatever was there.

    The socket is bound under a temporary dot-name (the kubelet's plugin
    watcher ignores those), given its mode, set listening, and renamed into
    place: the kubelet never sees a socket that refuses connections or has
    the wrong mode, and a stale socket from an earlier run is replaced.
    """
    tmp = path.parent / f".{secrets.token_hex(3)}.sock"
    for p in (path, tmp):
        if len(os.fsencode(p)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"unix socket path {p} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter directory"
            )
    if path.is_socket():
        log.info("replacing stale socket %s", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(tmp))
        os.chmod(tmp, mode)
        sock.listen(backlog)
        os.replace(tmp, path)
    except BaseException as exc:
        sock.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot create unix socket {path}: {exc.strerror}") from exc
        raise
    sock.setblocking(False)
    return sock


class _CoalescingTransport:
    """A transport that sends everything one turn of the event loop wrote in one go.

    grpclib (0.4) writes each HTTP/2 piece of an answer as soon as h2 makes
    it: the headers, the data and the trailers of a unary answer, and
    window updates, each its own `write`, so its own system call and its own
    wake-up of the kubelet's reader. Queued and sent by one callback at the
    end of the loop turn, they leave as one write. Everything else goes to
    the real transport.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _TrackedProtocol(asyncio.Protocol):
    """grpclib's connection protocol, with the transport remembered so that
    shutdown can close it: grpclib's Server.close() leaves accepted
    connections open, and the kubelet would keep talking to a dead server."""

    def __init__(self, inner: Any, transports: set[asyncio.BaseTransport]) -> None:
        self._inner = inner
        self._transports = transports
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._transports.add(transport)
        self._inner.connection_made(_CoalescingTransport(cast(asyncio.Transport, transport)))

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transports.discard(self._transport)
        self._inner.connection_lost(exc)


class _UnixServer:
    """A started grpclib server on one unix socket, removed again at close."""

    def __init__(self, path: Path, services: list[Any], lifecycle: _Lifecycle) -> None:
        self.path = path
        self._services = services
        self._lifecycle = lifecycle
        self._server: Any = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        sock = listen_unix(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        server = Server(self._services)
        # grpclib (0.4) creates one protocol per connection with this method.
        grpclib_protocol = server._protocol_factory
        server._protocol_factory = lambda: _TrackedProtocol(grpclib_protocol(), self._connections)
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        self._server = server
        log.info("serving %s", self.path)

    def _remove_socket(self) -> None:
        # Only our own: a newer instance may already have put its socket here.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            self.path.unlink(missing_ok=True)
        else:
            log.info("%s now belongs to another instance; leaving it", self.path)

    async def close(self, grace: float) -> None:
        """Remove the socket, end streams, let running calls finish for up to
        `grace` seconds, then cancel what is left."""
        # The socket file goes first: the kubelet deregisters when it
        # disappears, and no new connection can reach us.
        self._remove_socket()
        server, self._server = self._server, None
        if server is None:
            return
        with anyio.CancelScope(shield=True):
            self._lifecycle.stop()
            with anyio.move_on_after(grace):
                await self._lifecycle.wait_idle()
            server.close()  # stops listening, cancels calls still running
            with anyio.move_on_after(grace):
                await server.wait_closed()
            for transport in list(self._connections):
                transport.close()  # flushes what is buffered (trailers), then closes


class PluginServers:
    """The registration and DRA servers of one plugin instance.

    ::

        async with PluginServers(backend, driver_name=..., sockets=...) as servers:
            await stop.wait()

    The DRA socket starts first so that it answers once the kubelet learns
    its path; at exit the registration socket goes first, then the DRA one.
    """

    def __init__(
        self,
        backend: DraBackend,
        *,
        driver_name: str,
        sockets: SocketPaths,
        health_resend_interval: float = 10.0,
        health_check_timeout: int = 30,
        shutdown_grace: float = 5.0,
    ) -> None:
        if not sockets.dra.is_absolute():
            # The kubelet connects to exactly the path GetInfo names.
            raise ValueError(f"DRA socket path {sockets.dra} must be absolute")
        self.sockets = sockets
        self._registration = _RegistrationService(driver_name, sockets.dra)
        dra_lifecycle = _Lifecycle()
        self._dra = _UnixServer(
            sockets.dra,
            _dra_services(backend, dra_lifecycle, health_resend_interval, health_check_timeout),
            dra_lifecycle,
        )
        reg_lifecycle = _Lifecycle()
        self._reg = _UnixServer(
            sockets.registration,
            [_Servable(registration_api.RegistrationBase, self._registration, reg_lifecycle)],
            reg_lifecycle,
        )
        self._grace = shutdown_grace

    @property
    def info_answered(self) -> anyio.Event:
        """Set once GetInfo was answered (the kubelet found us)."""
        return self._registration.info_answered

    @property
    def registration(self) -> RegistrationState:
        """What the kubelet last reported through NotifyRegistrationStatus."""
        return self._registration.state

    async def start(self) -> None:
        """Create both sockets (replacing stale ones) and start serving."""
        await self._dra.start()
        try:
            await self._reg.start()
        except BaseException:
            await self._dra.close(self._grace)
            raise

    async def close(self) -> None:
        """Remove both sockets, end health streams, give running calls the
        grace period, then cancel the rest and close all connections."""
        try:
            await self._reg.close(self._grace)
        finally:
            await self._dra.close(self._grace)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
