# SPDX-License-Identifier: Apache-2.0
"""The gRPC services the kubelet calls on a DRA plugin, served with grpclib.

Two unix sockets:

- the registration socket in the kubelet's plugins_registry directory
  (`pluginregistration.Registration`): the kubelet finds it, asks `GetInfo`
  and reports the outcome with `NotifyRegistrationStatus`;
- the DRA socket in the plugin's data directory, named in `GetInfo`: DRA
  `v1` and `v1beta1` (`NodePrepareResources`, `NodeUnprepareResources`) and
  the device health stream (`v1alpha1`, `v1beta1`, `v1`), in `dra_service`.

This module holds the sockets and the registration service only, so that
the registration socket can serve before the DRA messages, the claim code
and anyio's event-loop backend are imported (`PluginServers.serve_dra`).

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
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import anyio
from grpclib.server import Server

from proto_gen.generated import pluginregistration as registration_api

from .grpc_calls import (
    CallLifecycle,
    ChangeSignal,
    DeviceHealth,
    DraBackend,
    Servable,
    clip_message,
)

__all__ = [
    "ChangeSignal",
    "DeviceHealth",
    "DraBackend",
    "PluginServers",
    "RegistrationState",
    "SocketPaths",
    "listen_unix",
]

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
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


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
        # asyncio's: an anyio one would import anyio's backend before the socket serves.
        self.info_answered = asyncio.Event()

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
            self._log_refusal(clip_message(request.error or "no reason given", 500))
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


# --- sockets -------------------------------------------------------------------


def listen_unix(path: Path, *, mode: int = 0o600, backlog: int = 128) -> socket.socket:
    """A listening unix socket at `path` with `mode`, replacing whatever was there.

    The socket is bound under a temporary dot-name (the kubelet's plugin
    watcher ignores those), given its mode, set listening, and renamed into
    place: the kubelet never sees a socket that refuses connections or has
    the wrong mode, and a stale socket from an earlier run is replaced.
    """
    tmp = path.parent / f".{os.urandom(3).hex()}.sock"
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
    """A grpclib server on one unix socket, removed again at close.

    `bind` creates the listening socket; `serve` starts answering on it.
    Connections made in between wait in the socket's backlog.
    """

    def __init__(self, path: Path, lifecycle: CallLifecycle) -> None:
        self.path = path
        self._lifecycle = lifecycle
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[asyncio.BaseTransport] = set()

    def bind(self) -> None:
        self._sock = listen_unix(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    async def serve(self, services: list[Any]) -> None:
        sock, self._sock = self._sock, None
        assert sock is not None, "bind() first"
        server = Server(services)
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
        if self._sock is not None:  # bound, never served
            self._sock.close()
            self._sock = None
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

    Or, to let the kubelet register the plugin while it still loads, without a
    backend first and `await servers.serve_dra(backend)` once it is ready.

    The DRA socket is bound first, so it accepts connections once the
    kubelet learns its path; at exit the registration socket goes first,
    then the DRA one.
    """

    def __init__(
        self,
        backend: DraBackend | None,
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
        self._backend = backend
        self._registration = _RegistrationService(driver_name, sockets.dra)
        self._dra_lifecycle = CallLifecycle()
        self._dra = _UnixServer(sockets.dra, self._dra_lifecycle)
        self._reg_lifecycle = CallLifecycle()
        self._reg = _UnixServer(sockets.registration, self._reg_lifecycle)
        self._health = (health_resend_interval, health_check_timeout)
        self._grace = shutdown_grace

    @property
    def info_answered(self) -> asyncio.Event:
        """Set once GetInfo was answered (the kubelet found us)."""
        return self._registration.info_answered

    @property
    def registration(self) -> RegistrationState:
        """What the kubelet last reported through NotifyRegistrationStatus."""
        return self._registration.state

    async def start(self) -> None:
        """Create both sockets (replacing stale ones) and serve registration, and the
        DRA services when the backend was given."""
        # Why the DRA socket is bound before GetInfo can name it, even while its
        # services still load: the kubelet connects to the endpoint right after
        # registering (kubelets from 1.33 watch that connection and treat a refused
        # one as a plugin gone, health streams retry only every 5 s). A connection
        # made early waits in the socket's backlog and its calls wait, within their
        # own deadlines, for `serve_dra`. Holding GetInfo back instead until the
        # driver is loaded would spend the kubelet's 1 s GetInfo timeout on it.
        self._dra.bind()
        try:
            if self._backend is not None:
                await self.serve_dra(self._backend)
            self._reg.bind()
            await self._reg.serve(
                [
                    Servable(
                        registration_api.RegistrationBase, self._registration, self._reg_lifecycle
                    )
                ]
            )
        except BaseException:
            await self._dra.close(self._grace)
            raise

    async def serve_dra(self, backend: DraBackend) -> None:
        """Start answering on the DRA socket (bound by `start`), calls going to `backend`."""
        from .dra_service import dra_services  # the DRA messages: imported only now

        self._backend = backend
        resend, timeout = self._health
        await self._dra.serve(dra_services(backend, self._dra_lifecycle, resend, timeout))

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
