# SPDX-License-Identifier: Apache-2.0
"""The node as the plugin's flags describe it: device options and discovery.

Shared by the command line (`inspect`, start-up) and the serving half
(`plugin.py`, rediscovery), so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection
from pathlib import Path

from controller.nx.names import DEVICE_PATH, DRIVER_VERSION

from .devices import DeviceOptions
from .discovery import Inventory, discover

log = logging.getLogger("kubeletplugin")


def device_options(args: argparse.Namespace) -> DeviceOptions:
    """DeviceOptions from flags (ValueError with the flag's meaning on bad values)."""
    return DeviceOptions(
        driver_version=DRIVER_VERSION,
        mode=args.device_mode,
        reserved_credits=args.reserved_credits,
        max_slots=args.max_slots,
        fallback_credits=args.fallback_credits,
    )


def discover_node(args: argparse.Namespace, known_warnings: Collection[str] = ()) -> Inventory:
    """Read sysfs and the device node as the flags say.

    Warnings are logged unless in `known_warnings` (those of the previous
    discovery: a rediscovery every 30 s must not repeat them).
    """
    device_node = Path(str(args.host_dev_root).rstrip("/") + DEVICE_PATH)
    if not Path(args.sysfs_root).is_dir():
        log.warning(
            "--sysfs-root %s does not exist: is the path right (the DaemonSet mounts /sys "
            "at /host-sys)?",
            args.sysfs_root,
        )
    inventory = discover(args.sysfs_root, device_node)
    for warning in inventory.warnings:
        if warning not in known_warnings:
            log.warning("%s", warning)
    if inventory.platform is None:
        log.info(
            "no NX-gzip found: publishing an empty pool",
            extra={"sysfsRoot": str(args.sysfs_root), "deviceNode": str(device_node)},
        )
    return inventory
