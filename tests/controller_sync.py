# SPDX-License-Identifier: Apache-2.0
"""Waiting for positive signals: an in-process controller finished its work, the
API server's watch cache caught up.

The signal the tests use instead of sleeping to show that a controller wrote
nothing more: its informer holds the server's current version of an object, and
after that its work queue is idle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from controller.kube.client import ApiClient
from controller.kube.errors import NotFound
from controller.kube.informer import Informer
from controller.kube.resources import Resource
from controller.kube.workqueue import WorkQueue


def queue_idle(queue: WorkQueue) -> bool:
    """Nothing waiting, delayed or running."""
    return queue.depth == 0 and queue.longest_running() is None


async def settled(
    queue: WorkQueue, caught_up: Callable[[], Awaitable[bool]], timeout: float = 15.0
) -> None:
    """Wait until `caught_up()` holds and, after it, `queue` is idle.

    An informer queues a key in the same step that updates its cache, so once the
    cache shows a version and the queue is idle afterwards, every reconcile that
    version caused has finished, its writes included.
    """
    with anyio.fail_after(timeout):
        while not (await caught_up() and queue_idle(queue)):
            await anyio.sleep(0.05)


def cache_current(
    api: ApiClient, informer: Informer, resource: Resource, name: str, namespace: str | None = None
) -> Callable[[], Awaitable[bool]]:
    """A `caught_up` check: the informer's cache holds the server's current version of
    the object (or, both agree it is gone)."""
    key = f"{namespace}/{name}" if namespace else name

    async def check() -> bool:
        try:
            current = await api.get(resource, name, namespace)
        except NotFound:
            return informer.get(key) is None
        cached = informer.get(key)
        rv = (current.get("metadata") or {}).get("resourceVersion")
        return cached is not None and (cached.get("metadata") or {}).get("resourceVersion") == rv

    return check


async def in_watch_cache(
    api: ApiClient,
    resource: Resource,
    name: str,
    namespace: str | None = None,
    *,
    until: Callable[[dict[str, Any]], bool] = lambda obj: True,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The object as the API server's watch cache serves it, once it is there and
    `until` holds for it."""
    with anyio.fail_after(timeout):
        while True:
            with contextlib.suppress(NotFound):
                obj = await api.get(resource, name, namespace, from_cache=True)
                if until(obj):
                    return obj
            await anyio.sleep(0.02)
