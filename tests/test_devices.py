# SPDX-License-Identifier: Apache-2.0
"""Specification of the devices a node publishes in shared and slot mode."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kubeletplugin.devices import DeviceOptions, build_devices
from kubeletplugin.discovery import Inventory, NxCapabilities, NxCredits
from kubeletplugin.slices import API_VERSIONS, Capacity, RequestPolicy, SemVer, device_to_api

POWERVM = Inventory(
    platform="powervm",
    caps=NxCapabilities(
        req_max_processed_len=1048576, min_compress_len=32768, min_decompress_len=4096
    ),
    credits=NxCredits(total=240, used=17, qos_total=40, qos_used=2),
    device_node_present=True,
    processor_generation="power10",
)
POWERNV = Inventory(
    platform="powernv",
    caps=NxCapabilities(),
    credits=NxCredits(),
    device_node_present=True,
    processor_generation="power10",
)
SHARED = DeviceOptions(driver_version="0.1.0")
SLOTS = DeviceOptions(driver_version="0.1.0", mode="slots")


def with_total(total: int | None, inventory: Inventory = POWERVM) -> Inventory:
    return dataclasses.replace(inventory, credits=NxCredits(total=total))


# --- shared mode ---------------------------------------------------------------


def test_shared_mode_publishes_one_multi_allocatable_device() -> None:
    (device,) = build_devices(POWERVM, SHARED)
    assert device.name == "nx-gzip"
    assert device.allow_multiple_allocations


def test_shared_device_capacity_is_total_credits_minus_reserve_taken_one_at_a_time() -> None:
    (device,) = build_devices(POWERVM, SHARED)
    assert device.capacity == {"credits": Capacity(239, RequestPolicy(default=1, min=1, step=1))}


def test_credits_in_use_are_not_subtracted() -> None:
    # Open windows are mostly our own pods'; the scheduler already counts those.
    busy = dataclasses.replace(POWERVM, credits=NxCredits(total=240, used=239))
    (device,) = build_devices(busy, SHARED)
    assert device.capacity["credits"].value == 239


def test_shared_device_carries_every_known_attribute() -> None:
    (device,) = build_devices(POWERVM, SHARED)
    assert device.attributes == {
        "platform": "powervm",
        "processorGeneration": "power10",
        "reqMaxProcessedLen": 1048576,
        "minCompressLen": 32768,
        "minDecompressLen": 4096,
        "qosCredits": 40,
        "driverVersion": SemVer("0.1.0"),
    }


def test_unknown_values_are_left_out_of_the_attributes() -> None:
    (device,) = build_devices(dataclasses.replace(POWERNV, processor_generation=None), SHARED)
    assert device.attributes == {"platform": "powernv", "driverVersion": SemVer("0.1.0")}


def test_zero_qos_credits_are_still_published() -> None:
    inventory = dataclasses.replace(POWERVM, credits=NxCredits(total=240, qos_total=0))
    (device,) = build_devices(inventory, SHARED)
    assert device.attributes["qosCredits"] == 0


def test_the_reserve_is_configurable() -> None:
    (device,) = build_devices(POWERVM, dataclasses.replace(SHARED, reserved_credits=40))
    assert device.capacity["credits"].value == 200


def test_no_reserve_offers_every_credit() -> None:
    (device,) = build_devices(POWERVM, dataclasses.replace(SHARED, reserved_credits=0))
    assert device.capacity["credits"].value == 240


def test_a_one_credit_device_has_no_step() -> None:
    # The API server rejects min + step > capacity.
    (device,) = build_devices(with_total(2), SHARED)
    assert device.capacity == {"credits": Capacity(1, RequestPolicy(default=1, min=1, step=None))}


def test_a_two_credit_device_has_a_step() -> None:
    (device,) = build_devices(with_total(3), SHARED)
    policy = device.capacity["credits"].request_policy
    assert policy is not None and policy.step == 1


@pytest.mark.parametrize("total", [0, 1])
def test_no_credits_left_after_the_reserve_means_no_device(total: int) -> None:
    assert build_devices(with_total(total), SHARED) == []


def test_reserve_above_total_means_no_device() -> None:
    assert build_devices(with_total(5), dataclasses.replace(SHARED, reserved_credits=9)) == []


def test_powernv_uses_the_fallback_credit_count() -> None:
    (device,) = build_devices(POWERNV, dataclasses.replace(SHARED, fallback_credits=64))
    assert device.capacity["credits"].value == 63


def test_default_fallback_is_twenty_credits() -> None:
    (device,) = build_devices(POWERNV, SHARED)
    assert device.capacity["credits"].value == 19


def test_powervm_with_unknown_total_uses_the_fallback_too() -> None:
    (device,) = build_devices(with_total(None), SHARED)
    assert device.capacity["credits"].value == 19


def test_zero_fallback_credits_mean_no_device() -> None:
    assert build_devices(POWERNV, dataclasses.replace(SHARED, fallback_credits=0)) == []


# --- slot mode -----------------------------------------------------------------


def test_slot_mode_publishes_exclusive_numbered_devices_capped_by_max_slots() -> None:
    devices = build_devices(POWERVM, SLOTS)
    assert [d.name for d in devices] == [f"nx-gzip-{i}" for i in range(16)]
    assert not any(d.allow_multiple_allocations for d in devices)


def test_each_slot_is_one_credit_without_request_policy() -> None:
    assert all(d.capacity == {"credits": Capacity(1)} for d in build_devices(POWERVM, SLOTS))


def test_slots_carry_the_same_attributes_as_the_shared_device() -> None:
    (shared,) = build_devices(POWERVM, SHARED)
    assert all(d.attributes == shared.attributes for d in build_devices(POWERVM, SLOTS))


def test_fewer_credits_than_max_slots_give_one_slot_per_credit() -> None:
    assert len(build_devices(with_total(6), SLOTS)) == 5


def test_max_slots_is_configurable() -> None:
    assert len(build_devices(POWERVM, dataclasses.replace(SLOTS, max_slots=200))) == 200


@pytest.mark.parametrize("total", [0, 1])
def test_slot_mode_without_credits_left_has_no_devices(total: int) -> None:
    assert build_devices(with_total(total), SLOTS) == []


# --- no NX-gzip ----------------------------------------------------------------


@pytest.mark.parametrize("options", [SHARED, SLOTS], ids=["shared", "slots"])
def test_no_device_node_means_no_devices(options: DeviceOptions) -> None:
    assert build_devices(dataclasses.replace(POWERVM, device_node_present=False), options) == []


def test_no_platform_means_no_devices() -> None:
    nothing = Inventory(
        platform=None, caps=NxCapabilities(), credits=NxCredits(), device_node_present=False
    )
    assert build_devices(nothing, SHARED) == []


# --- options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"driver_version": "0.1.0.dev1"}, "semantic version"),
        ({"driver_version": "v0.1.0"}, "semantic version"),
        ({"reserved_credits": -1}, "reserved"),
        ({"max_slots": 0}, "max slots"),
        ({"fallback_credits": -5}, "fallback"),
        ({"mode": "exclusive"}, "mode"),
    ],
)
def test_invalid_options_are_refused_with_a_clear_message(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceOptions(**{"driver_version": "0.1.0", **changes})


@pytest.mark.parametrize("api_version", API_VERSIONS)
@pytest.mark.parametrize("options", [SHARED, SLOTS], ids=["shared", "slots"])
def test_every_built_device_converts_to_every_api_version(
    options: DeviceOptions, api_version: str
) -> None:
    for device in build_devices(POWERVM, options):
        assert device_to_api(device, api_version)["name"] == device.name
