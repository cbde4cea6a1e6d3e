# SPDX-License-Identifier: Apache-2.0
"""What both plugin sockets share: the backend the DRA services call
(`DraBackend`, `DeviceHealth`) and grpclib's side of one call (decoding with a
size limit, the call's budget from its deadline, errors as gRPC statuses,
calls in flight for a graceful stop).

Used by `grpc_service` (the sockets, registration) and `dra_service` (the
DRA and health services).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

if TYPE_CHECKING:
    from kubeletplugin.claims import ClaimRef
    from kubeletplugin.state import PrepareResult

# The logger these messages had before this module was split off grpc_service.
log = logging.getLogger("kubeletplugin.grpc_service")

# Longest status message we send: it travels in an HTTP/2 header, which
# clients cap (grpc-go at 16 KiB), and encoding a huge one stalls the server.
MAX_STATUS_MESSAGE = 2000
# The largest request message we decode: the kubelet's own gRPC limit (grpc-go's
# default receive size). A bigger one is refused from its length prefix, before
# a byte of it is buffered or parsed.
MAX_REQUEST_MESSAGE = 4 * 1024 * 1024
# The kubelet gives a DRA call 45 s. A call answers within its own gRPC
# deadline, never later than this, keeping a margin for the answer's way back.
MAX_CALL_BUDGET = 40.0
MIN_DEADLINE_MARGIN = 0.5


# --- what the backend sees ---------------------------------------------------
# (plus `claims.ClaimRef`, the kubelet's name for a claim)

__all__ = [
    "MAX_REQUEST_MESSAGE",
    "CallLifecycle",
    "ChangeSignal",
    "DeviceHealth",
    "DraBackend",
    "Send",
    "Servable",
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


# --- grpclib plumbing ------------------------------------------------------------


def clip_message(text: str, limit: int) -> str:
    """`claims.clip`, imported at the first use."""
    # claims (and the config decoder it imports) loads after the registration
    # socket serves; only error messages need it here.
    from kubeletplugin.claims import clip

    return clip(text, limit)


def _snake_case(method: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in method).lstrip("_")


def _status_for(method: str, exc: Exception) -> Any:
    if isinstance(exc, GRPCError):
        if exc.message is not None and len(exc.message) > MAX_STATUS_MESSAGE:
            return GRPCError(exc.status, clip_message(exc.message, MAX_STATUS_MESSAGE))
        return exc
    status = Status.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else Status.INTERNAL
    log.error("%s failed", method, exc_info=exc)
    return GRPCError(
        status, clip_message(f"{method}: {type(exc).__name__}: {exc}", MAX_STATUS_MESSAGE)
    )


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
            f"{method}: cannot decode request: {type(exc).__name__}: {clip_message(str(exc), 500)}",
        ) from exc
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: request has no message")
    return request


Send = Callable[[Any], Awaitable[None]]


class CallLifecycle:
    """Calls in flight on one server, and the shutdown signal for streams."""

    def __init__(self) -> None:
        self.stopping = False
        self._active = 0
        self._idle: anyio.Event | None = None  # made by wait_idle, set by the last call
        self._waits: set[anyio.CancelScope] = set()

    @contextmanager
    def call(self) -> Iterator[None]:
        """One call in flight for the duration of the block."""
        self._active += 1
        try:
            yield
        finally:
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
    method: str, impl: Callable[[Any, float], Awaitable[Any]], lifecycle: CallLifecycle
) -> Callable[[Any], Awaitable[None]]:
    async def handle(stream: Any) -> None:
        with lifecycle.call():
            request = await _recv_request(method, stream)
            try:
                reply = await impl(request, _call_budget(stream))
            except Exception as exc:
                raise _status_for(method, exc) from exc
            await stream.send_message(reply)

    return handle


def _server_stream_handler(
    method: str, impl: Callable[[Any, Send], Awaitable[None]], lifecycle: CallLifecycle
) -> Callable[[Any], Awaitable[None]]:
    async def handle(stream: Any) -> None:
        with lifecycle.call():
            request = await _recv_request(method, stream)
            try:
                await impl(request, stream.send_message)
            except (StreamTerminatedError, ProtocolError):
                raise
            except Exception as exc:
                raise _status_for(method, exc) from exc

    return handle


class Servable:
    """A grpclib service: method paths and message types from the generated
    code, implementations from `impl` (methods named in snake case; server
    streams get a `send` callback)."""

    def __init__(self, generated_base: Any, impl: object, lifecycle: CallLifecycle) -> None:
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
