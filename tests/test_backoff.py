# SPDX-License-Identifier: Apache-2.0
"""The one backoff helper: delays as pure functions, a loop's delays, and retrying a call."""

from __future__ import annotations

import itertools

import pytest

from controller.kube.backoff import Backoff, BackoffPolicy, retry, retryable_api_error
from controller.kube.errors import (
    AlreadyExists,
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    Unavailable,
    error_from_status,
)

NO_JITTER = 0.0
FULL_JITTER = 0.999999


def test_delays_double_from_initial_up_to_the_cap() -> None:
    policy = BackoffPolicy(initial=0.2, cap=5.0, jitter=0.0)
    assert [policy.delay(n, NO_JITTER) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_jitter_stretches_a_delay_by_up_to_its_fraction() -> None:
    policy = BackoffPolicy(initial=1.0, cap=8.0, jitter=0.5)
    assert policy.delay(2, NO_JITTER) == 2.0
    assert policy.delay(2, 0.5) == 2.5
    assert 2.0 < policy.delay(2, FULL_JITTER) < 3.0
    assert policy.delay(50, FULL_JITTER) < policy.longest == 12.0


def test_a_factor_of_one_is_a_fixed_period_with_jitter() -> None:
    policy = BackoffPolicy(initial=2.0, cap=2.0, factor=1.0, jitter=0.2)
    assert {policy.delay(n, NO_JITTER) for n in (1, 2, 100)} == {2.0}
    assert policy.delay(3, FULL_JITTER) == pytest.approx(2.4)


def test_a_huge_failure_count_waits_the_cap() -> None:
    assert BackoffPolicy(initial=0.001, cap=30.0, factor=10.0).delay(10**6, NO_JITTER) == 30.0


@pytest.mark.parametrize(
    ("initial", "cap", "factor", "jitter"),
    [(0.0, 1.0, 2.0, 0.1), (2.0, 1.0, 2.0, 0.1), (0.1, 1.0, 0.5, 0.1), (0.1, 1.0, 2.0, -0.1)],
)
def test_a_policy_that_would_spin_or_shrink_is_refused(
    initial: float, cap: float, factor: float, jitter: float
) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        BackoffPolicy(initial=initial, cap=cap, factor=factor, jitter=jitter)


def test_a_loop_waits_longer_after_each_failure_and_from_initial_after_a_success() -> None:
    backoff = Backoff(BackoffPolicy(initial=0.1, cap=1.0, jitter=0.0))
    assert [backoff.next_delay() for _ in range(3)] == [0.1, 0.2, 0.4]
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_a_failure_long_after_the_previous_one_starts_from_initial_again() -> None:
    now = [0.0]
    backoff = Backoff(
        BackoffPolicy(initial=0.1, cap=1.0, jitter=0.0), reset_after=60.0, clock=lambda: now[0]
    )
    assert [backoff.next_delay() for _ in range(3)] == [0.1, 0.2, 0.4]
    now[0] += 59.0  # failed again before the attempt was healthy for a minute
    assert backoff.next_delay() == 0.8
    now[0] += 60.0  # healthy for a minute, then failed
    assert backoff.next_delay() == 0.1


def test_a_loop_draws_its_jitter_from_the_given_source() -> None:
    draws = itertools.cycle([0.0, 0.5])
    backoff = Backoff(BackoffPolicy(initial=1.0, cap=10.0, jitter=1.0), rand=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(4)] == [1.0, 3.0, 4.0, 12.0]


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (Unavailable(503, "ServiceUnavailable", "starting"), True),
        (error_from_status(429, None), True),
        (Conflict(409, "Conflict", "stale resourceVersion"), True),
        (AlreadyExists(409, "AlreadyExists", "taken"), False),
        (NotFound(404, "NotFound", "gone"), False),
        (Forbidden(403, "Forbidden", "RBAC"), False),
        (ApiError(418, "Teapot", "?"), False),
        (ValueError("not ours"), False),
    ],
)
def test_the_default_predicate_retries_what_the_api_layer_calls_retryable(
    error: BaseException, retried: bool
) -> None:
    assert retryable_api_error(error) is retried


class Flaky:
    """A call failing with the given errors, then answering "ok"; records each wait."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.slept: list[float] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


POLICY = BackoffPolicy(initial=0.5, cap=2.0, jitter=0.1)


@pytest.mark.anyio
async def test_retry_returns_the_answer_after_retryable_failures_waiting_longer_each_time() -> None:
    down = Unavailable(0, "Unavailable", "connection refused")
    call = Flaky(down, down, down, down)
    told: list[tuple[str, float]] = []
    answer = await retry(
        call,
        POLICY,
        rand=lambda: 0.0,
        sleep=call.sleep,
        on_retry=lambda exc, delay: told.append((str(exc), delay)),
    )
    assert answer == "ok" and call.calls == 5
    assert call.slept == [0.5, 1.0, 2.0, 2.0]
    assert told == [("Unavailable (0): connection refused", d) for d in call.slept]


@pytest.mark.anyio
async def test_retry_raises_an_error_its_predicate_rejects_without_waiting() -> None:
    call = Flaky(Unavailable(503, "ServiceUnavailable", "x"), Forbidden(403, "Forbidden", "RBAC"))
    with pytest.raises(Forbidden):
        await retry(call, POLICY, rand=lambda: 0.0, sleep=call.sleep)
    assert call.calls == 2 and call.slept == [0.5]


@pytest.mark.anyio
async def test_retry_takes_its_own_predicate() -> None:
    call = Flaky(NotFound(404, "NotFound", "node not created yet"))
    answer = await retry(
        call,
        POLICY,
        retryable=lambda exc: isinstance(exc, NotFound),
        rand=lambda: 0.0,
        sleep=call.sleep,
    )
    assert answer == "ok" and call.slept == [0.5]


@pytest.mark.anyio
async def test_retry_really_sleeps_with_anyio_by_default() -> None:
    call = Flaky(Unavailable(503, "ServiceUnavailable", "x"))
    assert await retry(call, BackoffPolicy(initial=0.001, cap=0.001)) == "ok"
    assert call.calls == 2
