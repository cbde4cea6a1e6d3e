# SPDX-License-Identifier: Apache-2.0
"""List-then-watch with a local cache: the one informer both processes use.

It lists, then watches from the list's resourceVersion with bookmarks,
re-lists on 410 Gone, and reconnects with jittered backoff on errors. Every
change is handed to the registered handlers as (key, old, new); handlers map
that to work-queue keys. Relists diff against the cache so that nothing is
lost or announced twice.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from .apiclient import WATCH_READ_GRACE, ApiClient
from .errors import ApiError, Gone
from .resources import Resource, object_key

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Handler = Callable[[str, Obj | None, Obj | None], None]


@dataclass(frozen=True)
class Change:
    """One observed change: `old` None = added, `new` None = deleted."""

    key: str
    old: Obj | None
    new: Obj | None


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
        self.synced = anyio.Event()
        self.relists = 0
        # When the loop last moved (an event, a list, a watch ended or failed):
        # a loop stuck on a dead connection stops moving (liveness).
        self.last_progress = time.monotonic()
        self._handlers: list[Handler] = []

    def liveness_problem(self) -> str:
        """Why this informer's loop looks stuck ("" when it moves).

        A healthy loop moves at least once per watch: the server ends a quiet
        watch after its timeout, a dead connection is dropped a grace later,
        a failure is retried after at most 1.5 x max_backoff.
        """
        timeout = (
            self.watch_timeout if self.watch_timeout is not None else self.client.watch_timeout
        )
        limit = timeout + WATCH_READ_GRACE + 1.5 * self.max_backoff + 30.0
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

    def _emit(self, change: Change) -> None:
        for handler in self._handlers:
            try:
                handler(change.key, change.old, change.new)
            except Exception:
                log.exception("informer handler failed", extra={"resource": self.resource.plural})

    async def relist(self) -> None:
        """List everything and diff it into the cache."""
        listing = await self.client.list(
            self.resource,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
        )
        self.relists += 1
        self.resource_version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
        for change in diff_relist(self.cache, listing.get("items") or []):
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
        ):
            self.last_progress = time.monotonic()
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            change = apply_watch_event(self.cache, event)
            if rv:
                self.resource_version = str(rv)
            if change is not None:
                self._emit(change)

    async def run(self) -> None:
        """Run until cancelled: list, watch, re-list on 410, back off on errors."""
        failures = 0
        need_list = True
        while True:
            self.last_progress = time.monotonic()
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                await self._watch_once()
                failures = 0  # the server closed a healthy watch: resume from our RV
            except Gone:
                log.info("watch expired, re-listing", extra={"resource": self.resource.plural})
                need_list = True
                failures = 0
            except ApiError as exc:
                failures += 1
                delay = min(self.max_backoff, 0.2 * 2 ** min(failures, 8)) * (0.5 + random.random())
                log.warning(
                    "watch failed, reconnecting",
                    extra={"resource": self.resource.plural, "error": str(exc), "retryIn": delay},
                )
                self.last_progress = time.monotonic()
                await anyio.sleep(delay)
