# SPDX-License-Identifier: Apache-2.0
"""Specification of NX-gzip discovery: sysfs contents in, Inventory out, never an exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeletplugin.discovery import (
    Inventory,
    NxCapabilities,
    NxCredits,
    discover,
    parse_inventory,
)
from tests.fake_sysfs import (
    make_empty_tree,
    make_powernv_tree,
    make_powervm_tree,
    make_unreadable,
    write_dev_node,
    write_sysfs_file,
)

CAPS = "devices/vio/ibm,compression-v1/nx_gzip_caps"
VAS = "devices/virtual/misc/vas/vas0/gzip"
VAS_CLASS = "class/misc/vas/vas0/gzip"
TOTAL = f"{VAS}/default_capabilities/nr_total_credits"

POWERVM_FILES: dict[str, str | None] = {
    CAPS: "",
    f"{CAPS}/req_max_processed_len": "1048576\n",
    f"{CAPS}/min_compress_len": "32768\n",
    f"{CAPS}/min_decompress_len": "32768\n",
    VAS: "",
    TOTAL: "240\n",
    f"{VAS}/default_capabilities/nr_used_credits": "3\n",
    f"{VAS}/qos_capabilities/nr_total_credits": "40\n",
    f"{VAS}/qos_capabilities/nr_used_credits": "1\n",
    "firmware/devicetree/base/ibm,powervm-partition": "",
    "firmware/devicetree/base/cpus/PowerPC,POWER10@0": "",
}


def with_files(**changes: str | None) -> dict[str, str | None]:
    """POWERVM_FILES with some files replaced (keys use '__' for '/')."""
    return {**POWERVM_FILES, **{k.replace("__", "/"): v for k, v in changes.items()}}


def without(*paths: str) -> dict[str, str | None]:
    return {k: v for k, v in POWERVM_FILES.items() if k not in paths}


# --- parse_inventory: the pure decisions ------------------------------------


def test_powervm_lpar_reports_caps_credits_platform_and_generation() -> None:
    assert parse_inventory(POWERVM_FILES, device_node_present=True) == Inventory(
        platform="powervm",
        caps=NxCapabilities(
            req_max_processed_len=1048576, min_compress_len=32768, min_decompress_len=32768
        ),
        credits=NxCredits(total=240, used=3, qos_total=40, qos_used=1),
        device_node_present=True,
        processor_generation="power10",
        warnings=(),
    )


def test_powervm_without_qos_files_has_no_qos_credits_and_no_warning() -> None:
    files = without(
        f"{VAS}/qos_capabilities/nr_total_credits", f"{VAS}/qos_capabilities/nr_used_credits"
    )
    inventory = parse_inventory(files, device_node_present=True)
    assert inventory.credits == NxCredits(total=240, used=3)
    assert inventory.warnings == ()


def test_credits_are_read_from_the_class_path_when_the_devices_path_is_absent() -> None:
    files = {k.replace(VAS, VAS_CLASS): v for k, v in POWERVM_FILES.items()}
    inventory = parse_inventory(files, device_node_present=True)
    assert inventory.credits.total == 240


def test_the_devices_path_wins_over_the_class_path() -> None:
    files = {**POWERVM_FILES, f"{VAS_CLASS}/default_capabilities/nr_total_credits": "999\n"}
    assert parse_inventory(files, device_node_present=True).credits.total == 240


def test_caps_directory_alone_means_powervm() -> None:
    files = {CAPS: "", f"{CAPS}/req_max_processed_len": "65536\n"}
    assert parse_inventory(files, device_node_present=True).platform == "powervm"


def test_credit_files_alone_mean_powervm() -> None:
    files = {TOTAL: "100\n"}
    assert parse_inventory(files, device_node_present=False).platform == "powervm"


def test_device_tree_powervm_marker_alone_means_powervm() -> None:
    files = {"firmware/devicetree/base/ibm,powervm-partition": ""}
    assert parse_inventory(files, device_node_present=False).platform == "powervm"


def test_powervm_without_device_node_is_reported_as_such() -> None:
    inventory = parse_inventory(POWERVM_FILES, device_node_present=False)
    assert (inventory.platform, inventory.device_node_present) == ("powervm", False)


def test_device_node_with_opal_and_no_powervm_files_is_powernv() -> None:
    files = {"firmware/opal": "", "firmware/devicetree/base/cpus/PowerPC,POWER10@0": ""}
    inventory = parse_inventory(files, device_node_present=True)
    assert inventory == Inventory(
        platform="powernv",
        caps=NxCapabilities(),
        credits=NxCredits(),
        device_node_present=True,
        processor_generation="power10",
    )


def test_device_node_without_any_platform_evidence_is_assumed_powernv_with_a_warning() -> None:
    inventory = parse_inventory({}, device_node_present=True)
    assert inventory.platform == "powernv"
    assert any("firmware/opal" in w for w in inventory.warnings)


def test_opal_without_device_node_is_no_platform() -> None:
    assert parse_inventory({"firmware/opal": ""}, device_node_present=False).platform is None


def test_nothing_at_all_is_no_platform_and_no_warning() -> None:
    assert parse_inventory({}, device_node_present=False) == Inventory(
        platform=None, caps=NxCapabilities(), credits=NxCredits(), device_node_present=False
    )


def test_zero_credits_are_a_valid_value() -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): "0\n"}), True)
    assert (inventory.credits.total, inventory.warnings) == (0, ())


def test_surrounding_whitespace_is_tolerated() -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): "  240 \n"}), True)
    assert inventory.credits.total == 240


@pytest.mark.parametrize("content", ["0005\n", "0" * 5000 + "5"])
def test_leading_zeros_are_tolerated(content: str) -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): content}), True)
    assert (inventory.credits.total, inventory.warnings) == (5, ())


def test_two_to_the_31_is_still_accepted() -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): f"{2**31}\n"}), True)
    assert inventory.credits.total == 2**31


@pytest.mark.parametrize(
    "content",
    ["", "\n", "abc\n", "-1\n", "+5\n", "1_000\n", "12abc\n", "0x10\n", "1.5\n", "١٢\n", "2 4\n"],
)
def test_malformed_value_is_ignored_with_a_warning_naming_file_and_value(content: str) -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): content}), True)
    assert inventory.credits.total is None
    assert any(TOTAL in w and repr(content.strip()) in w for w in inventory.warnings)


def test_absurdly_large_value_is_ignored_with_a_warning() -> None:
    huge = str(2**31 + 1)
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): huge}), True)
    assert inventory.credits.total is None
    assert any(TOTAL in w and huge in w for w in inventory.warnings)


def test_very_long_garbage_is_shortened_in_the_warning() -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): "x" * 5000}), True)
    assert all(len(w) < 300 for w in inventory.warnings)


def test_unreadable_file_is_ignored_with_a_warning() -> None:
    inventory = parse_inventory(with_files(**{TOTAL.replace("/", "__"): None}), True)
    assert inventory.credits.total is None
    assert any(TOTAL in w and "unreadable" in w for w in inventory.warnings)


@pytest.mark.parametrize(
    "name", ["req_max_processed_len", "min_compress_len", "min_decompress_len"]
)
def test_malformed_caps_file_loses_only_that_value(name: str) -> None:
    inventory = parse_inventory(with_files(**{f"{CAPS}/{name}".replace("/", "__"): "oops"}), True)
    assert getattr(inventory.caps, name) is None
    assert inventory.credits.total == 240
    assert len(inventory.warnings) == 1


def test_each_malformed_file_gets_its_own_warning() -> None:
    files = with_files(
        **{
            f"{VAS}/qos_capabilities/nr_total_credits".replace("/", "__"): "bad",
            f"{CAPS}/min_compress_len".replace("/", "__"): None,
        }
    )
    assert len(parse_inventory(files, True).warnings) == 2


def test_powervm_device_without_total_credits_warns_that_the_fallback_applies() -> None:
    inventory = parse_inventory(without(TOTAL), device_node_present=True)
    assert inventory.credits.total is None
    assert any("fallback" in w for w in inventory.warnings)


def test_processor_generation_falls_back_to_cpuinfo() -> None:
    cpuinfo = "processor\t: 0\ncpu\t\t: POWER10 (architected), altivec supported\n"
    assert parse_inventory({}, False, cpuinfo=cpuinfo).processor_generation == "power10"


def test_device_tree_generation_wins_over_cpuinfo() -> None:
    cpuinfo = "cpu\t\t: POWER9 (architected), altivec supported\n"
    assert parse_inventory(POWERVM_FILES, True, cpuinfo=cpuinfo).processor_generation == "power10"


def test_processor_generation_is_none_when_nothing_names_it() -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n"
    assert parse_inventory({}, False, cpuinfo=cpuinfo).processor_generation is None


def test_nested_device_tree_entries_do_not_name_the_generation() -> None:
    files = {"firmware/devicetree/base/cpus/l2-cache@POWER8/x": ""}
    assert parse_inventory(files, False).processor_generation is None


# --- discover: the reader over real directories ------------------------------------


def discover_in(tmp_path: Path, cpuinfo: Path | None = None) -> Inventory:
    return discover(tmp_path / "sys", tmp_path / "host" / "dev/crypto/nx-gzip", cpuinfo)


def test_discover_reads_a_powervm_tree(tmp_path: Path) -> None:
    make_powervm_tree(tmp_path / "sys", total_credits=480, qos_credits=20)
    write_dev_node(tmp_path / "host")
    inventory = discover_in(tmp_path)
    assert inventory == Inventory(
        platform="powervm",
        caps=NxCapabilities(1048576, 32768, 32768),
        credits=NxCredits(total=480, used=0, qos_total=20, qos_used=0),
        device_node_present=True,
        processor_generation="power10",
    )


def test_discover_reads_a_powervm_tree_without_qos(tmp_path: Path) -> None:
    make_powervm_tree(tmp_path / "sys", qos_credits=None, qos_used_credits=None)
    write_dev_node(tmp_path / "host")
    inventory = discover_in(tmp_path)
    assert (inventory.credits.qos_total, inventory.warnings) == (None, ())


def test_discover_falls_back_to_the_class_path(tmp_path: Path) -> None:
    make_powervm_tree(tmp_path / "sys", total_credits=60, vas_under_class_only=True)
    write_dev_node(tmp_path / "host")
    assert discover_in(tmp_path).credits.total == 60


def test_discover_reads_a_powernv_tree(tmp_path: Path) -> None:
    make_powernv_tree(tmp_path / "sys")
    write_dev_node(tmp_path / "host")
    inventory = discover_in(tmp_path)
    assert (inventory.platform, inventory.credits, inventory.warnings) == (
        "powernv",
        NxCredits(),
        (),
    )


def test_discover_on_an_empty_tree_finds_nothing(tmp_path: Path) -> None:
    make_empty_tree(tmp_path / "sys")
    inventory = discover_in(tmp_path)
    assert (inventory.platform, inventory.device_node_present, inventory.warnings) == (
        None,
        False,
        (),
    )


def test_discover_without_a_sysfs_root_finds_nothing(tmp_path: Path) -> None:
    inventory = discover_in(tmp_path)
    assert (inventory.platform, inventory.warnings) == (None, ())


def test_discover_warns_about_a_corrupt_file(tmp_path: Path) -> None:
    make_powervm_tree(tmp_path / "sys", total_credits="lots\n")
    write_dev_node(tmp_path / "host")
    inventory = discover_in(tmp_path)
    assert inventory.credits.total is None
    assert any("nr_total_credits" in w and "'lots'" in w for w in inventory.warnings)


def test_discover_warns_about_an_unreadable_file(tmp_path: Path) -> None:
    root = make_powervm_tree(tmp_path / "sys")
    make_unreadable(root, f"{CAPS}/req_max_processed_len")
    write_dev_node(tmp_path / "host")
    inventory = discover_in(tmp_path)
    assert inventory.caps.req_max_processed_len is None
    assert any("req_max_processed_len" in w and "unreadable" in w for w in inventory.warnings)


def test_discover_treats_a_huge_file_as_one_bad_value(tmp_path: Path) -> None:
    root = make_powervm_tree(tmp_path / "sys")
    write_sysfs_file(root, f"{CAPS}/req_max_processed_len", "9" * 1_000_000)
    write_dev_node(tmp_path / "host")
    inventory = discover_in(tmp_path)
    assert inventory.caps.req_max_processed_len is None
    assert len(inventory.warnings) == 1


def test_discover_reads_cpuinfo_when_given(tmp_path: Path) -> None:
    make_powernv_tree(tmp_path / "sys", processor=None)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu\t\t: POWER11 (raw), altivec supported\n")
    assert discover_in(tmp_path, cpuinfo).processor_generation == "power11"


def test_discover_tolerates_a_missing_cpuinfo(tmp_path: Path) -> None:
    assert discover_in(tmp_path, tmp_path / "no-such-file").processor_generation is None
