# SPDX-License-Identifier: Apache-2.0
"""The DRA backend: prepare and unprepare claims for the kubelet.

Per request: claims are fetched concurrently (bounded), decided by the pure
functions of `claims`, then all CDI specs and ONE checkpoint write happen in a
worker thread under the state lock. A claim's problem stays in that claim's
answer. Transient API failures are retried inside the call (a failed prepare
costs the pod a 60-90 s kubelet retry); permanent ones are answered at once.

Crash safety: prepare writes specs before the checkpoint, unprepare removes
the checkpoint entry before the spec; `reconcile_on_start` repairs whatever a
crash between the two left behind (a spec without entry is removed, an entry
without spec gets its spec back).

Claims adopted from IBM's Go driver (see `ibm_state`) keep IBM's CDI spec
files instead of ours, under the same rules; their credits are reported to
the publisher, which keeps them out of the slice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from controller.kube.errors import ApiError, NotFound
from controller.kube.resources import resource_kinds
from controller.nx.names import DEVICE_PATH

from .cdi import (
    SPEC_FILE_PREFIX,
    claim_spec,
    list_claim_specs,
    remove_claim_spec,
    spec_file_name,
    write_claim_spec,
)
from .checkpoint import (
    CHECKPOINT_FILE_NAME,
    LOCK_FILE_NAME,
    StateFile,
    StateLock,
    read_boot_id,
)
from .claims import (
    ClaimError,
    ClaimRef,
    PreparedClaim,
    build_prepared_claim,
    check_claim,
    clip,
    validate_claim_ref,
    validate_claim_uid,
)
from .grpc_service import ClaimPrepareResult, DeviceHealth, PreparedDeviceInfo
from .ibm_state import (
    IBM_DEVICE_NAME,
    credits_outside_our_slice,
    ibm_specs_present,
    reconcile_ibm_specs,
    remove_ibm_specs,
    uses_ibm_specs,
    write_ibm_specs,
)

if TYPE_CHECKING:  # importing the HTTP stack is deferred until the sockets are up
    from controller.kube.client import ApiClient

log = logging.getLogger(__name__)

T = TypeVar("T")

# The kubelet gives a DRA call 45 s; answer before it gives up. A call's own
# gRPC deadline (the budget the service passes) is used when it is shorter.
PREPARE_DEADLINE = 40.0
# Part of the budget kept for writing specs and the checkpoint after the claims
# are decided (a busy disk's fsync takes up to ~0.2 s).
COMMIT_RESERVE = 0.5


@dataclass(frozen=True)
class DriverPaths:
    """Where the backend keeps its files."""

    plugin_dir: Path  # <kubelet plugins dir>/<driver>
    cdi_root: Path
    device_path: str = DEVICE_PATH  # inside the container
    host_device_path: str | None = None  # on the host, when it differs

    @property
    def checkpoint(self) -> Path:
        return self.plugin_dir / CHECKPOINT_FILE_NAME

    @property
    def lock(self) -> Path:
        return self.plugin_dir / LOCK_FILE_NAME


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
    ) -> None:
        self._client = client
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
        self._lock = StateLock(paths.lock)
        self.claims: dict[str, PreparedClaim] = {}
        self.boot_id = read_boot_id()
        self._state = StateFile(paths.checkpoint, self.boot_id)
        # One thread of its own for the state writes (they are serialized by the
        # lock anyway): handing work to an idle dedicated thread costs half what
        # anyio's worker pool does, and a tenth at p90.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="state-writer")
        self._health_event = anyio.Event()
        self.stats = {"prepared": 0, "unprepared": 0, "prepare_errors": 0}
        self.on_latency: Callable[[str, float], None] | None = None
        # Called (on the event loop) when `credits_outside_our_slice` changed.
        self.on_outside_credits_change: Callable[[], None] | None = None
        self._outside_credits = 0
        # Set when a changed claim holds credits of IBM's device (no scan of all claims otherwise).
        self._outside_may_change = False

    # --- start-up ----------------------------------------------------------------

    def set_client(self, client: ApiClient, devices_settled: anyio.Event | None = None) -> None:
        """Hand over the API client once it exists (the sockets come up before it).

        `devices_settled` is set once the node's devices are final for this run
        (the slice is published, after any fall-back to slot mode): until then a
        claim's device cannot be checked against the inventory.
        """
        self._client = client
        self._devices_settled = devices_settled
        self._client_ready.set()

    def load_state(self) -> list[str]:
        """Read the checkpoint and make specs and state agree. Blocking; returns problems."""
        self.paths.plugin_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            loaded, compact = self._state.load(self.paths.cdi_root)
            self.claims = dict(loaded.claims)
            problems = list(loaded.problems)
            problems += self._reconcile_files()
            self._remove_partial_writes()
            if problems or compact:
                self._state.save(self.claims)
        self._outside_credits = self.credits_outside_our_slice()
        return problems

    def close_state(self) -> None:
        """Compact the state into the previous release's format (at a clean stop). Blocking."""
        with self._lock:
            self._refresh_from_disk()
            self._state.close(self.claims)

    def _reconcile_files(self) -> list[str]:
        notes: list[str] = []
        on_disk = list_claim_specs(self.paths.cdi_root)
        for uid in sorted(set(on_disk) - set(self.claims)):
            remove_claim_spec(self.paths.cdi_root, uid)
            notes.append(f"removed CDI spec of claim {uid}: not in the checkpoint (never answered)")
        for uid, prepared in self.claims.items():
            if uid not in on_disk and not uses_ibm_specs(prepared):
                write_claim_spec(self.paths.cdi_root, self._spec(prepared), uid)
                notes.append(f"re-created CDI spec of prepared claim {prepared.ref}")
        notes += reconcile_ibm_specs(
            self.paths.cdi_root, self.claims, self.paths.device_path, self.paths.host_device_path
        )
        for note in notes:
            log.warning("%s", note)
        return notes

    def _remove_partial_writes(self) -> None:
        # A kill during an atomic write leaves its temporary file (`.<name>.<random>.tmp`)
        # behind; nobody else writes ours while we hold the state lock.
        partial = [
            *self.paths.cdi_root.glob(f".{SPEC_FILE_PREFIX}*.tmp"),
            *self.paths.plugin_dir.glob(f".{CHECKPOINT_FILE_NAME}.*.tmp"),
        ]
        for path in partial:
            path.unlink(missing_ok=True)
            log.info("removed %s: left by a write that was interrupted", path)

    def _spec(self, prepared: PreparedClaim) -> dict[str, Any]:
        return claim_spec(prepared, self.paths.device_path, self.paths.host_device_path)

    def _spec_present(self, prepared: PreparedClaim) -> bool:
        if uses_ibm_specs(prepared):
            return ibm_specs_present(self.paths.cdi_root, prepared.uid)
        return (self.paths.cdi_root / spec_file_name(prepared.uid)).exists()

    def _write_spec(self, prepared: PreparedClaim) -> None:
        # A claim adopted from IBM's driver keeps the CDI IDs the kubelet has: IBM's files.
        if uses_ibm_specs(prepared):
            write_ibm_specs(
                self.paths.cdi_root,
                prepared.uid,
                self.paths.device_path,
                self.paths.host_device_path,
            )
        else:
            write_claim_spec(self.paths.cdi_root, self._spec(prepared), prepared.uid)

    def credits_outside_our_slice(self) -> int:
        """Credits of prepared claims the scheduler counts against IBM's device, not ours."""
        return credits_outside_our_slice(self.claims.values())

    def _check_outside_credits(self) -> None:
        if not self._outside_may_change:
            return
        self._outside_may_change = False
        outside = self.credits_outside_our_slice()
        if outside != self._outside_credits:
            self._outside_credits = outside
            if self.on_outside_credits_change is not None:
                self.on_outside_credits_change()

    def _note_outside_change(self, *claims: PreparedClaim | None) -> None:
        if any(c is not None and credits_outside_our_slice((c,)) for c in claims):
            self._outside_may_change = True

    def _refresh_from_disk(self) -> None:
        # Another plugin instance (rolling update) may have written since our last write.
        if self._state.changed_on_disk():
            loaded, _ = self._state.load(self.paths.cdi_root)
            self.claims = dict(loaded.claims)
            self._outside_may_change = True
            # Its writer may have died mid-append: start from a clean journal.
            self._state.save(self.claims)

    # --- prepare -------------------------------------------------------------------

    async def prepare_claims(
        self, claims: list[ClaimRef], *, budget: float = PREPARE_DEADLINE
    ) -> dict[str, ClaimPrepareResult]:
        """Prepare a batch; every claim's outcome, error included, stays in its own entry.

        The whole call takes at most `budget` seconds (the caller's deadline):
        each claim gets until then minus COMMIT_RESERVE to be decided, and one
        that is not decided by then answers with what it was waiting for.
        """
        start = time.monotonic()
        budget = min(budget, PREPARE_DEADLINE)
        decide_by = start + max(0.0, budget - min(COMMIT_RESERVE, budget / 4))
        results: dict[str, ClaimPrepareResult] = {}
        decided: dict[str, PreparedClaim] = {}

        async def one(ref: ClaimRef) -> None:
            label = f"claim {clip(ref.namespace)}/{clip(ref.name)}"
            stage = ["waiting for a free prepare slot"]
            with anyio.move_on_after(decide_by - time.monotonic()) as scope:
                async with self._limit:
                    try:
                        validate_claim_ref(ref)
                        known = self.claims.get(ref.uid)
                        if known is None:
                            known = await self._decide(ref, decide_by, stage)
                        decided[ref.uid] = known
                    except ClaimError as exc:
                        results[ref.uid] = ClaimPrepareResult(error=str(exc))
                    except ApiError as exc:
                        results[ref.uid] = ClaimPrepareResult(error=f"{label}: {exc}")
                    except Exception as exc:  # a bug must fail its claim, not the batch
                        log.exception("preparing a claim failed", extra={"claimUID": ref.uid})
                        results[ref.uid] = ClaimPrepareResult(
                            error=f"{label}: internal error: {type(exc).__name__}: "
                            f"{clip(str(exc), 300)} (plugin bug; the kubelet retries)"
                        )
            if scope.cancelled_caught:
                results[ref.uid] = ClaimPrepareResult(
                    error=f"{label}: deadline exceeded: not prepared within the call's "
                    f"{budget:.1f} s while {stage[0]}; the kubelet retries"
                )

        if len(claims) == 1:  # the usual call: one pod, one claim; no task to start
            await one(claims[0])
        else:
            async with anyio.create_task_group() as tg:
                for ref in claims:
                    tg.start_soon(one, ref)
        if decided:
            async with self._lock:
                await self._in_writer(self._commit_prepared, decided)
            self._check_outside_credits()
        for uid, prepared in decided.items():
            results[uid] = ClaimPrepareResult(
                devices=[
                    PreparedDeviceInfo(
                        request_names=list(d.request_names),
                        pool_name=d.pool_name,
                        device_name=d.device_name,
                        cdi_device_ids=list(d.cdi_device_ids),
                        share_id=d.share_id,
                    )
                    for d in prepared.devices
                ]
            )
        errors = sum(1 for r in results.values() if r.error)
        self.stats["prepared"] += len(decided)
        self.stats["prepare_errors"] += errors
        if errors:
            for uid, r in results.items():
                if r.error:
                    log.error("prepare failed", extra={"claimUID": uid, "error": r.error})
        if self.on_latency is not None:
            self.on_latency("prepare", time.monotonic() - start)
        return results

    async def _in_writer(self, func: Callable[[T], None], arg: T) -> None:
        """Run `func(arg)` in the state-writer thread; not cancellable once started
        (the caller holds the state lock until the write is done)."""
        with anyio.CancelScope(shield=True):
            await asyncio.get_running_loop().run_in_executor(self._writer, func, arg)

    def _commit_prepared(self, decided: dict[str, PreparedClaim]) -> None:
        """Specs first, then one checkpoint write (worker thread, lock held)."""
        self._refresh_from_disk()
        changed: dict[str, PreparedClaim] = {}
        for uid, prepared in decided.items():
            if self.claims.get(uid) != prepared or not self._spec_present(prepared):
                self._write_spec(prepared)
            if self.claims.get(uid) != prepared:
                self._note_outside_change(self.claims.get(uid), prepared)
                self.claims[uid] = prepared
                changed[uid] = prepared
        if changed:
            self._state.record(self.claims, changed)

    async def _decide(self, ref: ClaimRef, deadline: float, stage: list[str]) -> PreparedClaim:
        """Read and judge one claim; `stage[0]` says what it waits for (the caller's timeout)."""
        claim = await self._get_claim(ref, deadline, stage)
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

    async def _get_claim(self, ref: ClaimRef, deadline: float, stage: list[str]) -> dict[str, Any]:
        if self._client is None:
            stage[0] = "waiting for the API client (the plugin is starting)"
            await self._client_ready.wait()
        client = self._client
        assert client is not None
        stage[0] = "reading the claim from the API server"
        delay = 0.05
        while True:
            try:
                res = resource_kinds(await client.resource_api_version())["ResourceClaim"]
                return await client.get(res, ref.name, ref.namespace)
            except NotFound as exc:
                raise ClaimError(
                    f"claim {ref.namespace}/{ref.name} (uid {ref.uid}) does not exist: "
                    "it was deleted before its pod started"
                ) from exc
            except ApiError as exc:
                if not exc.retryable:
                    raise
                # Retried until the call's deadline (the caller's scope ends it);
                # the timeout answer then quotes the last error.
                stage[0] = (
                    f"reading the claim from the API server (last error: {clip(str(exc), 300)})"
                )
                log.warning(
                    "reading claim failed, retrying",
                    extra={"claim": f"{ref.namespace}/{ref.name}", "error": str(exc)},
                )
                await anyio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 2.0)

    # --- unprepare -----------------------------------------------------------------

    async def unprepare_claims(self, claims: list[ClaimRef]) -> dict[str, str]:
        start = time.monotonic()
        results: dict[str, str] = {}
        uids: list[str] = []
        for ref in claims:
            try:
                validate_claim_uid(ref.uid)
            except ClaimError as exc:
                results[ref.uid] = str(exc)
                continue
            uids.append(ref.uid)
            results[ref.uid] = ""
        if uids:
            async with self._lock:
                await self._in_writer(self._commit_unprepared, uids)
            self._check_outside_credits()
        self.stats["unprepared"] += len(uids)
        if self.on_latency is not None:
            self.on_latency("unprepare", time.monotonic() - start)
        return results

    def _commit_unprepared(self, uids: list[str]) -> None:
        """Checkpoint entry first, then the spec (worker thread, lock held)."""
        self._refresh_from_disk()
        removed = []
        for uid in uids:
            gone = self.claims.pop(uid, None)
            if gone is not None:
                removed.append(uid)
                self._note_outside_change(gone)
        if removed:
            self._state.record(self.claims, {}, removed)
        for uid in uids:
            remove_claim_spec(self.paths.cdi_root, uid)
        remove_ibm_specs(self.paths.cdi_root, uids, self.claims.values())

    # --- health --------------------------------------------------------------------

    def device_health(self) -> list[DeviceHealth]:
        return self._health()

    def health_changed(self) -> anyio.Event:
        return self._health_event

    def notify_health_changed(self) -> None:
        """Wake health streams (the inventory changed)."""
        self._health_event.set()
        self._health_event = anyio.Event()
