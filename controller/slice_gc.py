# SPDX-License-Identifier: Apache-2.0
"""Slice GC: this driver's ResourceSlices whose node is gone are deleted.

A node's kubelet plugin publishes the node's slices and makes the Node their
owner, so the garbage collector normally removes them with the node. This
controller covers what that misses: slices written without an owner (an
older plugin, a failed owner lookup), and nodes deleted and re-created
under the same name: a slice whose Node owner has another UID than the node
of that name now belongs to the old node. (A slice without an owner cannot
tell the two nodes apart; it stays while a node of its name exists, and
the plugin on that node adopts it.) A slice belongs to `spec.nodeName`, or,
for slices without one, to the node its pool is named after (the plugin
names pools after nodes).

A slice is deleted only after its node has been missing for the whole
grace period (`--orphan-grace`), is checked once more against the API at
the deadline, and is deleted with a UID precondition, so a slice re-created
in the meantime survives. Other drivers' slices are never looked at: the
slice watch is filtered by `spec.driver` on the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from controller.kube.client import ApiClient
from controller.kube.errors import NotFound
from controller.kube.informer import Informer
from controller.kube.resources import NODES, resource_kinds
from controller.kube.workqueue import WorkQueue
from controller.nx.names import DRIVER_NAME

log = logging.getLogger(__name__)

DRIVER = DRIVER_NAME
DEFAULT_ORPHAN_GRACE = 60.0

Obj = dict[str, Any]


def slice_node(slice_obj: Mapping[str, Any]) -> str | None:
    """The node a slice belongs to: `spec.nodeName`, else its pool's name; None when neither."""
    spec = slice_obj.get("spec") or {}
    node = spec.get("nodeName")
    if isinstance(node, str) and node:
        return node
    if spec.get("allNodes") or spec.get("nodeSelector") or spec.get("perDeviceNodeSelection"):
        return None  # not node-local: no node can be "gone"
    pool = (spec.get("pool") or {}).get("name")
    return pool if isinstance(pool, str) and pool else None


def owner_node_uid(slice_obj: Mapping[str, Any]) -> str | None:
    """The UID of the slice's Node owner, if it has one."""
    for ref in (slice_obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("kind") == "Node" and ref.get("uid"):
            return str(ref["uid"])
    return None


def belongs_to(slice_obj: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether the slice belongs to this very Node object (not an earlier one of its name)."""
    owner = owner_node_uid(slice_obj)
    return owner is None or owner == (node.get("metadata") or {}).get("uid")


def is_orphan(slice_obj: Mapping[str, Any], live_nodes: Mapping[str, Any]) -> bool:
    """Whether the slice's node is gone (per `live_nodes`, keyed by name): no node of
    that name, or one re-created since (another UID than the slice's Node owner)."""
    node = slice_node(slice_obj)
    if node is None:
        return False
    live = live_nodes.get(node)
    return live is None or not belongs_to(slice_obj, live)


class SliceGC:
    """Deletes this driver's slices whose node has been gone for `grace` seconds."""

    name = "slice-gc"

    def __init__(
        self,
        client: ApiClient,
        api_version: str,
        *,
        grace: float = DEFAULT_ORPHAN_GRACE,
        driver: str = DRIVER,
        on_result: Callable[[str, BaseException | None, float], None] | None = None,
    ) -> None:
        self.client = client
        self.grace = grace
        self.driver = driver
        self.resource = resource_kinds(api_version)["ResourceSlice"]
        self.nodes = Informer(client, NODES)
        self.slices = Informer(client, self.resource, field_selector=f"spec.driver={driver}")
        self.informers = (self.nodes, self.slices)
        self.queue = WorkQueue(self.name)
        self.on_result = on_result
        # slice name -> (its UID, monotonic time its node was first seen missing)
        self._missing_since: dict[str, tuple[str, float]] = {}
        self.slices.add_handler(lambda key, _old, _new: self.queue.add(key))
        self.nodes.add_handler(self._node_changed)

    def _node_changed(self, node: str, old: Obj | None, new: Obj | None) -> None:
        if old is not None and new is not None:
            return  # an update does not change whether the node exists (or its UID)
        for obj in self.slices.items():
            if slice_node(obj) == node:
                self.queue.add(str((obj.get("metadata") or {}).get("name", "")))

    async def reconcile(self, name: str) -> None:
        """Converge one slice: keep it, wait out the grace period, or delete it."""
        obj = self.slices.get(name)
        if obj is None or (obj.get("spec") or {}).get("driver") != self.driver:
            self._missing_since.pop(name, None)
            return
        if not is_orphan(obj, self.nodes.cache):
            self._missing_since.pop(name, None)
            return
        node = slice_node(obj)
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        now = time.monotonic()
        seen_uid, since = self._missing_since.get(name, ("", now))
        if seen_uid != uid:  # a slice re-created under this name waits its own grace period
            since = now
        self._missing_since[name] = (uid, since)
        left = since + self.grace - now
        if left > 0:
            if since == now:
                log.info(
                    "ResourceSlice's node is gone; deleting it after the grace period",
                    extra={"resourceSlice": name, "node": node, "graceSeconds": self.grace},
                )
            self.queue.add_after(name, left)
            return
        # The deadline: ask the API itself, the node cache may lag behind.
        try:
            current = await self.client.get(NODES, str(node))
        except NotFound:
            pass
        else:
            if belongs_to(obj, current):
                self._missing_since.pop(name, None)
                return
        await self.client.delete(self.resource, name, uid=uid or None)
        self._missing_since.pop(name, None)
        log.info("deleted orphaned ResourceSlice", extra={"resourceSlice": name, "node": node})

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch nodes and slices, then reconcile until cancelled; `started` once synced."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.nodes.run)
            tg.start_soon(self.slices.run)
            await self.nodes.synced.wait()
            await self.slices.synced.wait()
            # Slices queued before the node cache was filled are simply looked at again.
            for obj in self.slices.items():
                self.queue.add(str((obj.get("metadata") or {}).get("name", "")))
            task_status.started()
            await self.queue.run_workers(self.reconcile, workers=2, on_result=self.on_result)
