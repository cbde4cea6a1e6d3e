# SPDX-License-Identifier: Apache-2.0
"""The thin async Kubernetes API layer used by both processes.

Objects are plain dicts decoded with orjson; no typed models. Errors become
the exceptions of `controller.kube.errors`.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import anyio
import orjson

from controller.kube.deep_json import (
    UndecodableJSON,
    contains_pruned,
    decode_pruning,
    decode_strict,
)
from controller.kube.errors import (
    ApiError,
    Gone,
    NotFound,
    Unauthorized,
    Unavailable,
    Undecodable,
    error_from_status,
)
from controller.kube.kubeconfig import ClusterConfig, ConfigError, ExecCredential
from controller.kube.ratelimit import TokenBucket
from controller.kube.resources import RESOURCE_GROUP, Resource, pick_resource_version


@contextlib.contextmanager
def _lean_aiohttp_import() -> Iterator[None]:
    """While aiohttp is imported: no system CA bundle, no compiled frozenlist.

    aiohttp builds two default TLS contexts at import, each loading the system
    CA bundle (1.6 MiB of a node plugin's idle RSS); every connection of ours
    carries its own context (the cluster's CA) or none, so they are never used,
    and without the bundle a stray caller's verification fails rather than
    passing. frozenlist (aiohttp's signal lists, never on a request's path) as
    compiled links libstdc++ (1.1 MiB); its pure-Python twin is the same type.
    The patch is process-wide while the import runs: nothing else builds a
    default TLS context then (the plugin imports this module in one worker
    thread before any connection, the controller at start).
    """
    saved = ssl.SSLContext.load_default_certs, ssl.SSLContext.set_default_verify_paths
    no_frozenlist_extension = os.environ.get("FROZENLIST_NO_EXTENSIONS")
    ssl.SSLContext.load_default_certs = lambda self, purpose=None: None  # type: ignore[method-assign]
    ssl.SSLContext.set_default_verify_paths = lambda self: None  # type: ignore[method-assign]
    os.environ["FROZENLIST_NO_EXTENSIONS"] = "1"
    try:
        yield
    finally:
        ssl.SSLContext.load_default_certs, ssl.SSLContext.set_default_verify_paths = saved  # type: ignore[method-assign]
        if no_frozenlist_extension is None:
            del os.environ["FROZENLIST_NO_EXTENSIONS"]
        else:
            os.environ["FROZENLIST_NO_EXTENSIONS"] = no_frozenlist_extension


with _lean_aiohttp_import():
    import aiohttp

log = logging.getLogger(__name__)

# Receives an object (list item or watch event) that could be decoded only in part.
Quarantine = Callable[[dict[str, Any]], None]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is valid YAML
# Query of a GET served from the API server's watch cache ("any version").
_FROM_CACHE = {"resourceVersion": "0"}


def _load_cert_chain_from_memory(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # The ssl module loads a key pair only from files: a private directory that
    # exists for the duration of this call, so no credential outlives it on disk.
    with tempfile.TemporaryDirectory(prefix="power-dra-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)


def _ssl_context(
    config: ClusterConfig, exec_credential: ExecCredential | None = None
) -> ssl.SSLContext | bool:
    if not config.server.startswith("https"):
        return False
    if config.insecure_skip_tls_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif config.ca_data:
        ctx = ssl.create_default_context(cadata=config.ca_data.decode())
    else:
        ctx = ssl.create_default_context(cafile=config.ca_file)
    if exec_credential is not None and exec_credential.client_cert_data:
        assert exec_credential.client_key_data is not None
        _load_cert_chain_from_memory(
            ctx, exec_credential.client_cert_data, exec_credential.client_key_data
        )
    elif config.client_cert_data and config.client_key_data:
        _load_cert_chain_from_memory(ctx, config.client_cert_data, config.client_key_data)
    elif config.client_cert_file:
        ctx.load_cert_chain(config.client_cert_file, config.client_key_file)
    return ctx


# TCP keepalive on every API connection: a peer that vanished (node cut off,
# NAT entry dropped) is noticed after KEEPALIVE_IDLE + KEEPALIVE_COUNT *
# KEEPALIVE_INTERVAL seconds instead of the kernel's two hours.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# A watch ends by the server after its timeoutSeconds; one that stays silent
# this much longer (no event, no bookmark, no end; half the timeout for short
# ones) is on a dead connection.
WATCH_READ_GRACE = 30.0


def keepalive_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A TCP socket for `addr_info` (family, type, proto, ...) with keepalive probes on."""
    family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


def _describe(method: str, path: str) -> str:
    return f"{method} {path}"


class ApiClient:
    """An HTTP/1.1 keep-alive connection pool to the API server.

    `qps`/`burst` bound request rate (watches excepted, as they are long-lived).
    `watch_timeout` is the default server-side length of a watch (seconds); a
    watch silent for `watch_timeout + WATCH_READ_GRACE` is dropped as dead.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        qps: float = 50.0,
        burst: int = 100,
        user_agent: str = "power-dra-driver",
        timeout: float = 30.0,
        max_connections: int = 64,
        watch_timeout: float = 300.0,
    ) -> None:
        self.config = config
        self.watch_timeout = watch_timeout
        self.limiter = TokenBucket(qps, burst)
        self._timeout = timeout
        self._user_agent = user_agent
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._resource_version: str | None = None
        # The exec credential the session was built with (its client certificate).
        self._session_credential: ExecCredential | None = None

    async def _refresh_credentials(self) -> None:
        """With an exec plugin: run it when its credential is missing or expired
        (in a worker thread), and rebuild the connection pool when the new
        credential brings another client certificate."""
        plugin = self.config.exec_plugin
        if plugin is None or plugin.valid() is not None:
            return
        try:
            credential = await anyio.to_thread.run_sync(plugin.credential)
        except ConfigError as exc:
            # Often transient (the token service is unreachable): callers retry.
            raise Unavailable(0, "CredentialsUnavailable", str(exc)) from exc
        old = self._session_credential
        if credential.client_cert_data and (
            old is None or old.client_cert_data != credential.client_cert_data
        ):
            await self.close()  # the next request connects with the new certificate
        self._session_credential = credential

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=_ssl_context(self.config, self._session_credential),
                limit=self._max_connections,
                keepalive_timeout=60,
                socket_factory=keepalive_socket,
            )
            self._session = aiohttp.ClientSession(
                base_url=self.config.server,
                connector=connector,
                json_serialize=lambda o: orjson.dumps(o).decode(),
                headers={"User-Agent": self._user_agent, "Accept": JSON},
            )
        return self._session

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        token = self.config.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        what: str,
    ) -> tuple[int, bytes]:
        """Send one request; return the status and the raw answer."""
        await self.limiter.acquire()
        await self._refresh_credentials()
        session = self._ensure_session()
        data = orjson.dumps(body) if body is not None else None
        try:
            async with session.request(
                method,
                path,
                params=params,
                data=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(0, "Unavailable", f"{type(exc).__name__}: {exc}", what=what) from exc

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = JSON,
        what: str = "",
    ) -> Any:
        """Send one request and return the decoded JSON answer (None when empty).

        With an exec credential plugin, a 401 makes it fetch a new credential
        and the request is sent once more.

        Raises:
            ApiError: the matching subclass for an error status; `Undecodable` when
                a successful answer is not JSON this client can read (never a
                made-up body).
        """
        what = what or _describe(method, path)
        plugin = self.config.exec_plugin
        status, raw = await self._send(
            method, path, params=params, body=body, content_type=content_type, what=what
        )
        if status == 401 and plugin is not None:
            log.info("API server refused our exec credential; fetching a new one")
            plugin.invalidate(plugin.valid())
            status, raw = await self._send(
                method, path, params=params, body=body, content_type=content_type, what=what
            )
        return _decode_answer(status, raw, what)

    # --- object verbs -------------------------------------------------------------

    async def get(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        subresource: str | None = None,
        *,
        from_cache: bool = False,
    ) -> dict[str, Any]:
        """GET one object.

        `from_cache`: read it from the API server's watch cache (`resourceVersion=0`)
        instead of etcd: no quorum read, but the copy may trail etcd by the cache's
        lag (milliseconds on a healthy server), so the caller must be able to tell a
        stale copy and read again without it.
        """
        result: dict[str, Any] = await self.request(
            "GET",
            res.path(namespace, name, subresource),
            params=_FROM_CACHE if from_cache else None,
            what=f"get {res.kind} {_nn(namespace, name)}",
        )
        return result

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int = 500,
        quarantine: Quarantine | None = None,
    ) -> dict[str, Any]:
        """LIST all objects (following `continue` pages); returns the merged list object.

        An item nested deeper than orjson reads does not spoil the page: the
        other items decode whole, and that item, with its deep values pruned
        (see `controller.kube.deep_json`), goes to `quarantine` instead of `items`.

        Raises:
            Undecodable: a page is not JSON, or an item is too deep and no
                `quarantine` was given.
        """
        params: dict[str, str] = {"limit": str(limit)}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        items: list[dict[str, Any]] = []
        what = f"list {res.plural}"
        while True:
            status, raw = await self._send(
                "GET", res.path(namespace), params=params, body=None, content_type=JSON, what=what
            )
            if status >= 400:
                _decode_answer(status, raw, what)  # raises the matching error
            try:
                page, pruned = decode_pruning(raw)
            except UndecodableJSON as exc:
                raise Undecodable(status, "Undecodable", str(exc), what=what) from exc
            if not isinstance(page, dict):
                raise Undecodable(status, "Undecodable", "the answer is not a list", what=what)
            for item in page.get("items") or []:
                if pruned and contains_pruned(item):
                    if quarantine is None:
                        raise Undecodable(status, "Undecodable", _too_deep(item), what=what)
                    quarantine(item)
                else:
                    items.append(item)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                page["items"] = items
                return page
            params["continue"] = token

    async def create(
        self, res: Resource, obj: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        """POST a new object."""
        ns = namespace or (obj.get("metadata") or {}).get("namespace")
        result: dict[str, Any] = await self.request(
            "POST",
            res.path(ns),
            body=obj,
            what=f"create {res.kind} {_nn(ns, (obj.get('metadata') or {}).get('name', ''))}",
        )
        return result

    async def replace(
        self, res: Resource, obj: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        """PUT an object (optimistic concurrency via metadata.resourceVersion)."""
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name", "")
        result: dict[str, Any] = await self.request(
            "PUT",
            res.path(ns, name, subresource),
            body=obj,
            what=f"update {res.kind} {_nn(ns, name)}",
        )
        return result

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
        field_manager: str | None = None,
    ) -> dict[str, Any]:
        """PATCH an object (merge patch unless told otherwise)."""
        params = {"fieldManager": field_manager} if field_manager else None
        result: dict[str, Any] = await self.request(
            "PATCH",
            res.path(namespace, name, subresource),
            params=params,
            body=patch,
            content_type=content_type,
            what=f"patch {res.kind} {_nn(namespace, name)}",
        )
        return result

    async def apply(
        self,
        res: Resource,
        obj: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool = True,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Server-side apply `obj` under `field_manager`."""
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name", "")
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        result: dict[str, Any] = await self.request(
            "PATCH",
            res.path(ns, name, subresource),
            params=params,
            body=obj,
            content_type=APPLY_PATCH,
            what=f"apply {res.kind} {_nn(ns, name)}",
        )
        return result

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
        missing_ok: bool = True,
    ) -> dict[str, Any] | None:
        """DELETE an object, optionally only if its UID / resourceVersion still match."""
        body: dict[str, Any] | None = None
        if uid or resource_version:
            pre: dict[str, str] = {}
            if uid:
                pre["uid"] = uid
            if resource_version:
                pre["resourceVersion"] = resource_version
            body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": pre}
        try:
            result: dict[str, Any] | None = await self.request(
                "DELETE",
                res.path(namespace, name),
                body=body,
                what=f"delete {res.kind} {_nn(namespace, name)}",
            )
            return result
        except NotFound:
            if missing_ok:
                return None
            raise

    async def watch(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: float | None = None,
        allow_bookmarks: bool = True,
        quarantine: Quarantine | None = None,
        on_open: Callable[[], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream watch events (`{"type", "object"}`) until the server ends the watch.

        The server ends it after `timeout_seconds` (default: the client's
        `watch_timeout`); silence for up to WATCH_READ_GRACE longer than that means
        the connection is dead and raises Unavailable, so the caller re-opens
        it instead of waiting forever. An ERROR event becomes the matching
        exception (410 -> Gone). An event whose object is nested deeper than
        orjson reads goes, its deep values pruned, to `quarantine` instead
        (without one it raises `Undecodable`), so that one object cannot stop
        the stream. `on_open` is called once the server has accepted the watch.
        """
        seconds = max(1, round(self.watch_timeout if timeout_seconds is None else timeout_seconds))
        params = {"watch": "1", "timeoutSeconds": str(seconds)}
        if allow_bookmarks:
            params["allowWatchBookmarks"] = "true"
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        await self._refresh_credentials()
        session = self._ensure_session()
        path = res.path(namespace)
        what = f"watch {res.plural}"
        try:
            async with session.get(
                path,
                params=params,
                headers=self._headers(None),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._timeout,
                    sock_read=seconds + min(WATCH_READ_GRACE, max(2.0, seconds / 2)),
                ),
            ) as resp:
                if resp.status >= 400:
                    if resp.status == 401 and self.config.exec_plugin is not None:
                        # The caller re-opens the watch: with a fresh credential.
                        self.config.exec_plugin.invalidate(self.config.exec_plugin.valid())
                    _decode_answer(resp.status, await resp.read(), what)  # raises
                if on_open is not None:
                    on_open()
                buf = b""
                async for chunk in resp.content.iter_any():
                    scanned = len(buf)  # a huge event arrives in many chunks
                    buf += chunk
                    while (nl := buf.find(b"\n", scanned)) >= 0:
                        line, buf = buf[:nl], buf[nl + 1 :]
                        scanned = 0
                        if not line.strip():
                            continue
                        event, pruned = _watch_event(line, what)
                        if not pruned:
                            yield event
                        elif quarantine is None:
                            raise Undecodable(
                                200, "Undecodable", _too_deep(event.get("object")), what=what
                            )
                        else:
                            quarantine(event)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(0, "Unavailable", f"{type(exc).__name__}: {exc}", what=what) from exc

    # --- discovery ------------------------------------------------------------------

    async def served_versions(self, group: str) -> builtins.list[str]:
        """The versions of an API group the server serves (empty when none)."""
        try:
            doc: dict[str, Any] = await self.request("GET", f"/apis/{quote(group)}")
        except NotFound:
            return []
        return [str(v.get("version")) for v in doc.get("versions") or []]

    async def resource_api_version(self) -> str:
        """The best served `resource.k8s.io` version (cached after the first call)."""
        if self._resource_version is None:
            self._resource_version = pick_resource_version(
                await self.served_versions(RESOURCE_GROUP)
            )
        return self._resource_version

    async def check_access(self) -> None:
        """Fail early with a clear message when the credentials are not accepted."""
        try:
            await self.request("GET", "/version")
        except Unauthorized as exc:
            raise ApiError(
                401,
                "Unauthorized",
                f"{self.config.server} rejected our credentials from {self.config.source}: "
                "check the kubeconfig or the service account token",
            ) from exc


def _nn(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _too_deep(obj: Any) -> str:
    meta = (obj.get("metadata") if isinstance(obj, dict) else None) or {}
    return (
        f"{_nn(meta.get('namespace'), str(meta.get('name') or '?'))} is nested deeper than "
        "this client decodes"
    )


def _decode_answer(status: int, raw: bytes, what: str) -> Any:
    """The decoded answer of a request, or the exception its status or body calls for."""
    decoded: Any = None
    problem = ""
    if raw:
        try:
            decoded = decode_strict(raw)
        except UndecodableJSON as exc:
            problem = str(exc)
    if status >= 400:
        if isinstance(decoded, dict):
            raise error_from_status(status, decoded, what=what)
        # Not a Status object (a proxy's HTML page, say): its start, escaped, says more.
        text = raw[:200].decode(errors="replace")
        raise error_from_status(status, None, what=what, detail=f"HTTP {status}: {text!r}")
    if problem:
        raise Undecodable(status, "Undecodable", problem, what=what)
    return decoded


def _watch_event(line: bytes, what: str) -> tuple[dict[str, Any], int]:
    try:
        event, pruned = decode_pruning(line)
    except UndecodableJSON as exc:
        raise Undecodable(
            0, "BadWatchEvent", f"undecodable watch line: {line[:120]!r}: {exc}", what=what
        ) from exc
    if not isinstance(event, dict):
        raise Undecodable(0, "BadWatchEvent", f"watch line is no event: {line[:120]!r}", what=what)
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        code = int(status.get("code") or 500)
        if code == 410:
            raise Gone(
                410, str(status.get("reason") or "Expired"), str(status.get("message")), what=what
            )
        raise error_from_status(code, status, what=what)
    return event, pruned
