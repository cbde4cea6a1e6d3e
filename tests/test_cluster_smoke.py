# SPDX-License-Identifier: Apache-2.0
"""The harness is real: a control plane that serves DRA and allocates devices,
and the API layer / informer work against it."""

from __future__ import annotations

import json
import signal
import time
import uuid
from typing import Any

import anyio
import pytest

from controller.kube.client import ApiClient
from controller.kube.errors import AlreadyExists, Conflict, Forbidden, NotFound
from controller.kube.informer import Informer
from controller.kube.kubeconfig import ClusterConfig
from controller.kube.resources import NODES, resource_kinds
from tests.controller_sync import in_watch_cache
from tests.harness.cluster import ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]

DRIVER = "smoke.example.com"


def _slice(name: str, node: str, devices: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name, "labels": {"test": "smoke"}},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": f"dev-{i}"} for i in range(devices)],
        },
    }


async def test_api_serves_resource_v1_and_it_is_chosen(api: ApiClient) -> None:
    served = await api.served_versions("resource.k8s.io")
    assert {"v1", "v1beta1", "v1beta2"} <= set(served)
    assert await api.resource_api_version() == "v1"


async def test_api_errors_are_typed(api: ApiClient, unique_name: str) -> None:
    slices = resource_kinds("v1")["ResourceSlice"]
    with pytest.raises(NotFound, match="get ResourceSlice does-not-exist"):
        await api.get(slices, "does-not-exist")
    created = await api.create(slices, _slice(unique_name, "nowhere"))
    with pytest.raises(AlreadyExists):
        await api.create(slices, _slice(unique_name, "nowhere"))
    stale = dict(created)
    stale["metadata"] = {**created["metadata"], "resourceVersion": "1"}
    with pytest.raises(Conflict):
        await api.replace(slices, stale)
    assert await api.delete(slices, unique_name) is not None
    assert await api.delete(slices, unique_name) is None  # already gone: fine


async def test_api_forbidden_for_an_unprivileged_identity(
    api: ApiClient, control_plane: ControlPlane
) -> None:
    # A node identity may not list cluster-wide claims: the Node authorizer and RBAC say no.
    node_cfg = ClusterConfig(
        server=control_plane.server,
        ca_file=str(control_plane.ca_file),
        token=control_plane.tokens["system:node:node-7"],
    )
    async with ApiClient(node_cfg) as node_api:
        with pytest.raises(Forbidden):
            await node_api.list(resource_kinds("v1")["DeviceClass"], limit=1)
            await node_api.create(NODES, {"metadata": {"name": "not-me"}})


async def test_a_get_from_the_cache_is_answered_while_etcd_is_stopped(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    # What `from_cache` buys: the watch cache answers without a quorum read of etcd
    # (which would wait for the stopped etcd until fail_after ends the test).
    slices = resource_kinds("v1")["ResourceSlice"]
    created = await api.create(slices, _slice(unique_name, "nowhere"))
    await in_watch_cache(api, slices, unique_name)
    etcd = control_plane.processes["etcd"].popen
    etcd.send_signal(signal.SIGSTOP)
    try:
        with anyio.fail_after(20):
            cached = await api.get(slices, unique_name, from_cache=True)
    finally:
        etcd.send_signal(signal.SIGCONT)
    assert cached["metadata"]["uid"] == created["metadata"]["uid"]
    await api.delete(slices, unique_name)


async def test_server_side_apply_of_plain_dicts(api: ApiClient, unique_name: str) -> None:
    classes = resource_kinds("v1")["DeviceClass"]
    obj = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": unique_name, "labels": {"a": "1"}},
        "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRIVER}'"}}]},
    }
    first = await api.apply(classes, obj, field_manager="smoke")
    assert first["metadata"]["labels"] == {"a": "1"}
    obj["metadata"]["labels"] = {"a": "2"}
    second = await api.apply(classes, obj, field_manager="smoke")
    assert second["metadata"]["labels"] == {"a": "2"}
    managers = [m["manager"] for m in second["metadata"]["managedFields"]]
    assert managers == ["smoke"]
    await api.delete(classes, unique_name)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None]] = []

    def __call__(self, key: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        kind = "added" if old is None else "deleted" if new is None else "updated"
        version = None if new is None else str(new["spec"]["pool"]["generation"])
        self.events.append((kind, key, version))

    def for_key(self, key: str) -> list[tuple[str, str, str | None]]:
        return [e for e in self.events if e[1] == key]


async def _wait_for(pred: Any, timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.02)


async def _bump(api: ApiClient, name: str, generation: int) -> None:
    slices = resource_kinds("v1")["ResourceSlice"]
    current = await api.get(slices, name)
    current["spec"]["pool"]["generation"] = generation
    await api.replace(slices, current)


async def test_informer_sees_create_update_delete_in_order(
    api: ApiClient, unique_name: str
) -> None:
    slices = resource_kinds("v1")["ResourceSlice"]
    informer = Informer(api, slices, label_selector="test=smoke")
    rec = Recorder()
    informer.add_handler(rec)
    async with anyio.create_task_group() as tg:
        tg.start_soon(informer.run)
        await informer.synced.wait()
        await api.create(slices, _slice(unique_name, "n1"))
        await _bump(api, unique_name, 2)
        await api.delete(slices, unique_name)
        await _wait_for(lambda: ("deleted", unique_name, None) in rec.events)
        tg.cancel_scope.cancel()
    assert rec.for_key(unique_name) == [
        ("added", unique_name, "1"),
        ("updated", unique_name, "2"),
        ("deleted", unique_name, None),
    ]
    assert informer.get(unique_name) is None


async def test_informer_relists_on_410_without_losing_or_duplicating(
    api: ApiClient, unique_name: str
) -> None:
    slices = resource_kinds("v1")["ResourceSlice"]
    keep, gone, new = f"{unique_name}-keep", f"{unique_name}-gone", f"{unique_name}-new"
    await api.create(slices, _slice(keep, "n1"))
    await api.create(slices, _slice(gone, "n1"))
    informer = Informer(api, slices, label_selector="test=smoke")
    rec = Recorder()
    informer.add_handler(rec)
    await informer.relist()
    assert informer.relists == 1
    # While nobody watches: one update, one delete, one create.
    await _bump(api, keep, 5)
    await api.delete(slices, gone)
    await api.create(slices, _slice(new, "n1"))
    # An expired resourceVersion: the server answers 410 Gone and the informer re-lists.
    informer.resource_version = "1"
    async with anyio.create_task_group() as tg:
        tg.start_soon(informer.run)
        await _wait_for(lambda: informer.relists >= 2)
        await _wait_for(lambda: informer.get(new) is not None)
        tg.cancel_scope.cancel()
    assert rec.for_key(keep) == [("added", keep, "1"), ("updated", keep, "5")]
    assert rec.for_key(gone) == [("added", gone, "1"), ("deleted", gone, None)]
    assert rec.for_key(new) == [("added", new, "1")]
    for name in (keep, new):
        await api.delete(slices, name)


async def test_informer_resumes_after_apiserver_restart(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    slices = resource_kinds("v1")["ResourceSlice"]
    informer = Informer(api, slices, label_selector="test=smoke", max_backoff=1.0)
    rec = Recorder()
    informer.add_handler(rec)
    async with anyio.create_task_group() as tg:
        tg.start_soon(informer.run)
        await informer.synced.wait()
        await anyio.to_thread.run_sync(control_plane.restart_apiserver)
        await api.create(slices, _slice(unique_name, "n1"))
        await _wait_for(lambda: informer.get(unique_name) is not None, timeout=30)
        tg.cancel_scope.cancel()
    assert rec.for_key(unique_name) == [("added", unique_name, "1")]
    await api.delete(slices, unique_name)


def test_scheduler_allocates_a_claim_from_a_hand_made_slice(
    control_plane: ControlPlane, unique_name: str
) -> None:
    node = f"{unique_name}-node"
    control_plane.create_node(node)
    ns = unique_name
    control_plane.create_namespace(ns)
    driver = f"{uuid.uuid4().hex[:8]}.smoke.example.com"
    sl = _slice(f"{unique_name}-slice", node)
    sl["spec"]["driver"] = driver
    objects: list[dict[str, Any]] = [
        sl,
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": driver},
            "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{driver}'"}}]},
        },
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": "tmpl", "namespace": ns},
            "spec": {
                "spec": {
                    "devices": {
                        "requests": [{"name": "dev", "exactly": {"deviceClassName": driver}}]
                    }
                }
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": ns},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "containers": [
                    {"name": "c", "image": "busybox", "resources": {"claims": [{"name": "d"}]}}
                ],
                "resourceClaims": [{"name": "d", "resourceClaimTemplateName": "tmpl"}],
            },
        },
    ]
    control_plane.apply(objects)
    deadline = time.monotonic() + 30
    claim: dict[str, Any] = {}
    while time.monotonic() < deadline:
        items = json.loads(
            control_plane.kubectl("get", "resourceclaims", "-n", ns, "-o", "json").stdout
        )["items"]
        if items and items[0].get("status", {}).get("allocation"):
            claim = items[0]
            break
        time.sleep(0.2)
    assert claim, "claim was not created and allocated within 30 s"
    results = claim["status"]["allocation"]["devices"]["results"]
    assert [(r["driver"], r["pool"], r["device"]) for r in results] == [(driver, node, "dev-0")]
    pod = json.loads(control_plane.kubectl("get", "pod", "p", "-n", ns, "-o", "json").stdout)
    assert pod["spec"].get("nodeName") == node
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")
