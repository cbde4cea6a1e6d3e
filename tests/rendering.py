# SPDX-License-Identifier: Apache-2.0
"""Rendering the deployment manifests for tests: kustomize (the built kubectl),
helm (built by hack/build-tools.sh), and server-side dry runs against the
test control plane."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.harness.cluster import REPO, ControlPlane, cache_root, ensure_binaries, yaml_stream

MANIFESTS = REPO / "manifests"
CHART = MANIFESTS / "helm" / "power-dra-driver"
OLM_BUNDLE = MANIFESTS / "olm"
TOOLS_BIN = cache_root() / "tools" / "bin"
NAMESPACE = "power-dra-driver"
DRIVER = "nx.device.power.ibm.com"
PLUGIN_SA = "power-dra-kubeletplugin"
CONTROLLER_SA = "power-dra-controller"

Obj = dict[str, Any]


def tool(name: str) -> Path:
    """A packaging tool (helm, operator-verify), built once by hack/build-tools.sh."""
    path = TOOLS_BIN / name
    if not path.exists():
        subprocess.run([str(REPO / "hack" / "build-tools.sh"), name], check=True)
    return path


def load_docs(text: str) -> list[Obj]:
    """The non-empty YAML documents of a multi-document stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize(directory: Path) -> list[Obj]:
    """`kubectl kustomize DIR` with the pinned kubectl."""
    kubectl = ensure_binaries(["kubectl"]) / "kubectl"
    out = subprocess.run(
        [str(kubectl), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{out.stderr}")
    return load_docs(out.stdout)


def helm(
    *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the pinned helm without touching the user's helm configuration."""
    home = Path(tempfile.gettempdir()) / "power-dra-driver-helm"
    with tempfile.TemporaryDirectory(prefix="helm-kube-cache-") as kube_cache:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            **{f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CONFIG", "CACHE", "DATA")},
            # No discovery cache shared between control planes: it is keyed by
            # host:port, and ports are reused by servers of other releases.
            "KUBECACHEDIR": kube_cache,
        }
        proc = subprocess.run(
            [str(tool("helm")), *args],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            cwd=cwd,
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def helm_template(
    *extra: str, namespace: str = NAMESPACE, release: str = "power-dra-driver"
) -> list[Obj]:
    """`helm template` of the chart (offline: helm's built-in API versions)."""
    return load_docs(helm("template", release, str(CHART), "--namespace", namespace, *extra).stdout)


def key(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name) of an object."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def index(objs: Iterable[Obj]) -> dict[tuple[str, str, str], Obj]:
    """Objects by (kind, namespace, name); a duplicate is an error."""
    result: dict[tuple[str, str, str], Obj] = {}
    for obj in objs:
        k = key(obj)
        assert k not in result, f"duplicate object {k}"
        result[k] = obj
    return result


def one(objs: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    """The single object of a kind (and name)."""
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[key(o) for o in found]}"
    return found[0]


def container(workload: Obj, name: str | None = None) -> Obj:
    """A container of a Deployment/DaemonSet/Pod (the only one when no name is given)."""
    spec = workload["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    containers = pod["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def env_of(c: Obj) -> dict[str, Any]:
    """A container's env as name -> value (or valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def ensure_namespace(cp: ControlPlane, name: str) -> None:
    """Create a namespace for real (dry runs of namespaced objects need it)."""
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    cp.kubectl("apply", "--server-side", "--field-manager=tests", "-f", "-", input=json.dumps(ns))
    # Pods are admitted only once the controller-manager made the default
    # ServiceAccount.
    deadline = time.monotonic() + 30
    while cp.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name}"
        time.sleep(0.1)


def server_dry_run(cp: ControlPlane, objs: Sequence[Obj]) -> subprocess.CompletedProcess[str]:
    """`kubectl apply --server-side --dry-run=server` of the objects, as admin.

    Namespaces are applied for real first, since the server checks that the
    namespace of each namespaced object exists."""
    for obj in objs:
        if obj["kind"] == "Namespace":
            ensure_namespace(cp, obj["metadata"]["name"])
    doc = yaml_stream(objs)
    return cp.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=power-dra-driver-tests",
        "-f",
        "-",
        input=doc,
        check=False,
    )


# A stand-in for OpenShift's SecurityContextConstraints CRD: the same group,
# kind, scope and required fields as the real one (openshift/api,
# security/v1), with types for the fields our SCC sets and the rest open.
SCC_CRD: Obj = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "securitycontextconstraints.security.openshift.io"},
    "spec": {
        "group": "security.openshift.io",
        "scope": "Cluster",
        "names": {
            "kind": "SecurityContextConstraints",
            "listKind": "SecurityContextConstraintsList",
            "plural": "securitycontextconstraints",
            "singular": "securitycontextconstraints",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                        "required": [
                            "allowHostDirVolumePlugin",
                            "allowHostIPC",
                            "allowHostNetwork",
                            "allowHostPID",
                            "allowHostPorts",
                            "allowPrivilegedContainer",
                            "allowedCapabilities",
                            "defaultAddCapabilities",
                            "priority",
                            "readOnlyRootFilesystem",
                            "requiredDropCapabilities",
                            "volumes",
                        ],
                        "properties": {
                            **{
                                f: {"type": "boolean"}
                                for f in (
                                    "allowHostDirVolumePlugin",
                                    "allowHostIPC",
                                    "allowHostNetwork",
                                    "allowHostPID",
                                    "allowHostPorts",
                                    "allowPrivilegedContainer",
                                    "readOnlyRootFilesystem",
                                )
                            },
                            **{
                                f: {"type": "boolean", "nullable": True}
                                for f in (
                                    "allowPrivilegeEscalation",
                                    "defaultAllowPrivilegeEscalation",
                                )
                            },
                            **{
                                f: {"type": "array", "nullable": True, "items": {"type": "string"}}
                                for f in (
                                    "allowedCapabilities",
                                    "defaultAddCapabilities",
                                    "requiredDropCapabilities",
                                    "seccompProfiles",
                                    "volumes",
                                    "users",
                                    "groups",
                                )
                            },
                            "priority": {"type": "integer", "format": "int32", "nullable": True},
                            **{
                                f: {
                                    "type": "object",
                                    "nullable": True,
                                    "x-kubernetes-preserve-unknown-fields": True,
                                    "properties": {"type": {"type": "string"}},
                                }
                                for f in (
                                    "runAsUser",
                                    "seLinuxContext",
                                    "fsGroup",
                                    "supplementalGroups",
                                )
                            },
                        },
                    }
                },
            }
        ],
    },
}


def _crd_established(cp: ControlPlane, name: str) -> bool:
    out = cp.kubectl("get", "crd", name, "-o", "json", check=False)
    conditions = json.loads(out.stdout or "{}").get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def install_crd(cp: ControlPlane, crd: Obj) -> None:
    """Create a CRD (idempotent) and wait until the server serves it."""
    cp.kubectl("apply", "--server-side", "--field-manager=tests", "-f", "-", input=json.dumps(crd))
    name, group = crd["metadata"]["name"], crd["spec"]["group"]
    deadline = time.monotonic() + 60
    # Established first, then discovery of the new group (it lags a little).
    while (
        not _crd_established(cp, name)
        or crd["spec"]["names"]["plural"]
        not in cp.kubectl("api-resources", f"--api-group={group}", "-o", "name").stdout
    ):
        assert time.monotonic() < deadline, f"{name} not served after 60 s"
        time.sleep(0.2)
