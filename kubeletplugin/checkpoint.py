# SPDX-License-Identifier: Apache-2.0
"""The plugin's crash-safe state file: which claims are prepared on this node.

Two files in the plugin directory. The snapshot `checkpoint.json`:

    {"version": 1, "bootId": "...", "checksum": "<sha256 hex>",
     "claims": {"<claim uid>": <PreparedClaim.to_dict()>, ...}}

or, while the plugin runs, version 2, which adds `"journal": "<generation>"`:
the journal `checkpoint.journal` then holds the changes made since, one line
per batch of claims (appended and fdatasync'd, so a prepare or unprepare
costs the same whether the node holds 1 claim or 1,000):

    {"gen": "<generation>", "put": {"<uid>": <PreparedClaim>}, "del": ["<uid>"],
     "checksum": "<sha256 hex>"}

Lines of another generation are older than the snapshot (written before it
was compacted) and ignored; a damaged last line is a write that never
completed (its call was never answered) and is dropped; a damaged line
followed by good ones makes the state untrusted. The journal is compacted
into a new snapshot (new generation) when it outgrows the snapshot, and into
a version-1 snapshot without journal when the plugin stops
(`StateFile.close`). The previous release reads version 1 only: after a
clean stop it finds its own format; after a crash it finds version 2, moves
it aside as "unknown version" and rebuilds the claims from the CDI specs.

Each checksum covers the canonical JSON (sorted keys, no whitespace) of the
document without the `checksum` key, so it does not depend on how the file is
laid out. A file that cannot be trusted is never fatal: it is moved aside and
the claims are rebuilt from our CDI spec files, which carry each
`PreparedClaim` in an annotation.

All functions here block (fsync), once per batch of claims; the driver makes
a quick journal append on its event loop and everything else in its state
thread (see `driver.NxDriver._on_loop`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import anyio
import orjson

from controller.kube.backoff import Backoff, BackoffPolicy
from kubeletplugin.atomic_write import atomic_write_bytes, fsync_directory
from kubeletplugin.cdi import SPEC_FILE_PREFIX, list_claim_specs, prepared_claim_from_spec
from kubeletplugin.claims import PreparedClaim, PreparedDevice
from kubeletplugin.ibm_state import (
    ADOPTED_CLAIM_CREDITS,
    IBM_COMMON_SPEC_FILE,
    IBM_DEVICE_NAME,
    IBM_SPEC_SUFFIX,
    IbmCheckpointError,
    credits_outside_our_slice,
    decode_ibm_checkpoint,
    ibm_cdi_device_ids,
    ibm_claim_spec_uids,
    looks_like_ibm_checkpoint,
    uses_ibm_specs,
)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
JOURNALED_VERSION = 2  # a snapshot whose journal may hold later changes
CHECKPOINT_FILE_NAME = "checkpoint.json"
LOCK_FILE_NAME = "checkpoint.lock"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted (corrupt, foreign, or too new)."""


class LoadedCheckpoint(NamedTuple):
    """What `load_checkpoint` found: the claims, and notes for the operator."""

    claims: dict[str, PreparedClaim]
    problems: list[str]


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """The kernel's boot ID, or "" when it cannot be read (then never compared)."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        log.warning("cannot read boot ID from %s: %s", path, exc)
        return ""


def checkpoint_checksum(document: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of `document` minus its checksum."""
    payload = {k: v for k, v in document.items() if k != "checksum"}
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def encode_checkpoint(claims: Mapping[str, PreparedClaim], boot_id: str) -> bytes:
    """The bytes of a checkpoint file holding `claims` (keyed by claim UID)."""
    for uid, claim in claims.items():
        if uid != claim.uid:
            raise ValueError(f"checkpoint key {uid} holds claim {claim.uid}")
    document: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "bootId": boot_id,
        "claims": {uid: claim.to_dict() for uid, claim in claims.items()},
    }
    document["checksum"] = checkpoint_checksum(document)
    # Indented for whoever reads it on a node; the checksum ignores layout.
    return orjson.dumps(
        document, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
    )


def journal_path(path: Path) -> Path:
    """The journal next to the snapshot `path` (`checkpoint.json` -> `checkpoint.journal`)."""
    return path.with_name(f"{path.stem}.journal")


def decode_snapshot(data: bytes) -> tuple[str, str | None, dict[str, PreparedClaim]]:
    """Parse and verify snapshot bytes: (boot ID, journal generation or None for
    version 1, claims by UID); the claims are the snapshot's only (see `read_state`
    for the journal).

    Raises:
        CheckpointError: not JSON, wrong checksum, unknown version, or
            malformed claims.
    """
    document = _verified_object(data)
    version = document.get("version")
    if version not in (CHECKPOINT_VERSION, JOURNALED_VERSION):
        raise CheckpointError(
            f"unknown version {version!r} (this plugin reads versions "
            f"{CHECKPOINT_VERSION} and {JOURNALED_VERSION})"
        )
    gen = document.get("journal") if version == JOURNALED_VERSION else None
    if version == JOURNALED_VERSION and not isinstance(gen, str):
        raise CheckpointError("journal must be a string")
    boot_id = document.get("bootId")
    raw_claims = document.get("claims")
    if not isinstance(boot_id, str) or not isinstance(raw_claims, dict):
        raise CheckpointError("bootId must be a string and claims an object")
    return boot_id, gen, _decode_claims(raw_claims)


def _verified_object(data: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CheckpointError("not a JSON object")
    if document.get("checksum") != checkpoint_checksum(document):
        raise CheckpointError("checksum mismatch: the file was damaged or edited")
    return document


def _decode_claims(raw_claims: dict[str, Any]) -> dict[str, PreparedClaim]:
    claims: dict[str, PreparedClaim] = {}
    for uid, raw in raw_claims.items():
        try:
            claim = PreparedClaim.from_dict(raw)
        except ValueError as exc:
            raise CheckpointError(f"claim {uid}: {exc}") from None
        if claim.uid != uid:
            raise CheckpointError(f"claim {uid}: entry holds claim {claim.uid}")
        claims[uid] = claim
    return claims


def encode_snapshot(claims: Mapping[str, PreparedClaim], boot_id: str, gen: str) -> bytes:
    """A version-2 snapshot: `claims`, to be followed by journal records of `gen`."""
    document: dict[str, Any] = {
        "version": JOURNALED_VERSION,
        "bootId": boot_id,
        "journal": gen,
        "claims": {uid: claim.to_dict() for uid, claim in claims.items()},
    }
    document["checksum"] = checkpoint_checksum(document)
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def encode_journal_record(
    gen: str, put: Mapping[str, PreparedClaim], delete: Iterable[str] = ()
) -> bytes:
    """One journal line: claims `put` (prepared) and UIDs in `delete` (unprepared)."""
    record: dict[str, Any] = {
        "gen": gen,
        "put": {uid: claim.to_dict() for uid, claim in put.items()},
        "del": list(delete),
    }
    record["checksum"] = checkpoint_checksum(record)
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def replay_journal(data: bytes, gen: str, claims: dict[str, PreparedClaim]) -> tuple[int, int]:
    """Apply the journal's records of `gen` to `claims` in order.

    Returns (records applied, length of the journal's good part): a damaged
    or unterminated last record is a write that never completed and lies past
    that length.

    Raises:
        CheckpointError: a damaged record followed by a good one.
    """
    applied, good_end, offset = 0, 0, 0
    damaged: str | None = None
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:  # unterminated: the last write did not complete
            break
        line, offset = data[offset:end], end + 1
        try:
            record = _verified_object(line)
            if not isinstance(record.get("gen"), str):
                raise CheckpointError("gen must be a string")
            if record["gen"] != gen:
                good_end = offset if damaged is None else good_end
                continue  # older than the snapshot, which holds its changes
            put, delete = record.get("put"), record.get("del")
            if not isinstance(put, dict) or not isinstance(delete, list):
                raise CheckpointError("put must be an object and del a list")
            changes = _decode_claims(put)
        except CheckpointError as exc:
            damaged = damaged or f"journal record at byte {offset - len(line) - 1}: {exc}"
            continue
        if damaged is not None:
            raise CheckpointError(damaged)
        for uid in delete:
            claims.pop(str(uid), None)
        claims.update(changes)
        applied += 1
        good_end = offset
    return applied, good_end


class StateInfo(NamedTuple):
    """How the state was found on disk (for `StateFile`)."""

    gen: str | None  # journal generation of the snapshot; None: no journal may be appended
    journal_records: int
    journal_clean: bool  # no damaged or unterminated tail


def save_checkpoint(path: Path, claims: Mapping[str, PreparedClaim], boot_id: str) -> None:
    """Write a version-1 snapshot atomically and drop the journal. Blocking.

    The result is the format of the previous release: what a plugin leaves
    behind when it stops.
    """
    atomic_write_bytes(path, encode_checkpoint(claims, boot_id), mode=0o600)
    # Ignored next to a version-1 snapshot; removed so that nobody wonders.
    journal_path(path).unlink(missing_ok=True)


def load_checkpoint(
    path: Path, cdi_root: Path, *, boot_id_path: Path = BOOT_ID_PATH
) -> LoadedCheckpoint:
    """Read the snapshot and its journal; never raises. Blocking.

    - No file: no claims (a fresh node).
    - A file that cannot be read or trusted (a damaged journal included):
      moved aside to `<name>.corrupt-<UTC timestamp>`, logged as an error,
      and the claims are rebuilt from our CDI spec files in `cdi_root` (specs
      without a readable claim annotation are skipped and reported). Nothing
      is written back: the next save records the recovered claims.
    - Written in an earlier boot: the claims are kept, since the kubelet
      prepares its pods' claims again after a reboot; noted as a problem.
    - Written by IBM's Go driver (same path, its own format): its claims are
      adopted (see `ibm_state`), noted as a problem so that the caller writes
      them in our format; a damaged one is recovered like ours.
    """
    return _load(path, cdi_root, boot_id_path)[0]


def _load(
    path: Path, cdi_root: Path, boot_id_path: Path = BOOT_ID_PATH
) -> tuple[LoadedCheckpoint, StateInfo]:
    no_journal = StateInfo(None, 0, True)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadedCheckpoint({}, []), no_journal
    except OSError as exc:
        return _recover(path, cdi_root, f"cannot read it: {exc}"), no_journal
    if _is_ibm_checkpoint(data):
        return _adopt_ibm_checkpoint(path, cdi_root, data), no_journal
    try:
        saved_boot_id, gen, claims = decode_snapshot(data)
        info = no_journal
        if gen is not None:
            try:
                journal = journal_path(path).read_bytes()
            except FileNotFoundError:
                journal = b""
            applied, good_end = replay_journal(journal, gen, claims)
            info = StateInfo(gen, applied, good_end == len(journal))
    except (ValueError, TypeError) as exc:  # CheckpointError, and anything unforeseen
        return _recover(path, cdi_root, str(exc)), no_journal
    except OSError as exc:
        return _recover(path, cdi_root, f"cannot read its journal: {exc}"), no_journal
    current_boot_id = read_boot_id(boot_id_path)
    if saved_boot_id and current_boot_id and saved_boot_id != current_boot_id:
        note = (
            f"checkpoint {path} was written before the node rebooted (boot {saved_boot_id}, "
            f"now {current_boot_id}): keeping {len(claims)} claims; the kubelet prepares "
            "them again and their CDI specs are re-created then"
        )
        log.warning("%s", note)
        return LoadedCheckpoint(claims, [note]), info
    return LoadedCheckpoint(claims, []), info


def read_state(path: Path) -> dict[str, PreparedClaim]:
    """The prepared claims the snapshot and its journal hold; reads only. Blocking.

    Raises:
        CheckpointError: the state cannot be trusted.
        OSError: it cannot be read.
    """
    _, gen, claims = decode_snapshot(path.read_bytes())
    if gen is not None:
        try:
            journal = journal_path(path).read_bytes()
        except FileNotFoundError:
            journal = b""
        replay_journal(journal, gen, claims)
    return claims


class StateFile:
    """The state file of one running plugin: appends to the journal, compacts it.

    The caller holds the `StateLock` around every call and keeps the claims
    in memory; `changed_on_disk` says when another instance wrote since.
    """

    def __init__(self, path: Path, boot_id: str, *, min_compact_bytes: int = 256 * 1024) -> None:
        self.path = path
        self.journal = journal_path(path)
        self.boot_id = boot_id
        self.min_compact_bytes = min_compact_bytes
        self._gen: str | None = None
        self._snapshot_bytes = 0
        self._journal_bytes = 0
        self._signature: tuple[object, object] | None = None
        # How long the last `record` took (its fdatasync, mostly), in seconds.
        self.last_record_seconds = 0.0

    def load(self, cdi_root: Path) -> tuple[LoadedCheckpoint, bool]:
        """Read the state; returns it and whether it should be compacted (`save`) now."""
        loaded, info = _load(self.path, cdi_root)
        self._gen = info.gen if info.journal_clean else None
        self._journal_bytes = _size(self.journal)
        self._snapshot_bytes = _size(self.path)
        self._signature = self._stat()
        return loaded, info.journal_records > 0 or not info.journal_clean

    def changed_on_disk(self) -> bool:
        """Whether someone else wrote the state since our last load or write."""
        return self._stat() != self._signature

    def record(
        self,
        claims: Mapping[str, PreparedClaim],
        put: Mapping[str, PreparedClaim],
        delete: Iterable[str] = (),
    ) -> None:
        """Make a change durable: `claims` is the state after it (`put` added, `delete` gone).

        One append and fdatasync of the journal; a new snapshot instead when
        there is no journal yet or it has outgrown the snapshot.

        Raises:
            OSError: the change is not durable; the journal is cut back to the
                records before it.
        """
        start = time.monotonic()
        try:
            gen = self._gen if self.appends_next() else None
            if gen is None:
                self.save(claims)
            else:
                self._append(gen, put, delete)
        finally:
            self.last_record_seconds = time.monotonic() - start

    def appends_next(self) -> bool:
        """Whether the next `record` appends to the journal (a new snapshot otherwise:
        there is no journal yet, or it has outgrown the snapshot)."""
        limit = max(self.min_compact_bytes, 2 * self._snapshot_bytes)
        return self._gen is not None and self._journal_bytes <= limit

    def _append(self, gen: str, put: Mapping[str, PreparedClaim], delete: Iterable[str]) -> None:
        line = encode_journal_record(gen, put, delete)
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
            st = os.fstat(fd)
        except BaseException:
            self._cut_back(fd)
            raise
        finally:
            os.close(fd)
        self._journal_bytes = st.st_size
        self._signature = (self._signature[0] if self._signature else None, _sig(st))

    def _cut_back(self, fd: int) -> None:
        """After a failed append: the journal back to its last good record (the change
        was not made, whatever part of it reached the file)."""
        try:
            os.ftruncate(fd, self._journal_bytes)
            st = os.fstat(fd)
        except OSError:
            # Appending after a partial line would make it a damaged record followed
            # by good ones: the next change compacts instead.
            self._gen = None
            return
        self._signature = (self._signature[0] if self._signature else None, _sig(st))

    def save(self, claims: Mapping[str, PreparedClaim]) -> None:
        """Compact: a new snapshot of `claims` (new generation), then an empty journal."""
        gen = uuid.uuid4().hex
        data = encode_snapshot(claims, self.boot_id, gen)
        atomic_write_bytes(self.path, data, mode=0o600)
        # Records of the old generation are ignored from here on: emptying the
        # journal need not be durable, its existence must (appends only fdatasync).
        existed = self.journal.exists()
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        if not existed:
            fsync_directory(self.journal.parent)
        self._gen = gen
        self._snapshot_bytes = len(data)
        self._journal_bytes = 0
        self._signature = self._stat()

    def close(self, claims: Mapping[str, PreparedClaim]) -> None:
        """Leave a version-1 snapshot and no journal (what the previous release reads)."""
        save_checkpoint(self.path, claims, self.boot_id)
        self._gen = None
        self._signature = self._stat()

    def _stat(self) -> tuple[object, object]:
        return _file_sig(self.path), _file_sig(self.journal)


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _file_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        return _sig(os.stat(path))
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    sig = _file_sig(path)
    return sig[1] if sig else 0


def _is_ibm_checkpoint(data: bytes) -> bool:
    try:
        return looks_like_ibm_checkpoint(orjson.loads(data))
    except orjson.JSONDecodeError:
        return False


def _adopt_ibm_checkpoint(path: Path, cdi_root: Path, data: bytes) -> LoadedCheckpoint:
    try:
        claims = decode_ibm_checkpoint(data)
    except IbmCheckpointError as exc:
        return _recover(path, cdi_root, f"written by IBM's driver, but {exc}")
    note = (
        f"checkpoint {path} was written by IBM's driver: adopted its {len(claims)} prepared "
        f"claims ({', '.join(sorted(claims)) or 'none'}); their pods keep IBM's CDI specs "
        "until the kubelet unprepares them"
    )
    log.warning("%s", note)
    return LoadedCheckpoint(claims, [note])


def _recovered_ibm_claim(uid: str) -> PreparedClaim:
    # IBM's spec file names the claim and nothing else: pool and request names are lost.
    device = PreparedDevice(
        request_names=(),
        pool_name="",
        device_name=IBM_DEVICE_NAME,
        cdi_device_ids=ibm_cdi_device_ids(uid),
        credits=ADOPTED_CLAIM_CREDITS,
    )
    return PreparedClaim(uid=uid, namespace="", name="", devices=(device,))


def _recover(path: Path, cdi_root: Path, reason: str) -> LoadedCheckpoint:
    """Move an untrusted checkpoint aside and rebuild the claims from CDI specs."""
    problems: list[str] = []
    try:
        moved: str = str(_move_aside(path))
    except OSError as exc:
        moved = f"nowhere (moving it failed: {exc})"
    # The journal only means something on top of its snapshot.
    with contextlib.suppress(OSError):
        journal_path(path).unlink(missing_ok=True)
    claims: dict[str, PreparedClaim] = {}
    try:
        specs = list_claim_specs(cdi_root)
    except OSError as exc:
        specs = {}
        problems.append(f"cannot list CDI specs in {cdi_root}: {exc}")
    for uid, spec in sorted(specs.items()):
        try:
            claim = prepared_claim_from_spec(spec)
            if claim.uid != uid:
                raise ValueError(f"its annotation describes claim {claim.uid}")
        except ValueError as exc:
            problems.append(f"CDI spec of claim {uid} cannot be recovered: {exc}")
            continue
        claims[uid] = claim
    # Claims adopted from IBM's driver have no spec of ours, but IBM's spec names them.
    try:
        ibm_uids = ibm_claim_spec_uids(cdi_root)
    except OSError as exc:
        ibm_uids = set()
        problems.append(f"cannot list IBM's CDI specs in {cdi_root}: {exc}")
    for uid in sorted(ibm_uids - set(claims)):
        try:
            claims[uid] = _recovered_ibm_claim(uid)
        except ValueError as exc:
            problems.append(f"IBM's CDI spec of claim {uid} cannot be recovered: {exc}")
    message = (
        f"checkpoint {path} is unusable ({reason}); moved to {moved}; rebuilt "
        f"{len(claims)} claims from the CDI specs in {cdi_root}"
    )
    log.error("%s", message)
    for problem in problems:
        log.error("%s", problem)
    return LoadedCheckpoint(claims, [message, *problems])


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    # After the newest of this second: a pruned name is never reused for a newer copy.
    taken = [_moved_at(p)[1] for p in path.parent.glob(f"{target.name}*")]
    if taken:
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{max(taken) + 1}")
    os.rename(path, target)
    _prune_corrupt_copies(path)
    fsync_directory(path.parent)
    return target


# Corrupt checkpoints kept for a post-mortem; older ones are removed.
KEEP_CORRUPT_COPIES = 3


def _moved_at(copy: Path) -> tuple[str, int]:
    # `<name>.corrupt-<UTC stamp>[-<n>]`: the stamp is when it was moved aside.
    stamp, _, n = copy.name.rsplit(".corrupt-", 1)[1].partition("-")
    return stamp, int(n) if n.isdigit() else 0


def _prune_corrupt_copies(path: Path) -> None:
    copies = sorted(path.parent.glob(f"{path.name}.corrupt-*"), key=_moved_at)
    for old in copies[:-KEEP_CORRUPT_COPIES]:
        old.unlink(missing_ok=True)
        log.info("removed old corrupt checkpoint copy %s", old)


class StateLock:
    """Exclusive lock on `<plugin dir>/checkpoint.lock` (`flock`).

    During a rolling update two plugin instances run on one node for a
    moment; holding this lock around each batch (prepare or unprepare, up to
    and including the checkpoint write) keeps them from interleaving. Every
    acquisition opens its own file descriptor, so the lock also excludes
    other tasks and threads of the same process. Not re-entrant.

    Use `async with lock:` on the event loop (polls without blocking it, and
    a cancelled wait leaves nothing locked) or `with lock:` in a thread.
    """

    def __init__(
        self, path: Path, *, poll_interval: float = 0.002, max_poll_interval: float = 0.05
    ) -> None:
        self.path = path
        # A lock poll, not a failure: no jitter (the other holder is on this node).
        self._poll = BackoffPolicy(initial=poll_interval, cap=max_poll_interval, jitter=0.0)
        self._fd: int | None = None
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        with self._guard:
            self._fd = fd
        return True

    def acquire(self, timeout: float | None = None) -> None:
        """Wait for the lock, blocking the calling thread.

        Raises:
            TimeoutError: not acquired within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = Backoff(self._poll)
        while not self.try_acquire():
            delay = poll.next_delay()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"{self.path} stayed locked for {timeout} s")
            time.sleep(delay)

    async def acquire_async(self) -> None:
        """Wait for the lock without blocking the event loop.

        Polls with a growing pause (2 ms to 50 ms by default) instead of
        blocking a worker thread in `flock`: a thread stuck in `flock` cannot
        be cancelled and would take the lock after its caller gave up. The
        free lock, the usual case, costs one system call. Bound the wait
        with `anyio.fail_after`.
        """
        poll = Backoff(self._poll)
        while not self.try_acquire():  # noqa: ASYNC110 (a flock has no event to wait on)
            await anyio.sleep(poll.next_delay())

    def release(self) -> None:
        """Release the lock (closing its descriptor releases the flock)."""
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError(f"{self.path}: release of a lock that is not held")
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> StateLock:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def describe_state(path: Path, cdi_root: Path) -> dict[str, Any]:
    """What the state file and CDI directory hold, for `inspect`; reads only, never raises.

    Says whose state file it is (ours, IBM's driver's, none, or unusable), the
    prepared claims (marking those adopted from IBM's driver), and which of
    IBM's files are still on the node: once no claim of IBM's is left, the
    take-over is complete.
    """
    report: dict[str, Any] = {"stateFile": str(path), "cdiRoot": str(cdi_root)}
    claims: dict[str, PreparedClaim] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        report["owner"] = "none"
    except OSError as exc:
        report["owner"], report["problem"] = "unreadable", str(exc)
    else:
        try:
            if _is_ibm_checkpoint(data):
                report["owner"] = "ibm"
                claims = decode_ibm_checkpoint(data)
            else:
                report["owner"] = "power-dra-driver"
                report["bootId"], _, _ = decode_snapshot(data)
                claims = read_state(path)
        except (ValueError, TypeError) as exc:
            report["problem"] = f"{exc} (the plugin moves it aside at start)"
    try:
        names = sorted(os.listdir(cdi_root))
    except OSError:
        names = []
    ibm_files = [n for n in names if n == IBM_COMMON_SPEC_FILE or n.endswith(IBM_SPEC_SUFFIX)]
    ibm_files = [n for n in ibm_files if n.startswith(SPEC_FILE_PREFIX)]
    adopted = sorted(uid for uid, c in claims.items() if uses_ibm_specs(c))
    report["claims"] = {
        uid: {**c.to_dict(), "adoptedFromIbm": uid in adopted} for uid, c in sorted(claims.items())
    }
    report["ibmFiles"] = ibm_files + ([path.name] if report["owner"] == "ibm" else [])
    report["creditsHeldOutsideOurSlice"] = credits_outside_our_slice(claims.values())
    if report["owner"] == "ibm":
        report["migration"] = "not started: the plugin adopts IBM's claims when it starts"
    elif adopted or ibm_files:
        report["migration"] = (
            f"in progress: {len(adopted)} claims adopted from IBM's driver still prepared; "
            "IBM's files go with the last of them"
        )
    else:
        report["migration"] = "complete: nothing of IBM's driver is left on this node"
    return report
