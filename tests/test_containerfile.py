# SPDX-License-Identifier: Apache-2.0
"""The container image recipe. No container engine here, so: the Containerfile's
promises are read from the file, and what its build stage does (a wheel of the
project, installed into a clean virtual environment, both console scripts
working) is done for real."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.harness.cluster import REPO

CONTAINERFILE = REPO / "Containerfile"
SCRIPTS = {
    # console script -> flags its --help must mention
    "power-dra-kubeletplugin": ("--node-name", "--device-mode", "--cdi-root"),
    "power-dra-controller": ("--leader-elect", "--manage-plugin-daemonset"),
}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _arg_defaults() -> dict[str, str]:
    return dict(
        args.split("=", 1) for word, args in _instructions() if word == "ARG" and "=" in args
    )


# --- the recipe -------------------------------------------------------------------


def test_base_images_are_build_args_without_a_registry_host() -> None:
    defaults = _arg_defaults()
    froms = [args.split()[0] for word, args in _instructions() if word == "FROM"]
    assert froms == ["${BUILDER_IMAGE}", "${RUNTIME_IMAGE}"]
    for name in ("BUILDER_IMAGE", "RUNTIME_IMAGE"):
        first = defaults[name].split("/")[0]
        assert "." not in first and ":" not in first, defaults[name]
    assert defaults["BUILDER_IMAGE"] == "ubi9/python-311"
    assert defaults["RUNTIME_IMAGE"].startswith("ubi9/")


def test_build_stage_makes_the_wheel_and_runtime_stage_installs_it() -> None:
    build, runtime = _stages()
    assert any(w == "RUN" and "pip wheel" in a and " . " in f"{a} " for w, a in build)
    installs = [a for w, a in runtime if w == "RUN" and "pip install" in a]
    assert len(installs) == 1
    assert "--no-index" in installs[0] and "from=build" in installs[0]
    assert "python3.11" in " ".join(a for w, a in runtime if w == "RUN")


def test_build_stage_copies_every_package_the_project_ships() -> None:
    build = _stages()[0]
    copied = {
        part.rstrip("/").removeprefix("./")
        for w, a in build
        if w == "COPY"
        for part in a.split()
        if not part.startswith("--")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        assert pattern.rstrip("*") in copied, pattern
    assert {"pyproject.toml", "README.md", "LICENSE"} <= copied


def test_runtime_runs_as_non_root_user_1001_by_default() -> None:
    runtime = _stages()[-1]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1] == "1001"


def test_runtime_puts_both_console_scripts_on_path() -> None:
    runtime = _stages()[-1]
    env = " ".join(a for w, a in runtime if w == "ENV")
    venv = re.search(r"-m venv (?:--\S+ )*(/\S+)", " ".join(a for w, a in runtime if w == "RUN"))
    assert venv
    assert re.search(rf"PATH={re.escape(venv.group(1))}/bin:", env)
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem


def test_runtime_carries_the_license_and_oci_labels() -> None:
    runtime = _stages()[-1]
    assert ("COPY", "LICENSE /licenses/LICENSE") in runtime
    labels = " ".join(a for w, a in runtime if w == "LABEL")
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def test_no_step_depends_on_the_architecture() -> None:
    steps = " ".join(a for _, a in _instructions()).lower()
    for arch in ("ppc64le", "amd64", "x86_64", "aarch64", "arm64", "s390x", "targetarch"):
        assert arch not in steps


def test_build_context_keeps_what_the_build_copies() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".containerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("pyproject.toml", "README.md", "LICENSE", "controller", "kubeletplugin"):
        assert needed not in ignored
    assert {".git", ".venv", ".cache"} <= ignored


# --- what the build stage does, for real ----------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built like the image's build stage does (without
    its dependencies, which come from PyPI there)."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--wheel-dir", str(wheels), str(REPO),
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (path,) = wheels.glob("power_dra_driver-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a fresh virtual environment; returns its bin folder."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    # Dependencies come from the development environment, appended after the
    # new environment's own site-packages (so the project itself is only the
    # wheel's copy); a plain path line runs no editable-install hooks.
    new_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(new_site, "zz-dev-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


def test_wheel_carries_license_protos_and_type_markers(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.startswith("proto_gen/protos/") and n.endswith(".proto") for n in names)
    for package in ("controller", "kubeletplugin", "proto_gen"):
        assert f"{package}/py.typed" in names
    assert not any(n.startswith(("tests/", "manifests/", "bench/")) for n in names)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_wheel_installs_the_packages_outside_the_source_tree(installed: Path) -> None:
    out = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import controller, kubeletplugin, proto_gen; "
            "print(controller.__file__, kubeletplugin.__file__, proto_gen.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=installed,
        env=_clean_env(),
    )
    for path in out.stdout.split():
        assert Path(path).is_relative_to(installed.parent), path


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_answers_help(installed: Path, script: str) -> None:
    path = installed / script
    assert path.exists(), f"{script} not installed by the wheel"
    out = subprocess.run(
        [str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=installed,
        env=_clean_env(),
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for flag in SCRIPTS[script]:
        assert flag in out.stdout, f"{script} --help does not mention {flag}"
