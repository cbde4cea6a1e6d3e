# SPDX-License-Identifier: Apache-2.0
"""Device health the plugin streams to the kubelet, as a pure function of the inventory."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kubeletplugin.discovery import discover
from kubeletplugin.main import build_parser
from kubeletplugin.plugin import NodeView, device_health
from tests.fake_sysfs import make_powervm_tree, write_dev_node


def _view(
    tmp_path: Path, *, total: int = 8, used: int = 0, dev: bool = True, mode: str = "shared"
) -> NodeView:
    sysfs = make_powervm_tree(tmp_path / "sys", total_credits=total, used_credits=used)
    if dev:
        write_dev_node(tmp_path / "hostdev")
    inventory = discover(sysfs, tmp_path / "hostdev" / "dev" / "crypto" / "nx-gzip")
    args = build_parser().parse_args(
        ["--node-name", "n1", "--sysfs-root", str(sysfs), "--device-mode", mode]
    )
    return NodeView("n1", inventory, args)


def test_a_usable_device_is_healthy(tmp_path: Path) -> None:
    health = device_health(_view(tmp_path))
    assert [(h.device_name, h.healthy) for h in health] == [("nx-gzip", True)]


def test_all_credits_in_use_is_load_not_a_fault(tmp_path: Path) -> None:
    (h,) = device_health(_view(tmp_path, total=8, used=8))
    assert h.healthy is True
    assert "all 8 NX-gzip credits are in use" in h.message


def test_a_device_whose_node_vanished_stays_listed_as_unhealthy(tmp_path: Path) -> None:
    view = _view(tmp_path)
    assert device_health(view)[0].healthy is True
    # Later in the same run, discovery finds no device node.
    later = _view(tmp_path / "after", dev=False)
    later.known.update(view.known)
    (h,) = device_health(later)
    assert (h.device_name, h.healthy) == ("nx-gzip", False)
    assert "/dev/crypto/nx-gzip is missing" in h.message


def test_the_shared_device_is_not_reported_gone_after_falling_back_to_slots(
    tmp_path: Path,
) -> None:
    from kubeletplugin.plugin import forget_devices_of_old_mode

    class Driver:
        woken = 0

        def notify_health_changed(self) -> None:
            self.woken += 1

    view = _view(tmp_path)
    assert [h.device_name for h in device_health(view)] == ["nx-gzip"]  # shared mode
    # The publisher fell back: the same run now offers the devices of slot mode.
    slots = _view(tmp_path / "slots", mode="slots")
    slots.known.update(view.known)
    driver = Driver()
    forget_devices_of_old_mode(slots, driver)  # type: ignore[arg-type]
    health = device_health(slots)
    assert "nx-gzip" not in [h.device_name for h in health]
    assert all(h.healthy for h in health)
    assert driver.woken == 1


def test_rediscovery_logs_a_warning_only_when_it_is_new(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kubeletplugin.node_discovery import discover_node

    sysfs = make_powervm_tree(tmp_path / "sys", total_credits="lots")
    args = build_parser().parse_args(["--node-name", "n1", "--sysfs-root", str(sysfs)])
    with caplog.at_level(logging.WARNING, logger="kubeletplugin"):
        first = discover_node(args)
        assert first.warnings
        again = discover_node(args, first.warnings)  # every 30 s
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.count(first.warnings[0]) == 1
    assert again.warnings == first.warnings
