# SPDX-License-Identifier: Apache-2.0
"""Slice GC: this driver's slices of vanished nodes go after the grace period; nothing else."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from controller.kube.client import ApiClient
from controller.kube.errors import NotFound
from controller.kube.resources import NODES, resource_kinds
from controller.slice_gc import DRIVER, SliceGC, is_orphan, slice_node
from tests.controller_sync import cache_current, settled
from tests.harness.cluster import ControlPlane
from tests.test_leader import restricted_config


def _slice(name: str, node: str | None, driver: str = DRIVER, pool: str | None = None) -> Any:
    spec: dict[str, Any] = {
        "driver": driver,
        "pool": {"name": pool or node or name, "generation": 1, "resourceSliceCount": 1},
        "devices": [{"name": "nx-gzip"}],
    }
    if node:
        spec["nodeName"] = node
    else:
        spec["allNodes"] = True
    return {"metadata": {"name": name}, "spec": spec}


# --- which node a slice belongs to ----------------------------------------------------


def test_a_slice_owned_by_an_earlier_node_of_the_same_name_is_an_orphan() -> None:
    owned = _slice("s", "n1")
    owned["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "old-uid"}
    ]
    assert is_orphan(owned, {"n1": {"metadata": {"name": "n1", "uid": "new-uid"}}})
    assert not is_orphan(owned, {"n1": {"metadata": {"name": "n1", "uid": "old-uid"}}})
    # Without an owner a slice cannot tell the nodes apart: the name decides.
    assert not is_orphan(_slice("s", "n1"), {"n1": {"metadata": {"uid": "new-uid"}}})


def test_a_slice_belongs_to_its_node_name() -> None:
    assert slice_node(_slice("s", "n1", pool="other")) == "n1"


def test_a_slice_without_node_name_belongs_to_the_node_its_pool_is_named_after() -> None:
    obj = _slice("s", "n1")
    del obj["spec"]["nodeName"]
    assert slice_node(obj) == "n1"


def test_a_slice_for_all_nodes_belongs_to_no_node_and_is_never_an_orphan() -> None:
    obj = _slice("s", None)
    assert slice_node(obj) is None
    assert not is_orphan(obj, {})


def test_a_slice_is_an_orphan_only_when_its_node_is_missing() -> None:
    assert is_orphan(_slice("s", "gone"), {"n1": {}})
    assert not is_orphan(_slice("s", "n1"), {"n1": {}})


# --- on the server ----------------------------------------------------------------------


async def _exists(api: ApiClient, res: Any, name: str) -> bool:
    try:
        await api.get(res, name)
    except NotFound:
        return False
    return True


@pytest.mark.cluster
@pytest.mark.anyio
async def test_slices_of_a_deleted_node_are_deleted_after_the_grace_period_only(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    slices = resource_kinds(await api.resource_api_version())["ResourceSlice"]
    live, doomed, back = f"{unique_name}-live", f"{unique_name}-doomed", f"{unique_name}-back"
    for node in (live, doomed, back):
        control_plane.create_node(node)
    never = f"{unique_name}-never"  # a node that never existed
    ours = {
        f"{live}-s": _slice(f"{live}-s", live),
        f"{doomed}-s": _slice(f"{doomed}-s", doomed),
        f"{back}-s": _slice(f"{back}-s", back),
        f"{never}-s": _slice(f"{never}-s", never),
    }
    foreign = _slice(f"{never}-foreign", never, driver="other.example.com")
    for obj in (*ours.values(), foreign):
        await api.create(slices, obj)

    grace = 1.5
    control_plane.kubectl("create", "namespace", unique_name)
    restricted = ApiClient(restricted_config(control_plane, unique_name, "controller"))
    gc = SliceGC(restricted, slices.version, grace=grace)  # exactly the documented RBAC
    async with restricted, anyio.create_task_group() as tg:
        await tg.start(gc.run)
        started = time.monotonic()
        await api.delete(NODES, doomed)
        # Deleted and re-created within the grace period: its slice stays.
        await api.delete(NODES, back)
        control_plane.create_node(back)
        with anyio.fail_after(10):
            while await _exists(api, slices, f"{doomed}-s") or await _exists(
                api, slices, f"{never}-s"
            ):
                await anyio.sleep(0.05)
        assert time.monotonic() - started >= grace
        # The re-created node is in the GC's cache and no deadline is pending (a delayed
        # key counts as queued): the re-created node's slice was looked at and kept.
        await settled(gc.queue, cache_current(api, gc.nodes, NODES, back))
        tg.cancel_scope.cancel()
    control_plane.kubectl("delete", "namespace", unique_name, "--wait=false")

    assert await _exists(api, slices, f"{live}-s")
    assert await _exists(api, slices, f"{back}-s")
    assert await _exists(api, slices, foreign["metadata"]["name"])  # another driver's: untouched
    for name in (f"{live}-s", f"{back}-s", foreign["metadata"]["name"]):
        await api.delete(slices, name)
    for node in (live, back):
        await api.delete(NODES, node)
