# SPDX-License-Identifier: Apache-2.0
"""A work queue of keys that merges duplicates and retries failures with backoff.

Semantics follow client-go's: a key is in the queue at most once; a key added
while a worker processes it is queued again when that worker is done, so two
workers never reconcile the same key at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from controller.kube.backoff import BackoffPolicy

log = logging.getLogger(__name__)


class WorkQueue:
    """Keys to reconcile; `get()` waits for one."""

    def __init__(
        self,
        name: str = "queue",
        base_delay: float = 0.005,
        max_delay: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self._clock = clock  # seconds, monotonic: delays and how long a reconcile runs
        # Per key: base_delay doubling up to max_delay, each up to 10% longer at random.
        self.backoff = BackoffPolicy(initial=base_delay, cap=max_delay, jitter=0.1)
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._started: dict[str, float] = {}  # key -> when its reconcile began
        self._failures: dict[str, int] = {}
        self._delayed: dict[str, float] = {}  # key -> monotonic due time
        self._wakeup = anyio.Event()
        self._shutdown = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def depth(self) -> int:
        """Keys waiting (ready or delayed), for metrics."""
        return len(self._queue) + len(self._delayed)

    def _notify(self) -> None:
        # Every waiter holds the current event; set it and start a fresh one.
        self._wakeup.set()
        self._wakeup = anyio.Event()

    def add(self, key: str) -> None:
        """Queue `key` unless it is already waiting."""
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        self._delayed.pop(key, None)
        if key not in self._processing:
            self._queue.append(key)
            self._notify()

    def add_after(self, key: str, delay: float) -> None:
        """Queue `key` after `delay` seconds (the earliest due time wins)."""
        if self._shutdown:
            return
        if delay <= 0:
            self.add(key)
            return
        due = self._clock() + delay
        if key in self._dirty:
            return
        if key not in self._delayed or self._delayed[key] > due:
            self._delayed[key] = due
            self._notify()

    def retry(self, key: str) -> float:
        """Queue `key` again after its backoff; returns the delay chosen."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = self.backoff.delay(failures, random.random())
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset `key`'s failure count after a success."""
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        """Consecutive failures of `key` so far."""
        return self._failures.get(key, 0)

    def longest_running(self) -> tuple[str, float] | None:
        """The key whose reconcile has run longest, and for how many seconds (liveness)."""
        if not self._started:
            return None
        key = min(self._started, key=self._started.__getitem__)
        return key, self._clock() - self._started[key]

    def done(self, key: str) -> None:
        """Mark `key` processed; re-queue it if it was added meanwhile."""
        self._processing.discard(key)
        self._started.pop(key, None)
        if key in self._dirty:
            self._queue.append(key)
            self._notify()

    def shutdown(self) -> None:
        """Wake all waiters; `get()` raises `anyio.EndOfStream` from now on."""
        self._shutdown = True
        self._notify()

    def _promote_due(self) -> float | None:
        now = self._clock()
        next_due: float | None = None
        for key, due in list(self._delayed.items()):
            if due <= now:
                del self._delayed[key]
                self.add(key)
            elif next_due is None or due < next_due:
                next_due = due
        return None if next_due is None else next_due - now

    async def get(self) -> str:
        """Wait for a key; the caller must call `done(key)` afterwards."""
        while True:
            if self._shutdown:
                raise anyio.EndOfStream
            wakeup = self._wakeup
            wait = self._promote_due()
            if self._queue:
                key = self._queue.popleft()
                self._dirty.discard(key)
                self._processing.add(key)
                self._started[key] = self._clock()
                return key
            with anyio.move_on_after(wait if wait is not None else 3600):
                await wakeup.wait()

    async def run_workers(
        self,
        reconcile: Callable[[str], Awaitable[None]],
        workers: int = 4,
        on_result: Callable[[str, BaseException | None, float], None] | None = None,
    ) -> None:
        """Run `workers` tasks calling `reconcile(key)`; failures are retried with backoff.

        Returns when the queue is shut down (or the caller's scope is cancelled).
        """

        async def worker() -> None:
            while True:
                try:
                    key = await self.get()
                except anyio.EndOfStream:
                    return
                start = self._clock()
                error: BaseException | None = None
                try:
                    await reconcile(key)
                except Exception as exc:
                    error = exc
                    delay = self.retry(key)
                    log.warning(
                        "reconcile failed, retrying",
                        extra={"queue": self.name, "key": key, "error": str(exc), "retryIn": delay},
                    )
                else:
                    self.forget(key)
                finally:
                    self.done(key)
                if on_result is not None:
                    on_result(key, error, self._clock() - start)

        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)
