# SPDX-License-Identifier: Apache-2.0
"""The plugin's state machine (`kubeletplugin.state`) on real files, without gRPC or an
API server: what prepare and unprepare leave on disk, and how a failure stays in the
claim it concerns."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeletplugin.cdi import spec_file_name
from kubeletplugin.checkpoint import journal_path, read_state
from kubeletplugin.state import DriverPaths, PluginState, PrepareResult
from tests.test_checkpoint import Holder
from tests.test_driver import OTHER_UID, UID, prepared

UID_A, UID_B = UID, OTHER_UID
UID_C = "9e8d7c6b-5a49-4837-a261-5f4e3d2c1b0a"


@pytest.fixture
def paths(tmp_path: Path) -> DriverPaths:
    return DriverPaths(plugin_dir=tmp_path / "plugin", cdi_root=tmp_path / "cdi")


UID_PRIMER = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def state(paths: DriverPaths) -> PluginState:
    """A started state whose journal exists (the first write of a node is a snapshot)."""
    s = PluginState(paths)
    assert s.load() == []
    s.prepare({UID_PRIMER: prepared(UID_PRIMER)})
    s.unprepare([UID_PRIMER])
    return s


def spec(paths: DriverPaths, uid: str) -> Path:
    return paths.cdi_root / spec_file_name(uid)


def journal_lines(paths: DriverPaths) -> int:
    return journal_path(paths.checkpoint).read_bytes().count(b"\n")


def test_prepare_writes_every_spec_and_one_state_record(
    paths: DriverPaths, state: PluginState
) -> None:
    claims = {uid: prepared(uid) for uid in (UID_A, UID_B, UID_C)}
    before = journal_lines(paths)
    results = state.prepare(claims)
    assert results == {uid: PrepareResult(c.devices) for uid, c in claims.items()}
    assert journal_lines(paths) == before + 1
    assert read_state(paths.checkpoint) == claims
    assert all(spec(paths, uid).exists() for uid in claims)


def test_prepare_of_a_prepared_claim_writes_nothing(paths: DriverPaths, state: PluginState) -> None:
    claim = prepared(UID_A)
    state.prepare({UID_A: claim})
    before = journal_lines(paths)
    assert state.prepare({UID_A: claim}) == {UID_A: PrepareResult(claim.devices)}
    assert journal_lines(paths) == before


def test_prepare_brings_back_a_missing_spec_of_a_prepared_claim(
    paths: DriverPaths, state: PluginState
) -> None:
    claim = prepared(UID_A)
    state.prepare({UID_A: claim})
    spec(paths, UID_A).unlink()
    assert state.prepare({UID_A: claim})[UID_A].error == ""
    assert spec(paths, UID_A).exists()


def test_unprepare_removes_the_state_entry_and_the_spec(
    paths: DriverPaths, state: PluginState
) -> None:
    state.prepare({UID_A: prepared(UID_A), UID_B: prepared(UID_B)})
    assert state.unprepare([UID_A, UID_C]) == {UID_A: "", UID_C: ""}
    assert set(read_state(paths.checkpoint)) == {UID_B}
    assert not spec(paths, UID_A).exists()
    assert spec(paths, UID_B).exists()


def test_an_unsafe_uid_is_refused_and_the_others_unprepared(
    paths: DriverPaths, state: PluginState
) -> None:
    state.prepare({UID_A: prepared(UID_A)})
    results = state.unprepare(["../checkpoint", UID_A])
    assert "is not a safe token" in results["../checkpoint"]
    assert results[UID_A] == ""
    assert read_state(paths.checkpoint) == {}


def test_a_spec_that_cannot_be_written_fails_its_claim_alone(
    paths: DriverPaths, state: PluginState
) -> None:
    spec(paths, UID_B).mkdir(parents=True)  # nothing can be renamed onto a directory
    results = state.prepare({UID_A: prepared(UID_A), UID_B: prepared(UID_B, "blocked")})
    assert results[UID_A].error == ""
    assert results[UID_B].error.startswith("claim ns/blocked: cannot write its CDI spec: ")
    assert set(read_state(paths.checkpoint)) == {UID_A}
    assert set(state.claims) == {UID_A}


def test_a_state_write_that_fails_prepares_nothing_and_the_next_one_recovers(
    paths: DriverPaths, state: PluginState, monkeypatch: pytest.MonkeyPatch
) -> None:
    state.prepare({UID_A: prepared(UID_A)})

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full_disk)
    results = state.prepare({UID_B: prepared(UID_B, "b")})
    assert "cannot write its state file" in results[UID_B].error
    assert "No space left" in results[UID_B].error
    assert set(state.claims) == {UID_A}  # what the file says
    assert state.unprepare([UID_A])[UID_A] != ""  # not durable: still prepared
    assert set(state.claims) == {UID_A}
    monkeypatch.undo()
    assert state.prepare({UID_B: prepared(UID_B, "b")})[UID_B].error == ""
    assert state.unprepare([UID_A]) == {UID_A: ""}
    assert set(read_state(paths.checkpoint)) == {UID_B}
    assert set(PluginState(paths).claims) == set()  # a new instance reads the file only:
    fresh = PluginState(paths)
    fresh.load()
    assert set(fresh.claims) == {UID_B}


def test_another_instances_changes_are_seen_before_each_call(paths: DriverPaths) -> None:
    # A rolling update: two instances of the plugin on one node, one after the other.
    old, new = PluginState(paths), PluginState(paths)
    old.load()
    new.load()
    old.prepare({UID_A: prepared(UID_A)})
    new.prepare({UID_B: prepared(UID_B)})
    old.unprepare([UID_B])
    assert set(read_state(paths.checkpoint)) == {UID_A}
    assert new.prepare({UID_C: prepared(UID_C)})[UID_C].error == ""
    assert set(read_state(paths.checkpoint)) == {UID_A, UID_C}
    assert set(new.claims) == {UID_A, UID_C}


@pytest.fixture
def holder(paths: DriverPaths) -> Iterator[Holder]:
    paths.plugin_dir.mkdir(parents=True, exist_ok=True)
    h = Holder(paths.lock)
    yield h
    h.close()


def test_a_lock_held_past_the_deadline_fails_the_call_in_time(
    paths: DriverPaths, state: PluginState, holder: Holder
) -> None:
    prepare = state.prepare({UID_A: prepared(UID_A)}, timeout=0.3)
    unprepare = state.unprepare([UID_B], timeout=0.3)
    assert prepare[UID_A].error.startswith("claim ns/claim: deadline exceeded: the state lock ")
    assert unprepare[UID_B].startswith(f"claim {UID_B}: deadline exceeded: the state lock ")
    assert not spec(paths, UID_A).exists()
    holder.release()
    assert state.prepare({UID_A: prepared(UID_A)}, timeout=0.3)[UID_A].error == ""


def test_calls_after_close_are_refused_and_leave_the_stopped_format(
    paths: DriverPaths, state: PluginState
) -> None:
    state.prepare({UID_A: prepared(UID_A)})
    state.close()
    snapshot = paths.checkpoint.read_bytes()
    assert "the plugin is stopping" in state.prepare({UID_B: prepared(UID_B)})[UID_B].error
    assert "the plugin is stopping" in state.unprepare([UID_A])[UID_A]
    assert paths.checkpoint.read_bytes() == snapshot
    assert not journal_path(paths.checkpoint).exists()
    assert not spec(paths, UID_B).exists()
