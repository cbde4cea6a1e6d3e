# SPDX-License-Identifier: Apache-2.0
"""NxDriver on real files, without an API server: start-up repair of the
state directory, the prepare/unprepare paths that need no API call
(claims already in the checkpoint, claim references refused up front), the
thread the state runs in; and one batch read from the real API server."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import anyio
import pytest

from controller.kube.client import ApiClient
from controller.kube.resources import PODS, resource_kinds
from kubeletplugin import state as state_module
from kubeletplugin.cdi import claim_spec, spec_file_name, write_claim_spec
from kubeletplugin.checkpoint import (
    StateLock,
    journal_path,
    read_boot_id,
    read_state,
    save_checkpoint,
)
from kubeletplugin.claims import ClaimRef, PreparedClaim, PreparedDevice, cdi_device_id
from kubeletplugin.driver import (
    CLAIM_READ_CACHE,
    CLAIM_READ_QUORUM,
    DriverPaths,
    NxDriver,
    StateThread,
)
from tests.controller_sync import in_watch_cache
from tests.dra_objects import claim as dra_claim
from tests.dra_objects import claim_spec as dra_claim_spec
from tests.dra_objects import pod as dra_pod
from tests.harness.cluster import ControlPlane

DRIVER = "nx.device.power.ibm.com"
NODE = "node-a"
UID = "0b5a6c1e-94c1-4f5e-9d43-6e0f7f2c1a77"
OTHER_UID = "5d0c3b58-2f1e-4a5b-8c9d-0e1f2a3b4c5d"


def prepared(uid: str, name: str = "claim") -> PreparedClaim:
    return PreparedClaim(
        uid=uid,
        namespace="ns",
        name=name,
        devices=(
            PreparedDevice(
                request_names=("nx",),
                pool_name=NODE,
                device_name="nx-gzip",
                cdi_device_ids=(cdi_device_id(uid, "nx-gzip"),),
                credits=1,
                env={"NX_DRA_CREDITS": "1"},
            ),
        ),
    )


def new_driver(paths: DriverPaths, claim_read: str = CLAIM_READ_CACHE) -> NxDriver:
    # No API client: every test here must get by without one.
    return NxDriver(
        None,
        driver=DRIVER,
        node_name=NODE,
        paths=paths,
        device_names=lambda: {"nx-gzip"},
        health=list,
        claim_read=claim_read,
    )


def with_prepared(paths: DriverPaths, *claims: PreparedClaim) -> NxDriver:
    """A started driver whose checkpoint and specs hold `claims`."""
    save_checkpoint(paths.checkpoint, {c.uid: c for c in claims}, read_boot_id())
    for c in claims:
        write_claim_spec(paths.cdi_root, claim_spec(c), c.uid)
    driver = new_driver(paths)
    assert driver.load_state() == []
    return driver


def spec_path(paths: DriverPaths, uid: str) -> Path:
    return paths.cdi_root / spec_file_name(uid)


def checkpoint_uids(paths: DriverPaths) -> set[str]:
    return set(read_state(paths.checkpoint))


# --- start-up ---------------------------------------------------------------------------


def test_start_removes_temporary_files_of_interrupted_writes(paths: DriverPaths) -> None:
    partial = [
        paths.plugin_dir / ".checkpoint.json.k2j4l1.tmp",
        paths.cdi_root / f".{spec_file_name(UID)}.x8d7f0.tmp",
    ]
    foreign = paths.cdi_root / ".vendor.com-gpu_abc.json.a1b2c3.tmp"
    for p in [*partial, foreign]:
        p.write_bytes(b'{"half')
    new_driver(paths).load_state()
    assert [p for p in partial if p.exists()] == []
    assert foreign.exists()  # another driver's write in progress


def test_start_removes_a_spec_the_checkpoint_does_not_know(paths: DriverPaths) -> None:
    write_claim_spec(paths.cdi_root, claim_spec(prepared(UID)), UID)
    problems = new_driver(paths).load_state()
    assert not spec_path(paths, UID).exists()
    assert any(UID in p and "not in the checkpoint" in p for p in problems)


def test_start_recreates_the_missing_spec_of_a_checkpointed_claim(paths: DriverPaths) -> None:
    claim = prepared(UID)
    save_checkpoint(paths.checkpoint, {UID: claim}, read_boot_id())
    new_driver(paths).load_state()
    assert json.loads(spec_path(paths, UID).read_text()) == claim_spec(claim)


# --- prepare and unprepare without the API -------------------------------------------------


@pytest.mark.anyio
async def test_prepare_of_a_checkpointed_claim_answers_from_the_checkpoint(
    paths: DriverPaths,
) -> None:
    driver = with_prepared(paths, prepared(UID))
    results = await driver.prepare_claims([ClaimRef("ns", UID, "claim")])
    assert results[UID].error == ""
    assert [d.cdi_device_ids for d in results[UID].devices] == [(cdi_device_id(UID, "nx-gzip"),)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "namespace,name,message",
    [
        ("ns", "", "is not a ResourceClaim name"),
        ("ns", "a/../../secrets/x", "is not a ResourceClaim name"),
        ("ns", "x" * 300, "is not a ResourceClaim name"),
        ("a/b", "claim", "is not a Kubernetes namespace name"),
    ],
)
async def test_claim_reference_the_api_cannot_have_fails_alone(
    paths: DriverPaths, namespace: str, name: str, message: str
) -> None:
    driver = with_prepared(paths, prepared(UID))
    results = await driver.prepare_claims(
        [ClaimRef("ns", UID, "claim"), ClaimRef(namespace, OTHER_UID, name)]
    )
    assert results[UID].error == ""
    assert message in results[OTHER_UID].error
    assert len(results[OTHER_UID].error) < 500
    assert not spec_path(paths, OTHER_UID).exists()


@pytest.mark.anyio
async def test_a_claim_that_cannot_be_decided_in_time_fails_alone_within_the_budget(
    paths: DriverPaths,
) -> None:
    # No API client ever arrives (the plugin is still connecting): the new claim
    # waits until the call's budget is spent, the checkpointed one answers at once.
    driver = with_prepared(paths, prepared(UID))
    results = await driver.prepare_claims(
        [ClaimRef("ns", UID, "claim"), ClaimRef("ns", OTHER_UID, "new")], budget=1.0
    )
    assert results[UID].error == ""
    assert results[OTHER_UID].error.startswith("claim ns/new: deadline exceeded: ")
    assert "waiting for the API client" in results[OTHER_UID].error
    assert not spec_path(paths, OTHER_UID).exists()


@pytest.mark.anyio
async def test_unprepare_removes_checkpoint_entry_and_spec(paths: DriverPaths) -> None:
    driver = with_prepared(paths, prepared(UID), prepared(OTHER_UID, "other"))
    assert await driver.unprepare_claims([ClaimRef("ns", UID, "claim")]) == {UID: ""}
    assert checkpoint_uids(paths) == {OTHER_UID}
    assert not spec_path(paths, UID).exists()
    assert spec_path(paths, OTHER_UID).exists()


@pytest.mark.anyio
async def test_unprepare_of_an_unknown_claim_succeeds(paths: DriverPaths) -> None:
    driver = with_prepared(paths, prepared(UID))
    assert await driver.unprepare_claims([ClaimRef("ns", OTHER_UID, "gone")]) == {OTHER_UID: ""}
    assert checkpoint_uids(paths) == {UID}


@pytest.mark.anyio
async def test_unprepare_refuses_an_unsafe_uid_and_touches_nothing(paths: DriverPaths) -> None:
    driver = with_prepared(paths, prepared(UID))
    before = sorted(p.name for p in paths.cdi_root.iterdir())
    errors = await driver.unprepare_claims([ClaimRef("ns", "../plugin/checkpoint", "x")])
    assert "is not a safe token" in errors["../plugin/checkpoint"]
    assert sorted(p.name for p in paths.cdi_root.iterdir()) == before
    assert checkpoint_uids(paths) == {UID}


# --- where a state call is made ---------------------------------------------------------------


def state_calls(driver: NxDriver) -> tuple[int, int]:
    """(calls made on the event loop, calls made in the state thread)."""
    return driver.stats["state_calls_loop"], driver.stats["state_calls_thread"]


@pytest.mark.anyio
async def test_a_state_call_waits_in_the_state_thread_while_another_instance_holds_the_lock(
    paths: DriverPaths,
) -> None:
    third = "9e8d7c6b-5a49-4382-9716-a5b4c3d2e1f0"
    driver = with_prepared(paths, prepared(UID), prepared(OTHER_UID, "other"), prepared(third))
    await driver.unprepare_claims([ClaimRef("ns", UID, "claim")])
    assert state_calls(driver) == (0, 1)  # the first write after a start: a snapshot
    await driver.unprepare_claims([ClaimRef("ns", OTHER_UID, "other")])
    assert state_calls(driver) == (1, 1)  # a free lock, a quick append: on the event loop
    other_instance = StateLock(paths.lock)
    assert other_instance.try_acquire()
    async with anyio.create_task_group() as tg:
        answer: dict[str, str] = {}

        async def unprepare_third() -> None:
            answer.update(await driver.unprepare_claims([ClaimRef("ns", third, "claim")]))

        tg.start_soon(unprepare_third)
        with anyio.fail_after(5):
            while state_calls(driver) != (1, 2):
                await anyio.sleep(0.001)
        # The event loop goes on while the call waits for the lock in the thread.
        assert spec_path(paths, third).exists()
        other_instance.release()
    assert answer == {third: ""}
    assert not spec_path(paths, third).exists()
    assert checkpoint_uids(paths) == set()


@pytest.mark.anyio
async def test_a_state_call_after_a_slow_write_is_made_in_the_state_thread(
    paths: DriverPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = with_prepared(paths, prepared(UID), prepared(OTHER_UID, "other"))
    await driver.unprepare_claims([ClaimRef("ns", UID, "claim")])  # a snapshot: the thread
    monkeypatch.setattr(state_module, "QUICK_COMMIT_SECONDS", 0.0)  # every write is slow
    assert await driver.unprepare_claims([ClaimRef("ns", OTHER_UID, "other")]) == {OTHER_UID: ""}
    assert state_calls(driver) == (0, 2)
    assert checkpoint_uids(paths) == set()


# --- with claims read from the API server ---------------------------------------------------


def journal_lines(paths: DriverPaths) -> int:
    return journal_path(paths.checkpoint).read_bytes().count(b"\n")


async def allocated_claim(
    api: ApiClient, ns: str, name: str, *, reserved: bool = False
) -> ClaimRef:
    """A claim with an allocation on our node's `nx-gzip`, as the scheduler leaves it
    (`reserved`: and reserved for a pod that uses it, as it is when the kubelet asks).

    The pod exists and stays pending (no scheduler of its name runs): the
    controller-manager removes a reservation for a pod that does not exist."""
    res = resource_kinds("v1")["ResourceClaim"]
    created = await api.create(res, dra_claim(ns, name, dra_claim_spec({"nx": DRIVER})))
    created["status"] = {
        "allocation": {
            "devices": {
                "results": [{"request": "nx", "driver": DRIVER, "pool": NODE, "device": "nx-gzip"}]
            }
        }
    }
    if reserved:
        manifest = dra_pod(ns, f"{name}-pod", NODE, claims={"nx": name})
        manifest["spec"]["schedulerName"] = "nobody"
        consumer = await api.create(PODS, manifest)
        created["status"]["reservedFor"] = [
            {"resource": "pods", "name": f"{name}-pod", "uid": consumer["metadata"]["uid"]}
        ]
    await api.replace(res, created, subresource="status")
    return ClaimRef(ns, created["metadata"]["uid"], name)


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_batch_of_new_claims_is_written_in_one_state_record(
    paths: DriverPaths, control_plane: ControlPlane, api: ApiClient, unique_name: str
) -> None:
    control_plane.create_namespace(unique_name)
    refs = [await allocated_claim(api, unique_name, f"c{i}") for i in range(3)]
    driver = with_prepared(paths, prepared(UID))
    driver.set_client(api)
    await driver.unprepare_claims([ClaimRef("ns", UID, "claim")])  # a journal to count lines in
    before = journal_lines(paths)
    results = await driver.prepare_claims(refs)
    assert {uid: r.error for uid, r in results.items()} == {r.uid: "" for r in refs}
    assert journal_lines(paths) == before + 1
    assert checkpoint_uids(paths) == {r.uid for r in refs}
    assert all(spec_path(paths, r.uid).exists() for r in refs)


async def prepare_one(driver: NxDriver, api: ApiClient, ref: ClaimRef) -> None:
    assert driver.load_state() == []
    driver.set_client(api)
    results = await driver.prepare_claims([ref])
    assert results[ref.uid].error == ""
    assert spec_path(driver.paths, ref.uid).exists()


@pytest.mark.cluster
@pytest.mark.anyio
@pytest.mark.parametrize(
    "case",
    [
        # (reserved for a pod, --claim-read, (reads from the cache, reads from etcd))
        (True, CLAIM_READ_CACHE, (1, 0)),
        # Allocated but reserved for nobody: what a cache that trails etcd shows.
        (False, CLAIM_READ_CACHE, (0, 1)),
        (True, CLAIM_READ_QUORUM, (0, 1)),
    ],
    ids=["reserved-from-the-cache", "not-reserved-read-again-from-etcd", "quorum-mode-etcd-only"],
)
async def test_where_prepare_reads_a_claim(
    paths: DriverPaths,
    control_plane: ControlPlane,
    api: ApiClient,
    unique_name: str,
    case: tuple[bool, str, tuple[int, int]],
) -> None:
    reserved, claim_read, reads = case
    control_plane.create_namespace(unique_name)
    ref = await allocated_claim(api, unique_name, "c", reserved=reserved)
    if reserved:
        await in_watch_cache(
            api,
            resource_kinds("v1")["ResourceClaim"],
            ref.name,
            ref.namespace,
            until=lambda claim: bool(claim.get("status", {}).get("reservedFor")),
        )
    driver = new_driver(paths, claim_read)
    await prepare_one(driver, api, ref)
    assert (driver.stats["claim_reads_cache"], driver.stats["claim_reads_etcd"]) == reads


def test_an_unknown_claim_read_mode_is_refused_naming_the_modes(paths: DriverPaths) -> None:
    with pytest.raises(ValueError, match="claim read 'fast': must be one of cache, quorum"):
        new_driver(paths, claim_read="fast")


# --- the state thread ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_state_calls_run_in_order_and_a_cancelled_callers_call_completes() -> None:
    thread = StateThread()
    done: list[str] = []
    started, go_on = threading.Event(), threading.Event()

    def first() -> None:
        started.set()
        go_on.wait()
        done.append("first")

    def second() -> str:
        done.append("second")
        return "second"

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(thread.run, first)
            await anyio.to_thread.run_sync(started.wait)
            scope.cancel()  # the caller gives up while its call runs
    go_on.set()
    assert await thread.run(second) == "second"
    assert done == ["first", "second"]


@pytest.mark.anyio
async def test_a_state_call_that_fails_raises_in_its_caller() -> None:
    def boom() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        await StateThread().run(boom)
