# SPDX-License-Identifier: Apache-2.0
"""Decoding JSON the API server accepts but orjson refuses: values nested too deep.

The API server stores objects nested up to 10,000 levels (Go's
encoding/json limit); orjson stops at 1,024. Any tenant can create such an
object (a ResourceClaim's opaque parameters are free-form), so a list or a
watch line holding one must not stop the decoding of everything else.

`decode_pruning` decodes with orjson and, only when orjson gives up on the
depth, replaces every value that starts deeper than `PRUNE_DEPTH` levels by
the string `PRUNED` and decodes again. The shallow parts (metadata: name,
namespace, UID, resourceVersion) survive, so a caller can still tell which
object it was, skip it, and move on; `contains_pruned` says whether an
object lost a part. Nothing is invented: an object either decodes whole or
is known to be incomplete.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

PRUNE_DEPTH = 512
PRUNED = f"<power-dra-driver: value nested deeper than {PRUNE_DEPTH} levels, not decoded>"
_PRUNED_JSON = orjson.dumps(PRUNED)

# A JSON string (escapes included) or one bracket; everything else is skipped.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_OPEN = frozenset(b"[{")
_QUOTE = ord('"')


class UndecodableJSON(ValueError):
    """Bytes that are not JSON, even with deep values left out."""


def prune_deep(raw: bytes, max_depth: int = PRUNE_DEPTH) -> tuple[bytes, int]:
    """`raw` with every array or object starting below `max_depth` levels replaced
    by the JSON string `PRUNED`; returns the new bytes and how many were replaced.

    Works on any depth without recursion; the input must be valid JSON.
    """
    pieces: list[bytes] = []
    depth = 0
    last = 0
    skip_from = -1
    replaced = 0
    for match in _TOKEN.finditer(raw):
        first = raw[match.start()]
        if first == _QUOTE:
            continue
        if first in _OPEN:
            depth += 1
            if depth == max_depth + 1:
                skip_from = match.start()
            continue
        if depth == max_depth + 1 and skip_from >= 0:
            pieces.append(raw[last:skip_from])
            pieces.append(_PRUNED_JSON)
            last = match.end()
            skip_from = -1
            replaced += 1
        depth -= 1
    pieces.append(raw[last:])
    return b"".join(pieces), replaced


def decode_strict(raw: bytes) -> Any:
    """orjson's decoding of `raw`.

    Raises:
        UndecodableJSON: saying why, with the size of the input.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UndecodableJSON(f"{exc} ({len(raw)} bytes)") from exc


def decode_pruning(raw: bytes) -> tuple[Any, int]:
    """Decode `raw`; values orjson cannot reach (too deep) become `PRUNED`.

    Returns the value and the number of values pruned (0: decoded whole).

    Raises:
        UndecodableJSON: `raw` is not JSON at all.
    """
    try:
        return orjson.loads(raw), 0
    except orjson.JSONDecodeError as exc:
        if "depth" not in str(exc):
            raise UndecodableJSON(f"{exc} ({len(raw)} bytes)") from exc
    pruned, replaced = prune_deep(raw)
    try:
        return orjson.loads(pruned), replaced
    except orjson.JSONDecodeError as exc:
        raise UndecodableJSON(f"{exc} ({len(raw)} bytes, after pruning)") from exc


def contains_pruned(value: Any) -> bool:
    """Whether `value` holds a part `decode_pruning` left out.

    Walks without recursion (orjson.dumps itself stops at 255 levels).
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item == PRUNED:
            return True
    return False
