# SPDX-License-Identifier: Apache-2.0
"""Kubernetes objects the DRA tests (and the demo) apply, as plain dicts.

cp.apply([device_class("nx-test"),
          template(ns, "nx", claim_spec({"nx": "nx-test"})),
          pod(ns, "p", node, templates={"nx": "nx"})])
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.harness.cluster import ControlPlane
from tests.harness.images import BUSYBOX_IMAGE
from tests.harness.plugin import DRIVER
from tests.kubelet_standin import ClaimName

NXCONFIG_HEADER = {"apiVersion": "nx.device.power.ibm.com/v1alpha1", "kind": "NxConfig"}


def device_class(name: str, driver: str = DRIVER, version: str = "v1") -> dict[str, Any]:
    """A DeviceClass selecting every device of `driver` (the driver's own class, as
    the controller keeps it, is `device_class(DRIVER)`)."""
    return {
        "apiVersion": f"resource.k8s.io/{version}",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{driver}'"}}]},
    }


def claim_spec(requests: dict[str, str], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A claim spec: one request per name -> device class, and optionally one
    NxConfig (fields without the header) for all requests."""
    devices: dict[str, Any] = {
        "requests": [
            {"name": name, "exactly": {"deviceClassName": cls}} for name, cls in requests.items()
        ]
    }
    if config is not None:
        devices["config"] = [
            {"opaque": {"driver": DRIVER, "parameters": {**NXCONFIG_HEADER, **config}}}
        ]
    return {"devices": devices}


def template(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A ResourceClaimTemplate."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"spec": spec},
    }


def claim(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A standalone ResourceClaim."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def pod(
    ns: str,
    name: str,
    node: str,
    templates: dict[str, str] | None = None,
    claims: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod pinned to `node` using claims from templates and existing claims
    (pod claim entry -> object name); its one container uses them all."""
    entries = [{"name": e, "resourceClaimTemplateName": t} for e, t in (templates or {}).items()]
    entries += [{"name": e, "resourceClaimName": c} for e, c in (claims or {}).items()]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [
                {
                    "name": "c",
                    "image": "nx-app",
                    "resources": {"claims": [{"name": e["name"]} for e in entries]},
                }
            ],
            "resourceClaims": entries,
        },
    }


def real_node_pod(
    ns: str, name: str, node: str, template: str, command: str, *, request: str | None = None
) -> dict[str, Any]:
    """`pod` as a real test node runs it: one claim from `template` (its `request`
    only, when given), the local busybox running `command`, host network (the node
    has no CNI), no service account token, a one-second grace period."""
    manifest = pod(ns, name, node, templates={"nx": template})
    spec = manifest["spec"]
    spec.update(
        hostNetwork=True,
        automountServiceAccountToken=False,
        enableServiceLinks=False,
        terminationGracePeriodSeconds=1,
    )
    [container] = spec["containers"]
    container.update(
        name="app", image=BUSYBOX_IMAGE, imagePullPolicy="Never", command=["sh", "-c", command]
    )
    if request:
        container["resources"]["claims"][0]["request"] = request
    return manifest


def allocate_claims(
    cp: ControlPlane,
    ns: str,
    node: str,
    *,
    device_class_name: str,
    count: int,
    timeout: float = 60.0,
) -> list[ClaimName]:
    """Create `count` claims and one pod using them all; return them once the
    scheduler allocated every one (in name order)."""
    names = [f"c{i:03d}" for i in range(count)]
    objects = [claim(ns, n, claim_spec({"nx": device_class_name})) for n in names]
    objects.append(pod(ns, "holder", node, claims={n: n for n in names}))
    cp.apply(objects)
    deadline = time.monotonic() + timeout
    while True:
        items = json.loads(cp.kubectl("get", "resourceclaims", "-n", ns, "-o", "json").stdout)[
            "items"
        ]
        allocated = [c for c in items if (c.get("status") or {}).get("allocation")]
        if len(allocated) == count:
            return sorted(
                (ClaimName(ns, c["metadata"]["uid"], c["metadata"]["name"]) for c in allocated),
                key=lambda c: c.name,
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(allocated)} of {count} claims allocated after {timeout} s")
        time.sleep(0.1)


def ready_for_real_nodes(cp: ControlPlane, namespace: str) -> None:
    """What every real-node test needs first: the machine's requirements (a skip
    naming what is missing), containerd, the API server allowed to reach kubelets
    (exec, logs), the driver's DeviceClass and `namespace`."""
    import subprocess

    import pytest

    from tests.harness.node import allow_kubelet_api_access, ensure_containerd, missing_requirements

    missing = missing_requirements()
    if missing:
        pytest.skip("a real node needs " + "; ".join(missing))
    try:
        ensure_containerd()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"containerd >= 1.7 unavailable (hack/fetch-containerd.sh failed: {exc})")
    allow_kubelet_api_access(cp)
    cp.apply(device_class(DRIVER, version=cp.release.resource_version))
    if cp.kubectl("get", "namespace", namespace, check=False).returncode != 0:
        cp.create_namespace(namespace)
