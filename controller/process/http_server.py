# SPDX-License-Identifier: Apache-2.0
"""The health and metrics endpoint both processes serve: /healthz, /readyz, /metrics.

    port = await task_group.start(serve_http, ":8080", registry, ready, healthy)

`serve_http` binds, reports the bound port through `task_status` (None when
disabled), then serves until cancelled. `ready()` and `healthy()` are plain
callables asked on every probe: `/readyz` answers 503 until `ready()` is
true, `/healthz` 503 while `healthy()` is false.

Bind address syntax: `:8080` (all interfaces), `127.0.0.1:0` (any free
port), `[::1]:8080`; `0` or empty disables the server.

A deliberately small HTTP/1.1 server on anyio streams: one GET (or HEAD) per
connection, answered with `Connection: close`. Probes and Prometheus scrapes
need nothing more. The /metrics body and its content type are
prometheus-client's (text format 0.0.4), from the process's own registry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from controller.process.metrics import CollectorRegistry, exposition

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 5.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"


def parse_bind_address(bind: str) -> tuple[str | None, int] | None:
    """`host:port` -> (host or None for all interfaces, port); `0`/empty -> None (disabled).

    Raises:
        ValueError: naming the address and the accepted forms.
    """
    text = bind.strip()
    if text in ("", "0"):
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"bind address {bind!r}: use host:port (e.g. :8080, 127.0.0.1:0, [::1]:8080), "
            "or 0 to disable"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


def _response(status: int, body: bytes, content_type: str, head_only: bool) -> bytes:
    headers = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return headers.encode() + (b"" if head_only else body)


Reason = Callable[[], str]


def _why(reason: Reason | None, default: str) -> bytes:
    text = (reason() if reason is not None else "") or default
    return f"{text}\n".encode()


def route(
    method: str,
    target: str,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    healthy: Callable[[], bool],
    *,
    not_ready_reason: Reason | None = None,
    unhealthy_reason: Reason | None = None,
) -> tuple[int, bytes, str]:
    """Answer one request: (status, body, content type). No I/O.

    A 503 body says why when a reason callable is given.
    """
    text = "text/plain; charset=utf-8"
    if method not in ("GET", "HEAD"):
        return 405, b"only GET and HEAD\n", text
    path = target.split("?", 1)[0]
    if path == "/healthz":
        if healthy():
            return 200, b"ok\n", text
        return 503, _why(unhealthy_reason, "unhealthy"), text
    if path == "/readyz":
        if ready():
            return 200, b"ok\n", text
        return 503, _why(not_ready_reason, "not ready"), text
    if path == "/metrics":
        body, content_type = exposition(registry)
        return 200, body, content_type
    return 404, b"not found: try /healthz, /readyz or /metrics\n", text


async def _read_head(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_HEAD:
            break
        try:
            chunk = await stream.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            break
        data += chunk
    return data


async def _handle(
    stream: anyio.abc.SocketStream,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    healthy: Callable[[], bool],
    reasons: dict[str, Reason | None],
) -> None:
    async with stream:
        with anyio.move_on_after(READ_TIMEOUT):
            head = await _read_head(stream)
            request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                answer = _response(400, b"bad request\n", "text/plain", False)
            else:
                method, target = parts[0], parts[1]
                try:
                    status, body, ctype = route(method, target, registry, ready, healthy, **reasons)
                except Exception:
                    log.exception("health/metrics handler failed", extra={"path": target})
                    status, body, ctype = 503, b"internal error\n", "text/plain"
                answer = _response(status, body, ctype, method == "HEAD")
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(answer)


async def serve_http(
    bind: str,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    healthy: Callable[[], bool],
    *,
    not_ready_reason: Reason | None = None,
    unhealthy_reason: Reason | None = None,
    task_status: anyio.abc.TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /healthz, /readyz and /metrics on `bind` until cancelled.

    Reports the bound TCP port (or None when `bind` disables the server,
    returning at once) via `task_status`, so `await tg.start(serve_http, ...)`
    returns it.

    Raises:
        ValueError: an unparseable bind address.
        OSError: the address cannot be bound (in use, not local).
    """
    address = parse_bind_address(bind)
    if address is None:
        task_status.started(None)
        return
    host, port = address
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound: int = listener.extra(SocketAttribute.local_port)
        log.info(
            "serving /healthz, /readyz and /metrics",
            extra={"address": f"{host or ''}:{bound}", "port": bound},
        )
        task_status.started(bound)

        async def handler(stream: anyio.abc.SocketStream) -> None:
            await _handle(
                stream,
                registry,
                ready,
                healthy,
                {"not_ready_reason": not_ready_reason, "unhealthy_reason": unhealthy_reason},
            )

        await listener.serve(handler)
