# SPDX-License-Identifier: Apache-2.0
"""Every Kubernetes release we serve, on its own control plane: install paths,
the controller's jobs, and the README's release table.

For each release of the matrix (`hack/k8s-bin/v1.*`, narrowed by K8S_MATRIX)
a control plane of that release's own binaries, with the gates its users turn
on for DRA, takes the driver as users install it:

- `helm template --kube-version <release>` output, applied for real;
- `helm install` / `helm uninstall` against the live server;
- `kubectl apply --server-side -k manifests/base` with that release's kubectl,
  then the controller (as its ServiceAccount, shipped RBAC) creates the
  DeviceClass in the version the server serves, collects an orphaned slice,
  puts a bad NxConfig on the claim as a Warning Event, and writes claim status
  where the server keeps it (where it does not: one warning and a metric,
  never a success log).

The examples of each release run on real nodes in tests/test_demo.py.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import (
    REPO,
    ControlPlane,
    Process,
    free_port,
    matrix_releases,
    resource_path,
    yaml_stream,
)
from tests.harness.demo import sa_kubeconfig
from tests.harness.node import Api, wait_for
from tests.harness.plugin import DRIVER, PluginProcess
from tests.metrics_text import sample
from tests.release_table import release_rows
from tests.rendering import CHART, helm, load_docs

pytestmark = pytest.mark.cluster

NAMESPACE = "power-dra-driver"
VERSION_ORDER = ("v1", "v1beta2", "v1beta1")
EXAMPLES_NS = "matrix"


@pytest.fixture(scope="module", params=matrix_releases())
def cp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """A control plane of one release (the module's tests run once per release)."""
    plane = ControlPlane(tmp_path_factory.mktemp(f"cp-{request.param}"), release=request.param)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def served_resource_versions(cp: ControlPlane) -> list[str]:
    group = Api(cp).get("/apis/resource.k8s.io")
    return [v["version"] for v in group["versions"]]


def device_class(cp: ControlPlane) -> dict[str, Any] | None:
    found: dict[str, Any] | None = Api(cp).get(resource_path(cp, f"deviceclasses/{DRIVER}"))
    return found


def test_readme_row_matches_the_release_and_the_api_it_serves(cp: ControlPlane) -> None:
    row = release_rows()[cp.release.name]
    assert row["Kubernetes"] == cp.version.removeprefix("v")
    served = served_resource_versions(cp)
    newest = next(v for v in VERSION_ORDER if v in served)
    assert newest == cp.release.resource_version == row["resource.k8s.io"], served
    assert row["device mode"] == cp.release.device_mode
    assert row["examples"] == f"`{cp.release.examples.relative_to(REPO)}`"
    kept = row["claim `status.devices`"] == "kept"
    assert kept == cp.release.device_status


def test_helm_template_for_the_release_applies_for_real(cp: ControlPlane) -> None:
    ns = "pdd-template"
    objs = load_docs(
        helm(
            "template",
            "power-dra-driver",
            str(CHART),
            "--namespace",
            ns,
            "--kube-version",
            cp.version,
        ).stdout
    )
    dc = next(o for o in objs if o["kind"] == "DeviceClass")
    assert dc["apiVersion"] == f"resource.k8s.io/{cp.release.resource_version}"
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    stream = yaml_stream([namespace, *objs])
    cp.kubectl("apply", "--server-side", "--field-manager=matrix", "-f", "-", input=stream)
    assert device_class(cp) is not None
    cp.kubectl("delete", "--wait=false", "-f", "-", input=stream)
    wait_for("DeviceClass removed", lambda: device_class(cp) is None, 30)


def test_helm_install_and_uninstall_on_the_live_server(cp: ControlPlane) -> None:
    kubeconfig = ["--kubeconfig", cp.kubeconfig]
    ns = "pdd-helm"
    helm("install", "power-dra-driver", str(CHART), "-n", ns, "--create-namespace", *kubeconfig)
    dc = device_class(cp)
    assert dc is not None and dc["apiVersion"] == f"resource.k8s.io/{cp.release.resource_version}"
    ds = json.loads(
        cp.kubectl("get", "daemonset", "power-dra-kubeletplugin", "-n", ns, "-o", "json").stdout
    )
    assert ds["spec"]["template"]["spec"]["containers"]
    helm("uninstall", "power-dra-driver", "-n", ns, *kubeconfig)
    wait_for("DeviceClass removed by helm uninstall", lambda: device_class(cp) is None, 30)
    gone = cp.kubectl("get", "daemonset", "-n", ns, "-o", "name").stdout
    assert gone == ""


class Installed:
    """manifests/base applied with the release's kubectl; the controller running as its
    ServiceAccount; one fake Power node with a plugin process."""

    def __init__(self, cp: ControlPlane, workdir: Path) -> None:
        self.cp = cp
        self.workdir = workdir
        self.applied = cp.kubectl(
            "apply", "--server-side", "-k", str(REPO / "manifests" / "base"), check=False
        )
        self.metrics_port = free_port()
        kubeconfig = sa_kubeconfig(
            cp, "power-dra-controller", workdir / "controller.kube.kubeconfig"
        )
        self.controller = Process(
            "controller",
            [
                sys.executable,
                "-m",
                "controller",
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--orphan-grace=1s",
                f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            ],
            workdir,
        )
        cp.create_node("power-a")
        self.plugin = PluginProcess(cp, "power-a", workdir / "power-a", total_credits=6).start()

    def controller_log(self) -> str:
        return self.controller.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text: str = resp.read().decode()
            return text

    def stop(self) -> None:
        self.plugin.stop()
        self.controller.stop()


@pytest.fixture(scope="module")
def installed(cp: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    inst = Installed(cp, tmp_path_factory.mktemp(f"installed-{cp.release.name}"))
    try:
        yield inst
    finally:
        inst.stop()


def test_kustomize_base_applies_and_the_controller_creates_the_class(
    cp: ControlPlane, installed: Installed
) -> None:
    assert installed.applied.returncode == 0, installed.applied.stderr
    dc = wait_for("DeviceClass from the controller", lambda: device_class(cp), 30)
    assert dc["apiVersion"] == f"resource.k8s.io/{cp.release.resource_version}"


def test_plugin_publishes_in_the_mode_the_release_supports(
    cp: ControlPlane, installed: Installed
) -> None:
    def settled() -> list[dict[str, Any]] | None:
        slices = installed.plugin.slices()
        devices = [d for s in slices for d in s["spec"].get("devices") or []]
        # Shared mode: one device; slot mode: one per schedulable credit (6 - 1 reserved).
        return devices if len(devices) in (1, 5) else None

    devices = wait_for("the plugin's slice", settled, 30)
    mode = "shared" if len(devices) == 1 else "slots"
    assert mode == cp.release.device_mode, devices


def test_controller_collects_an_orphaned_slice(cp: ControlPlane, installed: Installed) -> None:
    cp.create_node("gone-node")
    slice_obj = {
        "apiVersion": f"resource.k8s.io/{cp.release.resource_version}",
        "kind": "ResourceSlice",
        "metadata": {"name": "gone-node-nx"},
        "spec": {
            "driver": DRIVER,
            "nodeName": "gone-node",
            "pool": {"name": "gone-node", "generation": 1, "resourceSliceCount": 1},
            "devices": [],
        },
    }
    cp.kubectl("create", "-f", "-", input=yaml_stream([slice_obj]))
    cp.kubectl("delete", "node", "gone-node")
    api = Api(cp)
    wait_for(
        "orphaned slice deleted by the controller",
        lambda: (
            not any(
                s["metadata"]["name"] == "gone-node-nx"
                for s in api.get(resource_path(cp, "resourceslices"))["items"]
            )
        ),
        60,
    )


def _claim(cp: ControlPlane, name: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """A ResourceClaim for one NX-gzip device in the shape the release serves."""
    request: dict[str, Any] = {"name": "nx"}
    fields = {"deviceClassName": DRIVER}
    if cp.release.resource_version == "v1beta1":
        request.update(fields)
    else:
        request["exactly"] = fields
    devices: dict[str, Any] = {"requests": [request]}
    if config is not None:
        params = {"apiVersion": "nx.device.power.ibm.com/v1alpha1", "kind": "NxConfig", **config}
        devices["config"] = [{"opaque": {"driver": DRIVER, "parameters": params}}]
    return {
        "apiVersion": f"resource.k8s.io/{cp.release.resource_version}",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": EXAMPLES_NS},
        "spec": {"devices": devices},
    }


def _holder(name: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": EXAMPLES_NS},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": "power-a"},
            "resourceClaims": [{"name": "nx", "resourceClaimName": claim}],
            "containers": [
                {"name": "c", "image": "nx-app", "resources": {"claims": [{"name": "nx"}]}}
            ],
        },
    }


@pytest.fixture(scope="module")
def claims(cp: ControlPlane, installed: Installed) -> Api:
    """A good and a badly configured claim, each allocated for a pod on power-a."""
    wait_for("DeviceClass", lambda: device_class(cp), 30)
    installed.plugin.wait_for_slices(30)
    cp.create_namespace(EXAMPLES_NS)
    cp.apply(
        [
            _claim(cp, "good", {"verbose": 1}),
            _claim(cp, "bad", {"verbose": "loud"}),
            _holder("good-pod", "good"),
            _holder("bad-pod", "bad"),
        ]
    )
    return Api(cp)


def test_bad_config_becomes_a_warning_event_on_the_claim(
    cp: ControlPlane, installed: Installed, claims: Api
) -> None:
    def event() -> dict[str, Any] | None:
        events = claims.get(f"/api/v1/namespaces/{EXAMPLES_NS}/events")["items"]
        return next(
            (
                e
                for e in events
                if e.get("reason") == "InvalidNxConfig" and e["involvedObject"].get("name") == "bad"
            ),
            None,
        )

    found = wait_for("InvalidNxConfig Event on claim bad", event, 60)
    assert found["type"] == "Warning"
    assert "verbose" in found["message"]


def test_claim_status_is_written_or_its_loss_said_once(
    cp: ControlPlane, installed: Installed, claims: Api
) -> None:
    def status_devices() -> list[dict[str, Any]]:
        claim = claims.get(resource_path(cp, f"namespaces/{EXAMPLES_NS}/resourceclaims/good"))
        devices: list[dict[str, Any]] = (claim.get("status") or {}).get("devices") or []
        return devices

    if cp.release.device_status:
        devices = wait_for("status.devices of claim good", status_devices, 60)
        ready = [c for d in devices for c in d.get("conditions") or [] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", devices
        return
    # The server drops the entries: the controller must say so, and never log success.
    wait_for(
        "the controller's warning about dropped status.devices",
        lambda: "the API server dropped status.devices" in installed.controller_log(),
        60,
    )
    log = installed.controller_log()
    assert "updated claim device status" not in log
    assert log.count("the API server dropped status.devices") == 1
    assert status_devices() == []
    assert sample(installed.metrics(), "power_dra_controller_claim_status_dropped_total") >= 1
