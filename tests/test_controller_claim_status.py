# SPDX-License-Identifier: Apache-2.0
"""Claims allocated to our driver: configs checked, `status.devices` written, Events on errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from controller.claim_status import (
    DRIVER,
    ClaimStatusController,
    config_notes,
    config_problem,
    current_entries,
    desired_entries,
    entries_match,
    involves_driver,
    result_credits,
    status_apply_body,
)
from controller.kube.client import ApiClient
from controller.kube.errors import Invalid
from controller.kube.resources import EVENTS, resource_kinds
from tests.controller_sync import cache_current, settled
from tests.harness.cluster import ControlPlane
from tests.test_leader import restricted_config

NX = {"apiVersion": "nx.device.power.ibm.com/v1alpha1", "kind": "NxConfig"}
OTHER = "other.example.com"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SHARE = "9f2a7c1e-0000-4000-8000-000000000001"
IBM_DEVICE = "cryptonxgzip"


def _claim(configs: list[Any], results: list[Any], devices: list[Any] | None = None) -> Any:
    status: dict[str, Any] = {
        "allocation": {"devices": {"results": results, "config": configs}},
    }
    if devices is not None:
        status["devices"] = devices
    return {
        "metadata": {"name": "c", "namespace": "ns", "uid": "u-1", "generation": 1},
        "status": status,
    }


def _ours(device: str = "nx-gzip", credits: str | None = "3", share: str | None = SHARE) -> Any:
    result: dict[str, Any] = {"driver": DRIVER, "pool": "n1", "device": device, "request": "nx"}
    if credits is not None:
        result["consumedCapacity"] = {"credits": credits}
    if share:
        result["shareID"] = share
    return result


def _config(params: Any, driver: str = DRIVER, source: str = "FromClaim") -> Any:
    return {"source": source, "requests": [], "opaque": {"driver": driver, "parameters": params}}


IBM_NX = {"apiVersion": "device.power.ibm.com/v1alpha1", "kind": "NxConfig"}

# --- what the entries say -----------------------------------------------------------------


def test_a_valid_allocation_gets_a_ready_entry_with_its_credits() -> None:
    claim = _claim([_config({**NX, "verbose": 1})], [_ours()])
    entries, problem = desired_entries(claim, NOW)
    assert problem is None
    assert entries == [
        {
            "driver": DRIVER,
            "pool": "n1",
            "device": "nx-gzip",
            "shareID": SHARE,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "ConfigValid",
                    "message": "opaque config valid (or none); 3 credits allocated",
                    "lastTransitionTime": "2026-01-02T03:04:05Z",
                    "observedGeneration": 1,
                }
            ],
            "data": {"credits": 3},
        }
    ]


def test_an_unreadable_consumed_capacity_is_not_ready_like_the_plugin_says() -> None:
    # The plugin refuses such a claim; the controller must not report it Ready with 1 credit.
    from kubeletplugin.claims import ClaimError, build_prepared_claim

    claim = _claim([], [_ours(credits="lots")])
    entries, problem = desired_entries(claim, NOW)
    assert problem is not None and "unreadable consumedCapacity" in problem
    assert entries[0]["conditions"][0]["status"] == "False"
    with pytest.raises(ClaimError, match="unreadable consumedCapacity"):
        build_prepared_claim(claim, DRIVER, "n1", ["nx-gzip"])


def test_a_slot_device_without_consumed_capacity_counts_one_credit() -> None:
    assert result_credits(_ours(device="nx-gzip-0", credits=None, share=None)) == 1
    assert result_credits(_ours(credits="1500m")) == 2  # fractions round up


def test_an_invalid_config_makes_every_entry_not_ready_and_names_the_field() -> None:
    claim = _claim(
        [_config({**NX, "verbose": 1}), _config({**NX, "verbos": 1})],
        [_ours(), _ours(device="nx-gzip-1", share=None)],
    )
    entries, problem = desired_entries(claim, NOW)
    assert problem is not None
    assert "status.allocation.devices.config[1] (FromClaim)" in problem
    assert "parameters.verbos: unknown field" in problem
    assert "fix it in the claim" in problem
    assert [e["conditions"][0]["status"] for e in entries] == ["False", "False"]
    assert {e["conditions"][0]["reason"] for e in entries} == {"InvalidConfig"}


def test_ibm_nxconfig_with_sharing_is_valid_and_noted_as_without_effect() -> None:
    ibm = {**IBM_NX, "sharing": {"strategy": "TimeSlicing"}}
    claim = _claim([_config(ibm, source="FromClass")], [_ours(device=IBM_DEVICE, credits=None)])
    entries, problem = desired_entries(claim, NOW)
    assert problem is None
    assert entries[0]["conditions"][0]["status"] == "True"
    notes = config_notes(claim)
    assert notes is not None
    assert notes.startswith("claim ns/c: status.allocation.devices.config[0] (FromClass): ")
    assert "parameters.sharing (TimeSlicing) has no effect" in notes
    assert "credits" in notes


def test_configs_that_all_take_effect_have_no_notes() -> None:
    assert config_notes(_claim([_config({**NX, "verbose": 1}), _config(IBM_NX)], [_ours()])) is None


def test_a_bad_class_config_is_blamed_on_the_class() -> None:
    claim = _claim([_config({**NX, "trace": 99}, source="FromClass")], [_ours()])
    problem = config_problem(claim)
    assert problem is not None and "fix it in the DeviceClass" in problem


def test_other_drivers_results_and_configs_are_not_ours() -> None:
    claim = _claim(
        [_config({"not": "an NxConfig"}, driver=OTHER)],
        [{"driver": OTHER, "pool": "p", "device": "d", "request": "o"}],
    )
    assert desired_entries(claim, NOW) == ([], None)
    assert not involves_driver(claim)


def test_results_on_the_same_device_and_share_add_up() -> None:
    claim = _claim([], [_ours(credits="2"), _ours(credits="3")])
    entries, _ = desired_entries(claim, NOW)
    assert [e["data"] for e in entries] == [{"credits": 5}]


def test_an_unchanged_condition_keeps_its_transition_time() -> None:
    claim = _claim([], [_ours()])
    first, _ = desired_entries(claim, NOW)
    claim["status"]["devices"] = first
    later, _ = desired_entries(claim, NOW + timedelta(hours=1))
    assert later == first
    assert entries_match(current_entries(claim), later)
    claim["status"]["allocation"]["devices"]["config"] = [_config({"bad": 1})]
    failed, _ = desired_entries(claim, NOW + timedelta(hours=1))
    assert failed[0]["conditions"][0]["lastTransitionTime"] == "2026-01-02T04:04:05Z"
    assert not entries_match(current_entries(claim), failed)


def test_a_deallocated_claim_wants_none_of_our_entries() -> None:
    claim = _claim([], [_ours()])
    entries, _ = desired_entries(claim, NOW)
    claim["status"] = {"devices": entries}
    assert involves_driver(claim)  # so it is looked at once more
    assert desired_entries(claim, NOW) == ([], None)
    assert not entries_match(current_entries(claim), [])


def test_the_apply_body_pins_the_claim_uid_and_carries_only_status_devices() -> None:
    claim = _claim([], [_ours()])
    body = status_apply_body(claim, [{"driver": DRIVER}], "v1")
    assert body == {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "c", "namespace": "ns", "uid": "u-1"},
        "status": {"devices": [{"driver": DRIVER}]},
    }


# --- on the server, with exactly the documented RBAC -------------------------------------


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)


def _setup(cp: ControlPlane, name: str, our_params: Any) -> None:
    """A node with our slice and another driver's, classes, a claim using both, a pod."""
    node = f"{name}-node"
    cp.create_node(node)
    cp.create_namespace(name)
    pool = {"name": node, "generation": 1, "resourceSliceCount": 1}
    shared = {
        "name": "nx-gzip",
        "allowMultipleAllocations": True,
        "capacity": {
            "credits": {
                "value": "10",
                "requestPolicy": {"default": "1", "validRange": {"min": "1", "step": "1"}},
            }
        },
    }
    slices = [
        {"driver": DRIVER, "devices": [shared], "suffix": "nx"},
        {"driver": OTHER, "devices": [{"name": "dev-0"}], "suffix": "other"},
    ]
    objects: list[dict[str, Any]] = []
    for s in slices:
        objects.append(
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceSlice",
                "metadata": {"name": f"{node}-{s['suffix']}"},
                "spec": {
                    "driver": s["driver"],
                    "nodeName": node,
                    "pool": pool,
                    "devices": s["devices"],
                },
            }
        )
        objects.append(
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": f"{name}-{s['suffix']}"},
                "spec": {
                    "selectors": [{"cel": {"expression": f"device.driver == '{s['driver']}'"}}]
                },
            }
        )
    objects.append(
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": "claim", "namespace": name},
            "spec": {
                "devices": {
                    "requests": [
                        {
                            "name": "nx",
                            "exactly": {
                                "deviceClassName": f"{name}-nx",
                                "capacity": {"requests": {"credits": "3"}},
                            },
                        },
                        {"name": "other", "exactly": {"deviceClassName": f"{name}-other"}},
                    ],
                    "config": [
                        {
                            "requests": ["nx"],
                            "opaque": {"driver": DRIVER, "parameters": our_params},
                        },
                        {
                            "requests": ["other"],
                            "opaque": {"driver": OTHER, "parameters": {"x": 1}},
                        },
                    ],
                }
            },
        }
    )
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "pod", "namespace": name},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "automountServiceAccountToken": False,
                "containers": [
                    {"name": "c", "image": "busybox", "resources": {"claims": [{"name": "d"}]}}
                ],
                "resourceClaims": [{"name": "d", "resourceClaimName": "claim"}],
            },
        }
    )
    cp.apply(objects)


def _teardown(cp: ControlPlane, name: str) -> None:
    node = f"{name}-node"
    cp.kubectl("delete", "pod", "pod", "-n", name, "--grace-period=0", "--force", check=False)
    cp.kubectl("delete", "namespace", name, "--wait=false")
    for suffix in ("nx", "other"):
        cp.kubectl("delete", "resourceslice", f"{node}-{suffix}", "--ignore-not-found")
        cp.kubectl("delete", "deviceclass", f"{name}-{suffix}", "--ignore-not-found")
    cp.kubectl("delete", "node", node, "--ignore-not-found")


async def _allocated_claim(api: ApiClient, claims: Any, ns: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def allocated() -> bool:
        found.update(await api.get(claims, "claim", ns))
        return bool(found.get("status", {}).get("allocation"))

    await _eventually(allocated)
    return found


def _entries(claim: dict[str, Any], driver: str) -> list[dict[str, Any]]:
    return [e for e in claim.get("status", {}).get("devices") or [] if e["driver"] == driver]


@pytest.mark.cluster
@pytest.mark.anyio
async def test_an_allocated_claim_gets_ready_entries_next_to_other_drivers_and_loses_them(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    ns = unique_name
    _setup(control_plane, ns, {**NX, "verbose": 1})
    try:
        claims = resource_kinds(await api.resource_api_version())["ResourceClaim"]
        claim = await _allocated_claim(api, claims, ns)
        (ours,) = [
            r for r in claim["status"]["allocation"]["devices"]["results"] if r["driver"] == DRIVER
        ]
        # The other driver reports its own device's status first.
        other_entry = {
            "driver": OTHER,
            "pool": f"{ns}-node",
            "device": "dev-0",
            "data": {"mine": True},
        }
        await api.apply(
            claims,
            {
                "apiVersion": claims.api_version,
                "kind": "ResourceClaim",
                "metadata": {"name": "claim", "namespace": ns},
                "status": {"devices": [other_entry]},
            },
            field_manager="other-driver",
            subresource="status",
        )

        # Without the resourceclaims/driver rule the status write is refused (1.36); the
        # refusal comes from validation, so it is a 422 naming the missing permission.
        denied = restricted_config(control_plane, ns, "no-driver-rule", without_driver_rule=True)
        entries, _ = desired_entries(claim, datetime.now(UTC))
        async with ApiClient(denied) as denied_api:
            with pytest.raises(Invalid, match='requires resource="resourceclaims/driver"'):
                await denied_api.apply(
                    claims,
                    status_apply_body(claim, entries, claims.version),
                    field_manager="power-dra-driver",
                    subresource="status",
                )

        config = restricted_config(control_plane, ns, "controller")
        async with ApiClient(config) as restricted, anyio.create_task_group() as tg:
            controller = ClaimStatusController(
                restricted, claims.version, reporting_instance="test"
            )
            await tg.start(controller.run)

            async def ready() -> bool:
                claim.update(await api.get(claims, "claim", ns))
                return bool(_entries(claim, DRIVER))

            await _eventually(ready)
            (entry,) = _entries(claim, DRIVER)
            assert (entry["pool"], entry["device"], entry.get("shareID")) == (
                ours["pool"],
                ours["device"],
                ours.get("shareID"),
            )
            assert entry["data"] == {"credits": 3}
            (condition,) = entry["conditions"]
            assert (condition["type"], condition["status"]) == ("Ready", "True")
            (theirs,) = _entries(claim, OTHER)
            assert theirs["data"] == {"mine": True}  # untouched

            # Deallocation: the pod goes, the claim controller clears the allocation.
            control_plane.kubectl("delete", "pod", "pod", "-n", ns, "--grace-period=0", "--force")

            async def deallocated() -> bool:
                claim.clear()
                claim.update(await api.get(claims, "claim", ns))
                return not claim.get("status", {}).get("allocation")

            await _eventually(deallocated)
            # The controller has seen the deallocated claim and finished the reconciles it
            # caused: a (wrong) write of our entries would have been made by now.
            await settled(
                controller.queue, cache_current(api, controller.informer, claims, "claim", ns)
            )
            tg.cancel_scope.cancel()
        final = await api.get(claims, "claim", ns)
        assert not final.get("status", {}).get("devices")
    finally:
        _teardown(control_plane, ns)


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_bad_nxconfig_gets_one_warning_event_naming_the_field(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    ns = unique_name
    _setup(control_plane, ns, {**NX, "verbos": 1})
    try:
        claims = resource_kinds(await api.resource_api_version())["ResourceClaim"]
        await _allocated_claim(api, claims, ns)
        config = restricted_config(control_plane, ns, "controller")

        async def warnings() -> list[dict[str, Any]]:
            listing = await api.list(EVENTS, ns)
            return [e for e in listing["items"] if e.get("reason") == "InvalidNxConfig"]

        async with ApiClient(config) as restricted:
            for round_ in range(2):  # a second controller (say, after a restart) adds nothing
                controller = ClaimStatusController(
                    restricted, claims.version, reporting_instance=f"test-{round_}"
                )
                async with anyio.create_task_group() as tg:
                    await tg.start(controller.run)

                    async def not_ready() -> bool:
                        claim = await api.get(claims, "claim", ns)
                        return bool(_entries(claim, DRIVER)) and bool(await warnings())

                    await _eventually(not_ready)
                    # Another change to the claim: reconciled again, reported once.
                    control_plane.kubectl(
                        "label",
                        "resourceclaim",
                        "claim",
                        "-n",
                        ns,
                        f"round={round_}",
                        "--overwrite",
                    )
                    await settled(
                        controller.queue,
                        cache_current(api, controller.informer, claims, "claim", ns),
                    )
                    tg.cancel_scope.cancel()

        (event,) = await warnings()
        assert event["type"] == "Warning"
        assert event["regarding"]["kind"] == "ResourceClaim"
        assert event["regarding"]["name"] == "claim"
        assert "parameters.verbos: unknown field" in event["note"]
        assert event["reportingController"] == "nx.device.power.ibm.com/controller"
        claim = await api.get(claims, "claim", ns)
        (entry,) = _entries(claim, DRIVER)
        (condition,) = entry["conditions"]
        assert (condition["status"], condition["reason"]) == ("False", "InvalidConfig")
        assert "parameters.verbos" in condition["message"]
    finally:
        _teardown(control_plane, ns)
