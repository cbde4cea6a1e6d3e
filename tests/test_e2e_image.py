# SPDX-License-Identifier: Apache-2.0
"""The driver as users install it: the image built from the Containerfile, the
shipped manifests (kustomize base, then the Helm chart), the plugin DaemonSet
and the controller Deployment running as pods under a real kubelet and
containerd (tests/harness/node.py), with only the one-machine changes of
tests/harness/image_install.py. A workload pod then gets NX-gzip through them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.cluster import REPO, ControlPlane, yaml_stream
from tests.harness.driver_image import BuiltImage, build_image
from tests.harness.image_install import (
    CONTROLLER_LABEL,
    PLUGIN_LABEL,
    Install,
    OneMachine,
    container_rss_mib,
    install_helm,
    install_kustomize,
    wait_running,
)
from tests.harness.images import BUSYBOX_IMAGE
from tests.harness.node import (
    RealNode,
    allow_kubelet_api_access,
    ensure_containerd,
    missing_requirements,
    wait_for,
)
from tests.harness.plugin import DRIVER
from tests.rendering import tool

pytestmark = [pytest.mark.cluster]

NS = "nx-image-e2e"
WORKLOAD = (
    "trap 'exit 0' TERM; ls -l /dev/crypto/nx-gzip && env | grep '^NX_' | sort; "
    "echo workload-done; sleep 2147483647 & wait"
)


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    built = build_image()
    print(built.figures())
    return built


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> ControlPlane:
    missing = missing_requirements()
    if missing:
        pytest.skip("a real node needs " + "; ".join(missing))
    ensure_containerd()
    allow_kubelet_api_access(control_plane)  # kubectl logs
    if control_plane.kubectl("get", "namespace", NS, check=False).returncode != 0:
        control_plane.create_namespace(NS)
    return control_plane


def _node(cp: ControlPlane, image: BuiltImage, workdir: Path, name: str) -> Iterator[RealNode]:
    start = time.monotonic()
    node = RealNode(cp, workdir, name).start(with_plugin=False, images=[image.tarball])
    print(f"{name}: Ready with the image imported in {time.monotonic() - start:.1f} s")
    try:
        yield node
    finally:
        node.tear_down(NS)


def _workload(name: str) -> list[dict[str, Any]]:
    template = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "spec": {
                "devices": {"requests": [{"name": "nx", "exactly": {"deviceClassName": DRIVER}}]}
            }
        },
    }
    # The shipped example's pod, with the local busybox and host network.
    example = next(
        d
        for d in yaml.safe_load_all(
            (REPO / "manifests/examples/workloads/single-pod.yaml").read_text()
        )
        if d and d["kind"] == "Pod"
    )
    spec = example["spec"]
    spec["resourceClaims"][0]["resourceClaimTemplateName"] = name
    spec["hostNetwork"] = True
    spec["terminationGracePeriodSeconds"] = 1
    container = spec["containers"][0]
    container.update(image=BUSYBOX_IMAGE, imagePullPolicy="Never", command=["sh", "-c", WORKLOAD])
    example["metadata"] = {"name": name, "namespace": NS}
    return [template, example]


def _run_install(cp: ControlPlane, node: RealNode, install: Install) -> None:
    """What both installs must show, and the figures."""
    try:
        plugin = wait_running(cp, node, PLUGIN_LABEL)
        assert plugin["spec"]["containers"][0]["image"].startswith("localhost/power-dra-driver:")
        (slice_,) = wait_for("our ResourceSlice", node.slices, 60, 0.05)
        to_slice = time.monotonic() - install.applied_at
        assert slice_["spec"]["driver"] == DRIVER
        (device,) = slice_["spec"]["devices"]
        assert device["name"] == "nx-gzip"
        controller = wait_running(cp, node, CONTROLLER_LABEL)
        assert (
            controller["spec"]["containers"][0]["image"] == plugin["spec"]["containers"][0]["image"]
        )

        name = f"nx-{install.how}"
        cp.kubectl("apply", "-f", "-", input=yaml_stream(_workload(name)))

        def logged() -> str | None:
            out = cp.kubectl("logs", "-n", NS, name, check=False).stdout
            return out if "workload-done" in out else None

        logs: str = wait_for(f"workload {name} output", logged, 120, 0.2)
        assert "/dev/crypto/nx-gzip" in logs
        env = dict(line.split("=", 1) for line in logs.splitlines() if line.startswith("NX_"))
        assert env["NX_DRA_DEVICES"] == "nx-gzip"
        assert env["NX_DRA_CREDITS"] == "1"

        # The controller from the image wrote our status on the claim.
        def status_written() -> bool:
            claims = json.loads(cp.kubectl("get", "resourceclaims", "-n", NS, "-o", "json").stdout)
            return any(
                d.get("driver") == DRIVER
                for c in claims["items"]
                for d in (c.get("status") or {}).get("devices") or []
            )

        wait_for("claim status from the controller", status_written, 60, 0.2)
        print(
            f"{install.how}: DaemonSet applied -> slice visible {to_slice:.2f} s; "
            f"RSS in their containers: plugin {container_rss_mib(node, 'power-dra-kubeletplugin'):.1f} MiB, "
            f"controller {container_rss_mib(node, 'power-dra-controller'):.1f} MiB"
        )
    finally:
        cp.kubectl("delete", "pods", "--all", "-n", NS, "--wait=false", check=False)
        install.uninstall()


def test_kustomize_base_runs_the_driver_from_its_image_under_a_real_kubelet(
    cluster: ControlPlane, image: BuiltImage, tmp_path: Path
) -> None:
    for node in _node(cluster, image, tmp_path / "node", "node-5"):
        machine = OneMachine.for_node(cluster, node, image.name)
        _run_install(cluster, node, install_kustomize(cluster, machine, tmp_path))


def test_helm_chart_runs_the_driver_from_its_image_under_a_real_kubelet(
    cluster: ControlPlane, image: BuiltImage, tmp_path: Path
) -> None:
    try:
        helm = tool("helm")
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"helm unavailable: {exc}")
    for node in _node(cluster, image, tmp_path / "node", "node-6"):
        machine = OneMachine.for_node(cluster, node, image.name)
        _run_install(cluster, node, install_helm(cluster, machine, tmp_path, helm))
