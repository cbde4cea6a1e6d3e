# SPDX-License-Identifier: Apache-2.0
"""`power-dra-kubeletplugin inspect`: what the plugin sees and would publish, as JSON.

Run as a real subprocess (`python -m kubeletplugin inspect ...`) over fake
sysfs trees; no API server is involved, except in the last tests, which hand
the printed slices to the real kube-apiserver (server-side dry run) to show
they are what a server accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubeletplugin.driver import DriverPaths, NxDriver
from kubeletplugin.ibm_state import (
    IBM_COMMON_SPEC_FILE,
    ibm_claim_spec_file,
)
from tests.fake_sysfs import (
    make_empty_tree,
    make_powernv_tree,
    make_powervm_tree,
    write_dev_node,
)
from tests.harness.cluster import ControlPlane
from tests.ibm_driver_standin import encode_ibm_checkpoint, ibm_device

DRIVER = "nx.device.power.ibm.com"
API_VERSIONS = ("v1", "v1beta2", "v1beta1")
PLATFORMS = ("powervm", "powernv", "empty")


def _node_tree(root: Path, platform: str, total_credits: int = 240) -> tuple[Path, Path]:
    """A fake node under `root`: (sysfs root, host /dev root). `empty` has no device node."""
    sysfs, host = root / "sys", root / "host"
    if platform == "powervm":
        make_powervm_tree(sysfs, total_credits=total_credits)
    elif platform == "powernv":
        make_powernv_tree(sysfs)
    else:
        make_empty_tree(sysfs)
    if platform != "empty":
        write_dev_node(host)
    return sysfs, host


def _inspect(
    *args: str, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run `inspect`; return its parsed stdout and the finished process."""
    proc = subprocess.run(
        [sys.executable, "-m", "kubeletplugin", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc, proc


def _inspect_node(
    tmp_path: Path, platform: str, *args: str, total_credits: int = 240
) -> dict[str, Any]:
    sysfs, host = _node_tree(tmp_path, platform, total_credits)
    doc, _ = _inspect(
        f"--sysfs-root={sysfs}", f"--host-dev-root={host}", "--node-name=node-a", *args
    )
    return doc


def _devices(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for s in doc["resourceSlices"] for d in s["spec"]["devices"]]


def _fields(device: dict[str, Any], api_version: str) -> dict[str, Any]:
    """Attributes, capacity and allowMultipleAllocations: under `basic` in v1beta1 only."""
    fields: dict[str, Any] = device["basic"] if api_version == "v1beta1" else device
    return fields


# --- inventory -------------------------------------------------------------------------


def test_inspect_of_a_powervm_lpar_reports_its_platform_caps_and_credits(
    tmp_path: Path,
) -> None:
    doc = _inspect_node(tmp_path, "powervm", total_credits=240)
    inventory = doc["inventory"]
    assert inventory["platform"] == "powervm"
    assert inventory["device_node_present"] is True
    assert inventory["credits"]["total"] == 240
    assert inventory["caps"]["req_max_processed_len"] == 1048576
    assert inventory["processor_generation"] == "power10"
    assert inventory["warnings"] == []


def test_inspect_of_a_powernv_system_reports_no_credit_files(tmp_path: Path) -> None:
    inventory = _inspect_node(tmp_path, "powernv")["inventory"]
    assert inventory["platform"] == "powernv"
    assert inventory["device_node_present"] is True
    assert inventory["credits"]["total"] is None


def test_inspect_of_a_node_without_nx_gzip_reports_nothing_found_and_succeeds(
    tmp_path: Path,
) -> None:
    sysfs, host = _node_tree(tmp_path, "empty")
    doc, proc = _inspect(f"--sysfs-root={sysfs}", f"--host-dev-root={host}")
    assert doc["inventory"]["platform"] is None
    assert doc["inventory"]["device_node_present"] is False
    assert "no NX-gzip found" in proc.stderr


# --- node state (taking over from IBM's driver) ---------------------------------------


def _inspect_state(tmp_path: Path) -> dict[str, Any]:
    if not (tmp_path / "sys").exists():
        _node_tree(tmp_path, "powervm")
    doc, _ = _inspect(
        f"--sysfs-root={tmp_path / 'sys'}",
        f"--host-dev-root={tmp_path / 'host'}",
        f"--kubelet-plugins-directory-path={tmp_path / 'plugins'}",
        f"--cdi-root={tmp_path / 'cdi'}",
    )
    state: dict[str, Any] = doc["nodeState"]
    return state


def _ibm_files(tmp_path: Path, uid: str) -> None:
    plugin_dir, cdi = tmp_path / "plugins" / DRIVER, tmp_path / "cdi"
    plugin_dir.mkdir(parents=True)
    cdi.mkdir()
    (plugin_dir / "checkpoint.json").write_bytes(
        encode_ibm_checkpoint({uid: [ibm_device(uid, "node-a", "nx")]})
    )
    (cdi / IBM_COMMON_SPEC_FILE).write_text("kind: k8s.nx.device.power.ibm.com/nx\n")
    (cdi / ibm_claim_spec_file(uid)).write_text("kind: k8s.nx.device.power.ibm.com/nx\n")


def test_inspect_of_a_node_ibm_driver_left_shows_its_claims_and_files(tmp_path: Path) -> None:
    uid = "0b5f1a2c-7d3e-4f60-9a8b-1c2d3e4f5a6b"
    _ibm_files(tmp_path, uid)
    state = _inspect_state(tmp_path)
    assert state["owner"] == "ibm"
    assert state["claims"][uid]["adoptedFromIbm"] is True
    assert state["ibmFiles"] == [ibm_claim_spec_file(uid), IBM_COMMON_SPEC_FILE, "checkpoint.json"]
    assert state["creditsHeldOutsideOurSlice"] == 1
    assert state["migration"].startswith("not started")
    assert (tmp_path / "plugins" / DRIVER / "checkpoint.json").exists()  # inspect only reads


def test_inspect_of_a_node_taken_over_says_what_is_left(tmp_path: Path) -> None:
    uid = "0b5f1a2c-7d3e-4f60-9a8b-1c2d3e4f5a6b"
    _ibm_files(tmp_path, uid)
    paths = DriverPaths(plugin_dir=tmp_path / "plugins" / DRIVER, cdi_root=tmp_path / "cdi")
    NxDriver(
        None, driver=DRIVER, node_name="node-a", paths=paths, device_names=set, health=list
    ).load_state()
    state = _inspect_state(tmp_path)
    assert state["owner"] == "power-dra-driver"
    assert state["migration"].startswith("in progress: 1 claims adopted")
    (tmp_path / "plugins" / DRIVER / "checkpoint.json").unlink()
    for name in os.listdir(tmp_path / "cdi"):
        (tmp_path / "cdi" / name).unlink()
    state = _inspect_state(tmp_path)
    assert (state["owner"], state["claims"], state["ibmFiles"]) == ("none", {}, [])
    assert state["migration"].startswith("complete")


# --- slices ----------------------------------------------------------------------------


@pytest.mark.parametrize("api_version", API_VERSIONS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_inspect_prints_one_slice_of_the_node_pool_in_the_requested_api_version(
    tmp_path: Path, platform: str, api_version: str
) -> None:
    doc = _inspect_node(tmp_path, platform, f"--api-version={api_version}")
    (only,) = doc["resourceSlices"]
    assert only["apiVersion"] == f"resource.k8s.io/{api_version}"
    assert only["kind"] == "ResourceSlice"
    assert only["metadata"]["name"] == "node-a-nx-gzip-0"
    assert only["spec"]["driver"] == DRIVER
    assert only["spec"]["nodeName"] == "node-a"
    assert only["spec"]["pool"] == {"name": "node-a", "generation": 1, "resourceSliceCount": 1}


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_inspect_of_a_powervm_lpar_shows_one_shared_device_with_its_credits_minus_the_reserve(
    tmp_path: Path, api_version: str
) -> None:
    doc = _inspect_node(tmp_path, "powervm", f"--api-version={api_version}", total_credits=240)
    (device,) = _devices(doc)
    fields = _fields(device, api_version)
    assert device["name"] == "nx-gzip"
    assert fields["allowMultipleAllocations"] is True
    assert fields["capacity"]["credits"]["value"] == "239"
    assert fields["attributes"]["platform"] == {"string": "powervm"}


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_inspect_puts_device_fields_under_basic_only_in_v1beta1(
    tmp_path: Path, api_version: str
) -> None:
    (device,) = _devices(_inspect_node(tmp_path, "powervm", f"--api-version={api_version}"))
    if api_version == "v1beta1":
        assert set(device) == {"name", "basic"}
    else:
        assert "basic" not in device
        assert {"attributes", "capacity"} <= set(device)


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_inspect_of_a_powernv_system_shows_the_fallback_credits_minus_the_reserve(
    tmp_path: Path, api_version: str
) -> None:
    doc = _inspect_node(tmp_path, "powernv", f"--api-version={api_version}", "--fallback-credits=9")
    (device,) = _devices(doc)
    fields = _fields(device, api_version)
    assert fields["capacity"]["credits"]["value"] == "8"
    assert fields["attributes"]["platform"] == {"string": "powernv"}


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_inspect_of_a_node_without_nx_gzip_shows_an_empty_pool(
    tmp_path: Path, api_version: str
) -> None:
    doc = _inspect_node(tmp_path, "empty", f"--api-version={api_version}")
    assert _devices(doc) == []


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_inspect_in_slot_mode_shows_one_exclusive_device_per_credit_minus_the_reserve(
    tmp_path: Path, api_version: str
) -> None:
    doc = _inspect_node(
        tmp_path, "powervm", f"--api-version={api_version}", "--device-mode=slots", total_credits=5
    )
    devices = _devices(doc)
    assert [d["name"] for d in devices] == [f"nx-gzip-{i}" for i in range(4)]
    for device in devices:
        fields = _fields(device, api_version)
        assert "allowMultipleAllocations" not in fields
        assert fields["capacity"] == {"credits": {"value": "1"}}


def test_inspect_in_slot_mode_caps_the_devices_at_max_slots(tmp_path: Path) -> None:
    doc = _inspect_node(tmp_path, "powervm", "--device-mode=slots", "--max-slots=3")
    assert [d["name"] for d in _devices(doc)] == ["nx-gzip-0", "nx-gzip-1", "nx-gzip-2"]


def test_inspect_honours_the_reserved_credits(tmp_path: Path) -> None:
    doc = _inspect_node(tmp_path, "powervm", "--reserved-credits=40", total_credits=240)
    (device,) = _devices(doc)
    assert device["capacity"]["credits"]["value"] == "200"


def test_inspect_takes_its_settings_from_the_environment(tmp_path: Path) -> None:
    sysfs, host = _node_tree(tmp_path, "powervm", total_credits=5)
    doc, _ = _inspect(
        env={
            "SYSFS_ROOT": str(sysfs),
            "HOST_DEV_ROOT": str(host),
            "NODE_NAME": "from-env",
            "DEVICE_MODE": "slots",
            "MAX_SLOTS": "2",
        }
    )
    assert doc["inventory"]["credits"]["total"] == 5
    assert doc["resourceSlices"][0]["spec"]["nodeName"] == "from-env"
    assert [d["name"] for d in _devices(doc)] == ["nx-gzip-0", "nx-gzip-1"]


def test_inspect_needs_no_api_server(tmp_path: Path) -> None:
    sysfs, host = _node_tree(tmp_path, "powervm")
    doc, _ = _inspect(
        f"--sysfs-root={sysfs}",
        f"--host-dev-root={host}",
        env={"KUBECONFIG": str(tmp_path / "missing.kubeconfig")},
    )
    assert [d["name"] for d in _devices(doc)] == ["nx-gzip"]


# --- what a real API server makes of it --------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("api_version", API_VERSIONS)
@pytest.mark.parametrize("mode", ["shared", "slots"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_printed_slices_are_accepted_by_kube_apiserver(
    control_plane: ControlPlane, tmp_path: Path, platform: str, mode: str, api_version: str
) -> None:
    doc = _inspect_node(tmp_path, platform, f"--api-version={api_version}", f"--device-mode={mode}")
    proc = control_plane.kubectl(
        "create",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": doc["resourceSlices"]}),
    )
    accepted = json.loads(proc.stdout)
    items = accepted.get("items", [accepted])
    assert [s["spec"]["pool"]["name"] for s in items] == ["node-a"]
