# SPDX-License-Identifier: Apache-2.0
"""A kubelet stand-in: the kubelet's side of DRA, for tests and the demo (not shipped).

It does what a kubelet does with a DRA plugin, with grpcio (an implementation
independent of the plugin's grpclib) and the stubs of `tests.grpc_stubs`:

- watches the plugin registration directory for `*-reg.sock` (dot-files are
  ignored, as the kubelet ignores them), asks `GetInfo` within 1 s, picks the
  first DRA service of the plugin's list that it knows, and answers
  `NotifyRegistrationStatus`. Several registered sockets of one driver (a
  rolling update) are all kept; calls go to the newest. A socket that goes
  away, or is replaced by a new one at the same path, deregisters.
- watches the Pods bound to its node and the ResourceClaims; once every claim
  of a pod is allocated and reserved for it, calls `NodePrepareResources` on
  each driver's plugin with that pod's claims of the driver (one call per
  driver, as the kubelet does) and records the answers; a failed prepare is
  retried after `retry_interval`.
- when a pod ends (phase Succeeded/Failed), is being deleted or is gone, calls
  `NodeUnprepareResources` for its claims that no other pod on the node still
  uses. A pod being deleted is then removed for good (grace period 0), as the
  kubelet does once its containers stopped, so `kubectl delete pod` works.

    standin = KubeletStandin("node-1", registry_dir, kubeconfig).start()
    try:
        result = standin.wait_prepared("ns/pod", timeout=30)
        assert result.ok, result.errors()
    finally:
        standin.stop()

`python -m tests.kubelet_standin --node-name N --registry-dir D --kubeconfig K`
runs one in the foreground and logs what it does.

What it leaves out: containers (nothing runs; pod status is not written), the
health stream, the kubelet's claim cache across restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import anyio.abc
import anyio.from_thread
import grpc

from controller.kube.client import ApiClient
from controller.kube.errors import ApiError
from controller.kube.informer import Informer
from controller.kube.kubeconfig import load_cluster_config
from controller.kube.resources import PODS, resource_kinds
from tests import grpc_stubs

log = logging.getLogger("kubelet-standin")

PLUGIN_TYPE = "DRAPlugin"
# The kubelet's deadlines: GetInfo 1 s, DRA calls 45 s.
GET_INFO_TIMEOUT = 1.0
DRA_CALL_TIMEOUT = 45.0
DRA_API_VERSIONS = ("v1", "v1beta1")
REGISTRATION_SUFFIX = "-reg.sock"

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # A plugin restarts in about a second: reconnect quickly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def unix_channel(path: Path | str) -> grpc.Channel:
    """A grpcio channel to a unix socket."""
    return grpc.insecure_channel(f"unix:{path}", options=_CHANNEL_OPTIONS)


# --- plain data --------------------------------------------------------------------


class ClaimName(NamedTuple):
    """A claim as the kubelet names it in DRA calls."""

    namespace: str
    uid: str
    name: str


@dataclass(frozen=True)
class DeviceResult:
    """One device of a prepare answer."""

    request_names: tuple[str, ...]
    pool_name: str
    device_name: str
    cdi_device_ids: tuple[str, ...]
    share_id: str = ""  # DRA v1 only


@dataclass(frozen=True)
class PrepareAnswer:
    """The plugin's answer for one claim: devices, or an error."""

    devices: tuple[DeviceResult, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class ClaimResult:
    """The outcome of one claim of a pod, for one driver."""

    pod_claim: str  # the entry name in pod.spec.resourceClaims
    namespace: str
    name: str
    uid: str
    driver: str
    devices: tuple[DeviceResult, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class PodResult:
    """One prepare (or unprepare) round of a pod: a result per claim and driver."""

    pod: str  # namespace/name
    pod_uid: str
    claims: tuple[ClaimResult, ...]
    at: float  # time.time() when the round ended

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.claims)

    def errors(self) -> dict[str, str]:
        """Errors by `<pod claim>@<driver>`."""
        return {f"{c.pod_claim}@{c.driver}": c.error for c in self.claims if c.error}

    def claim(self, pod_claim: str, driver: str | None = None) -> ClaimResult:
        """The result for one entry of pod.spec.resourceClaims (and driver)."""
        found = [
            c
            for c in self.claims
            if c.pod_claim == pod_claim and (driver is None or c.driver == driver)
        ]
        if len(found) != 1:
            raise KeyError(f"{self.pod}: {len(found)} results for claim {pod_claim} ({driver})")
        return found[0]


@dataclass(frozen=True)
class Call:
    """One gRPC call the stand-in made."""

    method: str  # GetInfo, NotifyRegistrationStatus, NodePrepareResources, ...
    target: str  # socket path
    api_version: str  # DRA version, or "" for registration
    claim_uids: tuple[str, ...]
    started: float  # time.time()
    seconds: float
    error: str  # gRPC status and details, "" when the call succeeded


@dataclass(frozen=True)
class Registration:
    """A registered plugin socket."""

    driver: str
    socket: Path  # the registration socket
    endpoint: Path  # the DRA socket GetInfo named
    api_version: str  # chosen DRA version: "v1" or "v1beta1"
    supported_versions: tuple[str, ...]
    inode: tuple[int, int]
    seq: int  # registration order; the highest of a driver is used


# --- the DRA client ------------------------------------------------------------------


def _device(dev: Any) -> DeviceResult:
    return DeviceResult(
        tuple(dev.request_names),
        dev.pool_name,
        dev.device_name,
        tuple(dev.cdi_device_ids),
        getattr(dev, "share_id", ""),
    )


class DraClient:
    """NodePrepareResources / NodeUnprepareResources on one DRA socket, with grpcio.

    Blocking calls for tests (`prepare`, `unprepare`) and grpcio futures for
    callers with their own event loop (`prepare_future`, `unprepare_future`).
    """

    def __init__(self, endpoint: Path | str, api_version: str = "v1") -> None:
        if api_version not in DRA_API_VERSIONS:
            raise ValueError(f"DRA API version {api_version!r}: known are {DRA_API_VERSIONS}")
        self.endpoint = Path(endpoint)
        self.api_version = api_version
        self._api = grpc_stubs.load().dra[api_version]
        self._channel = unix_channel(endpoint)
        self._stub = self._api.grpc.DRAPluginStub(self._channel)

    def _claims(self, claims: Iterable[ClaimName | tuple[str, str, str]]) -> list[Any]:
        return [self._api.pb2.Claim(namespace=ns, uid=uid, name=name) for ns, uid, name in claims]

    def prepare_request(self, claims: Iterable[ClaimName | tuple[str, str, str]]) -> Any:
        return self._api.pb2.NodePrepareResourcesRequest(claims=self._claims(claims))

    def unprepare_request(self, claims: Iterable[ClaimName | tuple[str, str, str]]) -> Any:
        return self._api.pb2.NodeUnprepareResourcesRequest(claims=self._claims(claims))

    @staticmethod
    def prepare_answers(response: Any) -> dict[str, PrepareAnswer]:
        """A NodePrepareResourcesResponse as plain data, by claim UID."""
        return {
            uid: PrepareAnswer(tuple(_device(d) for d in r.devices), r.error)
            for uid, r in response.claims.items()
        }

    @staticmethod
    def unprepare_answers(response: Any) -> dict[str, str]:
        """A NodeUnprepareResourcesResponse as claim UID -> error ("" for success)."""
        return {uid: r.error for uid, r in response.claims.items()}

    def prepare(
        self,
        claims: Iterable[ClaimName | tuple[str, str, str]],
        timeout: float = DRA_CALL_TIMEOUT,
    ) -> dict[str, PrepareAnswer]:
        """Prepare claims (namespace, uid, name); raises grpc.RpcError on a failed call."""
        response = self._stub.NodePrepareResources(self.prepare_request(claims), timeout=timeout)
        return self.prepare_answers(response)

    def unprepare(
        self,
        claims: Iterable[ClaimName | tuple[str, str, str]],
        timeout: float = DRA_CALL_TIMEOUT,
    ) -> dict[str, str]:
        """Unprepare claims; raises grpc.RpcError on a failed call."""
        response = self._stub.NodeUnprepareResources(
            self.unprepare_request(claims), timeout=timeout
        )
        return self.unprepare_answers(response)

    def prepare_future(self, request: Any, timeout: float = DRA_CALL_TIMEOUT) -> Any:
        return self._stub.NodePrepareResources.future(request, timeout=timeout)

    def unprepare_future(self, request: Any, timeout: float = DRA_CALL_TIMEOUT) -> Any:
        return self._stub.NodeUnprepareResources.future(request, timeout=timeout)

    def raw(self, method_path: str) -> Any:
        """A unary call that sends and returns raw bytes (for malformed requests)."""
        return self._channel.unary_unary(method_path)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_plugin_info(socket: Path | str, timeout: float = GET_INFO_TIMEOUT) -> Any:
    """GetInfo on a registration socket (blocking), as the kubelet asks it."""
    api = grpc_stubs.load().registration
    with unix_channel(socket) as channel:
        return api.grpc.RegistrationStub(channel).GetInfo(api.pb2.InfoRequest(), timeout=timeout)


def choose_dra_version(supported_versions: Sequence[str], known: Sequence[str]) -> str | None:
    """The DRA version the kubelet uses: the first service of the plugin's list it knows."""
    for service in supported_versions:
        version, _, name = service.partition(".")
        if name == "DRAPlugin" and version in known:
            return version
    return None


async def _wait_grpc(future: Any) -> Any:
    """Await a grpcio future from asyncio; cancelling the wait cancels the call."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def wake(_: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(done.set)

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


def _rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


# --- pods and claims (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class PodClaim:
    """A claim a pod uses, read from the API."""

    pod_claim: str
    namespace: str
    name: str
    uid: str
    drivers: tuple[str, ...]

    @property
    def ref(self) -> ClaimName:
        return ClaimName(self.namespace, self.uid, self.name)


def pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def pod_claim_names(pod: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """The (pod claim entry, ResourceClaim name) pairs of a pod, or why they are not known yet.

    A template entry is resolved through `status.resourceClaimStatuses`; an
    entry whose status names no claim needs none (the kubelet skips it).
    """
    spec = pod.get("spec") or {}
    statuses = {
        s.get("name"): s.get("resourceClaimName")
        for s in (pod.get("status") or {}).get("resourceClaimStatuses") or []
    }
    names: list[tuple[str, str]] = []
    for entry in spec.get("resourceClaims") or []:
        entry_name = str(entry.get("name", ""))
        if entry.get("resourceClaimName"):
            names.append((entry_name, str(entry["resourceClaimName"])))
        elif entry.get("resourceClaimTemplateName"):
            if entry_name not in statuses:
                return [], f"claim for {entry_name} not created yet"
            if statuses[entry_name]:
                names.append((entry_name, str(statuses[entry_name])))
    return names, ""


def pod_claims(
    pod: Mapping[str, Any], get_claim: Callable[[str], Mapping[str, Any] | None]
) -> tuple[list[PodClaim] | None, str]:
    """The pod's claims when all are allocated and reserved for it, else (None, why)."""
    meta = pod.get("metadata") or {}
    namespace, uid = str(meta.get("namespace", "")), meta.get("uid")
    names, why = pod_claim_names(pod)
    if why:
        return None, why
    out: list[PodClaim] = []
    for entry_name, claim_name in names:
        claim = get_claim(f"{namespace}/{claim_name}")
        if claim is None:
            return None, f"claim {namespace}/{claim_name} not found"
        status = claim.get("status") or {}
        allocation = status.get("allocation")
        if not allocation:
            return None, f"claim {namespace}/{claim_name} not allocated"
        reserved = {r.get("uid") for r in status.get("reservedFor") or []}
        if uid not in reserved:
            return None, f"claim {namespace}/{claim_name} not reserved for the pod"
        results = (allocation.get("devices") or {}).get("results") or []
        drivers = tuple(sorted({str(r.get("driver")) for r in results}))
        out.append(
            PodClaim(
                entry_name,
                namespace,
                claim_name,
                str((claim.get("metadata") or {}).get("uid", "")),
                drivers,
            )
        )
    return out, ""


# --- the stand-in -------------------------------------------------------------------------


@dataclass
class _PodState:
    key: str
    uid: str
    phase: str = "pending"  # pending, prepared, failed, unprepared
    claims: list[PodClaim] = field(default_factory=list)
    busy: bool = False
    retry_at: float = 0.0  # when a failed prepare may be tried again
    end_retry_at: float = 0.0  # when a failed unprepare may be tried again
    finalized: bool = False


class KubeletStandin:
    """Plays one node's kubelet towards DRA plugins.

    - `node_name`: pods with this `spec.nodeName` are this kubelet's.
    - `registry_dir`: the plugin registration directory to watch.
    - `kubeconfig`: API access; needs list/watch of pods (on the node) and
      ResourceClaims, and pod delete (admin in tests).
    - `api_version_preference`: the DRA gRPC versions this kubelet knows.
      As in the kubelet, the plugin's advertised order picks among them;
      `("v1beta1",)` plays a kubelet 1.32/1.33.
    - `retry_interval`: pause before a failed prepare is tried again (the
      real kubelet takes 60-90 s).
    - `handle_pods`: False leaves pods alone (only plugins are registered),
      for tests that make the DRA calls themselves; may be switched on later.
    - `finalize_deleted_pods`: remove a pod being deleted once its claims are
      unprepared (as the kubelet does after its containers stopped).

    Results: `prepared` and `unprepared` (pod key "namespace/name" ->
    latest `PodResult`), `calls` (every gRPC call, in order), `registrations`
    (driver -> registered sockets, oldest first). `wait_*` methods block the
    calling thread with a timeout; the stand-in runs in its own thread.
    """

    def __init__(
        self,
        node_name: str,
        registry_dir: Path | str,
        kubeconfig: str | None,
        *,
        api_version_preference: Sequence[str] = DRA_API_VERSIONS,
        retry_interval: float = 5.0,
        handle_pods: bool = True,
        finalize_deleted_pods: bool = True,
        poll_interval: float = 0.05,
        call_timeout: float = DRA_CALL_TIMEOUT,
    ) -> None:
        unknown = set(api_version_preference) - set(DRA_API_VERSIONS)
        if unknown or not api_version_preference:
            raise ValueError(f"api_version_preference must be some of {DRA_API_VERSIONS}")
        self.node_name = node_name
        self.registry_dir = Path(registry_dir)
        self.kubeconfig = kubeconfig
        self.api_versions = tuple(api_version_preference)
        self.retry_interval = retry_interval
        self.handle_pods = handle_pods
        self.finalize_deleted_pods = finalize_deleted_pods
        self.poll_interval = poll_interval
        self.call_timeout = call_timeout

        self.prepared: dict[str, PodResult] = {}
        self.unprepared: dict[str, PodResult] = {}
        self.calls: list[Call] = []
        self.registrations: dict[str, list[Registration]] = {}
        self.rejected: dict[Path, str] = {}  # registration sockets refused, and why
        self.waiting: dict[str, str] = {}  # pod key -> why it is not prepared yet

        self._cond = threading.Condition()
        self._seq = 0
        self._clients: dict[int, DraClient] = {}  # by Registration.seq
        self._states: dict[str, _PodState] = {}  # by pod UID
        self._seen_sockets: dict[Path, tuple[tuple[int, int], float]] = {}
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._future: Future[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._wake: anyio.Event | None = None
        self._client: ApiClient | None = None
        self._pods: Informer | None = None
        self._claims: Informer | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> KubeletStandin:
        """Start the stand-in thread; returns once its pod and claim caches are synced."""
        if self._portal is not None:
            raise RuntimeError("already started")
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._future, _ = self._portal.start_task(self._main, timeout)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            self._portal = self._portal_cm = None
            raise
        return self

    def stop(self) -> None:
        """Stop watching and calling; in-flight calls are cancelled. Idempotent."""
        portal, self._portal = self._portal, None
        if portal is None:
            return
        try:
            if self._scope is not None:
                portal.call(self._scope.cancel)
            if self._future is not None:
                with contextlib.suppress(BaseException):
                    self._future.result(timeout=30)
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._portal_cm = None
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def __enter__(self) -> KubeletStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self, timeout: float, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        config = await load_cluster_config(self.kubeconfig)
        async with ApiClient(
            config, qps=1000, burst=1000, user_agent=f"kubelet-standin/{self.node_name}"
        ) as client:
            self._client = client
            version = await client.resource_api_version()
            self._pods = Informer(client, PODS, field_selector=f"spec.nodeName={self.node_name}")
            self._claims = Informer(client, resource_kinds(version)["ResourceClaim"])
            self._wake = anyio.Event()
            for informer in (self._pods, self._claims):
                informer.add_handler(lambda *_: self._poke())
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._pods.run)
                tg.start_soon(self._claims.run)
                with anyio.fail_after(timeout):
                    await self._pods.synced.wait()
                    await self._claims.synced.wait()
                tg.start_soon(self._watch_registry)
                tg.start_soon(self._reconcile_forever, tg)
                task_status.started()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- waiting (from the test thread) -----------------------------------------------------

    def _wait(self, pred: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = pred()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what()} after {timeout} s")
                self._cond.wait(min(left, 0.5))

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_registered(
        self, driver: str, timeout: float = 30.0, *, socket: Path | str | None = None
    ) -> Registration:
        """The active registration of `driver` (the one at `socket`, when given)."""

        def found() -> Registration | None:
            for reg in reversed(self.registrations.get(driver, [])):
                if socket is None or reg.socket == Path(socket):
                    return reg
            return None

        return self._wait(  # type: ignore[no-any-return]
            found,
            timeout,
            lambda: (
                f"driver {driver} not registered{f' at {socket}' if socket else ''} "
                f"(rejected: {self.rejected})"
            ),
        )

    def wait_deregistered(self, driver: str, socket: Path | str, timeout: float = 30.0) -> None:
        """Wait until the registration of `driver` at `socket` is gone."""
        self._wait(
            lambda: all(r.socket != Path(socket) for r in self.registrations.get(driver, [])),
            timeout,
            lambda: f"driver {driver} still registered at {socket}",
        )

    def wait_prepared(
        self, pod: str, timeout: float = 30.0, *, after: float = 0.0, ok: bool | None = None
    ) -> PodResult:
        """The latest prepare round of `pod` ("namespace/name") that ended after `after`.

        With `ok=True` (or False), waits for a round that succeeded (or failed).
        """

        def found() -> PodResult | None:
            result = self.prepared.get(pod)
            if result is None or result.at < after or (ok is not None and result.ok != ok):
                return None
            return result

        return self._wait(  # type: ignore[no-any-return]
            found,
            timeout,
            lambda: (
                f"pod {pod} not prepared ("
                f"{self.waiting.get(pod, 'not bound to this node, or waiting for nothing')}; "
                f"latest round: {self.prepared.get(pod)}; calls: {self.calls[-3:]})"
            ),
        )

    def wait_unprepared(self, pod: str, timeout: float = 30.0, *, after: float = 0.0) -> PodResult:
        """The latest unprepare round of `pod` that ended after `after`."""

        def found() -> PodResult | None:
            result = self.unprepared.get(pod)
            return result if result is not None and result.at >= after else None

        return self._wait(  # type: ignore[no-any-return]
            found,
            timeout,
            lambda: (
                f"pod {pod} not unprepared (latest: {self.unprepared.get(pod)}; "
                f"calls: {self.calls[-3:]})"
            ),
        )

    # --- direct calls (for tests) -------------------------------------------------------------

    def active(self, driver: str) -> Registration | None:
        """The registration calls for `driver` go to: the newest."""
        regs = self.registrations.get(driver) or []
        return regs[-1] if regs else None

    def client(self, driver: str) -> DraClient:
        """A DraClient on the active plugin of `driver` (raises LookupError when none)."""
        reg = self.active(driver)
        if reg is None:
            raise LookupError(f"DRA driver {driver} is not registered")
        return self._client_for(reg)

    def _client_for(self, reg: Registration) -> DraClient:
        # One channel per registration: a restarted plugin gets a fresh one.
        with self._cond:
            if reg.seq not in self._clients:
                self._clients[reg.seq] = DraClient(reg.endpoint, reg.api_version)
            return self._clients[reg.seq]

    # --- registration ----------------------------------------------------------------------------

    def _record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    async def _timed(
        self,
        method: str,
        target: Path,
        api_version: str,
        uids: Sequence[str],
        future: Any,
    ) -> Any:
        started, t0 = time.time(), time.perf_counter()
        error = ""
        try:
            return await _wait_grpc(future)
        except grpc.RpcError as exc:
            error = _rpc_error(exc)
            raise
        finally:
            self._record(
                Call(
                    method,
                    str(target),
                    api_version,
                    tuple(uids),
                    started,
                    time.perf_counter() - t0,
                    error,
                )
            )

    async def _watch_registry(self) -> None:
        while True:
            await self._scan_registry()
            await anyio.sleep(self.poll_interval)

    async def _scan_registry(self) -> None:
        present: dict[Path, tuple[int, int]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.registry_dir):
                if entry.name.startswith(".") or not entry.name.endswith(REGISTRATION_SUFFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    present[Path(entry.path)] = (st.st_dev, st.st_ino)
        # Gone or replaced sockets deregister.
        for driver, regs in list(self.registrations.items()):
            keep = [r for r in regs if present.get(r.socket) == r.inode]
            if len(keep) != len(regs):
                with self._cond:
                    self.registrations[driver] = keep
                    for r in regs:
                        if r not in keep:
                            log.info("deregistered %s at %s", driver, r.socket)
                            client = self._clients.pop(r.seq, None)
                            if client is not None:
                                client.close()
                    self._cond.notify_all()
        for path in list(self._seen_sockets):
            if path not in present:
                del self._seen_sockets[path]
                self.rejected.pop(path, None)
        now = time.monotonic()
        for path, inode in sorted(present.items()):
            seen = self._seen_sockets.get(path)
            if seen is not None and seen[0] == inode and (seen[1] == 0 or now < seen[1]):
                continue  # handled (retry time 0), or waiting to retry
            await self._register(path, inode)

    async def _register(self, path: Path, inode: tuple[int, int]) -> None:
        api = grpc_stubs.load().registration
        channel = unix_channel(path)
        try:
            stub = api.grpc.RegistrationStub(channel)
            try:
                info = await self._timed(
                    "GetInfo",
                    path,
                    "",
                    (),
                    stub.GetInfo.future(api.pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT),
                )
            except grpc.RpcError as exc:
                # The kubelet retries a plugin whose GetInfo fails.
                log.warning("GetInfo on %s failed: %s", path, _rpc_error(exc))
                self._seen_sockets[path] = (inode, time.monotonic() + 1.0)
                return
            version = choose_dra_version(list(info.supported_versions), self.api_versions)
            problem = ""
            if info.type != PLUGIN_TYPE:
                problem = f"plugin type {info.type!r} is not {PLUGIN_TYPE}"
            elif not info.name:
                problem = "plugin has no name"
            elif version is None:
                problem = (
                    f"none of the services supported by the plugin "
                    f"({list(info.supported_versions)}) is supported by this kubelet "
                    f"({[f'{v}.DRAPlugin' for v in self.api_versions]})"
                )
            status = api.pb2.RegistrationStatus(plugin_registered=not problem, error=problem)
            with contextlib.suppress(grpc.RpcError):
                await self._timed(
                    "NotifyRegistrationStatus",
                    path,
                    "",
                    (),
                    stub.NotifyRegistrationStatus.future(status, timeout=GET_INFO_TIMEOUT),
                )
            self._seen_sockets[path] = (inode, 0.0)
            if problem:
                log.warning("refused plugin at %s: %s", path, problem)
                with self._cond:
                    self.rejected[path] = problem
                    self._cond.notify_all()
                return
            assert version is not None
            with self._cond:
                self._seq += 1
                reg = Registration(
                    driver=info.name,
                    socket=path,
                    endpoint=Path(info.endpoint),
                    api_version=version,
                    supported_versions=tuple(info.supported_versions),
                    inode=inode,
                    seq=self._seq,
                )
                regs = [r for r in self.registrations.get(info.name, []) if r.socket != path]
                self.registrations[info.name] = [*regs, reg]
                self.rejected.pop(path, None)
                self._cond.notify_all()
            log.info("registered %s at %s (DRA %s)", info.name, info.endpoint, version)
            self._poke()  # pods waiting for this driver
        finally:
            channel.close()

    # --- pods ----------------------------------------------------------------------------------

    async def _reconcile_forever(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            wake = self._wake
            assert wake is not None
            with anyio.move_on_after(0.5):  # retries are due by time, not by events
                await wake.wait()
            self._wake = anyio.Event()
            self._reconcile(tg)

    def _get_claim(self, key: str) -> Mapping[str, Any] | None:
        assert self._claims is not None
        return self._claims.get(key)

    def _reconcile(self, tg: anyio.abc.TaskGroup) -> None:
        assert self._pods is not None
        if not self.handle_pods:
            return
        now = time.monotonic()
        pods = {(p.get("metadata") or {}).get("uid"): p for p in self._pods.items()}
        for uid, pod in pods.items():
            key = pod_key(pod)
            state = self._states.get(uid)
            if state is None:
                state = self._states[uid] = _PodState(key, uid)
            if state.busy:
                continue
            ending = (pod.get("metadata") or {}).get("deletionTimestamp") or (
                (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            )
            if ending:
                if now < state.end_retry_at:
                    continue
                deleting = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
                if state.phase in ("prepared", "failed") or (
                    deleting and self.finalize_deleted_pods and not state.finalized
                ):
                    state.busy = True
                    tg.start_soon(self._end_pod, state, pod if deleting else None)
                continue
            if state.phase == "pending" or (state.phase == "failed" and now >= state.retry_at):
                claims, why = pod_claims(pod, self._get_claim)
                if claims is None:
                    self.waiting[key] = why
                    continue
                self.waiting.pop(key, None)
                state.busy = True
                tg.start_soon(self._prepare_pod, state, claims)
        for uid, state in list(self._states.items()):
            if uid in pods or state.busy or now < state.end_retry_at:
                continue
            if state.phase in ("prepared", "failed"):
                state.busy = True
                tg.start_soon(self._end_pod, state, None)
            else:
                del self._states[uid]

    def _claims_in_use(self, besides: _PodState) -> set[str]:
        return {
            c.uid
            for s in self._states.values()
            if s is not besides and s.phase in ("prepared", "failed")
            for c in s.claims
        }

    async def _prepare_pod(self, state: _PodState, claims: list[PodClaim]) -> None:
        try:
            state.claims = claims
            results: list[ClaimResult] = []
            by_driver: dict[str, list[PodClaim]] = {}
            for claim in claims:
                for driver in claim.drivers:
                    by_driver.setdefault(driver, []).append(claim)
            for driver, group in sorted(by_driver.items()):
                answers = await self._prepare_for_driver(driver, group)
                for c in group:
                    a = answers[c.uid]
                    results.append(
                        ClaimResult(
                            c.pod_claim, c.namespace, c.name, c.uid, driver, a.devices, a.error
                        )
                    )
            result = PodResult(state.key, state.uid, tuple(results), time.time())
            state.phase = "prepared" if result.ok else "failed"
            state.retry_at = time.monotonic() + self.retry_interval
            with self._cond:
                self.prepared[state.key] = result
                self._cond.notify_all()
            if not result.ok:
                log.warning("prepare of pod %s failed: %s", state.key, result.errors())
        finally:
            state.busy = False
            self._poke()

    async def _prepare_for_driver(
        self, driver: str, claims: list[PodClaim]
    ) -> dict[str, PrepareAnswer]:
        reg = self.active(driver)
        if reg is None:
            error = f"DRA driver {driver} is not registered"
            return {c.uid: PrepareAnswer(error=error) for c in claims}
        client = self._client_for(reg)
        uids = [c.uid for c in claims]
        try:
            response = await self._timed(
                "NodePrepareResources",
                reg.endpoint,
                reg.api_version,
                uids,
                client.prepare_future(
                    client.prepare_request(c.ref for c in claims), self.call_timeout
                ),
            )
        except grpc.RpcError as exc:
            error = f"NodePrepareResources failed: {_rpc_error(exc)}"
            return {uid: PrepareAnswer(error=error) for uid in uids}
        answers = DraClient.prepare_answers(response)
        missing = PrepareAnswer(error="the plugin answered no entry for this claim")
        return {uid: answers.get(uid, missing) for uid in uids}

    async def _end_pod(self, state: _PodState, deleting: Mapping[str, Any] | None) -> None:
        """Unprepare the pod's claims no other pod uses; finalize a pod being deleted."""
        try:
            if state.phase in ("prepared", "failed"):
                in_use = self._claims_in_use(state)
                results: list[ClaimResult] = []
                by_driver: dict[str, list[PodClaim]] = {}
                for claim in state.claims:
                    if claim.uid in in_use:
                        continue
                    for driver in claim.drivers:
                        by_driver.setdefault(driver, []).append(claim)
                for driver, group in sorted(by_driver.items()):
                    errors = await self._unprepare_for_driver(driver, group)
                    results += [
                        ClaimResult(
                            c.pod_claim, c.namespace, c.name, c.uid, driver, error=errors[c.uid]
                        )
                        for c in group
                    ]
                result = PodResult(state.key, state.uid, tuple(results), time.time())
                if not result.ok:
                    log.warning("unprepare of pod %s failed: %s", state.key, result.errors())
                    state.end_retry_at = time.monotonic() + self.retry_interval
                else:
                    state.phase = "unprepared"
                with self._cond:
                    self.unprepared[state.key] = result
                    self._cond.notify_all()
            if (
                deleting is not None
                and self.finalize_deleted_pods
                and state.phase in ("pending", "unprepared")
            ):
                state.finalized = await self._finalize(deleting)
        finally:
            state.busy = False
            self._poke()

    async def _unprepare_for_driver(self, driver: str, claims: list[PodClaim]) -> dict[str, str]:
        reg = self.active(driver)
        uids = [c.uid for c in claims]
        if reg is None:
            return dict.fromkeys(uids, f"DRA driver {driver} is not registered")
        client = self._client_for(reg)
        try:
            response = await self._timed(
                "NodeUnprepareResources",
                reg.endpoint,
                reg.api_version,
                uids,
                client.unprepare_future(
                    client.unprepare_request(c.ref for c in claims), self.call_timeout
                ),
            )
        except grpc.RpcError as exc:
            return dict.fromkeys(uids, f"NodeUnprepareResources failed: {_rpc_error(exc)}")
        answers = DraClient.unprepare_answers(response)
        return {
            uid: answers.get(uid, "the plugin answered no entry for this claim") for uid in uids
        }

    async def _finalize(self, pod: Mapping[str, Any]) -> bool:
        """Remove a pod being deleted (grace period 0); False when that failed."""
        assert self._client is not None
        meta = pod.get("metadata") or {}
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta.get("uid")},
        }
        try:
            await self._client.request(
                "DELETE", PODS.path(meta.get("namespace"), meta.get("name")), body=body
            )
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone, or another pod by now: done
                log.warning("removing pod %s failed: %s", pod_key(pod), exc)
                return False
        return True


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kubelet_standin",
        description="Play a node's kubelet towards DRA plugins (registration, prepare, unprepare).",
    )
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--registry-dir", required=True, type=Path)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--dra-version", action="append", choices=DRA_API_VERSIONS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    standin = KubeletStandin(
        args.node_name,
        args.registry_dir,
        args.kubeconfig,
        api_version_preference=args.dra_version or DRA_API_VERSIONS,
    ).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
