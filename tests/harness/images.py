# SPDX-License-Identifier: Apache-2.0
"""Container images without a registry: OCI image-layout tarballs built from
Debian's `busybox-static`, imported into containerd with `ctr images import`.

Each image is one uncompressed layer holding `/bin/busybox` and a symlink per
applet; the tarball carries the `io.containerd.image.name` annotation, so the
import names the image. Builds are byte-for-byte reproducible (fixed times and
owners), so the digests only change with the busybox binary.

    tar = build_image(out_dir, PAUSE_IMAGE, ["sh", "-c", PAUSE_SCRIPT])
    # then: ctr -n k8s.io images import <tar>
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shutil
import struct
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Local names only: nothing is ever pulled (pods use imagePullPolicy: Never).
PAUSE_IMAGE = "localhost/power-dra-test/pause:1"
BUSYBOX_IMAGE = "localhost/power-dra-test/busybox:1"
# The sandbox ("pause") container: sleep until told to stop. A shell with a
# trap, because PID 1 ignores signals it has no handler for.
PAUSE_COMMAND = ["sh", "-c", "trap 'exit 0' TERM INT; sleep 2147483647 & wait"]

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
PT_INTERP = 3
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def oci_arch() -> str:
    """This machine's architecture in OCI terms (amd64, arm64, ppc64le, s390x)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def find_static_busybox() -> Path:
    """The statically linked busybox (Debian's busybox-static), or RuntimeError."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and _is_static(path):
            return path
    raise RuntimeError(
        "no statically linked busybox found: apt-get install busybox-static "
        "(a dynamic busybox would need its libraries in the image)"
    )


def _is_static(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return False
        bits64, order = head[4] == 2, "<" if head[5] == 1 else ">"
        if bits64:
            phoff, phentsize, phnum = struct.unpack(order + "Q14xHH", head[32:58])
        else:
            phoff, phentsize, phnum = struct.unpack(order + "I10xHH", head[28:46])
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (struct.unpack_from(order + "I", table, i * phentsize)[0] for i in range(phnum))
    return PT_INTERP not in types


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in out.stdout.split() if a and "/" not in a and a != "busybox"})


def _tar_info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def busybox_layer(busybox: Path) -> bytes:
    """An uncompressed layer: /bin/busybox, an applet symlink each, /tmp, /etc."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            tar.addfile(_tar_info(directory, tarfile.DIRTYPE, mode))
        data = busybox.read_bytes()
        tar.addfile(_tar_info("bin/busybox", tarfile.REGTYPE, 0o755, len(data)), io.BytesIO(data))
        for applet in _applets(busybox):
            tar.addfile(_tar_info(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_layout(name: str, command: Sequence[str], layer: bytes) -> dict[str, bytes]:
    """The files of an OCI image layout (path -> bytes) for one single-layer image."""
    arch = oci_arch()
    layer_digest = _digest(layer)
    config = _json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": list(command), "Env": [PATH_ENV], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": len(layer)}],
        }
    )
    index = _json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                    },
                }
            ],
        }
    )
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for blob in (layer, config, manifest):
        files[f"blobs/sha256/{_digest(blob).split(':', 1)[1]}"] = blob
    return files


def build_image(
    out_dir: Path, name: str, command: Sequence[str], busybox: Path | None = None
) -> Path:
    """Write `<out_dir>/<last name part>.tar`, an OCI layout tarball of a busybox image."""
    busybox = busybox or find_static_busybox()
    files = image_layout(name, command, busybox_layer(busybox))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (name.rsplit("/", 1)[-1].replace(":", "-") + ".tar")
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in ("blobs", "blobs/sha256"):
            tar.addfile(_tar_info(rel, tarfile.DIRTYPE, 0o755))
        for rel, data in files.items():
            tar.addfile(_tar_info(rel, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    shutil.move(tmp, path)
    return path


def build_test_images(out_dir: Path) -> dict[str, Path]:
    """The pause (sandbox) image and the busybox workload image: name -> tarball."""
    busybox = find_static_busybox()
    return {
        PAUSE_IMAGE: build_image(out_dir, PAUSE_IMAGE, PAUSE_COMMAND, busybox),
        BUSYBOX_IMAGE: build_image(out_dir, BUSYBOX_IMAGE, ["sh"], busybox),
    }
