# SPDX-License-Identifier: Apache-2.0
"""What this node has of NX-gzip, read from sysfs.

`parse_inventory` is pure: it takes the contents of the sysfs files we know
(keyed by their path relative to the sysfs root) and decides everything.
`discover` is the thin reader around it. Bad data never raises: a value that
cannot be trusted becomes a warning and is treated as absent, so one odd file
costs an attribute, never the plugin.

Input convention for `parse_inventory(files, ...)`:

- a path missing from `files` does not exist (no warning: PowerNV has no
  credit files, PowerVM without QoS has no QoS files);
- a path mapped to None exists but could not be read (warned);
- a directory we only probe for (`MARKER_DIRS`, the CPU nodes under
  `DEVICETREE_CPUS`) is present as a key, mapped to "".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Platform = Literal["powervm", "powernv"]

CAPS_DIR = "devices/vio/ibm,compression-v1/nx_gzip_caps"
CAPS_FILES = ("req_max_processed_len", "min_compress_len", "min_decompress_len")
# The same kernel object is reachable under both roots; the first one that
# exists wins (see NX-FACTS.md; `devices/vas/...` from an old comment is wrong).
VAS_GZIP_DIRS = ("devices/virtual/misc/vas/vas0/gzip", "class/misc/vas/vas0/gzip")
CREDIT_FILES = (
    "default_capabilities/nr_total_credits",
    "default_capabilities/nr_used_credits",
    "qos_capabilities/nr_total_credits",
    "qos_capabilities/nr_used_credits",
)
OPAL_DIR = "firmware/opal"
POWERVM_DT_MARKER = "firmware/devicetree/base/ibm,powervm-partition"
DEVICETREE_CPUS = "firmware/devicetree/base/cpus"
MARKER_DIRS = (CAPS_DIR, *VAS_GZIP_DIRS, OPAL_DIR, POWERVM_DT_MARKER)

# Larger values are not credits or byte counts any real machine reports; they
# mean a corrupt file, and would overflow what the API and libnxz expect.
MAX_SANE_VALUE = 2**31
# sysfs values are one short line; never read more than this from a file.
_READ_LIMIT = 4096
# The "cpu" line is in the first processor block of /proc/cpuinfo.
_CPUINFO_READ_LIMIT = 64 * 1024
_WARN_VALUE_CHARS = 40
_POWER_GENERATION_RE = re.compile(r"POWER(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class NxCapabilities:
    """The hypervisor's NX-gzip limits (`nx_gzip_caps`); None when unknown."""

    req_max_processed_len: int | None = None
    min_compress_len: int | None = None
    min_decompress_len: int | None = None


@dataclass(frozen=True)
class NxCredits:
    """VAS send-window credits of the LPAR, default and QoS; None when unknown."""

    total: int | None = None
    used: int | None = None
    qos_total: int | None = None
    qos_used: int | None = None


@dataclass(frozen=True)
class Inventory:
    """Everything discovery learned about NX-gzip on this node."""

    platform: Platform | None
    caps: NxCapabilities
    credits: NxCredits
    device_node_present: bool
    processor_generation: str | None = None
    warnings: tuple[str, ...] = ()


def _present(files: Mapping[str, str | None], path: str) -> bool:
    return path in files


def _any_present(files: Mapping[str, str | None], prefix: str) -> bool:
    return any(key == prefix or key.startswith(prefix + "/") for key in files)


def _shown(raw: str) -> str:
    text = raw.strip()
    if len(text) > _WARN_VALUE_CHARS:
        text = text[:_WARN_VALUE_CHARS] + "..."
    return repr(text)


def _parse_count(files: Mapping[str, str | None], path: str, warnings: list[str]) -> int | None:
    """One non-negative integer from `path`, or None (with a warning when present but bad)."""
    if path not in files:
        return None
    raw = files[path]
    if raw is None:
        warnings.append(f"{path}: unreadable; ignored")
        return None
    text = raw.strip()
    # isdecimal, not int(): int() also takes "+5", " 5", "1_000" and "-1".
    if not text.isascii() or not text.isdecimal():
        warnings.append(f"{path}: {_shown(raw)} is not a non-negative integer; ignored")
        return None
    # Length first: int() refuses strings of over 4300 digits with its own ValueError.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_SANE_VALUE)) or int(digits) > MAX_SANE_VALUE:
        warnings.append(f"{path}: {_shown(raw)} is implausibly large (> 2**31); ignored")
        return None
    return int(digits)


def _vas_root(files: Mapping[str, str | None]) -> str | None:
    for root in VAS_GZIP_DIRS:
        if _any_present(files, root):
            return root
    return None


def _generation_from(text: str) -> str | None:
    match = _POWER_GENERATION_RE.search(text)
    return f"power{int(match.group(1))}" if match else None


def _processor_generation(files: Mapping[str, str | None], cpuinfo: str | None) -> str | None:
    # Device-tree CPU nodes are named after the chip ("PowerPC,POWER10@0") and,
    # unlike /proc/cpuinfo, do not change under a compatibility mode.
    prefix = DEVICETREE_CPUS + "/"
    for key in sorted(files):
        if key.startswith(prefix) and "/" not in key[len(prefix) :]:
            generation = _generation_from(key[len(prefix) :])
            if generation:
                return generation
    if cpuinfo:
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == "cpu":
                return _generation_from(value)
    return None


def parse_inventory(
    files: Mapping[str, str | None], device_node_present: bool, cpuinfo: str | None = None
) -> Inventory:
    """Decide what this node has of NX-gzip from sysfs contents. Pure; never raises.

    `files` maps paths relative to the sysfs root to their contents (see the
    module docstring for missing, unreadable and marker paths); `cpuinfo` is
    the text of /proc/cpuinfo, a fallback for the processor generation.

    Platform rule:
    - "powervm" when the caps directory, the VAS gzip directory (or any of
      their files) or the device tree's `ibm,powervm-partition` exists;
    - "powernv" when the device node exists and there is no PowerVM evidence
      (bare metal has the node but no caps or credit files). `firmware/opal`
      confirms it; without it we still say powernv, with a warning;
    - None otherwise: nothing here speaks of NX-gzip.
    """
    warnings: list[str] = []
    caps = NxCapabilities(
        *(_parse_count(files, f"{CAPS_DIR}/{name}", warnings) for name in CAPS_FILES)
    )
    vas_root = _vas_root(files)
    if vas_root is None:
        credits = NxCredits()
    else:
        credits = NxCredits(
            *(_parse_count(files, f"{vas_root}/{name}", warnings) for name in CREDIT_FILES)
        )

    powervm = (
        _any_present(files, CAPS_DIR) or vas_root is not None or _present(files, POWERVM_DT_MARKER)
    )
    platform: Platform | None
    if powervm:
        platform = "powervm"
    elif device_node_present:
        platform = "powernv"
        if not _present(files, OPAL_DIR):
            warnings.append(
                f"NX-gzip device node present but neither PowerVM files nor {OPAL_DIR} "
                "found; assuming bare metal (powernv)"
            )
    else:
        platform = None

    if platform == "powervm" and device_node_present and credits.total is None:
        warnings.append(
            "PowerVM without a readable default_capabilities/nr_total_credits; "
            "the configured fallback credit count applies"
        )

    return Inventory(
        platform=platform,
        caps=caps,
        credits=credits,
        device_node_present=device_node_present,
        processor_generation=_processor_generation(files, cpuinfo),
        warnings=tuple(warnings),
    )


def known_files() -> Iterable[str]:
    """Every file path (relative to the sysfs root) that `discover` reads."""
    yield from (f"{CAPS_DIR}/{name}" for name in CAPS_FILES)
    for root in VAS_GZIP_DIRS:
        yield from (f"{root}/{name}" for name in CREDIT_FILES)


def _read_file(path: Path, limit: int = _READ_LIMIT) -> str | None:
    """The text of one sysfs file; None when it exists but cannot be read."""
    try:
        with path.open("rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        # Includes IsADirectoryError, EACCES and EIO from a driver's show().
        return None


def read_sysfs_files(sysfs_root: Path) -> dict[str, str | None]:
    """The `files` mapping `parse_inventory` expects, read from a sysfs tree."""
    files: dict[str, str | None] = {}
    for rel in MARKER_DIRS:
        # os.path.exists, not Path.exists: a directory this user may not search
        # (EACCES, e.g. /sys/firmware as non-root) counts as absent, not as a crash.
        if os.path.exists(sysfs_root / rel):
            files[rel] = ""
    for rel in known_files():
        path = sysfs_root / rel
        if os.path.lexists(path):
            files[rel] = _read_file(path)
    try:
        cpu_nodes = os.listdir(sysfs_root / DEVICETREE_CPUS)
    except OSError:
        cpu_nodes = []
    for name in cpu_nodes:
        files[f"{DEVICETREE_CPUS}/{name}"] = ""
    return files


def discover(sysfs_root: Path, device_node: Path, cpuinfo_path: Path | None = None) -> Inventory:
    """Read sysfs under `sysfs_root` and the device node, and parse them into an Inventory.

    `device_node` is the NX-gzip node as seen by this process (for example
    `/dev/crypto/nx-gzip`); `cpuinfo_path`, when given, is read as a fallback
    for the processor generation. Never raises for missing or odd files.
    """
    cpuinfo = _read_file(cpuinfo_path, _CPUINFO_READ_LIMIT) if cpuinfo_path is not None else None
    return parse_inventory(
        read_sysfs_files(sysfs_root),
        device_node_present=os.path.exists(device_node),
        cpuinfo=cpuinfo,
    )
