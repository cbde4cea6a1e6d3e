# SPDX-License-Identifier: Apache-2.0
"""Kubernetes resource quantities ("20", "1k", "2Ki", "1e3", "500m"): the one parser both processes use."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fractions import Fraction

_QUANTITY_RE = re.compile(
    r"^([+-]?)(\d*)(?:\.(\d*))?(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?$"
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


def parse_quantity(quantity: str | int) -> int | Fraction:
    """The exact value of a Kubernetes quantity string ("20", "1k", "2Ki", "1e3", "500m"):
    an int when it is a whole number, else a Fraction.

    The server re-serializes quantities in canonical form (1000 comes back as
    "1k"), so values read back must be compared by number, not by text.
    Raises ValueError on anything that is not a quantity.
    """
    if isinstance(quantity, bool):
        raise ValueError(f"{quantity!r} is not a quantity")
    if isinstance(quantity, int):
        return quantity
    match = _QUANTITY_RE.fullmatch(quantity.strip())
    if match is None or not (match.group(2) or match.group(3)):
        raise ValueError(f"{quantity!r} is not a quantity")
    sign, whole, decimals = match.group(1), match.group(2), match.group(3) or ""
    exponent, suffix = match.group(4), match.group(5) or ""
    # The value is numerator * 10**power, both integers.
    numerator = int(whole + decimals) * (-1 if sign == "-" else 1)
    power = -len(decimals)
    if exponent:
        # The API server caps quantities far below this; a huge exponent would hang us.
        if abs(int(exponent[1:])) > _MAX_QUANTITY_EXPONENT:
            raise ValueError(f"{quantity!r} is out of range")
        power += int(exponent[1:])
    elif suffix in _BINARY_SUFFIXES:
        numerator <<= _BINARY_SUFFIXES[suffix]
    else:
        power += _DECIMAL_SUFFIXES[suffix]
    scale: int = 10 ** abs(power)
    if power >= 0:
        return numerator * scale
    if numerator % scale == 0:
        return numerator // scale
    # Only a fraction needs the fractions module (with decimal and numbers, 0.7 MiB
    # of a node plugin's idle RSS; its quantities are whole).
    from fractions import Fraction

    return Fraction(numerator, scale)
