# SPDX-License-Identifier: Apache-2.0
"""Kubernetes resource quantities ("20", "1k", "2Ki", "1e3", "500m"): the one parser both processes use."""

from __future__ import annotations

import re
from fractions import Fraction

_QUANTITY_RE = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$"
)
_DECIMAL_SUFFIXES = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}
_MAX_QUANTITY_EXPONENT = 100
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def parse_quantity(quantity: str | int) -> Fraction:
    """The exact value of a Kubernetes quantity string ("20", "1k", "2Ki", "1e3", "500m").

    The server re-serializes quantities in canonical form (1000 comes back as
    "1k"), so values read back must be compared by number, not by text.
    Raises ValueError on anything that is not a quantity.
    """
    if isinstance(quantity, bool):
        raise ValueError(f"{quantity!r} is not a quantity")
    if isinstance(quantity, int):
        return Fraction(quantity)
    match = _QUANTITY_RE.fullmatch(quantity.strip())
    if match is None:
        raise ValueError(f"{quantity!r} is not a quantity")
    number = Fraction(match.group(1))
    exponent, suffix = match.group(2), match.group(3) or ""
    if exponent:
        power = int(exponent[1:])
        # The API server caps quantities far below this; a huge exponent would hang us.
        if abs(power) > _MAX_QUANTITY_EXPONENT:
            raise ValueError(f"{quantity!r} is out of range")
        return number * Fraction(10) ** power
    if suffix in _BINARY_SUFFIXES:
        return number * (1 << _BINARY_SUFFIXES[suffix])
    return number * Fraction(10) ** _DECIMAL_SUFFIXES[suffix]
