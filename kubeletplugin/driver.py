# SPDX-License-Identifier: Apache-2.0
"""The DRA backend: the async glue between the kubelet's calls and the plugin's state.

Per request: the claims not prepared yet are read from the API concurrently
(bounded) and decided by the pure functions of `claims`, each within the
call's deadline; then ONE call of the state machine (`state.PluginState`)
writes the specs and the state file under the state lock: on the event loop
when it is quick and the lock free, else in the state thread (`_on_loop`). A
claim's problem stays in that claim's answer. Transient API failures are
retried inside the call (a failed prepare costs the pod a 60-90 s kubelet
retry); permanent ones are answered at once.

State calls run in the order they were made (an unprepare never overtakes the
prepare before it): the state thread is one thread, and a call is made on the
event loop only when the thread has nothing queued or running. A call whose
caller gave up (cancelled, deadline) still completes in the thread: the state
stays what the files say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio

from controller.kube.backoff import BackoffPolicy, retry
from controller.kube.errors import ApiError, NotFound
from controller.kube.resources import Resource, resource_kinds

from .claims import (
    ClaimError,
    ClaimRef,
    PreparedClaim,
    build_prepared_claim,
    check_claim,
    clip,
    reserved_here,
    validate_claim_ref,
)
from .grpc_service import DeviceHealth
from .ibm_state import IBM_DEVICE_NAME
from .state import DriverPaths, PluginState, PrepareResult

if TYPE_CHECKING:  # importing the HTTP stack is deferred until the sockets are up
    from controller.kube.client import ApiClient

__all__ = ["DriverPaths", "NxDriver", "PrepareResult"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A", bound=Sized)  # a state call's claims

# The kubelet gives a DRA call 45 s; answer before it gives up. A call's own
# gRPC deadline (the budget the service passes) is used when it is shorter.
PREPARE_DEADLINE = 40.0
# Part of the budget kept for writing specs and the checkpoint after the claims
# are decided (a busy disk's fsync takes up to ~0.2 s).
COMMIT_RESERVE = 0.5

# Most claims a state call made on the event loop may have (`NxDriver._on_loop`).
LOOP_MAX_CLAIMS = 16

# Where a claim is read from: the API server's watch cache first (no etcd read;
# a copy that is not yet allocated here is read again from etcd), or etcd only.
CLAIM_READ_CACHE = "cache"
CLAIM_READ_QUORUM = "quorum"
CLAIM_READ_MODES = (CLAIM_READ_CACHE, CLAIM_READ_QUORUM)

# Reading a claim the API server failed to give: 50 ms doubling to 2 s, until the
# call's deadline.
CLAIM_READ_BACKOFF = BackoffPolicy(initial=0.05, cap=2.0)


class StateThread:
    """One thread that runs blocking calls in the order they were submitted.

    Lighter than an executor (a future, a queue entry and one wake-up of the
    event loop per call): the state's calls are serialized by its lock
    anyway, and in submission order here. Started at the first call.
    """

    def __init__(self, name: str = "plugin-state") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0  # calls submitted and not finished (changed on the loop only)

    @property
    def idle(self) -> bool:
        """No call queued or running (one whose caller was cancelled included)."""
        return self._pending == 0

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`func(*args, **kwargs)` in the thread. Cancelling the caller does not stop
        it: the result is then dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        self._pending += 1
        self._queue.put((loop, future, func, args, kwargs))
        return await future

    def _serve(self) -> None:
        while True:
            loop, future, func, args, kwargs = self._queue.get()
            try:
                result, error = func(*args, **kwargs), None
            except Exception as exc:  # handed to the caller
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(self._settle, future, result, error)
            del loop, future, func, args, kwargs, result, error

    def _settle(self, future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
        self._pending -= 1
        if future.done():  # the caller was cancelled
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class NxDriver:
    """Implements `grpc_service.DraBackend` for NX-gzip."""

    def __init__(
        self,
        client: ApiClient | None,
        *,
        driver: str,
        node_name: str,
        paths: DriverPaths,
        device_names: Callable[[], set[str]],
        health: Callable[[], list[DeviceHealth]],
        concurrency: int = 32,
        claim_read: str = CLAIM_READ_CACHE,
    ) -> None:
        if claim_read not in CLAIM_READ_MODES:
            raise ValueError(
                f"claim read {claim_read!r}: must be one of {', '.join(CLAIM_READ_MODES)}"
            )
        self.claim_read = claim_read
        self._client = client
        self._claim_resource: Resource | None = None
        self._devices_settled: anyio.Event | None = None
        self._client_ready = anyio.Event()
        if client is not None:
            self._client_ready.set()
        self.driver = driver
        self.node_name = node_name
        self.paths = paths
        self._device_names = device_names
        self._health = health
        self._limit = anyio.Semaphore(concurrency)
        self._state = PluginState(paths)
        self._thread = StateThread()
        self._health_event = anyio.Event()
        self.stats = {
            "prepared": 0,
            "unprepared": 0,
            "prepare_errors": 0,
            # Claim reads by where they were answered: the watch cache (a copy that
            # could be prepared), or etcd (quorum mode, or after a cached copy that
            # could not).
            "claim_reads_cache": 0,
            "claim_reads_etcd": 0,
            # State calls by the thread that made them (see `_on_loop`).
            "state_calls_loop": 0,
            "state_calls_thread": 0,
        }
        self.on_latency: Callable[[str, float], None] | None = None
        # Called (on the event loop) when `credits_outside_our_slice` changed.
        self.on_outside_credits_change: Callable[[], None] | None = None
        self._outside_credits = 0

    @property
    def boot_id(self) -> str:
        return self._state.boot_id

    @property
    def claims(self) -> dict[str, PreparedClaim]:
        """The prepared claims by UID (a copy: state calls change them)."""
        return dict(self._state.claims)

    # --- start-up ----------------------------------------------------------------

    def set_client(self, client: ApiClient, devices_settled: anyio.Event | None = None) -> None:
        """Hand over the API client once it exists (the sockets come up before it).

        `devices_settled` is set once the node's devices are final for this run
        (the slice is published, after any fall-back to slot mode): until then a
        claim's device cannot be checked against the inventory.
        """
        self._client = client
        self._claim_resource = None
        self._devices_settled = devices_settled
        self._client_ready.set()

    def load_state(self) -> list[str]:
        """Read the checkpoint and make specs and state agree. Blocking; returns problems."""
        problems = self._state.load()
        self._outside_credits = self._state.outside_credits
        return problems

    def close_state(self) -> None:
        """Compact the state into the previous release's format (at a clean stop). Blocking."""
        self._state.close()

    def credits_outside_our_slice(self) -> int:
        """Credits of prepared claims the scheduler counts against IBM's device, not ours."""
        return self._state.outside_credits

    def _check_outside_credits(self) -> None:
        outside = self._state.outside_credits
        if outside != self._outside_credits:
            self._outside_credits = outside
            if self.on_outside_credits_change is not None:
                self.on_outside_credits_change()

    # --- prepare -------------------------------------------------------------------

    async def prepare_claims(
        self, claims: list[ClaimRef], *, budget: float = PREPARE_DEADLINE
    ) -> dict[str, PrepareResult]:
        """Prepare a batch; every claim's outcome, error included, stays in its own entry.

        The whole call takes at most `budget` seconds (the caller's deadline):
        each claim gets until then minus COMMIT_RESERVE to be decided, and one
        that is not decided by then answers with what it was waiting for.
        """
        start = time.monotonic()
        budget = min(budget, PREPARE_DEADLINE)
        decide_by = start + max(0.0, budget - min(COMMIT_RESERVE, budget / 4))
        results: dict[str, PrepareResult] = {}
        decided: dict[str, PreparedClaim] = {}
        known = self._state.claims
        new: list[ClaimRef] = []
        for ref in claims:
            try:
                validate_claim_ref(ref)
            except ClaimError as exc:
                results[ref.uid] = PrepareResult(error=str(exc))
                continue
            prepared = known.get(ref.uid)
            if prepared is None:
                new.append(ref)
            else:
                decided[ref.uid] = prepared
        if len(new) == 1:  # the usual call: one pod, one claim; no task to start
            await self._decide(new[0], decide_by, budget, decided, results)
        elif new:
            async with anyio.create_task_group() as tg:
                for ref in new:
                    tg.start_soon(self._decide, ref, decide_by, budget, decided, results)
        if decided:
            results.update(
                await self._call_state(
                    self._state.prepare_now, self._state.prepare, decided, start + budget
                )
            )
            self._check_outside_credits()
        errors = 0
        for uid, result in results.items():
            if result.error:
                errors += 1
                log.error("prepare failed", extra={"claimUID": uid, "error": result.error})
        self.stats["prepared"] += len(results) - errors
        self.stats["prepare_errors"] += errors
        if self.on_latency is not None:
            self.on_latency("prepare", time.monotonic() - start)
        return results

    async def _decide(
        self,
        ref: ClaimRef,
        decide_by: float,
        budget: float,
        decided: dict[str, PreparedClaim],
        results: dict[str, PrepareResult],
    ) -> None:
        """Read and judge one claim not prepared yet; into `decided`, or its error into `results`."""
        stage = ["waiting for a free prepare slot"]
        with anyio.CancelScope(deadline=decide_by) as scope:
            try:
                self._limit.acquire_nowait()  # no event-loop round trip when a slot is free
            except anyio.WouldBlock:
                await self._limit.acquire()
            try:
                decided[ref.uid] = await self._decide_claim(ref, stage)
            except ClaimError as exc:
                results[ref.uid] = PrepareResult(error=str(exc))
            except ApiError as exc:
                results[ref.uid] = PrepareResult(error=f"{_label(ref)}: {exc}")
            except Exception as exc:  # a bug must fail its claim, not the batch
                log.exception("preparing a claim failed", extra={"claimUID": ref.uid})
                results[ref.uid] = PrepareResult(
                    error=f"{_label(ref)}: internal error: {type(exc).__name__}: "
                    f"{clip(str(exc), 300)} (plugin bug; the kubelet retries)"
                )
            finally:
                self._limit.release()
        if scope.cancelled_caught:
            results[ref.uid] = PrepareResult(
                error=f"{_label(ref)}: deadline exceeded: not prepared within the call's "
                f"{budget:.1f} s while {stage[0]}; the kubelet retries"
            )

    async def _decide_claim(self, ref: ClaimRef, stage: list[str]) -> PreparedClaim:
        """Read and judge one claim; `stage[0]` says what it waits for (the caller's timeout)."""
        claim = None
        if self.claim_read == CLAIM_READ_CACHE:
            with contextlib.suppress(NotFound):  # not in the cache (yet): etcd will say
                claim = await self._get_claim(ref, stage, from_cache=True)
            if claim is not None and not reserved_here(claim, ref, self.driver, self.node_name):
                log.debug(
                    "claim in the API server's cache is not (yet) allocated here; reading etcd",
                    extra={"claim": f"{ref.namespace}/{ref.name}", "claimUID": ref.uid},
                )
                claim = None
            if claim is not None:
                self.stats["claim_reads_cache"] += 1
        if claim is None:
            try:
                claim = await self._get_claim(ref, stage)
            except NotFound as exc:
                raise ClaimError(
                    f"claim {ref.namespace}/{ref.name} (uid {ref.uid}) does not exist: "
                    "it was deleted before its pod started"
                ) from exc
            self.stats["claim_reads_etcd"] += 1
        problem = check_claim(claim, ref)
        if problem:
            raise ClaimError(problem)
        if self._devices_settled is not None and not self._devices_settled.is_set():
            stage[0] = (
                "waiting for this node's ResourceSlice to be published (devices not known yet)"
            )
            await self._devices_settled.wait()
        devices = self._device_names()
        if devices:
            # Allocated from IBM's slice before ours replaced it: the same accelerator.
            devices = {*devices, IBM_DEVICE_NAME}
        return build_prepared_claim(claim, self.driver, self.node_name, devices)

    async def _get_claim(
        self, ref: ClaimRef, stage: list[str], *, from_cache: bool = False
    ) -> dict[str, Any]:
        """The claim from the API server (`from_cache`: from its watch cache), transient
        failures retried until the caller's deadline; NotFound is the caller's."""
        if self._client is None:
            stage[0] = "waiting for the API client (the plugin is starting)"
            await self._client_ready.wait()
        client = self._client
        assert client is not None
        stage[0] = "reading the claim from the API server"

        async def read() -> dict[str, Any]:
            res = self._claim_resource
            if res is None:
                version = await client.resource_api_version()
                res = self._claim_resource = resource_kinds(version)["ResourceClaim"]
            return await client.get(res, ref.name, ref.namespace, from_cache=from_cache)

        def retrying(exc: BaseException, delay: float) -> None:
            # Retried until the call's deadline (the caller's scope ends it);
            # the timeout answer then quotes the last error.
            stage[0] = f"reading the claim from the API server (last error: {clip(str(exc), 300)})"
            log.warning(
                "reading claim failed, retrying",
                extra={"claim": f"{ref.namespace}/{ref.name}", "error": str(exc), "delay_s": delay},
            )

        return await retry(read, CLAIM_READ_BACKOFF, on_retry=retrying)

    # --- the state's calls -----------------------------------------------------------

    def _on_loop(self, claims: int) -> bool:
        """Whether a state call for `claims` claims is made right here, on the event loop.

        The usual call (a claim or a few, its spec, one journal append of ~0.5 ms)
        is then one thread's work. Handed to the state thread it costs two more
        wake-ups and two hand-overs of the GIL, each waiting for a CPU on a busy
        node (`make bench BUSY=2`). The loop is blocked for the call's file work
        only: a state thread still busy (calls stay in order), a big batch, a due
        snapshot or a slow last write go to the thread, and so does a call whose
        lock another instance holds (the `_now` calls do nothing then).
        """
        return claims <= LOOP_MAX_CLAIMS and self._thread.idle and self._state.commits_quickly()

    async def _call_state(
        self,
        now: Callable[[A], T | None],
        waiting: Callable[[A, float], T],
        claims: A,
        deadline: float,
    ) -> T:
        """One state call for `claims`: `now` on the event loop when `_on_loop` allows it
        and the lock is free, else `waiting` in the state thread, which may wait for the
        lock until `deadline` (on the monotonic clock)."""
        if self._on_loop(len(claims)):
            done = now(claims)
            if done is not None:
                self.stats["state_calls_loop"] += 1
                return done
        self.stats["state_calls_thread"] += 1
        return await self._thread.run(waiting, claims, deadline - time.monotonic())

    # --- unprepare -----------------------------------------------------------------

    async def unprepare_claims(
        self, claims: list[ClaimRef], *, budget: float = PREPARE_DEADLINE
    ) -> dict[str, str]:
        """Unprepare a batch; claim UID -> error message, "" for success."""
        start = time.monotonic()
        results = await self._call_state(
            self._state.unprepare_now,
            self._state.unprepare,
            [c.uid for c in claims],
            start + min(budget, PREPARE_DEADLINE),
        )
        self._check_outside_credits()
        self.stats["unprepared"] += sum(1 for error in results.values() if not error)
        if self.on_latency is not None:
            self.on_latency("unprepare", time.monotonic() - start)
        return results

    # --- health --------------------------------------------------------------------

    def device_health(self) -> list[DeviceHealth]:
        return self._health()

    def health_changed(self) -> anyio.Event:
        return self._health_event

    def notify_health_changed(self) -> None:
        """Wake health streams (the inventory changed)."""
        self._health_event.set()
        self._health_event = anyio.Event()


def _label(ref: ClaimRef) -> str:
    return f"claim {clip(ref.namespace)}/{clip(ref.name)}"
