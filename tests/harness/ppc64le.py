# SPDX-License-Identifier: Apache-2.0
"""The driver's Python environment for ppc64le, installed and run on this
(non-Power) machine under Debian's qemu-user-static.

- Python: Debian bookworm's ppc64el `python3.11` and everything it depends on,
  downloaded by apt through a private state (own sources list, lists, cache and
  empty dpkg status under the cache folder; the system's apt setup untouched)
  and unpacked with `dpkg-deb -x` into a root filesystem.
- Wheels: the pinned runtime dependencies as ppc64le wheels (pip download
  --platform manylinux2014_ppc64le --only-binary=:all:), PyYAML built as pure
  Python from its pinned source (no ppc64le wheel exists), the project's wheel.
- Install and run: the ppc64le Python creates the virtual environment and runs
  pip (from pip's wheel) with --no-index, then the kubelet plugin's entry point,
  all in a chroot under qemu-ppc64le. The binfmt_misc handler is registered
  only inside a private user + mount namespace (Linux >= 6.7 gives each user
  namespace its own binfmt_misc), never on the host.

    python -m tests.harness.ppc64le     # install, then inspect a fake Power10 node
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

from tests.harness.cluster import REPO
from tests.harness.driver_image import SUITE, debian_mirror, image_cache

DEB_ARCH = "ppc64el"
PLATFORM = "manylinux2014_ppc64le"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
VENV = "/opt/power-dra-driver"
# ELF, 64-bit, little endian, e_machine 21 (EM_PPC64): qemu's own binfmt rule.
BINFMT_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x15\x00"
BINFMT_MASK = r"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\x00"


def ppc64le_cache() -> Path:
    return image_cache() / "ppc64le"


def qemu_binary() -> Path:
    """qemu-ppc64le-static: unpacked into the cache by hack/install-deps.sh, or installed."""
    for candidate in (
        image_cache().parent / "qemu" / "root" / "usr" / "bin" / "qemu-ppc64le-static",
        Path("/usr/bin/qemu-ppc64le-static"),
    ):
        if candidate.is_file():
            return candidate
    raise RuntimeError("qemu-ppc64le-static not found: run hack/install-deps.sh")


def ensure_python_rootfs() -> Path:
    """Debian's ppc64el python3.11 and its dependencies unpacked into a root filesystem, once."""
    rootfs = ppc64le_cache() / "rootfs"
    if (rootfs / ".complete").exists():
        return rootfs
    state = ppc64le_cache() / "apt"
    shutil.rmtree(state, ignore_errors=True)
    for d in ("lists/partial", "archives/partial", "parts", "prefs"):
        (state / d).mkdir(parents=True)
    (state / "status").write_text("")
    (state / "sources.list").write_text(
        f"deb [signed-by={KEYRING}] {debian_mirror()} {SUITE} main\n"
    )
    opts = [
        "-q",
        "-o", f"APT::Architecture={DEB_ARCH}",
        "-o", f"APT::Architectures::={DEB_ARCH}",
        "-o", f"Dir::Etc::SourceList={state}/sources.list",
        "-o", f"Dir::Etc::SourceParts={state}/parts",
        "-o", f"Dir::Etc::Preferences={state}/prefs/none",
        "-o", f"Dir::Etc::PreferencesParts={state}/prefs",
        "-o", f"Dir::State::Lists={state}/lists",
        "-o", f"Dir::State::Status={state}/status",
        "-o", f"Dir::Cache={state}",
        "-o", f"Dir::Cache::Archives={state}/archives",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root",
        "-o", "Acquire::Languages=none",
        "-o", "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
    ]  # fmt: skip
    print(f"fetching Debian {SUITE} {DEB_ARCH} python3.11 (private apt state in {state})")
    subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", *opts, "install", "-y", "--download-only", "--no-install-recommends",
         "python3.11", "libc-bin"],
        check=True, capture_output=True,
    )  # fmt: skip
    tmp = rootfs.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    debs = sorted((state / "archives").glob("*.deb"))
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    for d in ("dev", "proc", "tmp", "fake-node", "dist"):
        (tmp / d).mkdir(exist_ok=True)
    (tmp / "tmp").chmod(0o1777)
    (tmp / ".complete").write_text("".join(f"{d.name}\n" for d in debs))
    shutil.rmtree(rootfs, ignore_errors=True)
    tmp.rename(rootfs)
    shutil.rmtree(state, ignore_errors=True)
    return rootfs


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def ensure_wheels() -> Path:
    """The pinned runtime dependencies for ppc64le (plus pip's own wheel), once per pin set."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = pyproject["project"]["dependencies"]
    pins = _pins()
    key = hashlib.sha256(
        ((REPO / "constraints.txt").read_text() + "\n".join(requirements)).encode()
    ).hexdigest()[:12]
    dist = ppc64le_cache() / f"dist-{key}"
    if (dist / ".complete").exists():
        return dist
    tmp = dist.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "sdist").mkdir(parents=True)
    # PyYAML: no ppc64le wheel in any release; its pure-Python build is py3-none-any.
    _pip("download", "--no-deps", "--no-binary=:all:", "-d", str(tmp / "sdist"),
         f"pyyaml=={pins['pyyaml']}")  # fmt: skip
    (sdist,) = (tmp / "sdist").glob("pyyaml-*.tar.gz")
    _pip("wheel", "--no-deps", "-w", str(tmp), str(sdist), env={"PYYAML_FORCE_LIBYAML": "0"})
    shutil.rmtree(tmp / "sdist")
    reqs = tmp / "requirements.txt"
    reqs.write_text("\n".join(requirements) + "\n")
    _pip(
        "download", "-d", str(tmp), "-c", str(REPO / "constraints.txt"), "-r", str(reqs),
        "--find-links", str(tmp), "--platform", PLATFORM, "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
    )  # fmt: skip
    reqs.unlink()
    # pip itself runs from its wheel inside the ppc64le root (not installed there).
    _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(tmp / "pip"), "pip")
    (tmp / ".complete").write_text("")
    shutil.rmtree(dist, ignore_errors=True)
    tmp.rename(dist)
    return dist


def project_wheel(out: Path) -> Path:
    """The project's own wheel (pure Python), built from this checkout."""
    _pip("wheel", "--no-deps", "-w", str(out), str(REPO))
    (wheel,) = out.glob("power_dra_driver-*.whl")
    return wheel


def run_in_private_binfmt(rootfs: Path, script: str, binds: dict[str, Path]) -> str:
    """Run `script` (sh, `$R` = the root) in a private user + mount namespace where qemu-ppc64le is
    the binfmt_misc handler for ppc64le ELF files; `binds` maps paths inside
    `rootfs` to host folders. Returns stdout; raises on failure."""
    qemu = qemu_binary()
    rule = f":power-dra-ppc64le:M::{BINFMT_MAGIC}:{BINFMT_MASK}:{qemu}:F"
    with tempfile.TemporaryDirectory(prefix="power-dra-binfmt-") as tmp:
        mounts = [
            f"mount -t binfmt_misc binfmt_misc {tmp}",
            f"printf '%s' {shlex.quote(rule)} > {tmp}/register",
            f"mount --rbind /dev {rootfs}/dev",
            f"mount --rbind /proc {rootfs}/proc",
        ]
        for inside, host in binds.items():
            mounts.append(f"mount --bind {shlex.quote(str(host))} {rootfs}{inside}")
        # The root has no shell: `script` runs in the host's and chroots each command ($R).
        inner = "set -e\n" + "\n".join(mounts) + f"\nR={shlex.quote(str(rootfs))}\n" + script
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
             "sh", "-c", inner],
            capture_output=True, text=True, timeout=1200, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"ppc64le run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def install_and_inspect(fake_node: Path, work: Path) -> str:
    """Install the driver into the ppc64le root from the pins, offline, and run
    `power-dra-kubeletplugin inspect` on `fake_node` (sys/ and host/ inside).
    Returns the run's stdout: the platform line, then inspect's JSON."""
    rootfs = ensure_python_rootfs()
    dist = ensure_wheels()
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    wheel = project_wheel(project)
    shutil.copy2(wheel, dist / wheel.name)
    (pip_wheel,) = (dist / "pip").glob("pip-*.whl")
    # A fresh environment every time: the install itself is what is shown.
    shutil.rmtree(rootfs / VENV.lstrip("/"), ignore_errors=True)
    script = f"""
        chroot "$R" /usr/bin/python3.11 -m venv --without-pip {VENV}
        chroot "$R" {VENV}/bin/python /dist/pip/{pip_wheel.name}/pip install -q --no-cache-dir \\
            --no-index --find-links /dist --only-binary=:all: \\
            -c /dist/constraints.txt power-dra-driver
        chroot "$R" {VENV}/bin/python -c 'import platform, orjson, yaml; print(platform.machine(), orjson.__version__, yaml.__with_libyaml__)'
        chroot "$R" {VENV}/bin/power-dra-kubeletplugin inspect --sysfs-root=/fake-node/sys \\
            --host-dev-root=/fake-node/host --node-name=power10-node
    """
    shutil.copy2(REPO / "constraints.txt", dist / "constraints.txt")
    try:
        return run_in_private_binfmt(rootfs, script, {"/dist": dist, "/fake-node": fake_node})
    finally:
        (dist / wheel.name).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    import time

    from tests.fake_sysfs import make_powervm_tree, write_dev_node

    del argv
    with tempfile.TemporaryDirectory() as tmp:
        node = Path(tmp) / "node"
        make_powervm_tree(node / "sys", total_credits=240)
        write_dev_node(node / "host")
        start = time.monotonic()
        print(install_and_inspect(node, Path(tmp) / "work"))
        print(f"ppc64le install + inspect under qemu: {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
