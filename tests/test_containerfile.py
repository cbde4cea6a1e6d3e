# SPDX-License-Identifier: Apache-2.0
"""The driver's image, built from the Containerfile with buildah (local stand-ins
for the UBI bases, tests/harness/driver_image.py) and run: its entry points,
its environment, its configuration. The build is cached across runs (layer
cache), so only the first run pays for it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fake_sysfs import make_powervm_tree, write_dev_node
from tests.harness.cluster import REPO
from tests.harness.driver_image import Buildah, BuiltImage, build_image

FAKE = "/fake-node"


@pytest.fixture(scope="session")
def image() -> BuiltImage:
    built = build_image()
    print(built.figures())
    return built


@pytest.fixture(scope="session")
def buildah() -> Buildah:
    return Buildah()


@pytest.fixture
def power10_node(tmp_path: Path) -> Path:
    """A fake Power10 LPAR (sysfs tree and /dev/crypto/nx-gzip) to mount into the container."""
    make_powervm_tree(tmp_path / "sys", total_credits=240)
    write_dev_node(tmp_path / "host")
    return tmp_path


def _config(buildah: Buildah, image: BuiltImage) -> dict[str, Any]:
    out = buildah.run("inspect", "--type", "image", image.name).stdout
    config: dict[str, Any] = json.loads(out)["OCIv1"]["config"]
    return config


def _python(buildah: Buildah, image: BuiltImage, code: str) -> str:
    proc = buildah.run_in(image.name, ["python", "-c", code])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_plugin_inspects_a_power10_node_from_the_image(
    image: BuiltImage, buildah: Buildah, power10_node: Path
) -> None:
    # As the DaemonSet runs it: user 0, the node's sysfs mounted read-only.
    proc = buildah.run_in(
        image.name,
        [
            "power-dra-kubeletplugin", "inspect", f"--sysfs-root={FAKE}/sys",
            f"--host-dev-root={FAKE}/host", "--node-name=node-a",
        ],
        volumes=[f"{power10_node}:{FAKE}:ro"],
        user="0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["inventory"]["platform"] == "powervm"
    assert doc["inventory"]["processor_generation"] == "power10"
    assert doc["inventory"]["credits"]["total"] == 240
    (only,) = doc["resourceSlices"]
    assert only["spec"]["nodeName"] == "node-a"


def test_controller_answers_help_from_the_image_as_its_default_user(
    image: BuiltImage, buildah: Buildah
) -> None:
    proc = buildah.run_in(image.name, ["power-dra-controller", "--help"])
    assert proc.returncode == 0, proc.stderr
    for flag in ("--leader-elect", "--manage-plugin-daemonset"):
        assert flag in proc.stdout


def test_image_runs_as_user_1001_with_both_scripts_on_path_and_no_bytecode_writes(
    image: BuiltImage, buildah: Buildah
) -> None:
    config = _config(buildah, image)
    assert config["User"] == "1001"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/power-dra-driver/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root filesystem
    proc = buildah.run_in(image.name, ["sh", "-c", "id -u; command -v power-dra-kubeletplugin"])
    assert proc.stdout.split() == ["1001", "/opt/power-dra-driver/bin/power-dra-kubeletplugin"]


def test_image_carries_the_license_and_oci_labels(image: BuiltImage, buildah: Buildah) -> None:
    labels = _config(buildah, image)["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    for label in ("title", "description"):
        assert labels[f"org.opencontainers.image.{label}"]
    text = _python(buildah, image, "print(open('/licenses/LICENSE').read())")
    assert text.strip() == (REPO / "LICENSE").read_text().strip()


def test_image_installs_exactly_the_pinned_runtime_dependencies(
    image: BuiltImage, buildah: Buildah
) -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    out = _python(
        buildah,
        image,
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
    )
    installed = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in json.loads(out).items()}
    assert installed.pop("power-dra-driver") == "0.1.0"
    for name, version in installed.items():
        assert pins.get(name) == version, f"{name} {version} is not the pin {pins.get(name)}"
    assert installed["orjson"] == "3.11.9"  # the last orjson with ppc64le wheels


def test_image_leaves_out_kubernetes_asyncio_pip_and_build_tools(
    image: BuiltImage, buildah: Buildah
) -> None:
    # In a pod both processes authenticate with the service account; only
    # exec-plugin kubeconfigs (out of cluster) need kubernetes-asyncio.
    out = _python(
        buildah,
        image,
        "import importlib.util as u; "
        "print([m for m in ('kubernetes_asyncio', 'pip', 'setuptools', 'wheel', 'Cython') "
        "if u.find_spec(m)])",
    )
    assert out.strip() == "[]"


def test_image_pyyaml_is_pure_python_on_every_platform(image: BuiltImage, buildah: Buildah) -> None:
    out = _python(buildah, image, "import yaml; print(yaml.__with_libyaml__, yaml.__version__)")
    assert out.split() == ["False", "6.0.4"]


def test_image_is_exported_as_a_local_docker_archive(image: BuiltImage) -> None:
    assert image.name.startswith("localhost/power-dra-driver:")
    listing = subprocess.run(
        ["tar", "-tf", str(image.tarball)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "manifest.json" in listing
    manifest = subprocess.run(
        ["tar", "-xOf", str(image.tarball), "manifest.json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(manifest)[0]["RepoTags"] == [image.name]
    assert os.path.getsize(image.tarball) > 0


def test_a_source_edit_reaches_the_rebuilt_image(
    image: BuiltImage, buildah: Buildah, tmp_path: Path
) -> None:
    # The layer cache must not ship stale code (the trap of RUN --mount=from=...).
    context = tmp_path / "context"
    shutil.copytree(
        REPO,
        context,
        ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "*_cache", "__pycache__"),
    )
    marker = f"EDITED_{os.getpid()}"
    init = context / "kubeletplugin" / "__init__.py"
    init.write_text(init.read_text() + f"\n{marker} = True\n")
    edited = build_image(tag="0.1.0-edited", context=context)
    try:
        out = _python(buildah, edited, f"import kubeletplugin; print(kubeletplugin.{marker})")
        assert out.strip() == "True"
        out = _python(
            buildah, image, f"import kubeletplugin; print(hasattr(kubeletplugin, '{marker}'))"
        )
        assert out.strip() == "False"
    finally:
        buildah.run("rmi", edited.name)
        edited.tarball.unlink(missing_ok=True)
        edited.tarball.with_suffix(".json").unlink(missing_ok=True)


def test_controller_in_the_image_says_how_to_get_auth_provider_kubeconfigs(
    image: BuiltImage, buildah: Buildah, tmp_path: Path
) -> None:
    # kubernetes-asyncio is the optional extra `auth-provider`, not in the image.
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [
            {
                "name": "u",
                "user": {"auth-provider": {"name": "oidc", "config": {"id-token": "x"}}},
            }
        ],
    }
    folder = tmp_path / "kubeconfig"
    folder.mkdir()
    (folder / "config").write_text(json.dumps(kubeconfig))
    folder.chmod(0o755)
    (folder / "config").chmod(0o644)
    proc = buildah.run_in(
        image.name,
        ["power-dra-controller", "--kubeconfig=/kc/config"],
        volumes=[f"{folder}:/kc:ro"],
    )
    assert proc.returncode != 0
    assert "pip install 'power-dra-driver[auth-provider]'" in proc.stdout + proc.stderr
