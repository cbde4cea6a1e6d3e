# SPDX-License-Identifier: Apache-2.0
"""The devices a node publishes, from its NX-gzip inventory.

NX-gzip is one engine per LPAR; what limits concurrent users is VAS credits
(one per open send window). Two ways to publish that:

- shared mode: one device `nx-gzip` that many claims may allocate, with a
  consumable `credits` capacity (each claim takes 1 by default);
- slot mode: N exclusive devices `nx-gzip-0..N-1`, one credit each, for servers
  without consumable capacity (or when chosen by flag).

Capacity is the LPAR's total default credits minus a reserve, not minus the
credits in use: windows open right now are mostly our own pods' windows, which
the scheduler already accounts for. The kernel does not enforce this split per
container, so it is scheduling-level accounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controller.nx.names import CREDITS_CAPACITY
from kubeletplugin.discovery import Inventory
from kubeletplugin.slices import AttributeValue, Capacity, Device, RequestPolicy, SemVer, is_semver

Mode = Literal["shared", "slots"]

SHARED_DEVICE_NAME = "nx-gzip"
SLOT_DEVICE_PREFIX = "nx-gzip-"


@dataclass(frozen=True, kw_only=True)
class DeviceOptions:
    """How to turn an inventory into devices.

    - `mode`: "shared" (one multi-allocatable device) or "slots" (exclusive devices).
    - `reserved_credits`: credits kept back for processes outside Kubernetes
      (libnxz itself keeps one spare).
    - `max_slots`: upper bound on slot devices.
    - `fallback_credits`: total credits assumed when the node has no credit
      files (PowerNV, or PowerVM with unreadable ones).
    - `driver_version`: published as the semver `driverVersion` attribute.
    """

    driver_version: str
    mode: Mode = "shared"
    reserved_credits: int = 1
    max_slots: int = 16
    fallback_credits: int = 20

    def __post_init__(self) -> None:
        if self.mode not in ("shared", "slots"):
            raise ValueError(f"device mode must be 'shared' or 'slots', got {self.mode!r}")
        if self.reserved_credits < 0:
            raise ValueError(f"reserved credits must be >= 0, got {self.reserved_credits}")
        if self.max_slots < 1:
            raise ValueError(f"max slots must be >= 1, got {self.max_slots}")
        if self.fallback_credits < 0:
            raise ValueError(f"fallback credits must be >= 0, got {self.fallback_credits}")
        if not is_semver(self.driver_version):
            raise ValueError(
                f"driver version {self.driver_version!r} is not a semantic version "
                "(the API server would reject the whole slice)"
            )


def available_credits(inventory: Inventory, options: DeviceOptions, held_credits: int = 0) -> int:
    """Credits we offer to claims: the node's total (or the fallback) minus the reserve,
    minus `held_credits` (claims allocated from IBM's device, which the scheduler
    does not count against ours)."""
    total = inventory.credits.total
    if total is None:
        total = options.fallback_credits
    return max(0, total - options.reserved_credits - held_credits)


def device_attributes(inventory: Inventory, options: DeviceOptions) -> dict[str, AttributeValue]:
    """Attributes every device of the node carries; unknown values are left out."""
    attributes: dict[str, AttributeValue] = {"driverVersion": SemVer(options.driver_version)}
    if inventory.platform is not None:
        attributes["platform"] = inventory.platform
    if inventory.processor_generation is not None:
        attributes["processorGeneration"] = inventory.processor_generation
    known_ints = {
        "reqMaxProcessedLen": inventory.caps.req_max_processed_len,
        "minCompressLen": inventory.caps.min_compress_len,
        "minDecompressLen": inventory.caps.min_decompress_len,
        "qosCredits": inventory.credits.qos_total,
    }
    attributes.update({name: value for name, value in known_ints.items() if value is not None})
    return attributes


def _shared_request_policy(credits: int) -> RequestPolicy:
    # The API server rejects a step when min + step exceeds the capacity, so a
    # one-credit device gets no step (1 is then the only valid amount anyway).
    return RequestPolicy(default=1, min=1, step=1 if credits >= 2 else None)


def build_devices(
    inventory: Inventory, options: DeviceOptions, held_credits: int = 0
) -> list[Device]:
    """The devices to publish for `inventory`: none without a usable NX-gzip device node.

    `held_credits` are in use by claims the scheduler allocated from IBM's
    driver's device (see `ibm_state`): one credit, or one slot, less each.
    """
    if not inventory.device_node_present or inventory.platform is None:
        return []
    credits = available_credits(inventory, options, held_credits)
    if credits == 0:
        return []
    attributes = device_attributes(inventory, options)
    if options.mode == "shared":
        return [
            Device(
                name=SHARED_DEVICE_NAME,
                attributes=attributes,
                capacity={CREDITS_CAPACITY: Capacity(credits, _shared_request_policy(credits))},
                allow_multiple_allocations=True,
            )
        ]
    slots = min(credits, options.max_slots)
    return [
        Device(
            name=f"{SLOT_DEVICE_PREFIX}{index}",
            attributes=attributes,
            capacity={CREDITS_CAPACITY: Capacity(1)},
        )
        for index in range(slots)
    ]
