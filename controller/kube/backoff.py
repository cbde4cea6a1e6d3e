# SPDX-License-Identifier: Apache-2.0
"""Jittered exponential backoff: the one way both processes wait between attempts.

A `BackoffPolicy` is plain data, and its `delay(failures, rand)` a pure function:
`initial * factor ** (failures - 1)`, capped at `cap`, then stretched by up to
`jitter` of itself at random (so many clients failing together do not retry
together). Two ways to use it:

- `await retry(call, policy, retryable=...)`: call until it succeeds, sleeping
  after each failure the predicate calls retryable; others are raised at once.
- `Backoff(policy, reset_after=...)`: the delays of a long-running loop (a watch
  that reconnects): `next_delay()` after each failure, `reset()` after a
  success; a failure `reset_after` seconds after the previous one starts from
  `initial` again, since the attempt in between was healthy for that long.

Randomness, the clock and sleeping are parameters, so tests choose them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from controller.kube.errors import ApiError

T = TypeVar("T")


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait after consecutive failures.

    `factor=1` gives a fixed period with jitter (a poll, such as leader election's
    retry period).
    """

    initial: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"backoff needs 0 < initial <= cap, got {self.initial}, {self.cap}")
        if self.factor < 1 or self.jitter < 0:
            raise ValueError(f"backoff needs factor >= 1 and jitter >= 0, got {self}")

    def delay(self, failures: int, rand: float) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based);
        `rand` in [0, 1) picks the jitter."""
        exponent = max(0, failures - 1)
        base = self.initial
        if self.factor > 1:
            # Past the exponent that reaches the cap, the power would only overflow.
            at_cap = math.log(self.cap / self.initial, self.factor)
            base = self.cap if exponent >= at_cap else self.initial * self.factor**exponent
        return min(base, self.cap) * (1 + self.jitter * rand)

    @property
    def longest(self) -> float:
        """The longest delay this policy ever gives (cap plus full jitter)."""
        return self.cap * (1 + self.jitter)


class Backoff:
    """The delays of one loop: grows with consecutive failures, resets on success."""

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        reset_after: float | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.reset_after = reset_after
        self.failures = 0
        self._rand = rand
        self._clock = clock
        self._last_failure: float | None = None

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        now = self._clock()
        if (
            self.reset_after is not None
            and self._last_failure is not None
            and now - self._last_failure >= self.reset_after
        ):
            self.failures = 0
        self._last_failure = now
        self.failures += 1
        return self.policy.delay(self.failures, self._rand())

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits `initial` again."""
        self.failures = 0
        self._last_failure = None


def retryable_api_error(exc: BaseException) -> bool:
    """The API layer's own judgement: `Unavailable` (5xx, 429, no connection) and
    `Conflict` (a stale resourceVersion) may succeed when tried again."""
    return isinstance(exc, ApiError) and exc.retryable


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: BackoffPolicy,
    *,
    retryable: Callable[[BaseException], bool] = retryable_api_error,
    on_retry: Callable[[BaseException, float], None] | None = None,
    rand: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> T:
    """`await call()` until it returns, waiting with backoff after each retryable failure.

    `on_retry(error, delay)` is told of each failure before the wait (to log it,
    or to record what the caller is waiting for). Bound the whole with the
    caller's cancel scope (`anyio.fail_after`).

    Raises:
        Exception: the first error `retryable` rejects, unchanged.
    """
    backoff = Backoff(policy, rand=rand)
    while True:
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc):
                raise
            delay = backoff.next_delay()
            if on_retry is not None:
                on_retry(exc, delay)
            await sleep(delay)
