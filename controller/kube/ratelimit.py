# SPDX-License-Identifier: Apache-2.0
"""Client-side token bucket protecting the API server from bursts we cause."""

from __future__ import annotations

import time

import anyio


class TokenBucket:
    """`qps` tokens per second, at most `burst` saved up; qps <= 0 disables limiting.

    Unlike a fixed 5 QPS limit, the defaults (50/100) let a burst of 100 pod
    starts on one node through at once while still capping a runaway loop.
    """

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now

    def try_take(self, now: float | None = None) -> float:
        """Take a token if one is there; return 0, or the seconds to wait for one."""
        if self.qps <= 0:
            return 0.0
        self._refill(time.monotonic() if now is None else now)
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.qps

    async def acquire(self) -> None:
        """Wait until a request may go out."""
        if self.qps <= 0:
            return
        # The usual case, nobody waiting and a token there: no event-loop round trip
        # (taking the lock yields to the loop once even when it is free).
        if not self._lock.locked() and self.try_take() == 0:
            return
        async with self._lock:
            # Sleeping exactly until the next token is the point here.
            while (wait := self.try_take()) > 0:  # noqa: ASYNC110
                await anyio.sleep(wait)
