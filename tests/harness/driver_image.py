# SPDX-License-Identifier: Apache-2.0
"""The driver's own image, built here from the Containerfile: no daemon, no registry.

Debian's `buildah` builds with `--isolation chroot` into its own storage under
the cache folder (nothing in /var/lib/containers), `--pull=never`. The UBI
bases are replaced by local stand-ins made from a `debootstrap --variant=minbase
bookworm` root filesystem, passed through the Containerfile's BUILDER_IMAGE and
RUNTIME_IMAGE arguments:

- builder: python3.11 with a virtual environment at /opt/app-root owned by user
  1001 and first on PATH, as in ubi9/python-311;
- runtime: a bare Debian whose /usr/bin/microdnf is a small shim over apt-get,
  so the Containerfile's `microdnf install python3.11` really installs Python.

The stand-ins are built once (their tags carry a hash of their recipe). The
image leaves as a docker-archive tarball named localhost/power-dra-driver:TAG,
which `ctr images import` takes.

    python -m tests.harness.driver_image build      # prints the tarball and figures
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.binfmt import run_private
from tests.harness.cluster import REPO, cache_root
from tests.harness.images import oci_arch

IMAGE_NAME = "localhost/power-dra-driver"
DEFAULT_TAG = "0.1.0"
SUITE = "bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STANDIN_PREFIX = "localhost/power-dra-standin"

# Debian arch names (debootstrap, apt) by OCI arch.
DEBIAN_ARCH = {"amd64": "amd64", "arm64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x"}

# microdnf's calls in the Containerfile, done by apt-get (options are dropped;
# Debian's package names match for python3.11).
MICRODNF_SHIM = """#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Stand-in for ubi-minimal's microdnf (install, clean) over apt-get.
set -e
cmd=""; pkgs=""
for a in "$@"; do
  case "$a" in
    -*) ;;
    *) if [ -z "$cmd" ]; then cmd="$a"; else pkgs="$pkgs $a"; fi ;;
  esac
done
export DEBIAN_FRONTEND=noninteractive
case "$cmd" in
  install) apt-get -q -o APT::Sandbox::User=root update >/dev/null
           apt-get -q -o APT::Sandbox::User=root install -y --no-install-recommends $pkgs ;;
  clean) apt-get clean; rm -rf /var/lib/apt/lists/* ;;
  *) echo "microdnf stand-in: $cmd is not supported" >&2; exit 1 ;;
esac
"""

BUILDER_RECIPE = """\
FROM scratch
ADD rootfs.tar /
RUN apt-get -q -o APT::Sandbox::User=root update \\
    && DEBIAN_FRONTEND=noninteractive apt-get -q -o APT::Sandbox::User=root install -y \\
       --no-install-recommends python3.11 python3.11-venv \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 1001 --gid 0 --home-dir /opt/app-root/src --create-home default \\
    && python3.11 -m venv /opt/app-root \\
    && chown -R 1001:0 /opt/app-root
ENV PATH=/opt/app-root/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    HOME=/opt/app-root/src
USER 1001
WORKDIR /opt/app-root/src
"""

RUNTIME_RECIPE = """\
FROM scratch
ADD rootfs.tar /
COPY microdnf /usr/bin/microdnf
RUN chmod 0755 /usr/bin/microdnf
"""


def image_cache() -> Path:
    """Everything the image build keeps: bases, buildah storage, tarballs (outside the clone)."""
    return cache_root() / "image"


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (DEBIAN_MIRROR overrides)."""
    env = os.environ.get("DEBIAN_MIRROR")
    if env:
        return env
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if words and words[0] in ("deb", "URIs:"):
                    for word in words[1:]:
                        web = word.startswith(("http://", "https://"))
                        if web and "debian" in word and "security" not in word:
                            return word
    raise RuntimeError("no Debian mirror in the system's apt sources; set DEBIAN_MIRROR")


class Buildah:
    """buildah with its own storage under the cache folder, chroot isolation, no pulls."""

    def __init__(self, root: Path | None = None, arch: str | None = None) -> None:
        # Another architecture (ppc64le here): its own storage, and every call in a
        # private user namespace where qemu runs that architecture's programs.
        self.foreign = arch is not None and arch != oci_arch()
        self.root = root or image_cache() / (f"buildah-{arch}" if self.foreign else "buildah")
        if not shutil.which("buildah"):
            raise RuntimeError("buildah not found: run hack/install-deps.sh (Debian's buildah)")

    def argv(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root", str(self.root / "root"),
            "--runroot", str(self.root / "runroot"),
            "--storage-driver", "overlay",
            *args,
        ]  # fmt: skip

    def _run(self, argv: list[str], capture: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
        if self.foreign:
            return run_private(argv, env=env)
        return subprocess.run(
            argv, capture_output=capture, text=True, env=env, timeout=3600, check=False
        )

    def run(self, *args: str, quiet: bool = True) -> subprocess.CompletedProcess[str]:
        proc = self._run(self.argv(*args), capture=quiet)
        if proc.returncode != 0:
            detail = (proc.stderr or "")[-4000:] if quiet else ""
            raise RuntimeError(f"buildah {' '.join(args[:2])} failed ({proc.returncode}): {detail}")
        return proc

    def exists(self, image: str) -> bool:
        proc = self._run(
            self.argv("inspect", "--type", "image", "--format", "{{.FromImageID}}", image)
        )
        return proc.returncode == 0

    def image_id(self, image: str) -> str:
        out = self.run("inspect", "--type", "image", "--format", "{{.FromImageID}}", image)
        return out.stdout.strip()

    def bud(
        self,
        context: Path,
        containerfile: Path,
        tag: str,
        *,
        build_args: dict[str, str] | None = None,
        arch: str | None = None,
        quiet: bool = True,
        host_ca: bool = True,
    ) -> None:
        args = [
            "bud", "--isolation", "chroot", "--pull=never", "--layers",
            "--format", "oci", "-f", str(containerfile), "-t", tag,
        ]  # fmt: skip
        if host_ca and HOST_CA_BUNDLE.is_file():
            # pip and apt inside RUN steps trust what this machine trusts; a
            # read-only bind mount, so nothing of it lands in a layer.
            args += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
        if arch:
            args += ["--arch", arch]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        self.run(*args, str(context), quiet=quiet)

    @contextlib.contextmanager
    def rootfs(self, image: str) -> Iterator[Path]:
        """The image's root filesystem, mounted read-write in a throwaway working container."""
        ctr = self.run("from", "--pull=never", image).stdout.strip().splitlines()[-1]
        try:
            yield Path(self.run("mount", ctr).stdout.strip())
        finally:
            self.run("rm", ctr)

    def run_in(
        self, image: str, argv: Sequence[str], volumes: Sequence[str] = (), user: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a throwaway container of `image` (chroot isolation)."""
        ctr = self.run("from", "--pull=never", image).stdout.strip().splitlines()[-1]
        try:
            args = ["run", "--isolation", "chroot"]
            for v in volumes:
                args += ["--volume", v]
            if user:
                args += ["--user", user]
            return self._run(self.argv(*args, ctr, "--", *argv))
        finally:
            self.run("rm", ctr)


def ensure_base_rootfs(arch: str | None = None) -> Path:
    """A `debootstrap --variant=minbase bookworm` root filesystem as a tarball, made once."""
    arch = arch or oci_arch()
    deb_arch = DEBIAN_ARCH[arch]
    out = image_cache() / "bases" / f"{SUITE}-minbase-{deb_arch}.tar"
    if out.exists():
        return out
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap not found: run hack/install-deps.sh")
    work = out.with_suffix(".d")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    foreign = arch != oci_arch()
    print(f"debootstrap {SUITE} ({deb_arch}) into {work}", flush=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--arch={deb_arch}",
         *(["--foreign"] if foreign else []), SUITE, str(work), debian_mirror()],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    if foreign:
        # The second stage runs the architecture's own programs: under qemu, in a
        # private namespace (about 9 minutes on 2 cores); container=lxc skips
        # debootstrap's mknod probe, which a user namespace refuses.
        script = (
            f"mount --rbind /dev {work}/dev\nmount --rbind /proc {work}/proc\n"
            f"container=lxc chroot {work} /debootstrap/debootstrap --second-stage"
        )
        proc = run_private(["sh", "-ec", script])
        if proc.returncode != 0:
            log = work / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else proc.stderr
            raise RuntimeError(f"debootstrap second stage ({deb_arch}) failed:\n{tail}")
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        [
            "tar", "-C", str(work), "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
            "--exclude=./sys/*", "--exclude=./var/cache/apt/archives/*.deb",
            "--exclude=./var/lib/apt/lists/*", "-cf", str(tmp), ".",
        ],
        check=True,
    )  # fmt: skip
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _recipe_tag(kind: str, files: dict[str, str | Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        value = files[name]
        digest.update(name.encode())
        if isinstance(value, Path):
            stat = value.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(value.encode())
    return f"{STANDIN_PREFIX}/{kind}:{digest.hexdigest()[:12]}"


def ensure_standins(buildah: Buildah, arch: str | None = None) -> tuple[str, str]:
    """The builder and runtime stand-ins for the UBI bases, built once; their names."""
    base = ensure_base_rootfs(arch)
    names = []
    for kind, recipe, extra in (
        ("builder", BUILDER_RECIPE, {}),
        ("runtime", RUNTIME_RECIPE, {"microdnf": MICRODNF_SHIM}),
    ):
        tag = _recipe_tag(kind, {"Containerfile": recipe, "rootfs.tar": base, **extra})
        names.append(tag)
        if buildah.exists(tag):
            continue
        context = image_cache() / "standin-context" / kind
        shutil.rmtree(context, ignore_errors=True)
        context.mkdir(parents=True)
        (context / "Containerfile").write_text(recipe)
        os.link(base, context / "rootfs.tar")
        for name, text in extra.items():
            (context / name).write_text(text)
        print(f"building the {kind} stand-in {tag}", flush=True)
        # No host CA bundle here: apt fetches over the mirror's own signatures,
        # and the builder's ca-certificates package writes that very file.
        buildah.bud(context, context / "Containerfile", tag, arch=arch, host_ca=False)
        shutil.rmtree(context, ignore_errors=True)
    return names[0], names[1]


@dataclass(frozen=True)
class BuiltImage:
    """The driver image: its local name, the docker-archive tarball, figures."""

    name: str
    image_id: str
    tarball: Path
    build_seconds: float
    unpacked_bytes: int
    compressed_bytes: int

    def figures(self) -> str:
        mib = 1024 * 1024
        return (
            f"image {self.name} ({self.image_id[:12]}): {self.tarball}\n"
            f"  size: {self.compressed_bytes / mib:.1f} MiB compressed (gzip of the layers), "
            f"{self.unpacked_bytes / mib:.1f} MiB unpacked\n"
            f"  build: {self.build_seconds:.1f} s (this run)"
        )


def _layer_sizes(tarball: Path) -> tuple[int, int]:
    """(unpacked, gzip-compressed) bytes of the docker-archive's layers."""
    import tarfile

    unpacked = compressed = 0
    with tarfile.open(tarball) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        for layer in manifest[0]["Layers"]:
            member = tar.getmember(layer)
            unpacked += member.size
            src = tar.extractfile(member)
            assert src is not None
            counter = _CountingWriter()
            with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6) as gz:
                shutil.copyfileobj(src, gz, 1 << 20)
            compressed += counter.count
    return unpacked, compressed


class _CountingWriter:
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def build_image(
    tag: str = DEFAULT_TAG, quiet: bool = True, context: Path = REPO, arch: str | None = None
) -> BuiltImage:
    """Build the driver image from the Containerfile of `context` (layer cache on)
    and export it. The tarball is re-exported only when the image ID changed.
    """
    arch = arch or oci_arch()
    buildah = Buildah(arch=arch)
    builder, runtime = ensure_standins(buildah, arch)
    name = f"{IMAGE_NAME}:{tag}"
    start = time.monotonic()
    buildah.bud(
        context,
        context / "Containerfile",
        name,
        build_args={"BUILDER_IMAGE": builder, "RUNTIME_IMAGE": runtime, "VERSION": tag},
        arch=arch,
        quiet=quiet,
    )
    seconds = time.monotonic() - start
    image_id = buildah.image_id(name)
    out_dir = image_cache() / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    tarball = out_dir / f"power-dra-driver-{tag}-{arch}.tar"
    stamp = tarball.with_suffix(".json")
    sizes: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        sizes = json.loads(stamp.read_text())
    if not tarball.exists() or sizes.get("id") != image_id:
        tarball.unlink(missing_ok=True)
        buildah.run("push", name, f"docker-archive:{tarball}:{name}")
        unpacked, compressed = _layer_sizes(tarball)
        stamp.write_text(
            json.dumps({"id": image_id, "unpacked": unpacked, "compressed": compressed})
        )
        sizes = {"unpacked": unpacked, "compressed": compressed}
    return BuiltImage(
        name=name,
        image_id=image_id,
        tarball=tarball,
        build_seconds=seconds,
        unpacked_bytes=int(sizes["unpacked"]),
        compressed_bytes=int(sizes["compressed"]),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.driver_image")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the driver image and export it as a tarball")
    b.add_argument("--tag", default=DEFAULT_TAG)
    b.add_argument("--arch", default=None, help="another architecture (ppc64le), under qemu")
    args = parser.parse_args(argv)
    if args.command == "build":
        image = build_image(args.tag, quiet=False, arch=args.arch)
        print(image.figures())
        print(image.tarball)


if __name__ == "__main__":
    main()
