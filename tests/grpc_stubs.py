# SPDX-License-Identifier: Apache-2.0
"""grpcio stubs for the kubelet's side of the plugin APIs, built at test time.

Tests play the kubelet with grpcio, a gRPC implementation independent of the
grpclib server under test. The stubs are generated with grpcio-tools from the
same proto_gen/protos files into .cache/grpc_stubs/<hash>/ (ignored by git),
once per content of the protos and tool versions, and imported from there
under the top-level package `kubelet_grpc_stubs`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "proto_gen" / "protos"
CACHE = ROOT / ".cache" / "grpc_stubs"
PACKAGE = "kubelet_grpc_stubs"


@dataclass(frozen=True)
class Api:
    """Messages (`pb2`) and client stubs (`grpc`) of one proto file."""

    pb2: ModuleType
    grpc: ModuleType


@dataclass(frozen=True)
class KubeletApis:
    registration: Api
    dra_v1: Api
    dra_v1beta1: Api
    health_v1alpha1: Api
    health_v1beta1: Api
    health_v1: Api

    @property
    def dra(self) -> dict[str, Api]:
        return {"v1": self.dra_v1, "v1beta1": self.dra_v1beta1}

    @property
    def health(self) -> dict[str, Api]:
        return {
            "v1alpha1": self.health_v1alpha1,
            "v1beta1": self.health_v1beta1,
            "v1": self.health_v1,
        }


def _cache_key(protos: list[Path]) -> str:
    h = hashlib.sha256()
    for dist in ("grpcio-tools", "protobuf"):
        h.update(f"{dist}={importlib.metadata.version(dist)}\n".encode())
    for p in protos:
        h.update(p.relative_to(PROTOS).as_posix().encode() + b"\n")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _generate(target: Path, protos: list[Path]) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tmp-", dir=CACHE))
    try:
        # Protos go under a package prefix so the generated absolute imports
        # (`from kubelet_grpc_stubs.dra.v1 import api_pb2`) cannot collide with
        # anything else on sys.path.
        src = work / "src"
        out = work / "out"
        for p in protos:
            dst = src / PACKAGE / p.relative_to(PROTOS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        out.mkdir()
        rel = [(Path(PACKAGE) / p.relative_to(PROTOS)).as_posix() for p in protos]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{src}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                *rel,
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"grpcio-tools protoc failed:\n{result.stderr}")
        try:
            os.rename(out, target)
        except OSError:
            if not target.is_dir():  # another test process won the race: fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _api(subdir: str) -> Api:
    base = f"{PACKAGE}.{subdir.replace('/', '.')}"
    return Api(
        pb2=importlib.import_module(f"{base}.api_pb2"),
        grpc=importlib.import_module(f"{base}.api_pb2_grpc"),
    )


@cache
def load() -> KubeletApis:
    """Generate (if needed) and import the grpcio stubs of all kubelet APIs."""
    protos = sorted(PROTOS.rglob("*.proto"))
    target = CACHE / _cache_key(protos)
    if not target.is_dir():
        _generate(target, protos)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return KubeletApis(
        registration=_api("pluginregistration/v1"),
        dra_v1=_api("dra/v1"),
        dra_v1beta1=_api("dra/v1beta1"),
        health_v1alpha1=_api("dra_health/v1alpha1"),
        health_v1beta1=_api("dra_health/v1beta1"),
        health_v1=_api("dra_health/v1"),
    )
