# SPDX-License-Identifier: Apache-2.0
"""Reading a ResourceClaim's allocation: the one code path both processes use to
find a driver's results and opaque configs (same shape in v1, v1beta2, v1beta1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from controller.kube.quantity import parse_quantity
from controller.nx.names import CREDITS_CAPACITY


def allocation_devices(claim: Mapping[str, Any]) -> Mapping[str, Any]:
    """`status.allocation.devices`, or an empty mapping when not allocated."""
    allocation = (claim.get("status") or {}).get("allocation") or {}
    devices = allocation.get("devices") or {}
    return devices if isinstance(devices, Mapping) else {}


def driver_results(
    claim: Mapping[str, Any], driver: str, pool: str | None = None
) -> list[dict[str, Any]]:
    """The allocation results of `driver` (and `pool`, when given), in allocation order."""
    return [
        r
        for r in allocation_devices(claim).get("results") or []
        if isinstance(r, dict)
        and r.get("driver") == driver
        and (pool is None or r.get("pool") == pool)
    ]


def driver_opaque_configs(
    claim: Mapping[str, Any], driver: str
) -> list[tuple[int, Mapping[str, Any], Mapping[str, Any]]]:
    """`(index, config entry, opaque)` of every opaque config addressed to `driver`,
    in API order; `index` is the position in `status.allocation.devices.config`."""
    found = []
    for index, entry in enumerate(allocation_devices(claim).get("config") or []):
        if not isinstance(entry, Mapping):
            continue
        opaque = entry.get("opaque")
        if isinstance(opaque, Mapping) and opaque.get("driver") == driver:
            found.append((index, entry, opaque))
    return found


def quantity_to_credits(value: Any) -> int:
    """A resource.Quantity (as serialized, e.g. "4", "1k", "2e1") as whole credits.

    Fractions round up, as the scheduler rounds consumed capacity up. The one
    parser both processes use, so that they never disagree about a claim.

    Raises:
        ValueError: not a non-negative quantity.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"not a quantity: {value!r}")
    try:
        amount = parse_quantity(value)
    except ValueError:
        raise ValueError(f"not a quantity: {value!r}") from None
    if amount < 0:
        raise ValueError(f"negative quantity: {value!r}")
    return math.ceil(amount)


def result_credits(result: Mapping[str, Any], driver: str) -> int:
    """Credits one allocation result holds: its consumed `credits` capacity, else 1
    (a slot-mode device is one exclusive slot).

    Raises:
        ValueError: the consumed capacity is not a quantity.
    """
    consumed = result.get("consumedCapacity") or {}
    for key in (CREDITS_CAPACITY, f"{driver}/{CREDITS_CAPACITY}"):
        if key in consumed:
            return quantity_to_credits(consumed[key])
    return 1
