# SPDX-License-Identifier: Apache-2.0
"""Work queue semantics: merge duplicates, no concurrent processing of a key, backoff."""

from __future__ import annotations

import anyio
import pytest

from controller.kube.workqueue import WorkQueue

pytestmark = pytest.mark.anyio


async def test_duplicate_adds_are_merged() -> None:
    q = WorkQueue()
    for key in ("a", "b", "a", "a"):
        q.add(key)
    assert len(q) == 2
    assert await q.get() == "a"
    assert await q.get() == "b"


async def test_key_added_while_processing_is_requeued_after_done() -> None:
    q = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")
    assert len(q) == 0  # not handed to a second worker while the first holds it
    q.done(key)
    assert len(q) == 1
    assert await q.get() == "a"


async def test_retry_backs_off_and_forget_resets() -> None:
    q = WorkQueue(base_delay=0.01)
    q.add("a")
    key = await q.get()
    first = q.retry(key)
    q.done(key)
    assert len(q) == 0 and q.depth == 1
    with anyio.fail_after(2):
        assert await q.get() == "a"
    second = q.retry("a")
    q.done("a")
    assert second > first
    assert q.failures("a") == 2
    q.forget("a")
    assert q.failures("a") == 0


def test_a_key_waits_from_five_milliseconds_doubling_to_a_minute_by_default() -> None:
    policy = WorkQueue().backoff
    assert [policy.delay(n, 0.0) for n in (1, 4, 40)] == [0.005, 0.04, 60.0]
    assert policy.delay(1, 0.999) <= 0.0056  # at most 10% jitter


async def test_workers_retry_failures_until_success() -> None:
    q = WorkQueue(base_delay=0.001)
    attempts: dict[str, int] = {}
    done = anyio.Event()

    async def reconcile(key: str) -> None:
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] < 3:
            raise RuntimeError("not yet")
        done.set()

    q.add("x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(q.run_workers, reconcile, 2)
        with anyio.fail_after(5):
            await done.wait()
        q.shutdown()
    assert attempts == {"x": 3}
    assert q.failures("x") == 0


async def test_shutdown_wakes_waiting_getters() -> None:
    q = WorkQueue()
    async with anyio.create_task_group() as tg:

        async def getter() -> None:
            with pytest.raises(anyio.EndOfStream):
                await q.get()

        tg.start_soon(getter)
        await anyio.wait_all_tasks_blocked()  # the getter waits in get()
        q.shutdown()
