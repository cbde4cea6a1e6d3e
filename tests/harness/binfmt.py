# SPDX-License-Identifier: Apache-2.0
"""ppc64le programs on this machine: qemu-user-static as the binfmt_misc handler,
registered only inside a private user + mount namespace (Linux >= 6.7 gives each
user namespace its own binfmt_misc), never on the host.

The namespace maps every ID to itself (0-65535), so files keep their owners
(debootstrap and image builds chown to other users). `unshare --map-users` would
need /etc/subuid entries for root, so this process, root outside, writes the
maps itself.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.harness.cluster import cache_root

# ELF, 64-bit, little endian, e_machine 21 (EM_PPC64): qemu's own binfmt rule.
PPC64LE_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x15\x00"
PPC64LE_MASK = r"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\x00"
HANDLER = "power-dra-ppc64le"
ID_RANGE = 65536


def qemu_binary() -> Path:
    """qemu-ppc64le-static: unpacked into the cache by hack/install-deps.sh, or installed."""
    for candidate in (
        cache_root() / "qemu" / "root" / "usr" / "bin" / "qemu-ppc64le-static",
        Path("/usr/bin/qemu-ppc64le-static"),
    ):
        if candidate.is_file():
            return candidate
    raise RuntimeError("qemu-ppc64le-static not found: run hack/install-deps.sh")


def run_private(
    command: Sequence[str], timeout: float = 3600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `command` in a private user + mount namespace where ppc64le ELF files run
    under qemu (F flag: qemu is opened at registration, so it works in chroots)."""
    mount_point = cache_root() / "binfmt_misc"
    mount_point.mkdir(parents=True, exist_ok=True)
    rule = f":{HANDLER}:M::{PPC64LE_MAGIC}:{PPC64LE_MASK}:{qemu_binary()}:F"
    script = (
        "read _ready\n"
        f"mount -t binfmt_misc binfmt_misc {shlex.quote(str(mount_point))}\n"
        f"printf '%s' {shlex.quote(rule)} > {shlex.quote(str(mount_point))}/register\n"
        'exec "$@"\n'
    )
    proc = subprocess.Popen(
        ["unshare", "--user", "--mount", "--propagation", "private", "sh", "-ec", script, "sh",
         *command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    ours = os.stat("/proc/self/ns/user").st_ino
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{proc.pid}/ns/user").st_ino == ours:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("unshare did not enter a new user namespace")
        time.sleep(0.01)
    Path(f"/proc/{proc.pid}/uid_map").write_text(f"0 0 {ID_RANGE}\n")
    Path(f"/proc/{proc.pid}/gid_map").write_text(f"0 0 {ID_RANGE}\n")
    out, err = proc.communicate("go\n", timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
