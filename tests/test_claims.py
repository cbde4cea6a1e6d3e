# SPDX-License-Identifier: Apache-2.0
"""Which results and configs of an allocated claim are ours, and what they become."""

from __future__ import annotations

from typing import Any

import pytest

from controller.nx.allocation import quantity_to_credits  # the one parser of both processes
from controller.nx.nxconfig import API_VERSION, KIND
from kubeletplugin.claims import (
    CDI_KIND,
    ClaimError,
    ClaimRef,
    PreparedClaim,
    PreparedDevice,
    build_prepared_claim,
    check_claim,
    our_results,
    reserved_here,
    validate_claim_ref,
    validate_claim_uid,
)

DRIVER = "nx.device.power.ibm.com"
POOL = "node-a"
UID = "4f1c2d3e-0000-4000-8000-00000000abcd"


def result(
    request: str = "nx",
    device: str = "nx-gzip",
    driver: str = DRIVER,
    pool: str = POOL,
    **extra: Any,
) -> dict[str, Any]:
    return {"request": request, "driver": driver, "pool": pool, "device": device, **extra}


def opaque(
    parameters: Any,
    source: str = "FromClaim",
    requests: list[str] | None = None,
    driver: str = DRIVER,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "source": source,
        "opaque": {"driver": driver, "parameters": parameters},
    }
    if requests is not None:
        entry["requests"] = requests
    return entry


def nx(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, **fields}


def make_claim(
    results: list[dict[str, Any]] | None = None,
    config: list[dict[str, Any]] | None = None,
    uid: str = UID,
    allocated: bool = True,
) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "default", "name": "x", "uid": uid},
        "spec": {"devices": {"requests": []}},
    }
    if allocated:
        devices: dict[str, Any] = {"results": results if results is not None else [result()]}
        if config is not None:
            devices["config"] = config
        claim["status"] = {"allocation": {"devices": devices}}
    return claim


# --- claim UIDs ---------------------------------------------------------------------------


@pytest.mark.parametrize("uid", [UID, "a", "abc_DEF-123", "x" * 128])
def test_uuid_like_claim_uids_are_accepted(uid: str) -> None:
    validate_claim_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "/", "..", "a/b", "../etc", ".hidden", "a b", "a.b", "-a", "a-", "x" * 129, "é"]
)
def test_claim_uids_unsafe_in_file_names_are_rejected(uid: str) -> None:
    with pytest.raises(ClaimError, match="not a safe token"):
        validate_claim_uid(uid)


# --- check_claim --------------------------------------------------------------------------


def test_an_allocated_claim_with_the_asked_uid_passes() -> None:
    assert check_claim(make_claim(), ClaimRef("default", UID, "x")) is None


def test_a_uid_mismatch_means_the_claim_was_recreated() -> None:
    error = check_claim(make_claim(uid="other"), ClaimRef("default", UID, "x"))
    assert error is not None
    assert error.startswith("claim default/x: the API has UID other")
    assert "re-created" in error


def test_an_answer_without_uid_is_not_called_a_re_created_claim() -> None:
    answer = {"message": "not a claim"}
    error = check_claim(answer, ClaimRef("default", UID, "x"))
    assert error is not None and "carries no UID" in error
    assert "re-created" not in error


@pytest.mark.parametrize(("namespace", "name"), [("evil\nns", "x"), ("default", "x\nINFO y")])
def test_names_with_newlines_are_escaped_in_the_error_text(namespace: str, name: str) -> None:
    with pytest.raises(ClaimError) as caught:
        validate_claim_ref(ClaimRef(namespace, UID, name))
    assert "\n" not in str(caught.value)
    assert "\\n" in str(caught.value)


def test_an_unallocated_claim_cannot_be_prepared() -> None:
    error = check_claim(make_claim(allocated=False), ClaimRef("default", UID, "x"))
    assert error == (
        "claim default/x: not allocated; the scheduler must allocate it before prepare"
    )


# --- reserved_here: whether a copy from the API server's watch cache will do -----------------


def reserved(claim: dict[str, Any]) -> dict[str, Any]:
    if "status" in claim:
        claim["status"]["reservedFor"] = [{"resource": "pods", "name": "p", "uid": "pod-uid"}]
    return claim


def test_a_copy_allocated_here_and_reserved_will_do() -> None:
    assert reserved_here(reserved(make_claim()), ClaimRef("default", UID, "x"), DRIVER, POOL)


@pytest.mark.parametrize(
    ("claim", "why"),
    [
        (make_claim(), "not reserved for a consumer yet"),
        (reserved(make_claim(allocated=False)), "not allocated yet"),
        (reserved(make_claim(uid="other")), "an older claim of the same name"),
        (reserved(make_claim(results=[result(pool="node-b")])), "allocated on another node"),
        (reserved(make_claim(results=[result(driver="gpu.example.com")])), "another driver's"),
        ({"message": "not a claim"}, "not a claim"),
    ],
)
def test_a_copy_the_kubelet_would_not_have_asked_for_is_read_again(
    claim: dict[str, Any], why: str
) -> None:
    assert not reserved_here(claim, ClaimRef("default", UID, "x"), DRIVER, POOL), why


# --- our_results --------------------------------------------------------------------------


def test_results_of_other_drivers_are_skipped() -> None:
    ours = result(request="a")
    claim = make_claim([result(driver="gpu.example.com"), ours])
    assert our_results(claim, DRIVER, POOL) == [ours]


def test_results_in_other_pools_are_skipped() -> None:
    ours = result(request="a")
    claim = make_claim([result(pool="node-b"), ours])
    assert our_results(claim, DRIVER, POOL) == [ours]


def test_our_results_keep_allocation_order() -> None:
    first, second = result(device="nx-gzip-1"), result(device="nx-gzip-0")
    assert our_results(make_claim([first, second]), DRIVER, POOL) == [first, second]


def test_an_unallocated_claim_has_no_results() -> None:
    assert our_results(make_claim(allocated=False), DRIVER, POOL) == []


# --- quantities ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "credits"),
    [("4", 4), ("0", 0), ("1k", 1000), ("2Ki", 2048), ("1500m", 2), ("2e1", 20), (3, 3)],
)
def test_consumed_capacity_quantities_become_whole_credits(quantity: Any, credits: int) -> None:
    assert quantity_to_credits(quantity) == credits


@pytest.mark.parametrize("quantity", ["-1", "abc", "", "1 k", True, None, 1.5])
def test_malformed_quantities_are_rejected(quantity: Any) -> None:
    with pytest.raises(ValueError):
        quantity_to_credits(quantity)


# --- build_prepared_claim -----------------------------------------------------------------


def test_a_slot_device_is_prepared_with_one_credit_and_its_cdi_id() -> None:
    prepared = build_prepared_claim(
        make_claim([result(device="nx-gzip-0")]), DRIVER, POOL, ["nx-gzip-0", "nx-gzip-1"]
    )
    assert prepared == PreparedClaim(
        uid=UID,
        namespace="default",
        name="x",
        devices=(
            PreparedDevice(
                request_names=("nx",),
                pool_name=POOL,
                device_name="nx-gzip-0",
                cdi_device_ids=(f"{CDI_KIND}={UID}-nx-gzip-0",),
                credits=1,
                env={
                    "NX_DRA_CLAIM": "default/x",
                    "NX_DRA_CREDITS": "1",
                    "NX_DRA_DEVICES": "nx-gzip-0",
                    "NX_GZIP_LOGFILE": "/dev/stderr",
                },
            ),
        ),
    )


def test_a_shared_device_counts_the_consumed_credits() -> None:
    claim = make_claim([result(consumedCapacity={"credits": "4"}, shareID="s-1")])
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.credits == 4
    assert device.env["NX_DRA_CREDITS"] == "4"


def test_requests_sharing_one_device_become_one_cdi_device() -> None:
    claim = make_claim(
        [
            result(request="a", consumedCapacity={"credits": "2"}),
            result(request="b", consumedCapacity={"credits": "3"}),
        ]
    )
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.request_names == ("a", "b")
    assert device.credits == 5
    assert device.cdi_device_ids == (f"{CDI_KIND}={UID}-nx-gzip",)


def test_every_device_tells_the_claims_total_share() -> None:
    claim = make_claim([result(device="nx-gzip-0"), result(request="b", device="nx-gzip-1")])
    prepared = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip-0", "nx-gzip-1"])
    for device in prepared.devices:
        assert device.env["NX_DRA_CREDITS"] == "2"
        assert device.env["NX_DRA_DEVICES"] == "nx-gzip-0,nx-gzip-1"


def test_other_drivers_results_are_not_prepared() -> None:
    claim = make_claim([result(driver="gpu.example.com", device="gpu-0"), result()])
    prepared = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])
    assert [d.device_name for d in prepared.devices] == ["nx-gzip"]


def test_a_claim_config_overrides_its_class_config() -> None:
    claim = make_claim(
        config=[
            opaque(nx(verbose=2), source="FromClaim"),
            opaque(nx(verbose=1, trace=8), source="FromClass"),
        ]
    )
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.env["NX_GZIP_VERBOSE"] == "2"
    assert device.env["NX_GZIP_TRACE"] == "8"


def test_a_config_for_one_request_leaves_other_requests_devices_alone() -> None:
    claim = make_claim(
        [result(request="a", device="nx-gzip-0"), result(request="b", device="nx-gzip-1")],
        config=[opaque(nx(typeSelector="nx"), requests=["b"])],
    )
    first, second = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip-0", "nx-gzip-1"]).devices
    assert "NX_GZIP_TYPE_SELECTOR" not in first.env
    assert second.env["NX_GZIP_TYPE_SELECTOR"] == "2"


def test_a_config_for_a_main_request_reaches_the_allocated_subrequest() -> None:
    claim = make_claim(
        [result(request="req/small")], config=[opaque(nx(strategy="fixed"), requests=["req"])]
    )
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.env["NX_GZIP_STRATEGY"] == "0"


def test_a_config_for_a_request_name_prefix_does_not_reach_the_subrequest() -> None:
    claim = make_claim(
        [result(request="req/small")], config=[opaque(nx(strategy="fixed"), requests=["re"])]
    )
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert "NX_GZIP_STRATEGY" not in device.env


def test_config_entries_without_opaque_parameters_are_skipped() -> None:
    claim = make_claim(config=[{"source": "FromClaim"}, opaque(nx(verbose=2))])
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.env["NX_GZIP_VERBOSE"] == "2"


def test_a_subrequest_result_is_reported_under_its_parent_request() -> None:
    # The kubelet matches containers' resources.claims[].request against the
    # parent name; `req/small` would leave the container without the device.
    claim = make_claim([result(request="req/small")])
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.request_names == ("req",)


def test_a_config_for_one_subrequest_applies_only_when_that_subrequest_was_allocated() -> None:
    config = [opaque(nx(strategy="fixed"), requests=["req/big"])]
    small = make_claim([result(request="req/small")], config=config)
    big = make_claim([result(request="req/big")], config=config)
    (got_small,) = build_prepared_claim(small, DRIVER, POOL, ["nx-gzip"]).devices
    (got_big,) = build_prepared_claim(big, DRIVER, POOL, ["nx-gzip"]).devices
    assert "NX_GZIP_STRATEGY" not in got_small.env
    assert got_big.env["NX_GZIP_STRATEGY"] == "0"


def test_the_allocations_share_id_is_kept_for_the_kubelet() -> None:
    claim = make_claim([result(shareID="7f3c0f4e-1111-4222-8333-444455556666")])
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.share_id == "7f3c0f4e-1111-4222-8333-444455556666"


def test_an_unshared_device_has_no_share_id() -> None:
    (device,) = build_prepared_claim(make_claim([result()]), DRIVER, POOL, ["nx-gzip"]).devices
    assert device.share_id == ""
    assert "shareID" not in device.to_dict()  # entries stay readable by older plugins


def test_share_id_survives_the_checkpoint_form() -> None:
    claim = make_claim([result(shareID="s-1")])
    prepared = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])
    assert PreparedClaim.from_dict(prepared.to_dict()) == prepared


def test_a_device_missing_from_the_inventory_fails_the_claim() -> None:
    claim = make_claim([result(device="nx-gzip-7")])
    with pytest.raises(ClaimError) as excinfo:
        build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])
    assert str(excinfo.value).startswith(
        "claim default/x: device nx-gzip-7 is not on this node (inventory: nx-gzip)"
    )


def test_an_invalid_config_fails_the_claim_naming_entry_and_field() -> None:
    claim = make_claim(config=[opaque(nx()), opaque(nx(verbose="x"))])
    with pytest.raises(ClaimError) as excinfo:
        build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])
    message = str(excinfo.value)
    assert message.startswith("claim default/x: invalid opaque config")
    assert "status.allocation.devices.config[1], FromClaim" in message
    assert 'parameters.verbose: must be an integer 0..255, got "x"' in message
    assert "fix it in the claim" in message


def test_an_invalid_class_config_points_at_the_device_class() -> None:
    claim = make_claim(config=[opaque({"kind": "NxConfig"}, source="FromClass")])
    with pytest.raises(ClaimError, match="fix it in the DeviceClass"):
        build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])


def test_an_invalid_config_fails_even_when_it_targets_no_device_here() -> None:
    claim = make_claim(config=[opaque(nx(bogus=1), requests=["elsewhere"])])
    with pytest.raises(ClaimError, match=r"parameters\.bogus"):
        build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])


def test_other_drivers_configs_are_not_validated() -> None:
    claim = make_claim(config=[opaque({"whatever": True}, driver="gpu.example.com")])
    build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])


def test_an_unallocated_claim_fails_to_build() -> None:
    with pytest.raises(ClaimError, match=r"^claim default/x: not allocated"):
        build_prepared_claim(make_claim(allocated=False), DRIVER, POOL, ["nx-gzip"])


def test_an_unsafe_uid_fails_to_build() -> None:
    with pytest.raises(ClaimError, match=r"^claim default/x: claim UID '\.\./x'"):
        build_prepared_claim(make_claim(uid="../x"), DRIVER, POOL, ["nx-gzip"])


def test_a_claim_allocated_in_another_nodes_pool_fails_to_build() -> None:
    claim = make_claim([result(pool="node-b")])
    with pytest.raises(ClaimError) as excinfo:
        build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])
    assert "this node's pool node-a (allocated in pools node-b)" in str(excinfo.value)


def test_unreadable_consumed_capacity_fails_the_claim() -> None:
    claim = make_claim([result(consumedCapacity={"credits": "lots"})])
    with pytest.raises(ClaimError, match="unreadable consumedCapacity"):
        build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"])


def test_a_v1beta1_claim_is_read_the_same_way() -> None:
    claim = make_claim(config=[opaque(nx(verbose=1))])
    claim["apiVersion"] = "resource.k8s.io/v1beta1"
    (device,) = build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip"]).devices
    assert device.env["NX_GZIP_VERBOSE"] == "1"


# --- serialization ------------------------------------------------------------------------


def sample_prepared() -> PreparedClaim:
    claim = make_claim(
        [result(request="a", device="nx-gzip-0"), result(request="b", device="nx-gzip-1")],
        config=[opaque(nx(verbose=1))],
    )
    return build_prepared_claim(claim, DRIVER, POOL, ["nx-gzip-0", "nx-gzip-1"])


def test_a_prepared_claim_survives_a_dict_round_trip() -> None:
    prepared = sample_prepared()
    assert PreparedClaim.from_dict(prepared.to_dict()) == prepared


def test_the_dict_form_uses_camel_case_keys() -> None:
    device = sample_prepared().to_dict()["devices"][0]
    assert set(device) == {
        "requestNames",
        "poolName",
        "deviceName",
        "cdiDeviceIds",
        "credits",
        "env",
    }


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.update(uid="../x"),
        lambda d: d.update(devices="nx-gzip"),
        lambda d: d.pop("namespace"),
        lambda d: d["devices"][0].update(credits=True),
        lambda d: d["devices"][0].update(credits=-1),
        lambda d: d["devices"][0].update(env={"A": 1}),
        lambda d: d["devices"][0].update(requestNames="a"),
    ],
)
def test_a_malformed_dict_is_rejected(damage: Any) -> None:
    data = sample_prepared().to_dict()
    damage(data)
    with pytest.raises(ValueError):
        PreparedClaim.from_dict(data)


def test_the_ref_names_the_claim_as_the_kubelet_does() -> None:
    ref = sample_prepared().ref
    assert ref == ClaimRef("default", UID, "x")
    assert str(ref) == "default/x"
