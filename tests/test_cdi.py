# SPDX-License-Identifier: Apache-2.0
"""CDI spec content, version, file naming and files on disk."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubeletplugin.cdi import (
    CLAIM_ANNOTATION,
    claim_spec,
    list_claim_specs,
    minimum_cdi_version,
    prepared_claim_from_spec,
    remove_claim_spec,
    spec_bytes,
    spec_file_name,
    write_claim_spec,
)
from kubeletplugin.claims import CDI_KIND, ClaimError, PreparedClaim, PreparedDevice

UID = "4f1c2d3e-0000-4000-8000-00000000abcd"


def prepared(uid: str = UID, env: dict[str, str] | None = None) -> PreparedClaim:
    return PreparedClaim(
        uid=uid,
        namespace="default",
        name="x",
        devices=(
            PreparedDevice(
                request_names=("nx",),
                pool_name="node-a",
                device_name="nx-gzip",
                cdi_device_ids=(f"{CDI_KIND}={uid}-nx-gzip",),
                credits=2,
                env=env if env is not None else {"NX_GZIP_VERBOSE": "1", "NX_DRA_CREDITS": "2"},
            ),
        ),
    )


# --- spec content -------------------------------------------------------------------------


def test_a_claim_spec_has_one_device_with_env_and_the_device_node() -> None:
    spec = claim_spec(prepared())
    assert spec["kind"] == "k8s.nx.device.power.ibm.com/nx"
    assert spec["devices"] == [
        {
            "name": f"{UID}-nx-gzip",
            "containerEdits": {
                "env": ["NX_DRA_CREDITS=2", "NX_GZIP_VERBOSE=1"],
                "deviceNodes": [{"path": "/dev/crypto/nx-gzip", "permissions": "rw"}],
            },
        }
    ]


def test_cdi_device_ids_of_the_claim_resolve_to_the_specs_devices() -> None:
    claim = prepared()
    spec = claim_spec(claim)
    names = {f"{spec['kind']}={d['name']}" for d in spec["devices"]}
    assert {i for d in claim.devices for i in d.cdi_device_ids} == names


def test_a_different_host_path_is_written_as_host_path() -> None:
    spec = claim_spec(prepared(), host_path="/host/dev/crypto/nx-gzip")
    (node,) = spec["devices"][0]["containerEdits"]["deviceNodes"]
    assert node == {
        "path": "/dev/crypto/nx-gzip",
        "hostPath": "/host/dev/crypto/nx-gzip",
        "permissions": "rw",
    }


def test_a_host_path_equal_to_the_path_is_left_out() -> None:
    spec = claim_spec(prepared(), host_path="/dev/crypto/nx-gzip")
    assert "hostPath" not in spec["devices"][0]["containerEdits"]["deviceNodes"][0]


def test_a_claim_spec_carries_the_prepared_claim_in_an_annotation() -> None:
    claim = prepared()
    assert prepared_claim_from_spec(claim_spec(claim)) == claim
    assert CLAIM_ANNOTATION == "nx.device.power.ibm.com/prepared-claim"


def test_a_claim_spec_needs_cdi_0_6_0_for_its_annotation() -> None:
    assert claim_spec(prepared())["cdiVersion"] == "0.6.0"


def test_a_claim_without_devices_has_no_spec() -> None:
    empty = PreparedClaim(uid=UID, namespace="default", name="x", devices=())
    with pytest.raises(ValueError, match="no devices"):
        claim_spec(empty)


def test_spec_bytes_do_not_depend_on_env_insertion_order() -> None:
    one = prepared(env={"A": "1", "B": "2"})
    other = prepared(env={"B": "2", "A": "1"})
    assert spec_bytes(claim_spec(one)) == spec_bytes(claim_spec(other))


def test_spec_bytes_are_json_with_sorted_keys() -> None:
    data = spec_bytes(claim_spec(prepared()))
    assert orjson.loads(data) == claim_spec(prepared())
    assert data.index(b'"annotations"') < data.index(b'"cdiVersion"') < data.index(b'"devices"')


# --- minimum CDI version ------------------------------------------------------------------


def plain_spec(**edits: Any) -> dict[str, Any]:
    return {
        "kind": "vendor.example.com/dev",
        "devices": [{"name": "dev0", "containerEdits": {"env": ["A=1"], **edits}}],
    }


@pytest.mark.parametrize(
    ("spec", "version"),
    [
        (plain_spec(), "0.3.0"),
        (plain_spec(mounts=[{"hostPath": "/a", "containerPath": "/a"}]), "0.3.0"),
        (plain_spec(mounts=[{"hostPath": "/a", "containerPath": "/a", "type": "bind"}]), "0.4.0"),
        (plain_spec(deviceNodes=[{"path": "/dev/x", "hostPath": "/host/x"}]), "0.5.0"),
        ({**plain_spec(), "devices": [{"name": "0dev", "containerEdits": {}}]}, "0.5.0"),
        (
            {**plain_spec(), "containerEdits": {"deviceNodes": [{"path": "/d", "hostPath": "/h"}]}},
            "0.5.0",
        ),
        ({**plain_spec(), "annotations": {"a.example.com/b": "c"}}, "0.6.0"),
        (
            {**plain_spec(), "devices": [{"name": "d", "annotations": {"a": "b"}}]},
            "0.6.0",
        ),
        ({**plain_spec(), "kind": "vendor.example.com/dev.sub"}, "0.6.0"),
        (plain_spec(additionalGids=[44]), "0.7.0"),
        (plain_spec(intelRdt={"closID": "c"}), "0.7.0"),
        ({**plain_spec(), "containerEdits": {"intelRdt": {"closID": "c"}}}, "0.7.0"),
        (plain_spec(intelRdt={"schemata": ["L3:0=f"]}), "1.1.0"),
        (plain_spec(intelRdt={"enableMonitoring": True}), "1.1.0"),
        (plain_spec(netDevices=[{"hostInterfaceName": "eth1", "name": "net1"}]), "1.1.0"),
    ],
)
def test_the_spec_version_is_the_lowest_that_has_every_used_feature(
    spec: dict[str, Any], version: str
) -> None:
    assert minimum_cdi_version(spec) == version


# --- file naming --------------------------------------------------------------------------


def test_spec_files_follow_cdis_transient_spec_naming() -> None:
    assert spec_file_name(UID) == f"k8s.nx.device.power.ibm.com-nx_{UID}.json"


@pytest.mark.parametrize("uid", ["", "../x", "a/b", ".."])
def test_unsafe_uids_get_no_spec_file_name(uid: str) -> None:
    with pytest.raises(ClaimError):
        spec_file_name(uid)


# --- files --------------------------------------------------------------------------------


def test_a_written_spec_holds_exactly_the_spec_bytes(tmp_path: Path) -> None:
    spec = claim_spec(prepared())
    path = write_claim_spec(tmp_path, spec, UID)
    assert path == tmp_path / spec_file_name(UID)
    assert path.read_bytes() == spec_bytes(spec)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_writing_a_spec_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_claim_spec(tmp_path, claim_spec(prepared()), UID)
    assert [p.name for p in tmp_path.iterdir()] == [spec_file_name(UID)]


def test_writing_a_spec_creates_a_missing_cdi_root(tmp_path: Path) -> None:
    root = tmp_path / "run" / "cdi"
    write_claim_spec(root, claim_spec(prepared()), UID)
    assert (root / spec_file_name(UID)).exists()


def test_writing_a_spec_again_replaces_it(tmp_path: Path) -> None:
    write_claim_spec(tmp_path, claim_spec(prepared(env={"A": "1"})), UID)
    spec = claim_spec(prepared(env={"A": "2"}))
    path = write_claim_spec(tmp_path, spec, UID)
    assert path.read_bytes() == spec_bytes(spec)


def test_removing_a_spec_reports_whether_it_existed(tmp_path: Path) -> None:
    write_claim_spec(tmp_path, claim_spec(prepared()), UID)
    assert remove_claim_spec(tmp_path, UID) is True
    assert remove_claim_spec(tmp_path, UID) is False
    assert list(tmp_path.iterdir()) == []


def test_listing_finds_our_specs_by_claim_uid(tmp_path: Path) -> None:
    other_uid = "9a9a9a9a-0000-4000-8000-000000000001"
    write_claim_spec(tmp_path, claim_spec(prepared()), UID)
    write_claim_spec(tmp_path, claim_spec(prepared(uid=other_uid)), other_uid)
    specs = list_claim_specs(tmp_path)
    assert set(specs) == {UID, other_uid}
    assert specs[UID] == claim_spec(prepared())


def test_listing_ignores_other_files(tmp_path: Path) -> None:
    write_claim_spec(tmp_path, claim_spec(prepared()), UID)
    (tmp_path / "nvidia.com-gpu_abc.json").write_text('{"kind": "nvidia.com/gpu"}')
    (tmp_path / f".k8s.nx.device.power.ibm.com-nx_{UID}.json.x1.tmp").write_text("{")
    (tmp_path / "k8s.nx.device.power.ibm.com-nx_other.yaml").write_text("kind: x")
    (tmp_path / "k8s.nx.device.power.ibm.com-nx_..json").write_text("{}")
    assert set(list_claim_specs(tmp_path)) == {UID}


def test_listing_skips_corrupt_specs_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_claim_spec(tmp_path, claim_spec(prepared()), UID)
    (tmp_path / spec_file_name("broken")).write_text('{"kind": ')
    (tmp_path / spec_file_name("foreign")).write_text('{"kind": "other.com/x"}')
    with caplog.at_level(logging.WARNING, logger="kubeletplugin.cdi"):
        assert set(list_claim_specs(tmp_path)) == {UID}
    assert "broken" in caplog.text
    assert "foreign" in caplog.text


def test_listing_a_missing_cdi_root_finds_nothing(tmp_path: Path) -> None:
    assert list_claim_specs(tmp_path / "absent") == {}


def test_a_spec_without_our_annotation_cannot_be_recovered() -> None:
    spec = claim_spec(prepared())
    del spec["annotations"]
    with pytest.raises(ValueError, match=r"no nx\.device\.power\.ibm\.com/prepared-claim"):
        prepared_claim_from_spec(spec)


def test_a_spec_with_a_damaged_annotation_cannot_be_recovered() -> None:
    spec = claim_spec(prepared())
    spec["annotations"][CLAIM_ANNOTATION] = '{"uid": 1}'
    with pytest.raises(ValueError):
        prepared_claim_from_spec(spec)
