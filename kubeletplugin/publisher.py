# SPDX-License-Identifier: Apache-2.0
"""Publishes this node's pool of NX-gzip devices as ResourceSlices.

Level-triggered: one reconcile compares the slices we want with the slices
the watch shows and converges. A deleted or edited slice (the kubelet deletes
its node's slices when it starts) is restored as soon as the watch reports
it; a restart adopts the slices already there instead of re-creating them,
so the scheduler never sees the pool vanish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio

from controller.kube.backoff import BackoffPolicy, retry, retryable_api_error
from controller.kube.client import ApiClient
from controller.kube.errors import AlreadyExists, NotFound
from controller.kube.informer import Informer
from controller.kube.resources import NODES, Resource, resource_kinds
from controller.kube.workqueue import WorkQueue
from kubeletplugin.slices import (
    Device,
    build_pool_slices,
    server_dropped_multi_allocation,
    slice_needs_update,
)

from .devices import DeviceOptions, build_devices
from .discovery import Inventory

log = logging.getLogger(__name__)

POOL_KEY = "pool"
# Reaching the API server and reading the Node at start: 0.2 s doubling up to 10 s.
CONNECT_BACKOFF = BackoffPolicy(initial=0.2, cap=10.0)


def _node_missing_or_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, NotFound) or retryable_api_error(exc)


def _generation(obj: dict[str, Any]) -> int:
    return int(((obj.get("spec") or {}).get("pool") or {}).get("generation") or 0)


class SlicePublisher:
    """Keeps the node's ResourceSlices equal to what discovery found."""

    def __init__(
        self,
        client: ApiClient,
        *,
        driver: str,
        node_name: str,
        options: DeviceOptions,
        inventory: Inventory,
        on_mode_change: Callable[[str], None] | None = None,
        held_credits: Callable[[], int] | None = None,
    ) -> None:
        self.client = client
        self.driver = driver
        self.node_name = node_name
        self.options = options
        self.inventory = inventory
        self.generation = 1
        self.node_uid: str | None = None
        self.api_version = "v1"
        self.informer: Informer | None = None
        self.queue = WorkQueue("slices", base_delay=0.05, max_delay=30.0)
        self.published = anyio.Event()
        self.reconciles = 0
        self._multi_allocation_probed = False
        self._on_mode_change = on_mode_change
        self._held_credits = held_credits or (lambda: 0)
        self._devices: tuple[Inventory, DeviceOptions, int, list[Device]] | None = None
        # Why the slice is not published yet ("" once it is, or before the first try).
        self.waiting_for = "connecting to the API server"

    @property
    def devices(self) -> list[Device]:
        """The devices of the current inventory in the current mode."""
        inventory, options, held = self.inventory, self.options, self._held_credits()
        cached = self._devices
        # Asked for on every prepare of a new claim: built again only when its inputs change.
        if (
            cached is None
            or cached[0] is not inventory
            or cached[1] is not options
            or cached[2] != held
        ):
            cached = self._devices = (
                inventory,
                options,
                held,
                build_devices(inventory, options, held),
            )
        return list(cached[3])

    def held_credits_changed(self) -> None:
        """Credits held outside our slice changed (claims adopted from IBM's driver)."""
        log.info(
            "credits held by claims of IBM's device changed, republishing",
            extra={"node": self.node_name, "held": self._held_credits()},
        )
        self.queue.add(POOL_KEY)

    def update_inventory(self, inventory: Inventory) -> bool:
        """Take a rediscovered inventory; True (and a reconcile queued) when it changed."""
        if inventory == self.inventory:
            return False
        old_devices = self.devices
        self.inventory = inventory
        if self.devices != old_devices:
            log.info(
                "NX-gzip inventory changed, republishing",
                extra={"node": self.node_name, "devices": [d.name for d in self.devices]},
            )
        self.queue.add(POOL_KEY)
        return True

    async def _connect(self) -> None:
        """The served API version and the Node's UID, retried with backoff while the
        API server is unreachable (or the Node not created yet): the kubelet is served
        meanwhile, and prepare of claims already in the checkpoint needs no API at all."""
        self.api_version = await retry(
            self.client.resource_api_version, CONNECT_BACKOFF, on_retry=self._unreachable
        )
        self.node_uid = await retry(
            self._node_uid,
            CONNECT_BACKOFF,
            retryable=_node_missing_or_unreachable,
            on_retry=self._node_not_readable,
        )

    async def _node_uid(self) -> str:
        node = await self.client.get(NODES, self.node_name)
        return str(node["metadata"]["uid"])

    def _unreachable(self, exc: BaseException, delay: float) -> None:
        self.waiting_for = f"the API server, unreachable: {exc}"
        log.warning(
            "API server unreachable, retrying",
            extra={"node": self.node_name, "error": str(exc), "retryIn": delay},
        )

    def _node_not_readable(self, exc: BaseException, delay: float) -> None:
        if not isinstance(exc, NotFound):
            self._unreachable(exc, delay)
            return
        self.waiting_for = f"the Node object {self.node_name} (owner of the slices)"
        log.warning(
            "Node object not found yet; slices need it as owner (is --node-name right?)",
            extra={"node": self.node_name, "retryIn": delay},
        )

    def _ours(self) -> dict[str, dict[str, Any]]:
        assert self.informer is not None
        return {
            obj["metadata"]["name"]: obj
            for obj in self.informer.items()
            if (obj.get("spec") or {}).get("driver") == self.driver
            and (obj.get("spec") or {}).get("nodeName") == self.node_name
        }

    def _desired(self) -> list[dict[str, Any]]:
        return build_pool_slices(
            self.driver,
            self.node_name,
            self.node_uid,
            self.devices,
            generation=self.generation,
            api_version=self.api_version,
        )

    async def reconcile(self) -> None:
        """Converge the node's slices; raises to be retried by the queue."""
        self.reconciles += 1
        slices = resource_kinds(self.api_version)["ResourceSlice"]
        actual = self._ours()
        actual_gen = max((_generation(o) for o in actual.values()), default=0)
        self.generation = max(self.generation, actual_gen)
        desired = self._desired()
        desired_names = {d["metadata"]["name"] for d in desired}
        changed = [
            d
            for d in desired
            if d["metadata"]["name"] in actual
            and slice_needs_update(d, actual[d["metadata"]["name"]])
        ]
        extra = [o for n, o in actual.items() if n not in desired_names]
        missing = [d for d in desired if d["metadata"]["name"] not in actual]
        if not (changed or extra or missing):
            self.waiting_for = ""
            self.published.set()
            return
        if await self._server_would_drop_multi_allocation(slices, desired):
            self._fall_back_to_slots()
            self.queue.add(POOL_KEY)
            return
        if changed or extra:
            # Content changes: a new generation tells the scheduler which slices are current.
            self.generation = max(self.generation, actual_gen) + 1
            desired = self._desired()
        for want in desired:
            name = want["metadata"]["name"]
            have = actual.get(name)
            if have is not None and not slice_needs_update(want, have):
                continue
            result = await self._write(slices, want, have)
            if self.options.mode == "shared" and server_dropped_multi_allocation(want, result):
                self._fall_back_to_slots()
                self.queue.add(POOL_KEY)
                return
        for obj in extra:
            log.info("deleting slice no longer desired", extra={"slice": obj["metadata"]["name"]})
            await self.client.delete(
                slices, obj["metadata"]["name"], uid=obj["metadata"].get("uid")
            )
        log.info(
            "published node slices",
            extra={
                "node": self.node_name,
                "generation": self.generation,
                "slices": len(desired),
                "devices": [d.name for d in self.devices],
                "mode": self.options.mode,
                "apiVersion": self.api_version,
            },
        )
        self.waiting_for = ""
        self.published.set()

    async def _server_would_drop_multi_allocation(
        self, slices: Resource, desired: list[dict[str, Any]]
    ) -> bool:
        """Ask once, by a dry-run create, whether the server keeps allowMultipleAllocations.

        Knowing before the first write matters on a restart: without it, a plugin
        on a server lacking consumable capacity would replace the slot devices
        claims are allocated from with one exclusive `nx-gzip` device, then fall
        back and write the slots again (two generations, and a pool the scheduler
        may allocate the wrong device from in between).
        """
        if (
            self.options.mode != "shared"
            or self._multi_allocation_probed
            or not any(d.allow_multiple_allocations for d in self.devices)
        ):
            return False
        probe = dict(desired[0])
        probe["metadata"] = {
            key: value for key, value in desired[0]["metadata"].items() if key != "name"
        }
        probe["metadata"]["generateName"] = f"{desired[0]['metadata']['name']}-probe-"
        answer = await self.client.request(
            "POST",
            slices.path(),
            params={"dryRun": "All"},
            body=probe,
            what=f"dry-run create ResourceSlice for node {self.node_name}",
        )
        self._multi_allocation_probed = True
        return server_dropped_multi_allocation(desired[0], answer)

    async def _write(
        self, slices: Resource, want: dict[str, Any], have: dict[str, Any] | None
    ) -> dict[str, Any]:
        if have is None:
            try:
                return await self.client.create(slices, want)
            except AlreadyExists:
                have = await self.client.get(slices, want["metadata"]["name"])
        body = dict(want)
        body["metadata"] = {
            **want["metadata"],
            "resourceVersion": have["metadata"]["resourceVersion"],
        }
        # Keep labels and owners others added; ours are merged over them.
        meta = have.get("metadata") or {}
        body["metadata"]["labels"] = {**(meta.get("labels") or {}), **want["metadata"]["labels"]}
        return await self.client.replace(slices, body)

    def _fall_back_to_slots(self) -> None:
        log.warning(
            "the API server dropped allowMultipleAllocations from our slice (consumable "
            "capacity is off: Kubernetes < 1.36 or DRAConsumableCapacity disabled); "
            "falling back to slot mode: one exclusive device per credit",
            extra={"node": self.node_name, "maxSlots": self.options.max_slots},
        )
        self.options = replace(self.options, mode="slots")
        if self._on_mode_change is not None:
            self._on_mode_change("slots")

    def _on_slice_change(self, key: str, old: Any, new: Any) -> None:
        self.queue.add(POOL_KEY)

    async def run(self, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish and keep publishing until cancelled."""
        await self._connect()
        self.waiting_for = "the first list of this node's slices"
        slices = resource_kinds(self.api_version)["ResourceSlice"]
        self.informer = Informer(
            self.client,
            slices,
            field_selector=f"spec.nodeName={self.node_name},spec.driver={self.driver}",
        )
        self.informer.add_handler(self._on_slice_change)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.informer.run)
            await self.informer.synced.wait()
            self.queue.add(POOL_KEY)

            async def reconcile(_key: str) -> None:
                await self.reconcile()

            tg.start_soon(self.queue.run_workers, reconcile, 1)
            task_status.started()
