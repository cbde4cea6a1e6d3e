# SPDX-License-Identifier: Apache-2.0
"""The plugin's state on this node: which claims are prepared, and their CDI specs.

Plain synchronous code (every method blocks on the file system); the async
driver (`driver.NxDriver`) makes one call per gRPC request, on its event loop
when the lock is free and the write quick (`prepare_now`, `unprepare_now`), in
one worker thread otherwise. It owns:

- the state file (`checkpoint.StateFile`: snapshot plus journal, one
  fdatasync'd append per call, whatever the number of claims held);
- the CDI spec files (`cdi`, and IBM's for adopted claims, `ibm_state`);
- the state lock (`checkpoint.StateLock`), held around every call: during a
  rolling update two plugin instances share the directory;
- the repair at start (`load`) and the previous release's format at a clean
  stop (`close`).

Crash safety: prepare writes specs before the state file, unprepare removes
the state entry before the spec; `load` repairs whatever a crash between the
two left behind (a spec without entry is removed, an entry without spec gets
its spec back), so a claim the kubelet was told is prepared always is, and one
it was told is unprepared never comes back.

Claims adopted from IBM's Go driver (see `ibm_state`) keep IBM's CDI spec
files instead of ours, under the same rules; their credits are counted in
`outside_credits`, which the publisher keeps out of the slice.

A claim's problem (a spec that cannot be written, a lock that stays taken past
the call's deadline) stays in that claim's result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from controller.nx.names import DEVICE_PATH

from .cdi import (
    SPEC_FILE_PREFIX,
    claim_spec,
    list_claim_specs,
    remove_claim_spec,
    spec_file_name,
    write_claim_spec,
)
from .checkpoint import CHECKPOINT_FILE_NAME, LOCK_FILE_NAME, StateFile, StateLock, read_boot_id
from .claims import ClaimError, PreparedClaim, PreparedDevice, clip, validate_claim_uid
from .ibm_state import (
    credits_outside_our_slice,
    ibm_specs_present,
    reconcile_ibm_specs,
    remove_ibm_specs,
    uses_ibm_specs,
    write_ibm_specs,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

__all__ = ["DriverPaths", "PluginState", "PrepareResult"]

# A write this quick (a journal append and its fdatasync, in seconds) is quick
# enough to make on the caller's thread (see `PluginState.commits_quickly`).
QUICK_COMMIT_SECONDS = 0.01


@dataclass(frozen=True)
class DriverPaths:
    """Where the plugin keeps its files."""

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


@dataclass(frozen=True, slots=True)
class PrepareResult:
    """One claim's answer to NodePrepareResources: its prepared devices, or why not.

    `devices` are the `PreparedDevice`s of the state itself (not copies); the
    gRPC service maps them to the wire once.
    """

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


class PluginState:
    """The prepared claims of this node, kept in memory, in the state file and as CDI specs.

    Blocking and not re-entrant: the driver calls it from one thread at a
    time. Every call that changes something takes the state lock first (see
    `StateLock`), so it also excludes another instance's calls and another
    thread of this process. `claims` may be read from any thread.
    """

    def __init__(self, paths: DriverPaths, *, boot_id: str | None = None) -> None:
        self.paths = paths
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self._lock = StateLock(paths.lock)
        self._file = StateFile(paths.checkpoint, self.boot_id)
        self._claims: dict[str, PreparedClaim] = {}
        self._closed = False
        # Credits of prepared claims the scheduler counts against IBM's device, not
        # ours; recounted only when a changed claim holds such credits.
        self.outside_credits = 0
        self._outside_may_change = False

    @property
    def claims(self) -> Mapping[str, PreparedClaim]:
        """The prepared claims by UID (the live mapping: copy it to iterate from another
        thread while calls run)."""
        return self._claims

    # --- start and stop ------------------------------------------------------------

    def load(self) -> list[str]:
        """Read the state file and make the specs agree with it; returns the repairs made.

        A claim in the state without its spec gets the spec back, a spec of
        ours without a claim is removed (a prepare that never answered), and
        so are temporary files of interrupted writes.
        """
        self.paths.plugin_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            loaded, compact = self._file.load(self.paths.cdi_root)
            self._claims = dict(loaded.claims)
            problems = list(loaded.problems)
            problems += self._reconcile_files()
            self._remove_partial_writes()
            if problems or compact:
                self._file.save(self._claims)
            self._closed = False
        self.outside_credits = credits_outside_our_slice(self._claims.values())
        return problems

    def close(self) -> None:
        """Leave the state in the previous release's format (at a clean stop).

        Calls after this one are refused: the plugin is stopping.
        """
        with self._lock:
            self._refresh_from_disk()
            self._file.close(self._claims)
            self._closed = True

    def _reconcile_files(self) -> list[str]:
        notes: list[str] = []
        cdi_root = self.paths.cdi_root
        on_disk = list_claim_specs(cdi_root)
        for uid in sorted(set(on_disk) - set(self._claims)):
            remove_claim_spec(cdi_root, uid)
            notes.append(f"removed CDI spec of claim {uid}: not in the checkpoint (never answered)")
        for uid, prepared in self._claims.items():
            if uid not in on_disk and not uses_ibm_specs(prepared):
                write_claim_spec(cdi_root, self._spec(prepared), uid)
                notes.append(f"re-created CDI spec of prepared claim {prepared.ref}")
        notes += reconcile_ibm_specs(
            cdi_root, self._claims, self.paths.device_path, self.paths.host_device_path
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

    # --- prepare and unprepare ---------------------------------------------------------

    def prepare(
        self, decided: Mapping[str, PreparedClaim], timeout: float | None = None
    ) -> dict[str, PrepareResult]:
        """Make claims prepared: their specs first, then one state-file write.

        `decided` maps claim UIDs to what they get (already known claims
        included: their specs are checked). `timeout` bounds the wait for the
        state lock, in seconds.
        """
        refused = self._refusal(timeout)
        if refused:
            return {
                uid: PrepareResult(error=f"{_label(c)}: {refused}") for uid, c in decided.items()
            }
        return self._then_unlock(self._prepare_locked, decided)

    def prepare_now(self, decided: Mapping[str, PreparedClaim]) -> dict[str, PrepareResult] | None:
        """`prepare` if the state lock is free this instant; None, with nothing done,
        when it is taken (or the state is closing): call `prepare` then, which waits."""
        if not self._take_lock_now():
            return None
        return self._then_unlock(self._prepare_locked, decided)

    def _prepare_locked(self, decided: Mapping[str, PreparedClaim]) -> dict[str, PrepareResult]:
        self._refresh_from_disk()
        claims = self._claims
        results: dict[str, PrepareResult] = {}
        changed: dict[str, PreparedClaim] = {}
        previous: dict[str, PreparedClaim | None] = {}
        for uid, prepared in decided.items():
            current = claims.get(uid)
            try:
                if current != prepared or not self._spec_present(prepared):
                    self._write_spec(prepared)
            except OSError as exc:
                results[uid] = PrepareResult(error=_write_failed(prepared, "CDI spec", exc))
                continue
            if current != prepared:
                self._note_outside(current, prepared)
                previous[uid] = current
                claims[uid] = prepared
                changed[uid] = prepared
            results[uid] = PrepareResult(prepared.devices)
        if changed:
            try:
                self._file.record(claims, changed)
            except OSError as exc:
                # Not durable, so not prepared: memory goes back to what the file says.
                for uid, before in previous.items():
                    if before is None:
                        claims.pop(uid, None)
                    else:
                        claims[uid] = before
                    results[uid] = PrepareResult(
                        error=_write_failed(decided[uid], "state file", exc)
                    )
        return results

    def unprepare(self, uids: Iterable[str], timeout: float | None = None) -> dict[str, str]:
        """Make claims unprepared: the state entry first, then the spec.

        Returns an error message per UID, "" for success (a claim that is not
        prepared is a success: the kubelet retries unprepare after a crash).
        A UID unsafe in a file name is refused without touching anything.
        """
        results, valid = _checked_uids(uids)
        if not valid:
            return results
        refused = self._refusal(timeout)
        if refused:
            results.update((uid, f"claim {uid}: {refused}") for uid in valid)
            return results
        self._then_unlock(self._unprepare_locked, valid, results)
        return results

    def unprepare_now(self, uids: Iterable[str]) -> dict[str, str] | None:
        """`unprepare` if the state lock is free this instant; None, with nothing done,
        when it is taken (or the state is closing): call `unprepare` then, which waits."""
        results, valid = _checked_uids(uids)
        if not valid:
            return results
        if not self._take_lock_now():
            return None
        self._then_unlock(self._unprepare_locked, valid, results)
        return results

    def _unprepare_locked(self, uids: list[str], results: dict[str, str]) -> None:
        self._refresh_from_disk()
        claims = self._claims
        removed: dict[str, PreparedClaim] = {}
        for uid in uids:
            gone = claims.pop(uid, None)
            if gone is not None:
                removed[uid] = gone
                self._note_outside(gone)
        if removed:
            try:
                self._file.record(claims, {}, removed)
            except OSError as exc:
                claims.update(removed)  # still prepared: the file says so
                for uid, claim in removed.items():
                    results[uid] = _write_failed(claim, "state file", exc)
                uids = [uid for uid in uids if uid not in removed]
        cdi_root = self.paths.cdi_root
        for uid in uids:
            try:
                remove_claim_spec(cdi_root, uid)
            except OSError as exc:
                # Unprepared all the same; the spec goes at the next start at the latest.
                results[uid] = f"claim {uid}: cannot remove its CDI spec: {clip(str(exc), 300)}"
        # IBM's files can belong to an adopted claim, or to one we do not know (its
        # unprepare retried after a crash); never to a claim of ours.
        ibm = [uid for uid in uids if uid not in removed or uses_ibm_specs(removed[uid])]
        if not ibm:
            return
        try:
            remove_ibm_specs(cdi_root, ibm, claims.values())
        except OSError as exc:
            for uid in ibm:
                results[uid] = results[uid] or (
                    f"claim {uid}: cannot remove IBM's CDI spec: {clip(str(exc), 300)}"
                )

    def _refusal(self, timeout: float | None) -> str:
        """Take the state lock; "" when taken, else why the call cannot go on."""
        if self._closed:
            return "the plugin is stopping; the kubelet retries with the next instance"
        start = time.monotonic()
        try:
            self._lock.acquire(timeout)
        except TimeoutError:
            waited = time.monotonic() - start
            return (
                f"deadline exceeded: the state lock {self.paths.lock} stayed taken for "
                f"{waited:.1f} s (another plugin instance writing?); the kubelet retries"
            )
        if self._closed:  # closed while we waited
            self._lock.release()
            return "the plugin is stopping; the kubelet retries with the next instance"
        return ""

    def _then_unlock(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`func(*args, **kwargs)` with the state lock taken by the caller, then the lock
        released (and the credits outside our slice recounted) whatever happened."""
        try:
            return func(*args, **kwargs)
        finally:
            self._recount_outside_credits()
            self._lock.release()

    def _take_lock_now(self) -> bool:
        """Take the state lock if it is free and the state is open, without waiting."""
        if self._closed or not self._lock.try_acquire():
            return False
        if self._closed:  # closed meanwhile, from the thread that stops the plugin
            self._lock.release()
            return False
        return True

    def commits_quickly(self) -> bool:
        """Whether the next call's write is expected to be quick: a journal append (not a
        new snapshot, nor another instance's file to read again) on a disk whose last
        write took under QUICK_COMMIT_SECONDS."""
        return (
            self._file.appends_next()
            and self._file.last_record_seconds < QUICK_COMMIT_SECONDS
            and not self._file.changed_on_disk()
        )

    # --- files ---------------------------------------------------------------------

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

    def _refresh_from_disk(self) -> None:
        # Another plugin instance (rolling update) may have written since our last write.
        if self._file.changed_on_disk():
            loaded, _ = self._file.load(self.paths.cdi_root)
            self._claims = dict(loaded.claims)
            self._outside_may_change = True
            # Its writer may have died mid-append: start from a clean journal.
            self._file.save(self._claims)

    # --- credits outside our slice ----------------------------------------------------

    def _note_outside(self, *claims: PreparedClaim | None) -> None:
        if any(c is not None and credits_outside_our_slice((c,)) for c in claims):
            self._outside_may_change = True

    def _recount_outside_credits(self) -> None:
        if self._outside_may_change:
            self._outside_may_change = False
            self.outside_credits = credits_outside_our_slice(self._claims.values())


def _checked_uids(uids: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Unprepare's answer so far ("" per valid UID, the error for one unsafe in a file
    name) and the valid UIDs."""
    results: dict[str, str] = {}
    valid: list[str] = []
    for uid in uids:
        try:
            validate_claim_uid(uid)
        except ClaimError as exc:
            results[uid] = str(exc)
            continue
        results[uid] = ""
        valid.append(uid)
    return results, valid


def _label(claim: PreparedClaim) -> str:
    return f"claim {clip(claim.namespace)}/{clip(claim.name)}"


def _write_failed(claim: PreparedClaim, what: str, exc: OSError) -> str:
    return f"{_label(claim)}: cannot write its {what}: {clip(str(exc), 300)}; the kubelet retries"
