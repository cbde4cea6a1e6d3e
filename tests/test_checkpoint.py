# SPDX-License-Identifier: Apache-2.0
"""The crash-safe state file, its recovery from CDI specs, and the state lock."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from kubeletplugin.atomic_write import atomic_write_bytes, remove_durably
from kubeletplugin.cdi import claim_spec, write_claim_spec
from kubeletplugin.checkpoint import (
    CHECKPOINT_FILE_NAME,
    KEEP_CORRUPT_COPIES,
    LOCK_FILE_NAME,
    StateFile,
    StateLock,
    checkpoint_checksum,
    encode_checkpoint,
    journal_path,
    load_checkpoint,
    read_boot_id,
    read_state,
    save_checkpoint,
)
from kubeletplugin.claims import CDI_KIND, PreparedClaim, PreparedDevice

REPO_ROOT = Path(__file__).resolve().parent.parent
UID_A = "4f1c2d3e-0000-4000-8000-00000000000a"
UID_B = "4f1c2d3e-0000-4000-8000-00000000000b"
BOOT = "8c1f2a4e-1111-4222-8333-444455556666"


def prepared(uid: str, name: str = "x") -> PreparedClaim:
    return PreparedClaim(
        uid=uid,
        namespace="default",
        name=name,
        devices=(
            PreparedDevice(
                request_names=("nx",),
                pool_name="node-a",
                device_name="nx-gzip",
                cdi_device_ids=(f"{CDI_KIND}={uid}-nx-gzip",),
                credits=1,
                env={"NX_DRA_CREDITS": "1", "NX_GZIP_LOGFILE": "/dev/stderr"},
            ),
        ),
    )


CLAIMS = {UID_A: prepared(UID_A, "a"), UID_B: prepared(UID_B, "b")}


class Node:
    """A plugin directory, a CDI root and a boot ID file under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.plugin_dir = root / "plugin"
        self.cdi_root = root / "cdi"
        self.boot_id_path = root / "boot_id"
        self.plugin_dir.mkdir()
        self.cdi_root.mkdir()
        self.boot_id_path.write_text(BOOT + "\n")

    @property
    def checkpoint(self) -> Path:
        return self.plugin_dir / CHECKPOINT_FILE_NAME

    def load(self) -> Any:
        return load_checkpoint(self.checkpoint, self.cdi_root, boot_id_path=self.boot_id_path)

    def write_specs(self, claims: dict[str, PreparedClaim]) -> None:
        for uid, claim in claims.items():
            write_claim_spec(self.cdi_root, claim_spec(claim), uid)

    def moved_aside(self) -> list[Path]:
        return sorted(self.plugin_dir.glob(CHECKPOINT_FILE_NAME + ".corrupt-*"))


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


# --- format -------------------------------------------------------------------------------


def test_saved_claims_load_back_unchanged(node: Node) -> None:
    save_checkpoint(node.checkpoint, CLAIMS, BOOT)
    claims, problems = node.load()
    assert claims == CLAIMS
    assert problems == []


def test_the_file_is_versioned_checksummed_and_records_the_boot(node: Node) -> None:
    save_checkpoint(node.checkpoint, CLAIMS, BOOT)
    document = orjson.loads(node.checkpoint.read_bytes())
    assert document["version"] == 1
    assert document["bootId"] == BOOT
    assert document["checksum"] == checkpoint_checksum(document)
    assert document["claims"][UID_A] == CLAIMS[UID_A].to_dict()


def test_the_file_is_private_to_the_plugin(node: Node) -> None:
    save_checkpoint(node.checkpoint, CLAIMS, BOOT)
    assert stat.S_IMODE(node.checkpoint.stat().st_mode) == 0o600


def test_no_claims_is_a_valid_checkpoint(node: Node) -> None:
    save_checkpoint(node.checkpoint, {}, BOOT)
    assert node.load() == ({}, [])


# --- journal ------------------------------------------------------------------------------

UID_C = "4f1c2d3e-0000-4000-8000-00000000000c"


def journaled(node: Node) -> StateFile:
    """A state file as the running plugin keeps it: snapshot of A, journal adds B, drops A."""
    state = StateFile(node.checkpoint, BOOT)
    state.load(node.cdi_root)
    state.record({UID_A: CLAIMS[UID_A]}, {UID_A: CLAIMS[UID_A]})  # first write: a snapshot
    state.record(CLAIMS, {UID_B: CLAIMS[UID_B]})
    state.record({UID_B: CLAIMS[UID_B]}, {}, [UID_A])
    return state


def test_journal_records_are_replayed_on_load(node: Node) -> None:
    journaled(node)
    assert orjson.loads(node.checkpoint.read_bytes())["version"] == 2
    assert len(journal_path(node.checkpoint).read_bytes().splitlines()) == 2
    assert node.load() == ({UID_B: CLAIMS[UID_B]}, [])
    assert read_state(node.checkpoint) == {UID_B: CLAIMS[UID_B]}


def test_an_unfinished_last_journal_record_is_dropped(node: Node) -> None:
    journaled(node)
    journal = journal_path(node.checkpoint)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:-9])  # cut mid-record
    assert node.load() == (CLAIMS, [])
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:-9] + b"\n")  # damaged, terminated
    assert node.load() == (CLAIMS, [])
    assert node.moved_aside() == []


def test_a_damaged_journal_record_followed_by_a_good_one_is_recovered_from_specs(
    node: Node,
) -> None:
    journaled(node)
    node.write_specs({UID_B: CLAIMS[UID_B]})
    journal = journal_path(node.checkpoint)
    first, second = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(first.replace(b"nx-gzip", b"nx-gzap") + second)
    claims, problems = node.load()
    assert claims == {UID_B: CLAIMS[UID_B]}
    assert "checksum mismatch" in problems[0]
    assert len(node.moved_aside()) == 1
    assert not journal.exists()


def test_compaction_makes_older_journal_records_stale(node: Node) -> None:
    state = journaled(node)
    journal = journal_path(node.checkpoint)
    old = journal.read_bytes()
    state.save({UID_C: prepared(UID_C)})
    assert journal.read_bytes() == b""
    journal.write_bytes(old)  # as if emptying it had not reached the disk
    assert node.load() == ({UID_C: prepared(UID_C)}, [])


def test_a_journal_that_outgrows_the_snapshot_is_compacted(node: Node) -> None:
    state = StateFile(node.checkpoint, BOOT, min_compact_bytes=0)
    state.load(node.cdi_root)
    claims: dict[str, PreparedClaim] = {}
    for _ in range(20):
        state.record(claims, {UID_A: CLAIMS[UID_A]})
        state.record(claims, {}, [UID_A])
    assert len(journal_path(node.checkpoint).read_bytes()) < 4 * node.checkpoint.stat().st_size
    assert node.load() == ({}, [])


def test_the_state_file_says_which_writes_append(node: Node) -> None:
    state = StateFile(node.checkpoint, BOOT, min_compact_bytes=0)
    state.load(node.cdi_root)
    assert not state.appends_next()  # no journal of this generation yet: a snapshot
    state.record({UID_A: CLAIMS[UID_A]}, {UID_A: CLAIMS[UID_A]})
    assert state.appends_next()
    snapshot = node.checkpoint.stat().st_size
    while state.appends_next():
        state.record({}, {}, [UID_A])
    # It stops appending once the journal has outgrown twice the snapshot, no sooner.
    assert 2 * snapshot < len(journal_path(node.checkpoint).read_bytes()) < 3 * snapshot
    state.record({}, {}, [UID_A])
    assert journal_path(node.checkpoint).read_bytes() == b""  # compacted
    assert state.appends_next()


def test_closing_leaves_the_previous_release_format(node: Node) -> None:
    state = journaled(node)
    state.close({UID_B: CLAIMS[UID_B]})
    document = orjson.loads(node.checkpoint.read_bytes())
    assert document["version"] == 1
    assert set(document["claims"]) == {UID_B}
    assert not journal_path(node.checkpoint).exists()
    assert node.load() == ({UID_B: CLAIMS[UID_B]}, [])


def test_a_version_1_snapshot_ignores_a_leftover_journal(node: Node) -> None:
    journaled(node)
    journal = journal_path(node.checkpoint).read_bytes()
    save_checkpoint(node.checkpoint, {UID_C: prepared(UID_C)}, BOOT)
    journal_path(node.checkpoint).write_bytes(journal)  # the crash before its removal
    assert node.load() == ({UID_C: prepared(UID_C)}, [])


def test_the_same_claims_encode_to_the_same_bytes() -> None:
    reordered = dict(reversed(CLAIMS.items()))
    assert encode_checkpoint(CLAIMS, BOOT) == encode_checkpoint(reordered, BOOT)


def test_a_claim_filed_under_another_uid_is_refused() -> None:
    with pytest.raises(ValueError, match="holds claim"):
        encode_checkpoint({UID_A: CLAIMS[UID_B]}, BOOT)


def reorder(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


def test_the_checksum_does_not_depend_on_key_order() -> None:
    document = orjson.loads(encode_checkpoint(CLAIMS, BOOT))
    assert checkpoint_checksum(reorder(document)) == checkpoint_checksum(document)


def test_a_reordered_and_reindented_file_still_loads(node: Node) -> None:
    document = orjson.loads(encode_checkpoint(CLAIMS, BOOT))
    node.checkpoint.write_bytes(orjson.dumps(reorder(document)))
    assert node.load() == (CLAIMS, [])


def test_the_checksum_changes_with_the_content() -> None:
    document = orjson.loads(encode_checkpoint(CLAIMS, BOOT))
    changed = {**document, "bootId": "other"}
    assert checkpoint_checksum(changed) != checkpoint_checksum(document)


# --- loading ------------------------------------------------------------------------------


def test_a_missing_checkpoint_means_no_claims(node: Node) -> None:
    assert node.load() == ({}, [])


def test_a_checkpoint_from_an_earlier_boot_keeps_its_claims_and_says_so(node: Node) -> None:
    save_checkpoint(node.checkpoint, CLAIMS, "old-boot")
    claims, problems = node.load()
    assert claims == CLAIMS
    (problem,) = problems
    assert "rebooted" in problem
    assert "old-boot" in problem and BOOT in problem
    assert node.moved_aside() == []


def test_an_unknown_boot_id_is_not_a_reboot(node: Node) -> None:
    save_checkpoint(node.checkpoint, CLAIMS, BOOT)
    node.boot_id_path.unlink()
    assert node.load() == (CLAIMS, [])


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return b"\x00\xff not json at all"


def _bad_checksum(data: bytes) -> bytes:
    document = orjson.loads(data)
    document["claims"][UID_A]["namespace"] = "tampered"
    return orjson.dumps(document)


def _wrong_version(data: bytes) -> bytes:
    document = orjson.loads(data)
    document["version"] = 3
    document["checksum"] = checkpoint_checksum(document)
    return orjson.dumps(document)


def _not_an_object(data: bytes) -> bytes:
    return b"[1, 2, 3]"


def _malformed_claim(data: bytes) -> bytes:
    document = orjson.loads(data)
    document["claims"][UID_A]["devices"] = "nx-gzip"
    document["checksum"] = checkpoint_checksum(document)
    return orjson.dumps(document)


def _empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "not valid JSON"),
        (_garbage, "not valid JSON"),
        (_empty, "not valid JSON"),
        (_bad_checksum, "checksum mismatch"),
        (_wrong_version, "unknown version 3"),
        (_not_an_object, "not a JSON object"),
        (_malformed_claim, f"claim {UID_A}"),
    ],
)
def test_a_damaged_checkpoint_is_moved_aside_and_rebuilt_from_cdi_specs(
    node: Node,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
    reason: str,
) -> None:
    save_checkpoint(node.checkpoint, CLAIMS, BOOT)
    original = damage(node.checkpoint.read_bytes())
    node.checkpoint.write_bytes(original)
    node.write_specs(CLAIMS)

    with caplog.at_level(logging.ERROR, logger="kubeletplugin.checkpoint"):
        claims, problems = node.load()

    assert claims == CLAIMS
    assert not node.checkpoint.exists()
    (aside,) = node.moved_aside()
    assert aside.read_bytes() == original
    assert problems[0].startswith(f"checkpoint {node.checkpoint} is unusable ({reason}")
    assert f"moved to {aside}" in problems[0]
    assert "rebuilt 2 claims" in problems[0]
    assert "unusable" in caplog.text


def test_an_unreadable_checkpoint_is_moved_aside_and_rebuilt(node: Node) -> None:
    node.checkpoint.mkdir()  # reading a directory fails like an I/O error would
    node.write_specs(CLAIMS)
    claims, problems = node.load()
    assert claims == CLAIMS
    assert "cannot read it" in problems[0]
    assert len(node.moved_aside()) == 1


def test_specs_that_cannot_be_recovered_are_reported_and_skipped(node: Node) -> None:
    node.checkpoint.write_bytes(b"garbage")
    node.write_specs({UID_A: CLAIMS[UID_A]})
    spec = claim_spec(CLAIMS[UID_B])
    del spec["annotations"]
    write_claim_spec(node.cdi_root, spec, UID_B)

    claims, problems = node.load()

    assert claims == {UID_A: CLAIMS[UID_A]}
    assert any(UID_B in p and "cannot be recovered" in p for p in problems[1:])


def test_a_spec_describing_another_claim_is_not_recovered(node: Node) -> None:
    node.checkpoint.write_bytes(b"garbage")
    write_claim_spec(node.cdi_root, claim_spec(CLAIMS[UID_A]), UID_B)
    claims, problems = node.load()
    assert claims == {}
    assert any(f"describes claim {UID_A}" in p for p in problems)


def test_rebuilding_without_a_cdi_root_gives_no_claims(node: Node) -> None:
    node.checkpoint.write_bytes(b"garbage")
    node.cdi_root.rmdir()
    claims, problems = node.load()
    assert claims == {}
    assert "rebuilt 0 claims" in problems[0]


def test_damaged_checkpoints_moved_aside_in_the_same_second_keep_both(node: Node) -> None:
    for _ in range(2):
        node.checkpoint.write_bytes(b"garbage")
        node.load()
    assert len(node.moved_aside()) == 2


def test_only_the_newest_corrupt_copies_are_kept(node: Node) -> None:
    for i in range(KEEP_CORRUPT_COPIES + 3):
        node.checkpoint.write_bytes(f"garbage {i}".encode())
        node.load()
    kept = node.moved_aside()
    assert len(kept) == KEEP_CORRUPT_COPIES
    contents = {p.read_text() for p in kept}
    assert contents == {f"garbage {i}" for i in range(3, KEEP_CORRUPT_COPIES + 3)}


def test_the_boot_id_is_read_from_the_kernel_file(node: Node) -> None:
    assert read_boot_id(node.boot_id_path) == BOOT


def test_an_unreadable_boot_id_is_empty(tmp_path: Path) -> None:
    assert read_boot_id(tmp_path / "absent") == ""


# --- atomic writes ------------------------------------------------------------------------


def test_an_atomic_write_replaces_the_file_with_the_given_mode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"new", mode=0o640)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")

    class Boom(Exception):
        pass

    def failing_fsync(fd: int) -> None:
        raise Boom

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_an_atomic_write_into_a_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "absent" / "f", b"x")


def test_durable_removal_reports_whether_the_file_existed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    assert remove_durably(path) is True
    assert remove_durably(path) is False


# --- the state lock -----------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from kubeletplugin.checkpoint import StateLock
lock = StateLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""


class Holder:
    """Another process holding the lock until told to release it."""

    def __init__(self, path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        assert self.readline() == "held"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def release(self) -> None:
        self.tell()
        assert self.readline() == "released"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / LOCK_FILE_NAME


@pytest.fixture
def holder(lock_path: Path) -> Iterator[Holder]:
    h = Holder(lock_path)
    yield h
    h.close()


def test_a_lock_held_by_another_process_is_not_acquired(lock_path: Path, holder: Holder) -> None:
    lock = StateLock(lock_path)
    assert lock.try_acquire() is False
    assert not lock.held


def test_the_lock_is_acquired_once_the_other_process_releases_it(
    lock_path: Path, holder: Holder
) -> None:
    lock = StateLock(lock_path)
    holder.release()
    assert lock.try_acquire() is True
    assert lock.held
    lock.release()


def test_a_blocking_acquire_waits_for_the_other_process(lock_path: Path, holder: Holder) -> None:
    lock = StateLock(lock_path)
    timer = threading.Timer(0.2, holder.tell)
    timer.start()
    started = time.monotonic()
    with lock:
        assert time.monotonic() - started >= 0.15
    timer.join()


def test_a_blocking_acquire_gives_up_after_its_timeout(lock_path: Path, holder: Holder) -> None:
    with pytest.raises(TimeoutError):
        StateLock(lock_path).acquire(timeout=0.1)


def test_the_other_process_waits_while_we_hold_the_lock(lock_path: Path) -> None:
    lock = StateLock(lock_path)
    lock.acquire()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    probe = (
        "import sys; from pathlib import Path; from kubeletplugin.checkpoint import StateLock; "
        "print(StateLock(Path(sys.argv[1])).try_acquire())"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe, str(lock_path)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=REPO_ROOT,
        )
    finally:
        lock.release()
    assert out.stdout.strip() == "False"


def test_two_lock_objects_in_one_process_exclude_each_other(lock_path: Path) -> None:
    first, second = StateLock(lock_path), StateLock(lock_path)
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


def test_an_async_acquire_waits_without_blocking_the_event_loop(
    lock_path: Path, holder: Holder
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.01)

    async def main() -> None:
        threading.Timer(0.2, holder.tell).start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async with StateLock(lock_path) as lock:
                assert lock.held
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert ticks >= 5


def test_a_cancelled_async_acquire_leaves_the_lock_free(lock_path: Path, holder: Holder) -> None:
    lock = StateLock(lock_path)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.1):
                await lock.acquire_async()

    anyio.run(main)
    assert not lock.held
    holder.release()
    assert StateLock(lock_path).try_acquire()


def test_releasing_a_lock_that_is_not_held_is_an_error(lock_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not held"):
        StateLock(lock_path).release()
