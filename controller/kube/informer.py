# SPDX-License-Identifier: Apache-2.0
"""List-then-watch with a local cache: the one informer both processes use.

It lists, then watches from the list's resourceVersion with bookmarks,
re-lists on 410 Gone, and reconnects with jittered backoff on errors. Every
change is handed to the registered handlers as (key, old, new); handlers map
that to work-queue keys. Relists diff against the cache so that nothing is
lost or announced twice.

An object the client can decode only in part (nested deeper than orjson
reads: any tenant can create such a claim) is quarantined: logged once per
version, counted, its key kept in `quarantined`, and the stream moves on
past it. Its last readable version, if any, stays in the cache; nothing
else in the cache is touched.

`healthy()` says whether the cache is current: false from the moment list or
watch keeps failing for longer than `stall_after` seconds, so /readyz can
tell the truth about a wedged stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from controller.kube.backoff import Backoff, BackoffPolicy
from controller.kube.client import WATCH_READ_GRACE, ApiClient
from controller.kube.errors import ApiError, Gone
from controller.kube.resources import Resource, object_key

# How long list/watch may keep failing before the informer says it is not healthy.
DEFAULT_STALL_AFTER = 30.0
# A failure this long after the previous one waits the shortest delay again: the
# watch in between was healthy.
BACKOFF_RESET_AFTER = 120.0

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Handler = Callable[[str, Obj | None, Obj | None], None]


@dataclass(frozen=True)
class Change:
    """One observed change: `old` None = added, `new` None = deleted."""

    key: str
    old: Obj | None
    new: Obj | None


def watch_backoff(max_backoff: float) -> BackoffPolicy:
    """Delays between failed list/watch attempts: 0.4 s doubling up to `max_backoff`,
    each stretched by up to half of itself at random."""
    return BackoffPolicy(initial=min(0.4, max_backoff), cap=max_backoff, jitter=0.5)


def _rv(obj: Obj | None) -> str | None:
    if obj is None:
        return None
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv is not None else None


def strip_managed_fields(obj: Obj) -> Obj:
    """Drop `metadata.managedFields` (often half an object's size; reconcilers never
    read it) before an object enters a cache."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


def diff_relist(cache: dict[str, Obj], items: Iterable[Obj]) -> list[Change]:
    """Replace the cache with a fresh list; return the changes it implies.

    Objects whose resourceVersion did not change produce no change.
    """
    fresh: dict[str, Obj] = {object_key(o): strip_managed_fields(o) for o in items}
    changes: list[Change] = []
    for key, obj in fresh.items():
        old = cache.get(key)
        if old is None or _rv(old) != _rv(obj):
            changes.append(Change(key, old, obj))
    changes.extend(Change(key, old, None) for key, old in cache.items() if key not in fresh)
    cache.clear()
    cache.update(fresh)
    return changes


def apply_watch_event(cache: dict[str, Obj], event: Obj) -> Change | None:
    """Apply one watch event to the cache; return the change, or None (bookmark, no-op)."""
    kind = event.get("type")
    obj = event.get("object")
    if kind == "BOOKMARK" or not isinstance(obj, dict):
        return None
    key = object_key(obj)
    old = cache.get(key)
    if kind in ("ADDED", "MODIFIED"):
        if old is not None and _rv(old) == _rv(obj):
            return None
        cache[key] = strip_managed_fields(obj)
        return Change(key, old, obj)
    if kind == "DELETED":
        cache.pop(key, None)
        return Change(key, old if old is not None else obj, None)
    return None


class Informer:
    """Keeps a cache of one resource's objects in sync with the server."""

    def __init__(
        self,
        client: ApiClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout: float | None = None,
        max_backoff: float = 30.0,
        stall_after: float = DEFAULT_STALL_AFTER,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.max_backoff = max_backoff
        self.cache: dict[str, Obj] = {}
        self.resource_version: str | None = None
        self.stall_after = stall_after
        self.synced = anyio.Event()
        self.relists = 0
        # When the loop last moved (an event, a list, a watch ended or failed):
        # a loop stuck on a dead connection stops moving (liveness).
        self.last_progress = time.monotonic()
        # key -> resourceVersion of objects seen but not decodable whole
        self.quarantined: dict[str, str] = {}
        self.quarantined_total = 0
        # monotonic time list/watch started failing (None while working), last error
        self.failing_since: float | None = None
        self.last_error = ""
        self._open_quiet = False  # the current watch was accepted and delivered nothing yet
        self._failed_after_open = False
        self._handlers: list[Handler] = []

    def liveness_problem(self) -> str:
        """Why this informer's loop looks stuck ("" when it moves).

        A healthy loop moves at least once per watch: the server ends a quiet
        watch after its timeout, a dead connection is dropped a grace later,
        a failure is retried after at most the backoff's longest delay.
        """
        timeout = (
            self.watch_timeout if self.watch_timeout is not None else self.client.watch_timeout
        )
        limit = timeout + WATCH_READ_GRACE + watch_backoff(self.max_backoff).longest + 30.0
        idle = time.monotonic() - self.last_progress
        if idle > limit:
            return f"informer {self.resource.plural}: no progress for {idle:.0f} s"
        return ""

    def add_handler(self, handler: Handler) -> None:
        """Call `handler(key, old, new)` for every change from now on."""
        self._handlers.append(handler)

    def get(self, key: str) -> Obj | None:
        """The cached object with this key, if any."""
        return self.cache.get(key)

    def items(self) -> list[Obj]:
        """All cached objects."""
        return list(self.cache.values())

    def healthy(self, now: float | None = None) -> bool:
        """False while list/watch has been failing for longer than `stall_after`."""
        if self.failing_since is None:
            return True
        return (time.monotonic() if now is None else now) - self.failing_since <= self.stall_after

    def problem(self) -> str:
        """Why the informer is not healthy ("" when it is)."""
        if self.healthy():
            return ""
        assert self.failing_since is not None
        return (
            f"{self.resource.plural}: list/watch failing for "
            f"{time.monotonic() - self.failing_since:.0f}s: {self.last_error}"
        )

    def _quarantine(self, obj: Obj) -> None:
        key = object_key(obj)
        rv = _rv(obj) or ""
        if self.quarantined.get(key) == rv:
            return
        self.quarantined[key] = rv
        self.quarantined_total += 1
        log.warning(
            "skipping an object nested too deep to decode; its last readable version "
            "(if any) stays in the cache",
            extra={"resource": self.resource.plural, "key": key, "resourceVersion": rv},
        )

    def _working(self) -> None:
        self.failing_since = None
        self._failed_after_open = False

    def _opened(self) -> None:
        # An accepted watch counts as working, unless the last one failed after it was
        # accepted without delivering anything: that stream is stuck on one event.
        self._open_quiet = True
        if not self._failed_after_open:
            self.failing_since = None

    def _quarantine_event(self, event: Obj) -> None:
        self._working()  # the stream moves on
        self._open_quiet = False
        obj = event.get("object")
        if not isinstance(obj, dict):
            return
        rv = _rv(obj)
        if rv:
            self.resource_version = rv  # never ask for this event again
        if event.get("type") == "DELETED":
            self.quarantined.pop(object_key(obj), None)
            change = apply_watch_event(self.cache, event)
            if change is not None:
                self._emit(change)
            return
        self._quarantine(obj)

    def _emit(self, change: Change) -> None:
        for handler in self._handlers:
            try:
                handler(change.key, change.old, change.new)
            except Exception:
                log.exception("informer handler failed", extra={"resource": self.resource.plural})

    async def relist(self) -> None:
        """List everything and diff it into the cache."""
        skipped: list[Obj] = []
        listing = await self.client.list(
            self.resource,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            quarantine=skipped.append,
        )
        self.relists += 1
        self.resource_version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
        items: list[Obj] = listing.get("items") or []
        seen = {object_key(o) for o in items}
        for obj in skipped:
            key = object_key(obj)
            seen.add(key)
            self._quarantine(obj)
            if key in self.cache:
                items.append(self.cache[key])  # keep the last readable version
        for key in [k for k in self.quarantined if k not in seen]:
            del self.quarantined[key]
        for change in diff_relist(self.cache, items):
            self._emit(change)
        self.synced.set()

    async def _watch_once(self) -> None:
        async for event in self.client.watch(
            self.resource,
            self.namespace,
            resource_version=self.resource_version,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_seconds=self.watch_timeout,
            quarantine=self._quarantine_event,
            on_open=self._opened,
        ):
            self.last_progress = time.monotonic()
            self._working()
            self._open_quiet = False
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if event.get("type") in ("ADDED", "MODIFIED") and isinstance(obj, dict):
                self.quarantined.pop(object_key(obj), None)
            change = apply_watch_event(self.cache, event)
            if rv:
                self.resource_version = str(rv)
            if change is not None:
                self._emit(change)

    async def run(self) -> None:
        """Run until cancelled: list, watch, re-list on 410, back off on errors."""
        backoff = Backoff(watch_backoff(self.max_backoff), reset_after=BACKOFF_RESET_AFTER)
        need_list = True
        while True:
            self.last_progress = time.monotonic()
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                    self._working()
                self._open_quiet = False
                await self._watch_once()
                self._working()
                backoff.reset()  # the server closed a healthy watch: resume from our RV
            except Gone:
                log.info("watch expired, re-listing", extra={"resource": self.resource.plural})
                need_list = True
                backoff.reset()
            except ApiError as exc:
                self._failed_after_open = self._open_quiet
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.last_error = str(exc)
                delay = backoff.next_delay()
                log.warning(
                    "watch failed, reconnecting",
                    extra={"resource": self.resource.plural, "error": str(exc), "retryIn": delay},
                )
                self.last_progress = time.monotonic()
                await anyio.sleep(delay)
