# SPDX-License-Identifier: Apache-2.0
"""Taking over a node from IBM's Go driver, on real files and without an API server:
its state file (format and checksum), its CDI specs, and the claims it prepared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubeletplugin.cdi import spec_file_name
from kubeletplugin.checkpoint import load_checkpoint, read_state
from kubeletplugin.claims import ClaimRef
from kubeletplugin.devices import DeviceOptions, build_devices
from kubeletplugin.discovery import discover
from kubeletplugin.driver import DriverPaths, NxDriver
from kubeletplugin.ibm_state import (
    IBM_COMMON_SPEC_FILE,
    IBM_DEVICE_NAME,
    IbmCheckpointError,
    decode_ibm_checkpoint,
    ibm_cdi_device_ids,
    ibm_checksum,
    ibm_claim_spec_file,
)
from tests.fake_sysfs import make_powervm_tree
from tests.ibm_driver_standin import encode_ibm_checkpoint, ibm_device

NODE = "node-0"
UID = "0b5f1a2c-7d3e-4f60-9a8b-1c2d3e4f5a6b"
OTHER_UID = "5d0c3b58-2f1e-4a5b-8c9d-0e1f2a3b4c5d"
IBM_ENV = (
    "NX_DEVICE=cryptonxgzip",
    "NX_DEVICE_SHARING_STRATEGY=TimeSlicing",
    "NX_DEVICE_TIMESLICE_INTERVAL=Default",
)

# Written by Go (encoding/json + the kubelet's checksum package) for these facts.
GO_CHECKPOINT = (
    b'{"checksum":2371238246,"v1":{"preparedClaims":{"0b5f1a2c-7d3e-4f60-9a8b-1c2d3e4f5a6b":'
    b'[{"request_names":["nx"],"pool_name":"node-0","device_name":"cryptonxgzip",'
    b'"cdi_device_ids":["k8s.nx.device.power.ibm.com/nx=common",'
    b'"k8s.nx.device.power.ibm.com/nx=0b5f1a2c-7d3e-4f60-9a8b-1c2d3e4f5a6b-crypto-nx-gzip"],'
    b'"ContainerEdits":{"env":["NX_DEVICE=cryptonxgzip","NX_DEVICE_SHARING_STRATEGY=TimeSlicing",'
    b'"NX_DEVICE_TIMESLICE_INTERVAL=Default"]}}]}}}'
)
GO_EMPTY_CHECKPOINT = b'{"checksum":1083090442,"v1":{}}'


# --- the state file -----------------------------------------------------------------------


def test_the_checksum_is_the_kubelet_checkpoint_managers() -> None:
    assert ibm_checksum(b'{"checksum":0,"v1":{}}') == 1083090442


def test_encoding_matches_what_go_writes_byte_for_byte() -> None:
    prepared = {UID: [ibm_device(UID, NODE, "nx", IBM_ENV)]}
    assert encode_ibm_checkpoint(prepared) == GO_CHECKPOINT
    assert encode_ibm_checkpoint({}) == GO_EMPTY_CHECKPOINT


def test_ibm_claims_decode_as_one_credit_claims_keeping_ibm_cdi_ids() -> None:
    claims = decode_ibm_checkpoint(GO_CHECKPOINT)
    (device,) = claims[UID].devices
    assert device.device_name == IBM_DEVICE_NAME
    assert device.pool_name == NODE
    assert device.request_names == ("nx",)
    assert device.cdi_device_ids == ibm_cdi_device_ids(UID)
    assert device.credits == 1
    assert decode_ibm_checkpoint(GO_EMPTY_CHECKPOINT) == {}


def test_an_ibm_claim_prepared_with_no_devices_is_not_adopted() -> None:
    data = encode_ibm_checkpoint({UID: [ibm_device(UID, NODE, "nx")], OTHER_UID: []})
    assert set(decode_ibm_checkpoint(data)) == {UID}


def test_a_reindented_ibm_file_still_verifies() -> None:
    pretty = json.dumps(json.loads(GO_CHECKPOINT), indent=2).encode()
    assert set(decode_ibm_checkpoint(pretty)) == {UID}


@pytest.mark.parametrize(
    "data",
    [
        GO_CHECKPOINT.replace(b"node-0", b"node-1"),
        GO_CHECKPOINT.replace(b"2371238246", b"2371238247"),
        b'{"checksum":1083090442,"v1":{"preparedClaims":[]}}',
        b'{"checksum":0,"v1":',
    ],
)
def test_a_damaged_ibm_file_is_refused(data: bytes) -> None:
    with pytest.raises(IbmCheckpointError):
        decode_ibm_checkpoint(data)


def test_load_adopts_ibm_claims_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    path.write_bytes(GO_CHECKPOINT)
    loaded = load_checkpoint(path, tmp_path / "cdi")
    assert set(loaded.claims) == {UID}
    assert "written by IBM's driver" in loaded.problems[0]
    assert path.read_bytes() == GO_CHECKPOINT  # the caller writes ours


def test_a_damaged_ibm_file_is_moved_aside_and_claims_rebuilt_from_ibm_specs(
    tmp_path: Path,
) -> None:
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / ibm_claim_spec_file(UID)).write_text("kind: k8s.nx.device.power.ibm.com/nx\n")
    path = tmp_path / "checkpoint.json"
    path.write_bytes(GO_CHECKPOINT.replace(b"2371238246", b"1"))
    loaded = load_checkpoint(path, cdi)
    assert not path.exists()
    assert loaded.claims[UID].devices[0].cdi_device_ids == ibm_cdi_device_ids(UID)


# --- the driver taking over ---------------------------------------------------------------


def ibm_node(paths: DriverPaths, *uids: str) -> None:
    """The files IBM's driver leaves for claims `uids` (its specs are YAML)."""
    paths.checkpoint.write_bytes(
        encode_ibm_checkpoint({u: [ibm_device(u, NODE, "nx", IBM_ENV)] for u in uids})
    )
    for name, device in [(IBM_COMMON_SPEC_FILE, "common")] + [
        (ibm_claim_spec_file(u), f"{u}-crypto-nx-gzip") for u in uids
    ]:
        spec = {
            "cdiVersion": "0.5.0",
            "kind": "k8s.nx.device.power.ibm.com/nx",
            "devices": [{"name": device, "containerEdits": {"env": ["NX_DEVICE_CLAIM=added"]}}],
        }
        (paths.cdi_root / name).write_text(yaml.safe_dump(spec))


def new_driver(paths: DriverPaths) -> NxDriver:
    return NxDriver(
        None,
        driver="nx.device.power.ibm.com",
        node_name=NODE,
        paths=paths,
        device_names=lambda: {"nx-gzip"},
        health=list,
    )


def cdi_files(paths: DriverPaths) -> set[str]:
    return {p.name for p in paths.cdi_root.iterdir()}


def test_start_replaces_ibm_state_file_with_ours_holding_its_claims(paths: DriverPaths) -> None:
    ibm_node(paths, UID, OTHER_UID)
    driver = new_driver(paths)
    problems = driver.load_state()
    assert any("IBM's driver" in p for p in problems)
    assert set(read_state(paths.checkpoint)) == {UID, OTHER_UID}
    # IBM's specs stay untouched: running containers resolve their CDI IDs through them.
    assert cdi_files(paths) == {
        IBM_COMMON_SPEC_FILE,
        ibm_claim_spec_file(UID),
        ibm_claim_spec_file(OTHER_UID),
    }
    assert driver.credits_outside_our_slice() == 2
    assert new_driver(paths).load_state() == []  # adopted once


@pytest.mark.anyio
async def test_re_prepare_of_an_adopted_claim_answers_ibm_cdi_ids(paths: DriverPaths) -> None:
    ibm_node(paths, UID)
    driver = new_driver(paths)
    driver.load_state()
    results = await driver.prepare_claims([ClaimRef("ns", UID, "claim")])
    assert results[UID].error == ""
    (device,) = results[UID].devices
    assert device.cdi_device_ids == ibm_cdi_device_ids(UID)
    assert device.device_name == IBM_DEVICE_NAME


@pytest.mark.anyio
async def test_re_prepare_after_a_reboot_recreates_ibm_specs(paths: DriverPaths) -> None:
    ibm_node(paths, UID)
    new_driver(paths).load_state()
    for p in paths.cdi_root.iterdir():  # /var/run/cdi is a tmpfs
        p.unlink()
    driver = new_driver(paths)
    problems = driver.load_state()
    assert cdi_files(paths) == {IBM_COMMON_SPEC_FILE, ibm_claim_spec_file(UID)}
    assert sum("re-created CDI spec" in p for p in problems) == 2
    spec = yaml.safe_load((paths.cdi_root / ibm_claim_spec_file(UID)).read_text())
    assert spec["devices"][0]["name"] == f"{UID}-crypto-nx-gzip"
    assert spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] == "/dev/crypto/nx-gzip"


@pytest.mark.anyio
async def test_unprepare_removes_ibm_claim_spec_and_the_common_one_with_the_last(
    paths: DriverPaths,
) -> None:
    ibm_node(paths, UID, OTHER_UID)
    driver = new_driver(paths)
    driver.load_state()
    changes: list[int] = []
    driver.on_outside_credits_change = lambda: changes.append(driver.credits_outside_our_slice())
    await driver.unprepare_claims([ClaimRef("ns", UID, "claim")])
    assert cdi_files(paths) == {IBM_COMMON_SPEC_FILE, ibm_claim_spec_file(OTHER_UID)}
    await driver.unprepare_claims([ClaimRef("ns", OTHER_UID, "other")])
    assert cdi_files(paths) == set()
    assert read_state(paths.checkpoint) == {}
    assert changes == [1, 0]


def test_an_ibm_spec_of_a_claim_ibm_never_recorded_is_removed(paths: DriverPaths) -> None:
    ibm_node(paths, UID)
    (paths.cdi_root / ibm_claim_spec_file(OTHER_UID)).write_text("kind: x\n")
    problems = new_driver(paths).load_state()
    assert not (paths.cdi_root / ibm_claim_spec_file(OTHER_UID)).exists()
    assert any(ibm_claim_spec_file(OTHER_UID) in p for p in problems)


def test_an_ibm_node_without_claims_is_left_with_nothing_of_ibm(paths: DriverPaths) -> None:
    ibm_node(paths)
    new_driver(paths).load_state()
    assert cdi_files(paths) == set()
    assert read_state(paths.checkpoint) == {}


def test_our_own_specs_are_not_taken_for_ibm_ones(paths: DriverPaths) -> None:
    ibm_node(paths, UID)
    new_driver(paths).load_state()
    assert spec_file_name(UID) not in cdi_files(paths)


# --- slice accounting ---------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("shared", [2]), ("slots", [1, 1])])
def test_an_adopted_claim_holds_one_credit_or_slot_of_the_slice(
    tmp_path: Path, mode: str, expected: list[int]
) -> None:
    make_powervm_tree(tmp_path / "sys", total_credits=4)  # 3 offered: one is reserved
    node = tmp_path / "nx-gzip"
    node.touch()
    inventory = discover(tmp_path / "sys", node)
    options = DeviceOptions(driver_version="0.1.0", mode=mode)  # type: ignore[arg-type]
    assert sum(c.value for d in build_devices(inventory, options) for c in d.capacity.values()) == 3
    fewer = build_devices(inventory, options, held_credits=1)
    assert [c.value for d in fewer for c in d.capacity.values()] == expected
