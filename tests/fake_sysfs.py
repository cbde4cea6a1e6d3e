# SPDX-License-Identifier: Apache-2.0
"""Fake IBM Power sysfs trees (and the NX-gzip device node) in a test directory.

The paths are written out here on purpose rather than imported from
`kubeletplugin.discovery`, so a typo in discovery's paths fails the tests
instead of being copied into the fixtures. They follow NX-FACTS.md.

Values: an int is written as the kernel does (digits and a newline); a str
is written verbatim (use it for corrupt content such as "", "abc\\n", "-1");
None leaves the file out.

    root = tmp_path / "sys"
    make_powervm_tree(root, total_credits=240, qos_credits=None)
    write_dev_node(tmp_path / "host")   # -> tmp_path/host/dev/crypto/nx-gzip
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

CAPS_DIR = "devices/vio/ibm,compression-v1/nx_gzip_caps"
VAS_GZIP_DIR = "devices/virtual/misc/vas/vas0/gzip"
VAS_GZIP_CLASS_DIR = "class/misc/vas/vas0/gzip"
OPAL_DIR = "firmware/opal"
DEVICETREE = "firmware/devicetree/base"
DEV_NODE = "dev/crypto/nx-gzip"

# Typical values of a Power10 LPAR with 12 default cores (NX-FACTS.md).
TYPICAL_REQ_MAX_PROCESSED_LEN = 1048576
TYPICAL_MIN_COMPRESS_LEN = 32768
TYPICAL_MIN_DECOMPRESS_LEN = 32768
TYPICAL_TOTAL_CREDITS = 240

FileValue = int | str | None


def write_sysfs_file(root: Path, rel: str, value: FileValue) -> None:
    """Write one sysfs file under `root`: int as "<n>\\n", str verbatim, None skipped."""
    if value is None:
        return
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n" if isinstance(value, int) else value)


def make_unreadable(root: Path, rel: str) -> Path:
    """Put a directory where the file `rel` is expected, so reading it fails.

    chmod 000 does not stop root (tests may run as root); reading a directory
    fails for everyone, like a sysfs attribute whose show() errors.
    """
    path = root / rel
    if path.is_file():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_cpus(root: Path, processor: str | None, count: int = 2) -> None:
    if processor is None:
        return
    cpus = root / DEVICETREE / "cpus"
    for index in range(count):
        (cpus / f"PowerPC,{processor}@{index * 8}").mkdir(parents=True, exist_ok=True)


def make_powervm_tree(
    root: Path,
    *,
    total_credits: FileValue = TYPICAL_TOTAL_CREDITS,
    used_credits: FileValue = 0,
    qos_credits: FileValue = 0,
    qos_used_credits: FileValue = 0,
    req_max_processed_len: FileValue = TYPICAL_REQ_MAX_PROCESSED_LEN,
    min_compress_len: FileValue = TYPICAL_MIN_COMPRESS_LEN,
    min_decompress_len: FileValue = TYPICAL_MIN_DECOMPRESS_LEN,
    processor: str | None = "POWER10",
    with_caps: bool = True,
    with_vas: bool = True,
    vas_under_class_only: bool = False,
) -> Path:
    """Lay out a PowerVM LPAR's sysfs under `root` and return `root`.

    - `with_caps=False`: no `nx_gzip_caps` directory at all.
    - `with_vas=False`: no VAS credit directory at all.
    - `qos_credits=None` and `qos_used_credits=None`: no QoS files (nor directory).
    - `vas_under_class_only=True`: credits only under `class/misc/vas/...`
      (the path discovery falls back to).
    - `processor`: device-tree CPU node name part ("POWER10"); None for none.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / DEVICETREE).mkdir(parents=True, exist_ok=True)
    (root / DEVICETREE / "ibm,powervm-partition").write_bytes(b"")
    _write_cpus(root, processor)
    if with_caps:
        caps = root / CAPS_DIR
        caps.mkdir(parents=True, exist_ok=True)
        write_sysfs_file(caps, "req_max_processed_len", req_max_processed_len)
        write_sysfs_file(caps, "min_compress_len", min_compress_len)
        write_sysfs_file(caps, "min_decompress_len", min_decompress_len)
    if with_vas:
        vas = root / (VAS_GZIP_CLASS_DIR if vas_under_class_only else VAS_GZIP_DIR)
        (vas / "default_capabilities").mkdir(parents=True, exist_ok=True)
        write_sysfs_file(vas, "default_capabilities/nr_total_credits", total_credits)
        write_sysfs_file(vas, "default_capabilities/nr_used_credits", used_credits)
        write_sysfs_file(vas, "qos_capabilities/nr_total_credits", qos_credits)
        write_sysfs_file(vas, "qos_capabilities/nr_used_credits", qos_used_credits)
    return root


def make_powernv_tree(root: Path, *, processor: str | None = "POWER10", opal: bool = True) -> Path:
    """Lay out a bare-metal (OPAL) Power system's sysfs: no caps, no credit files."""
    root.mkdir(parents=True, exist_ok=True)
    if opal:
        (root / OPAL_DIR).mkdir(parents=True, exist_ok=True)
    _write_cpus(root, processor)
    return root


def make_empty_tree(root: Path) -> Path:
    """A sysfs with nothing Power or NX-gzip about it (an x86 node, say)."""
    (root / "devices" / "system" / "cpu").mkdir(parents=True, exist_ok=True)
    (root / "class" / "misc").mkdir(parents=True, exist_ok=True)
    return root


def write_dev_node(dev_root: Path) -> Path:
    """Create `<dev_root>/dev/crypto/nx-gzip` and return its path.

    As root it is a real character device (c 1 3, the numbers of /dev/null, so
    opening it is harmless); otherwise, where mknod is not allowed, a regular
    file. Discovery only checks that the path exists, so both serve.
    """
    path = dev_root / DEV_NODE
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            return path
        except PermissionError:
            # Root without CAP_MKNOD (some containers): fall back to a file.
            pass
    path.write_bytes(b"")
    return path
