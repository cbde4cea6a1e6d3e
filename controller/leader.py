# SPDX-License-Identifier: Apache-2.0
"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it.

Only the leader runs the reconcilers. A candidate reads the Lease every
retry period and takes it when it is free, released or expired; the leader
renews it every retry period. Writes carry the resourceVersion they read,
so two candidates never both win (the loser gets 409 Conflict).

Expiry is judged on this process's own clock: a lease expires
`leaseDurationSeconds` after this process *first saw* its current
holder/renewTime, not after the renewTime the holder wrote, so clock skew
between nodes cannot make two leaders.

When the leader cannot renew within the renew deadline, or sees another
holder, it cancels the reconcilers at once and becomes a candidate again
(the renew deadline is shorter than the lease duration, so it stops before
anyone else may start). On shutdown the leader releases the lease (empty
holder, 1 s duration) so a successor takes over without waiting.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

from controller.kube.backoff import Backoff, BackoffPolicy
from controller.kube.client import ApiClient
from controller.kube.errors import AlreadyExists, ApiError, Conflict, NotFound
from controller.kube.resources import LEASES

log = logging.getLogger(__name__)

Obj = dict[str, Any]


def make_identity() -> str:
    """A holder identity unique to this process: `<hostname>_<pid>_<random>`."""
    return f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(4)}"


def format_micro_time(when: datetime) -> str:
    """A `MicroTime` as the API writes it: `2026-01-02T03:04:05.123456Z`."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> datetime | None:
    """A `Time`/`MicroTime` string as an aware datetime; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def lease_holder(lease: Mapping[str, Any] | None) -> str:
    """The lease's holder identity ("" when none)."""
    spec = (lease or {}).get("spec") or {}
    return str(spec.get("holderIdentity") or "")


def should_acquire(
    lease: Mapping[str, Any] | None,
    now: datetime,
    identity: str,
    *,
    observed_at: datetime | None = None,
) -> bool:
    """Whether `identity` may take (or renew) `lease` at `now`.

    True when the lease does not exist, has no holder (released), is held
    by `identity` already, or has expired: `leaseDurationSeconds` after
    `observed_at` (when this process first saw the lease's current
    holder/renewTime, on its own clock), or after the lease's `renewTime`
    when `observed_at` is not given. A lease without a readable renewTime
    or duration counts as expired.
    """
    if lease is None:
        return True
    holder = lease_holder(lease)
    if not holder or holder == identity:
        return True
    spec = lease.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
        return True
    start = observed_at if observed_at is not None else parse_time(spec.get("renewTime"))
    if start is None:
        return True
    return now >= start + timedelta(seconds=duration)


def lease_for(
    current: Mapping[str, Any] | None,
    identity: str,
    now: datetime,
    duration_seconds: int,
    *,
    namespace: str,
    name: str,
) -> Obj:
    """The Lease object to write so that `identity` holds it from `now`.

    Keeps acquireTime and leaseTransitions when renewing; a change of holder
    sets acquireTime and counts one more transition. Carries the current
    resourceVersion for optimistic concurrency.
    """
    stamp = format_micro_time(now)
    spec: Obj = dict((current or {}).get("spec") or {})
    previous = lease_holder(current)
    if previous != identity:
        spec["acquireTime"] = stamp
        if current is not None:
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        else:
            spec["leaseTransitions"] = 0
    spec.update(holderIdentity=identity, leaseDurationSeconds=duration_seconds, renewTime=stamp)
    metadata: Obj = {"name": name, "namespace": namespace}
    if current is not None:
        metadata = dict(current.get("metadata") or {})
        metadata.pop("managedFields", None)
    return {
        "apiVersion": LEASES.api_version,
        "kind": LEASES.kind,
        "metadata": metadata,
        "spec": spec,
    }


class LeaderElector:
    """Runs `leading()` only while this process holds the Lease.

    `run(leading)` loops forever: acquire, run `leading()` in a task group
    next to the renew loop, cancel that group the moment leadership is lost,
    and go back to acquiring. Cancelling `run` (shutdown) releases the lease
    when held.
    """

    def __init__(
        self,
        client: ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError(
                "leader election needs lease duration > renew deadline > retry period > 0, "
                f"got {lease_duration}s, {renew_deadline}s, {retry_period}s"
            )
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.duration_seconds = max(1, round(lease_duration))
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.is_leader = False
        self._observed: tuple[str, str] | None = None
        self._observed_at: datetime | None = None
        self._other_holder = ""

    def _set_leader(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            if self.on_change is not None:
                self.on_change(leading)

    def _observe(self, lease: Mapping[str, Any], now: datetime) -> None:
        spec = lease.get("spec") or {}
        record = (lease_holder(lease), str(spec.get("renewTime") or ""))
        if record != self._observed:
            self._observed = record
            self._observed_at = now

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this process holds the lease afterwards."""
        now = datetime.now(UTC)
        try:
            current: Obj | None = await self.client.get(LEASES, self.name, self.namespace)
        except NotFound:
            current = None
        if current is None:
            lease = lease_for(
                None,
                self.identity,
                now,
                self.duration_seconds,
                namespace=self.namespace,
                name=self.name,
            )
            try:
                await self.client.create(LEASES, lease, self.namespace)
            except AlreadyExists:
                return False
            self._other_holder = ""
            return True
        self._observe(current, now)
        holder = lease_holder(current)
        if not should_acquire(current, now, self.identity, observed_at=self._observed_at):
            self._other_holder = holder
            return False
        lease = lease_for(
            current,
            self.identity,
            now,
            self.duration_seconds,
            namespace=self.namespace,
            name=self.name,
        )
        try:
            written = await self.client.replace(LEASES, lease)
        except Conflict:
            return False
        self._observe(written, now)
        self._other_holder = ""
        if holder != self.identity:
            log.info(
                "acquired leader lease",
                extra={"lease": f"{self.namespace}/{self.name}", "previousHolder": holder or None},
            )
        return True

    async def _acquire(self) -> None:
        logged = ""
        # Every retry period, a little later at random (client-go's jitter of 1.2).
        period = Backoff(
            BackoffPolicy(self.retry_period, self.retry_period, factor=1.0, jitter=0.2)
        )
        while True:
            try:
                if await self.try_acquire_or_renew():
                    return
                if self._other_holder and self._other_holder != logged:
                    logged = self._other_holder
                    log.info(
                        "waiting for the leader lease",
                        extra={"lease": f"{self.namespace}/{self.name}", "holder": logged},
                    )
            except ApiError as exc:
                log.warning(
                    "cannot read or take the leader lease",
                    extra={"lease": f"{self.namespace}/{self.name}", "error": str(exc)},
                )
            await anyio.sleep(period.next_delay())

    async def _renew_until_lost(self) -> str:
        """Renew every retry period; return why leadership was lost."""
        last_renewed = time.monotonic()
        while True:
            await anyio.sleep(self.retry_period)
            left = self.renew_deadline - (time.monotonic() - last_renewed)
            renewed = False
            with anyio.move_on_after(max(left, 0.0)):
                try:
                    renewed = await self.try_acquire_or_renew()
                except ApiError as exc:
                    log.warning(
                        "cannot renew the leader lease",
                        extra={"lease": f"{self.namespace}/{self.name}", "error": str(exc)},
                    )
            if renewed:
                last_renewed = time.monotonic()
                continue
            if self._other_holder:
                return f"lease taken by {self._other_holder}"
            if time.monotonic() - last_renewed >= self.renew_deadline:
                return f"not renewed within the renew deadline ({self.renew_deadline:g}s)"

    async def release(self) -> None:
        """Give the lease up (empty holder, 1 s duration) if this process holds it."""
        try:
            current = await self.client.get(LEASES, self.name, self.namespace)
        except NotFound:
            return
        if lease_holder(current) != self.identity:
            return
        spec = dict(current.get("spec") or {})
        spec.update(
            holderIdentity=None,
            leaseDurationSeconds=1,
            renewTime=format_micro_time(datetime.now(UTC)),
        )
        metadata = dict(current.get("metadata") or {})
        metadata.pop("managedFields", None)
        await self.client.replace(LEASES, {**current, "metadata": metadata, "spec": spec})
        log.info("released leader lease", extra={"lease": f"{self.namespace}/{self.name}"})

    async def run(self, leading: Callable[[], Awaitable[None]]) -> None:
        """Run `leading()` whenever this process leads, until cancelled.

        Returns when `leading()` returns on its own; its exceptions propagate.
        """
        try:
            while True:
                await self._acquire()
                self._set_leader(True)
                log.info("became leader", extra={"identity": self.identity})
                finished = False
                reason = ""

                async def lead(scope: anyio.CancelScope) -> None:
                    nonlocal finished
                    await leading()
                    finished = True
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(lead, tg.cancel_scope)
                    reason = await self._renew_until_lost()
                    self._set_leader(False)
                    tg.cancel_scope.cancel()
                if finished:
                    return
                log.warning(
                    "lost leadership; reconcilers stopped",
                    extra={"identity": self.identity, "reason": reason},
                )
        finally:
            if self.is_leader:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.renew_deadline):
                    try:
                        await self.release()
                    except ApiError as exc:
                        log.warning("cannot release the leader lease", extra={"error": str(exc)})
                self._set_leader(False)
