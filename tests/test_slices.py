# SPDX-License-Identifier: Apache-2.0
"""Specification of the device model's API shapes and of a node pool's ResourceSlices."""

from __future__ import annotations

import copy
import re
from fractions import Fraction
from typing import Any

import pytest

from kubeletplugin.slices import (
    API_VERSIONS,
    MAX_OBJECT_NAME_LENGTH,
    Capacity,
    Device,
    JsonObject,
    RequestPolicy,
    SemVer,
    api_to_device,
    build_pool_slices,
    device_to_api,
    parse_quantity,
    server_dropped_multi_allocation,
    slice_name,
    slice_needs_update,
)

DRIVER = "nx.device.power.ibm.com"
NODE = "p10-node-1"
NODE_UID = "5f1c2d3e-0000-4000-8000-000000000001"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

SHARED = Device(
    name="nx-gzip",
    attributes={
        "platform": "powervm",
        "reqMaxProcessedLen": 1048576,
        "secure": False,
        "driverVersion": SemVer("0.1.0"),
    },
    capacity={"credits": Capacity(1000, RequestPolicy(default=1, min=1, step=1))},
    allow_multiple_allocations=True,
)
SLOT = Device(
    name="nx-gzip-0", attributes={"platform": "powernv"}, capacity={"credits": Capacity(1)}
)

SHARED_FIELDS_API = {
    "attributes": {
        "driverVersion": {"version": "0.1.0"},
        "platform": {"string": "powervm"},
        "reqMaxProcessedLen": {"int": 1048576},
        "secure": {"bool": False},
    },
    "capacity": {
        "credits": {
            "value": "1000",
            "requestPolicy": {"default": "1", "validRange": {"min": "1", "step": "1"}},
        }
    },
    "allowMultipleAllocations": True,
}


def slots(count: int) -> list[Device]:
    return [Device(name=f"nx-gzip-{i}", capacity={"credits": Capacity(1)}) for i in range(count)]


def canonical_quantity(text: str) -> str:
    """What the API server writes back for an integer quantity (1000 -> "1k")."""
    value = int(text)
    for suffix, factor in (("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9)):
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    for suffix, factor in (("M", 10**6), ("k", 10**3)):
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    return text


def as_server_returns(obj: JsonObject, *, drop_consumable_capacity: bool = False) -> JsonObject:
    """A slice as read back: server metadata, canonical quantities, extra fields, maybe drops."""
    out = copy.deepcopy(obj)
    out["metadata"].update(
        uid="0a0a0a0a-1111-4222-8333-444444444444",
        resourceVersion="4711",
        generation=1,
        creationTimestamp="2025-01-01T00:00:00Z",
        managedFields=[{"manager": "power-dra-driver", "operation": "Apply"}],
    )
    out["metadata"].setdefault("labels", {})["team"] = "storage"
    for dev in out["spec"]["devices"]:
        fields = dev.get("basic", dev)
        fields["futureField"] = {"defaulted": True}
        if drop_consumable_capacity:
            fields.pop("allowMultipleAllocations", None)
        for cap in fields.get("capacity", {}).values():
            cap["value"] = canonical_quantity(cap["value"])
            if drop_consumable_capacity:
                cap.pop("requestPolicy", None)
    return out


def one_slice(devices: list[Device], api_version: str = "v1", generation: int = 1) -> JsonObject:
    (only,) = build_pool_slices(
        DRIVER, NODE, NODE_UID, devices, generation=generation, api_version=api_version
    )
    return only


# --- device shapes ----------------------------------------------------------


@pytest.mark.parametrize("api_version", ["v1", "v1beta2"])
def test_v1_and_v1beta2_put_device_fields_at_device_level(api_version: str) -> None:
    assert device_to_api(SHARED, api_version) == {"name": "nx-gzip", **SHARED_FIELDS_API}


def test_v1beta1_wraps_device_fields_in_basic() -> None:
    assert device_to_api(SHARED, "v1beta1") == {"name": "nx-gzip", "basic": SHARED_FIELDS_API}


def test_exclusive_device_has_no_multi_allocation_flag_and_no_request_policy() -> None:
    assert device_to_api(SLOT, "v1") == {
        "name": "nx-gzip-0",
        "attributes": {"platform": {"string": "powernv"}},
        "capacity": {"credits": {"value": "1"}},
    }


def test_bool_attribute_is_not_published_as_int() -> None:
    dev = Device(name="d", attributes={"flag": True})
    assert device_to_api(dev, "v1")["attributes"] == {"flag": {"bool": True}}


def test_device_without_attributes_or_capacity_is_just_a_name() -> None:
    assert device_to_api(Device(name="d"), "v1beta1") == {"name": "d", "basic": {}}


def test_request_policy_max_is_published_when_set() -> None:
    dev = Device(
        name="d",
        capacity={"credits": Capacity(8, RequestPolicy(default=2, min=1, max=4))},
        allow_multiple_allocations=True,
    )
    assert device_to_api(dev, "v1")["capacity"]["credits"]["requestPolicy"] == {
        "default": "2",
        "validRange": {"min": "1", "max": "4"},
    }


@pytest.mark.parametrize("api_version", API_VERSIONS)
@pytest.mark.parametrize("device", [SHARED, SLOT, Device(name="bare")], ids=lambda d: d.name)
def test_device_round_trips_through_every_api_version(device: Device, api_version: str) -> None:
    assert api_to_device(device_to_api(device, api_version), api_version) == device


def test_device_converts_between_api_versions_without_loss() -> None:
    via_beta1 = api_to_device(device_to_api(SHARED, "v1beta1"), "v1beta1")
    via_beta2 = api_to_device(device_to_api(via_beta1, "v1beta2"), "v1beta2")
    assert device_to_api(via_beta2, "v1") == device_to_api(SHARED, "v1")


def test_reading_a_device_accepts_canonical_quantities() -> None:
    raw = {"name": "d", "capacity": {"credits": {"value": "1k"}}}
    assert api_to_device(raw, "v1").capacity["credits"] == Capacity(1000)


def test_reading_a_device_ignores_fields_outside_our_model() -> None:
    raw = {"name": "d", "taints": [], "bindsToNode": False, "attributes": {"a": {"int": 1}}}
    assert api_to_device(raw, "v1") == Device(name="d", attributes={"a": 1})


@pytest.mark.parametrize(
    "attribute",
    [{"ints": [1, 2]}, {"int": 1, "string": "x"}, {}, {"int": "1"}, {"version": "not-semver"}],
)
def test_reading_a_device_rejects_attribute_values_we_never_publish(attribute: Any) -> None:
    with pytest.raises(ValueError):
        api_to_device({"name": "d", "attributes": {"a": attribute}}, "v1")


def test_reading_a_device_rejects_fractional_capacity() -> None:
    with pytest.raises(ValueError, match="whole number"):
        api_to_device({"name": "d", "capacity": {"credits": {"value": "1500m"}}}, "v1")


@pytest.mark.parametrize("api_version", ["v1alpha3", "v2", ""])
def test_unknown_api_versions_are_refused(api_version: str) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        device_to_api(SLOT, api_version)


# --- the Device model itself ---------------------------------------------------


@pytest.mark.parametrize("name", ["", "NX-gzip", "nx_gzip", "-nx", "nx-", "a" * 64, "nx\n"])
def test_device_name_must_be_a_dns_label(name: str) -> None:
    with pytest.raises(ValueError, match="DNS label"):
        Device(name=name)


@pytest.mark.parametrize("attr", ["1abc", "with-dash", "a" * 33, "Bad_Domain/x", "/x"])
def test_attribute_names_must_be_c_identifiers_or_qualified(attr: str) -> None:
    with pytest.raises(ValueError, match="attribute name"):
        Device(name="d", attributes={attr: 1})


def test_qualified_attribute_names_are_accepted() -> None:
    assert Device(name="d", attributes={"nx.device.power.ibm.com/model": "p10"}).attributes


def test_string_attributes_longer_than_64_characters_are_refused() -> None:
    with pytest.raises(ValueError, match="64"):
        Device(name="d", attributes={"s": "x" * 65})


@pytest.mark.parametrize("text", ["0.1", "v1.0.0", "1.0.0.0", "01.0.0", "0.1.0.dev0", "0.1.0\n"])
def test_semver_attributes_refuse_non_semver_text(text: str) -> None:
    with pytest.raises(ValueError, match="semantic version"):
        SemVer(text)


@pytest.mark.parametrize("text", ["0.1.0", "1.2.3-rc.1", "1.2.3+build.5", "10.20.30-alpha-1"])
def test_semver_attributes_accept_semver_text(text: str) -> None:
    assert str(SemVer(text)) == text


def test_device_mappings_are_frozen_copies() -> None:
    attributes: dict[str, int | str | bool | SemVer] = {"a": 1}
    dev = Device(name="d", attributes=attributes)
    attributes["a"] = 2
    assert dev.attributes["a"] == 1
    with pytest.raises(TypeError):
        dev.attributes["a"] = 3  # type: ignore[index]


# --- quantities -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20", Fraction(20)),
        ("1k", Fraction(1000)),
        ("2M", Fraction(2_000_000)),
        ("1Ki", Fraction(1024)),
        ("1Mi", Fraction(1048576)),
        ("1e3", Fraction(1000)),
        ("1500m", Fraction(3, 2)),
        ("0.5", Fraction(1, 2)),
        ("+7", Fraction(7)),
        (12, Fraction(12)),
        ("1.5Ki", Fraction(1536)),
        ("-1500m", Fraction(-3, 2)),
        ("2k", Fraction(2000)),
        (".5", Fraction(1, 2)),
    ],
)
def test_quantities_parse_to_their_exact_value(text: str | int, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text", ["", "k", "1kk", "1 k", "abc", "1Ki2", "0x10", "1e999999999", ".", "e3", "1.2.3"]
)
def test_malformed_quantities_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


# --- slices of a pool -----------------------------------------------------------


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_small_pool_is_one_complete_slice(api_version: str) -> None:
    assert one_slice([SHARED], api_version, generation=3) == {
        "apiVersion": f"resource.k8s.io/{api_version}",
        "kind": "ResourceSlice",
        "metadata": {
            "name": f"{NODE}-nx-gzip-0",
            "labels": {"app.kubernetes.io/managed-by": "power-dra-driver"},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": NODE,
                    "uid": NODE_UID,
                    "controller": True,
                }
            ],
        },
        "spec": {
            "driver": DRIVER,
            "pool": {"name": NODE, "generation": 3, "resourceSliceCount": 1},
            "nodeName": NODE,
            "devices": [device_to_api(SHARED, api_version)],
        },
    }


def test_128_devices_fit_in_one_slice() -> None:
    slices = build_pool_slices(DRIVER, NODE, NODE_UID, slots(128), generation=1, api_version="v1")
    assert [len(s["spec"]["devices"]) for s in slices] == [128]


def test_129_devices_are_split_over_two_slices_of_one_pool() -> None:
    slices = build_pool_slices(DRIVER, NODE, NODE_UID, slots(129), generation=5, api_version="v1")
    assert [len(s["spec"]["devices"]) for s in slices] == [128, 1]
    assert [s["metadata"]["name"] for s in slices] == [f"{NODE}-nx-gzip-0", f"{NODE}-nx-gzip-1"]
    assert all(
        s["spec"]["pool"] == {"name": NODE, "generation": 5, "resourceSliceCount": 2}
        for s in slices
    )


def test_split_slices_keep_device_order_and_lose_none() -> None:
    devices = slots(300)
    slices = build_pool_slices(DRIVER, NODE, NODE_UID, devices, generation=1, api_version="v1")
    published = [d["name"] for s in slices for d in s["spec"]["devices"]]
    assert published == [d.name for d in devices]


def test_a_smaller_slice_size_can_be_chosen() -> None:
    slices = build_pool_slices(
        DRIVER, NODE, NODE_UID, slots(5), generation=1, api_version="v1", max_devices_per_slice=2
    )
    assert [len(s["spec"]["devices"]) for s in slices] == [2, 2, 1]


@pytest.mark.parametrize("size", [0, 129])
def test_slice_size_beyond_the_api_limit_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_devices_per_slice"):
        build_pool_slices(
            DRIVER,
            NODE,
            NODE_UID,
            slots(1),
            generation=1,
            api_version="v1",
            max_devices_per_slice=size,
        )


def test_a_pool_without_devices_is_one_empty_slice() -> None:
    slices = build_pool_slices(DRIVER, NODE, NODE_UID, [], generation=2, api_version="v1")
    assert len(slices) == 1
    assert slices[0]["spec"]["devices"] == []
    assert slices[0]["spec"]["pool"]["resourceSliceCount"] == 1


def test_duplicate_device_names_in_a_pool_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        build_pool_slices(DRIVER, NODE, NODE_UID, [SLOT, SLOT], generation=1, api_version="v1")


def test_negative_generation_is_refused() -> None:
    with pytest.raises(ValueError, match="generation"):
        build_pool_slices(DRIVER, NODE, NODE_UID, [SLOT], generation=-1, api_version="v1")


def test_slices_without_a_node_uid_have_no_owner() -> None:
    (only,) = build_pool_slices(DRIVER, NODE, None, [SLOT], generation=1, api_version="v1")
    assert "ownerReferences" not in only["metadata"]


def test_slices_do_not_share_mutable_metadata() -> None:
    first, second = build_pool_slices(
        DRIVER, NODE, NODE_UID, slots(3), generation=1, api_version="v1", max_devices_per_slice=2
    )
    first["metadata"]["labels"]["x"] = "y"
    first["metadata"]["ownerReferences"][0]["uid"] = "other"
    assert "x" not in second["metadata"]["labels"]
    assert second["metadata"]["ownerReferences"][0]["uid"] == NODE_UID


# --- slice names ----------------------------------------------------------------


def test_slice_name_is_node_name_driver_part_and_index() -> None:
    assert slice_name("worker-3.example.com", 7) == "worker-3.example.com-nx-gzip-7"


def test_slice_name_of_a_very_long_node_fits_and_is_a_dns_subdomain() -> None:
    node = ".".join(["a" * 60, "b" * 60, "c" * 60, "d" * 60])[:253]
    name = slice_name(node, 12)
    assert len(name) <= MAX_OBJECT_NAME_LENGTH
    assert DNS_SUBDOMAIN.match(name)
    assert name.endswith("-nx-gzip-12")


def test_slice_names_of_long_nodes_with_a_common_prefix_differ() -> None:
    common = "n" * 250
    assert slice_name(common + "-aa", 0) != slice_name(common + "-bb", 0)


def test_slice_name_cut_at_a_dot_stays_a_dns_subdomain() -> None:
    for cut in range(225, 245):
        node = ("x" * cut + "." + "y" * 252)[:253]
        assert DNS_SUBDOMAIN.match(slice_name(node, 0)), cut


def test_slice_name_is_deterministic() -> None:
    node = "z" * 253
    assert slice_name(node, 1) == slice_name(node, 1)


# --- desired vs actual --------------------------------------------------------------


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_a_slice_as_written_needs_no_update(api_version: str) -> None:
    desired = one_slice([SHARED], api_version)
    assert not slice_needs_update(desired, copy.deepcopy(desired))


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_server_metadata_defaults_and_canonical_quantities_need_no_update(
    api_version: str,
) -> None:
    desired = one_slice([SHARED, *slots(3)], api_version)
    actual = as_server_returns(desired)
    assert (
        actual["spec"]["devices"][0].get("basic", actual["spec"]["devices"][0])["capacity"][
            "credits"
        ]["value"]
        == "1k"
    )
    assert not slice_needs_update(desired, actual)


def test_a_slice_read_back_in_another_api_version_needs_no_update() -> None:
    desired = one_slice([SHARED], "v1")
    assert not slice_needs_update(desired, as_server_returns(one_slice([SHARED], "v1beta1")))


def test_device_order_on_the_server_does_not_matter() -> None:
    desired = one_slice(slots(3))
    actual = copy.deepcopy(desired)
    actual["spec"]["devices"].reverse()
    assert not slice_needs_update(desired, actual)


def test_changed_generation_needs_update() -> None:
    assert slice_needs_update(one_slice([SHARED], generation=2), one_slice([SHARED], generation=1))


def test_changed_attribute_needs_update() -> None:
    other = Device(
        name=SHARED.name,
        attributes={**SHARED.attributes, "reqMaxProcessedLen": 65536},
        capacity=SHARED.capacity,
        allow_multiple_allocations=True,
    )
    assert slice_needs_update(one_slice([SHARED]), one_slice([other]))


def test_changed_capacity_needs_update() -> None:
    other = Device(
        name=SHARED.name,
        attributes=SHARED.attributes,
        capacity={"credits": Capacity(999, RequestPolicy(default=1, min=1, step=1))},
        allow_multiple_allocations=True,
    )
    assert slice_needs_update(one_slice([SHARED]), one_slice([other]))


def test_added_or_removed_device_needs_update() -> None:
    assert slice_needs_update(one_slice(slots(2)), one_slice(slots(3)))
    assert slice_needs_update(one_slice(slots(3)), one_slice(slots(2)))


def test_renamed_device_needs_update() -> None:
    assert slice_needs_update(one_slice([SHARED]), one_slice(slots(1)))


def test_missing_managed_by_label_needs_update() -> None:
    desired = one_slice([SHARED])
    actual = copy.deepcopy(desired)
    del actual["metadata"]["labels"]
    assert slice_needs_update(desired, actual)


def test_missing_node_owner_reference_needs_update() -> None:
    desired = one_slice([SHARED])
    actual = copy.deepcopy(desired)
    actual["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "an-older-node-uid"}
    ]
    assert slice_needs_update(desired, actual)


def test_owner_references_added_by_others_need_no_update() -> None:
    desired = one_slice([SHARED])
    actual = copy.deepcopy(desired)
    actual["metadata"]["ownerReferences"].append(
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}
    )
    assert not slice_needs_update(desired, actual)


def test_other_node_name_needs_update() -> None:
    desired = one_slice([SHARED])
    actual = copy.deepcopy(desired)
    actual["spec"]["nodeName"] = "another-node"
    assert slice_needs_update(desired, actual)


def test_explicit_false_multi_allocation_needs_update() -> None:
    desired = one_slice([SHARED])
    actual = copy.deepcopy(desired)
    actual["spec"]["devices"][0]["allowMultipleAllocations"] = False
    assert slice_needs_update(desired, actual)


def test_device_values_we_cannot_read_need_update() -> None:
    desired = one_slice([SLOT])
    actual = copy.deepcopy(desired)
    actual["spec"]["devices"][0]["attributes"]["platform"] = {"strings": ["a", "b"]}
    assert slice_needs_update(desired, actual)


def test_object_without_spec_needs_update() -> None:
    desired = one_slice([SLOT])
    assert slice_needs_update(desired, {"metadata": desired["metadata"]})


# --- servers without consumable capacity ------------------------------------------


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_dropped_multi_allocation_is_detected(api_version: str) -> None:
    desired = one_slice([SHARED], api_version)
    actual = as_server_returns(desired, drop_consumable_capacity=True)
    assert server_dropped_multi_allocation(desired, actual)


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_dropped_multi_allocation_alone_needs_no_update(api_version: str) -> None:
    # Writing again would be dropped again; the caller falls back to slots instead.
    desired = one_slice([SHARED], api_version)
    actual = as_server_returns(desired, drop_consumable_capacity=True)
    assert not slice_needs_update(desired, actual)


def test_dropped_multi_allocation_does_not_hide_other_changes() -> None:
    desired = one_slice([SHARED], generation=2)
    actual = as_server_returns(one_slice([SHARED], generation=1), drop_consumable_capacity=True)
    assert slice_needs_update(desired, actual)


def test_kept_multi_allocation_is_not_reported_as_dropped() -> None:
    desired = one_slice([SHARED])
    assert not server_dropped_multi_allocation(desired, as_server_returns(desired))


def test_exclusive_devices_are_never_reported_as_dropped() -> None:
    desired = one_slice(slots(4))
    actual = as_server_returns(desired, drop_consumable_capacity=True)
    assert not server_dropped_multi_allocation(desired, actual)


def test_a_device_missing_on_the_server_is_not_reported_as_dropped() -> None:
    desired = one_slice([SHARED])
    actual = copy.deepcopy(desired)
    actual["spec"]["devices"] = []
    assert not server_dropped_multi_allocation(desired, actual)
