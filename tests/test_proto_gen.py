# SPDX-License-Identifier: Apache-2.0
"""Our .proto files say what upstream's say on the wire, and the committed
betterproto2 code is exactly what hack/gen_proto.py makes of them."""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import grpc_stubs

ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = ROOT / "hack" / "gen_proto.py"
GENERATED = ROOT / "proto_gen" / "generated"
PROTOS = ROOT / "proto_gen" / "protos"


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_committed_generated_code_is_up_to_date() -> None:
    result = run_check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_with_a_diff_on_a_modified_copy(tmp_path: Path) -> None:
    copy = tmp_path / "generated"
    shutil.copytree(GENERATED, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "v1alpha1" / "__init__.py"
    target.write_text(target.read_text().replace("HEALTHY = 1\n", "HEALTHY = 7\n"))
    (copy / "stray.py").write_text("# SPDX-License-Identifier: Apache-2.0\n")

    result = run_check("--generated", str(copy))

    assert result.returncode == 1
    assert "-    HEALTHY = 7" in result.stdout
    assert "+    HEALTHY = 1" in result.stdout
    assert "not generated any more: stray.py" in result.stdout
    assert "out of date" in result.stderr


def test_every_proto_and_generated_file_starts_with_spdx() -> None:
    files = [*PROTOS.rglob("*.proto"), *GENERATED.rglob("*.py")]
    assert files
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.endswith("SPDX-License-Identifier: Apache-2.0"), f


# What the kubelet calls (gRPC method paths), per generated service.
WIRE_PATHS = {
    "pluginregistration": {
        "/pluginregistration.Registration/GetInfo",
        "/pluginregistration.Registration/NotifyRegistrationStatus",
    },
    "k8s.io.kubelet.pkg.apis.dra.v1": {
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
    },
    "k8s.io.kubelet.pkg.apis.dra.v1beta1": {
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources",
    },
    "v1alpha1": {"/v1alpha1.DRAResourceHealth/NodeWatchResources"},
    "v1beta1": {"/v1beta1.DRAResourceHealth/NodeWatchResources"},
    "v1": {"/v1.DRAResourceHealth/NodeWatchResources"},
}


@pytest.mark.parametrize("package", sorted(WIRE_PATHS))
def test_generated_services_serve_the_kubelets_method_paths(package: str) -> None:
    module = importlib.import_module("proto_gen.generated." + package)
    bases = [v for k, v in vars(module).items() if k.endswith("Base") and isinstance(v, type)]
    assert len(bases) == 1
    assert set(bases[0]().__mapping__()) == WIRE_PATHS[package]


# Fields (name, number) per message, as in upstream k8s.io/kubelet/pkg/apis.
_CLAIM = [("namespace", 1), ("uid", 2), ("name", 3)]
_DRA_V1BETA1 = {
    "NodePrepareResourcesRequest": [("claims", 1)],
    "NodePrepareResourcesResponse": [("claims", 1)],
    "NodePrepareResourceResponse": [("devices", 1), ("error", 2)],
    "Device": [("request_names", 1), ("pool_name", 2), ("device_name", 3), ("cdi_device_ids", 4)],
    "NodeUnprepareResourcesRequest": [("claims", 1)],
    "NodeUnprepareResourcesResponse": [("claims", 1)],
    "NodeUnprepareResourceResponse": [("error", 1)],
    "Claim": _CLAIM,
}
_DRA_V1 = {**_DRA_V1BETA1, "Device": [*_DRA_V1BETA1["Device"], ("share_id", 5)]}
_HEALTH = {
    "NodeWatchResourcesRequest": [],
    "DeviceIdentifier": [("pool_name", 1), ("device_name", 2)],
    "DeviceHealth": [
        ("device", 1),
        ("health", 2),
        ("last_updated_time", 3),
        ("health_check_timeout_seconds", 4),
        ("message", 5),
    ],
    "NodeWatchResourcesResponse": [("devices", 1)],
}
_REGISTRATION = {
    "PluginInfo": [("type", 1), ("name", 2), ("endpoint", 3), ("supported_versions", 4)],
    "RegistrationStatus": [("plugin_registered", 1), ("error", 2)],
    "RegistrationStatusResponse": [],
    "InfoRequest": [],
}
MESSAGES = {
    "registration": ("pluginregistration", _REGISTRATION),
    "dra_v1": ("k8s.io.kubelet.pkg.apis.dra.v1", _DRA_V1),
    "dra_v1beta1": ("k8s.io.kubelet.pkg.apis.dra.v1beta1", _DRA_V1BETA1),
    "health_v1alpha1": ("v1alpha1", _HEALTH),
    "health_v1beta1": ("v1beta1", _HEALTH),
    "health_v1": ("v1", _HEALTH),
}


@pytest.mark.parametrize("api_name", sorted(MESSAGES))
def test_protos_have_upstream_packages_messages_and_field_numbers(api_name: str) -> None:
    package, messages = MESSAGES[api_name]
    descriptor: Any = getattr(grpc_stubs.load(), api_name).pb2.DESCRIPTOR
    assert descriptor.package == package
    got = {
        name: [(f.name, f.number) for f in m.fields]
        for name, m in descriptor.message_types_by_name.items()
    }
    assert got == messages


def test_health_status_enum_matches_upstream() -> None:
    for api in grpc_stubs.load().health.values():
        enum = api.pb2.DESCRIPTOR.enum_types_by_name["HealthStatus"]
        assert {v.name: v.number for v in enum.values} == {
            "UNKNOWN": 0,
            "HEALTHY": 1,
            "UNHEALTHY": 2,
        }


def test_generated_code_loads_without_importlib_metadata() -> None:
    # The plugin imports the generated messages before its sockets serve: they
    # must not bring in importlib.metadata (and with it email, zipfile, csv).
    code = (
        "import sys\n"
        "from proto_gen.generated import pluginregistration\n"
        "import betterproto2\n"
        "print(betterproto2.__version__, 'importlib.metadata' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [importlib.metadata.version("betterproto2"), "False"]


def test_code_from_another_compiler_minor_version_is_refused() -> None:
    code = (
        "import proto_gen, betterproto2\n"
        "major, minor = betterproto2.__version__.split('.')[:2]\n"
        "betterproto2.check_compiler_version(f'{major}.{minor}.99')\n"
        "betterproto2.check_compiler_version(f'{major}.{int(minor) + 1}.0')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "hack/gen_proto.py" in run.stderr, run.stderr
