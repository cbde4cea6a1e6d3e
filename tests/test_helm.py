# SPDX-License-Identifier: Apache-2.0
"""The Helm chart: lint, schema, rendering with default and other values, the
same objects as the kustomize base, and acceptance by a real API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.cluster import REPO, ControlPlane
from tests.rendering import (
    CHART,
    CONTROLLER_SA,
    DRIVER,
    MANIFESTS,
    NAMESPACE,
    PLUGIN_SA,
    SCC_CRD,
    Obj,
    container,
    env_of,
    helm,
    helm_template,
    index,
    install_crd,
    key,
    kustomize,
    one,
    server_dry_run,
)

OTHER_NAMESPACE = "nx-driver-alt"

# Every value changed from its default.
OTHER_VALUES: dict[str, Any] = {
    "image": {"repository": "REGISTRY/power-dra-driver", "tag": "0.2.0", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "pull-secret"}],
    "verbosity": 4,
    "openshift": True,
    "deviceClass": {"create": False},
    "resourceSlicePolicy": {"enabled": False},
    "kubeletPlugin": {
        "deviceMode": "slots",
        "reservedCredits": 2,
        "maxSlots": 8,
        "fallbackCredits": 10,
        "kubeletRegistrarDirectoryPath": "/var/data/kubelet/plugins_registry",
        "kubeletPluginsDirectoryPath": "/var/data/kubelet/plugins",
        "cdiRoot": "/etc/cdi",
        "nodeSelector": {"kubernetes.io/arch": "ppc64le", "nx.example.com/gzip": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "nx"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}
                    ]
                }
            }
        },
        "priorityClassName": "",
        "podAnnotations": {"example.com/note": "plugin"},
        # null removes a default key (helm merges maps with the defaults).
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": None},
        "env": [{"name": "REDISCOVERY_INTERVAL", "value": "10s"}],
    },
    "controller": {
        "replicas": 1,
        "leaderElect": False,
        "nodeSelector": {"node-role.kubernetes.io/infra": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/infra", "operator": "Exists"}],
        "affinity": {},
        "podAnnotations": {"example.com/note": "controller"},
        "resources": {"limits": {"memory": "512Mi"}},
        "env": [{"name": "ORPHAN_GRACE", "value": "120s"}],
    },
}


@pytest.fixture(scope="module")
def other_values_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("helm") / "values.yaml"
    path.write_text(yaml.safe_dump(OTHER_VALUES))
    return path


@pytest.fixture(scope="module")
def default_render() -> list[Obj]:
    return helm_template()


@pytest.fixture(scope="module")
def other_render(other_values_file: Path) -> list[Obj]:
    return helm_template("-f", str(other_values_file), namespace=OTHER_NAMESPACE)


def _without_labels(obj: Obj) -> Obj:
    meta = {k: v for k, v in obj["metadata"].items() if k not in ("labels", "annotations")}
    return {**obj, "metadata": meta}


# --- lint and schema ----------------------------------------------------------------


def test_lint_passes_with_default_values() -> None:
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout


def test_lint_passes_with_every_value_changed(other_values_file: Path) -> None:
    out = helm("lint", "--strict", str(CHART), "-f", str(other_values_file))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    "setting",
    [
        "kubeletPlugin.deviceMode=exclusive",
        "kubeletPlugin.reservedCredits=-1",
        "kubeletPlugin.maxSlots=0",
        "kubeletPlugin.cdiRoot=var/run/cdi",
        "openshift=maybe",
        "image.pullPolicy=Sometimes",
        "controller.replicas=two",
        "deviceMode=shared",
    ],
)
def test_schema_rejects_bad_values(setting: str) -> None:
    out = helm("template", "x", str(CHART), "--set", setting, check=False)
    assert out.returncode != 0
    assert "schema" in out.stderr, out.stderr


# --- rendering --------------------------------------------------------------------


def test_default_render_equals_the_kustomize_base_but_the_namespace(
    default_render: list[Obj],
) -> None:
    # Helm does not own the namespace (`--create-namespace` makes it, without
    # the Pod Security labels: see manifests/README.md) and ships the DeviceClass
    # (the base leaves it to the controller, which creates it in the version the
    # server serves); everything else is the same object, field for field, apart
    # from metadata labels.
    base = [o for o in kustomize(MANIFESTS / "base") if o["kind"] != "Namespace"]
    rendered = [o for o in default_render if o["kind"] != "DeviceClass"]
    ours, theirs = index(map(_without_labels, rendered)), index(map(_without_labels, base))
    assert sorted(ours) == sorted(theirs)
    for k, obj in theirs.items():
        assert ours[k] == obj, k


def test_default_render_labels_every_object_as_part_of_the_driver(
    default_render: list[Obj],
) -> None:
    for obj in default_render:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "power-dra-driver", key(obj)
        assert labels["app.kubernetes.io/instance"] == "power-dra-driver", key(obj)


def test_device_class_keeps_the_controllers_managed_by_label(default_render: list[Obj]) -> None:
    # The controller applies the same class; a different value would make the
    # two writers fight over the label.
    dc = one(default_render, "DeviceClass", DRIVER)
    assert dc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "power-dra-driver"


def test_openshift_objects_follow_the_cluster_when_auto(default_render: list[Obj]) -> None:
    assert not [o for o in default_render if o["kind"] == "SecurityContextConstraints"]
    detected = helm_template("--api-versions", "security.openshift.io/v1")
    scc = one(detected, "SecurityContextConstraints", PLUGIN_SA)
    assert scc["allowPrivilegedContainer"] is False
    assert one(detected, "RoleBinding", "power-dra-kubeletplugin-scc")["subjects"] == [
        {"kind": "ServiceAccount", "name": PLUGIN_SA, "namespace": NAMESPACE}
    ]
    forced_off = helm_template(
        "--api-versions", "security.openshift.io/v1", "--set", "openshift=false"
    )
    assert not [o for o in forced_off if o["kind"] == "SecurityContextConstraints"]


def test_openshift_objects_match_the_kustomize_overlay() -> None:
    rendered = index(map(_without_labels, helm_template("--set", "openshift=true")))
    overlay = index(map(_without_labels, kustomize(MANIFESTS / "openshift")))
    for kind, name in (
        ("SecurityContextConstraints", PLUGIN_SA),
        ("ClusterRole", "power-dra-kubeletplugin-scc"),
    ):
        assert rendered[kind, "", name] == overlay[kind, "", name]
    k = ("RoleBinding", NAMESPACE, "power-dra-kubeletplugin-scc")
    assert rendered[k] == overlay[k]


def test_other_values_reach_the_plugin(other_render: list[Obj]) -> None:
    ds = one(other_render, "DaemonSet", PLUGIN_SA)
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    env = env_of(c)
    values = OTHER_VALUES["kubeletPlugin"]
    assert c["image"] == "REGISTRY/power-dra-driver:0.2.0"
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == ["-v=4"]
    assert pod["imagePullSecrets"] == [{"name": "pull-secret"}]
    assert env["DEVICE_MODE"] == "slots"
    assert env["RESERVED_CREDITS"] == "2"
    assert env["MAX_SLOTS"] == "8"
    assert env["FALLBACK_CREDITS"] == "10"
    assert env["REDISCOVERY_INTERVAL"] == "10s"
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert "priorityClassName" not in pod
    assert ds["spec"]["template"]["metadata"]["annotations"] == values["podAnnotations"]
    assert c["resources"] == {"requests": values["resources"]["requests"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for var, value in (
        ("KUBELET_REGISTRAR_DIRECTORY_PATH", values["kubeletRegistrarDirectoryPath"]),
        ("KUBELET_PLUGINS_DIRECTORY_PATH", values["kubeletPluginsDirectoryPath"]),
        ("CDI_ROOT", values["cdiRoot"]),
    ):
        assert env[var] == value
        assert volumes[mounts[value]] == value


def test_without_leader_election_only_one_controller_runs() -> None:
    # Two replicas without a lease would both reconcile at once.
    rendered = helm_template("--set", "controller.leaderElect=false")
    dep = one(rendered, "Deployment", CONTROLLER_SA)
    assert dep["spec"]["replicas"] == 1
    assert env_of(container(dep))["LEADER_ELECT"] == "false"
    assert one(helm_template(), "Deployment", CONTROLLER_SA)["spec"]["replicas"] == 2


def test_other_values_reach_the_controller(other_render: list[Obj]) -> None:
    dep = one(other_render, "Deployment", CONTROLLER_SA)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    values = OTHER_VALUES["controller"]
    assert dep["spec"]["replicas"] == 1
    assert env_of(c)["LEADER_ELECT"] == "false"
    assert env_of(c)["ORPHAN_GRACE"] == "120s"
    # Maps merge with the defaults.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", **values["nodeSelector"]}
    assert pod["tolerations"] == values["tolerations"]
    assert c["resources"]["limits"] == values["resources"]["limits"]
    # Without leader election there is no Lease to grant.
    assert not [
        o
        for o in other_render
        if o["kind"] in ("Role", "RoleBinding") and "leader" in o["metadata"]["name"]
    ]


def test_other_values_drop_optional_objects_and_follow_the_namespace(
    other_render: list[Obj],
) -> None:
    kinds = {o["kind"] for o in other_render}
    assert "DeviceClass" not in kinds
    assert "ValidatingAdmissionPolicy" not in kinds
    assert "SecurityContextConstraints" in kinds
    for obj in other_render:
        if "namespace" in obj["metadata"]:
            assert obj["metadata"]["namespace"] == OTHER_NAMESPACE, key(obj)
        for subject in obj.get("subjects", []):
            assert subject["namespace"] == OTHER_NAMESPACE


def test_slice_policy_names_the_plugin_service_account_in_any_namespace() -> None:
    rendered = helm_template(namespace=OTHER_NAMESPACE)
    vap = one(rendered, "ValidatingAdmissionPolicy")
    (condition,) = vap["spec"]["matchConditions"]
    assert f"endsWith(':{PLUGIN_SA}')" in condition["expression"]
    assert OTHER_NAMESPACE not in json.dumps(vap["spec"])


# --- against the API server -------------------------------------------------------


def _assert_dry_run_ok(cp: ControlPlane, objs: list[Obj], namespace: str) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    out = server_dry_run(cp, [ns, *objs])
    assert out.returncode == 0, out.stdout + out.stderr
    applied = [line for line in out.stdout.splitlines() if "serverside-applied" in line]
    assert len(applied) == len(objs) + 1, out.stdout + out.stderr


@pytest.mark.cluster
def test_default_render_passes_server_side_dry_run(
    control_plane: ControlPlane, default_render: list[Obj]
) -> None:
    _assert_dry_run_ok(control_plane, default_render, NAMESPACE)


@pytest.mark.cluster
def test_other_values_render_passes_server_side_dry_run(
    control_plane: ControlPlane, other_render: list[Obj]
) -> None:
    install_crd(control_plane, SCC_CRD)  # no OpenShift here: a stand-in SCC CRD
    _assert_dry_run_ok(control_plane, other_render, OTHER_NAMESPACE)


@pytest.fixture(scope="module")
def own_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of this module's own (no scheduler, no controller-manager):
    a real install owns cluster-wide names that other tests use too."""
    cp = ControlPlane(
        tmp_path_factory.mktemp("helm-cp"), scheduler=False, controller_manager=False
    ).start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.mark.cluster
def test_install_upgrade_uninstall_with_the_documented_commands(
    own_control_plane: ControlPlane,
) -> None:
    cp = own_control_plane
    kubeconfig = ["--kubeconfig", cp.kubeconfig]
    # Verbatim from the repository root, as the old driver's README has them:
    #   helm install --create-namespace --namespace power-dra-driver power-dra-driver deployments/helm/power-dra-driver
    chart = "deployments/helm/power-dra-driver"
    release = ["power-dra-driver", chart, "--namespace", NAMESPACE]

    installed = helm(
        "install", *release, "--create-namespace", *kubeconfig, "--wait=false", cwd=REPO
    )
    notes = installed.stdout.split("NOTES:", 1)[1]
    assert "DeviceClass: nx.device.power.ibm.com (resource.k8s.io/v1)" in notes
    assert "OpenShift:   false" in notes
    assert "pod-security.kubernetes.io/enforce=privileged" in notes
    assert 'credits: "4"' in notes
    ds = json.loads(cp.kubectl("get", "daemonset", PLUGIN_SA, "-n", NAMESPACE, "-o", "json").stdout)
    assert env_of(container(ds))["DEVICE_MODE"] == "shared"
    cp.kubectl("get", "deviceclass", DRIVER)
    cp.kubectl("get", "validatingadmissionpolicy", "power-dra-kubeletplugin-resourceslices")

    helm("upgrade", *release, *kubeconfig, "--set", "kubeletPlugin.deviceMode=slots", cwd=REPO)
    ds = json.loads(cp.kubectl("get", "daemonset", PLUGIN_SA, "-n", NAMESPACE, "-o", "json").stdout)
    assert env_of(container(ds))["DEVICE_MODE"] == "slots"

    helm("uninstall", "power-dra-driver", "--namespace", NAMESPACE, *kubeconfig, cwd=REPO)
    for kind, name, ns in (
        ("daemonset", PLUGIN_SA, NAMESPACE),
        ("deployment", CONTROLLER_SA, NAMESPACE),
        ("clusterrole", PLUGIN_SA, ""),
        ("deviceclass", DRIVER, ""),
        ("validatingadmissionpolicy", "power-dra-kubeletplugin-resourceslices", ""),
    ):
        args = ["get", kind, name, "--ignore-not-found", "-o", "name"]
        assert cp.kubectl(*args, *(["-n", ns] if ns else [])).stdout == "", (kind, name)


@pytest.mark.cluster
def test_install_into_a_namespace_enforcing_baseline_is_refused_with_the_fix(
    own_control_plane: ControlPlane,
) -> None:
    # The plugin's pods would be rejected there while helm said "deployed".
    cp = own_control_plane
    namespace = "psa-baseline"
    cp.kubectl("create", "namespace", namespace)
    cp.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=baseline")
    try:
        refused = helm(
            "install",
            "nx",
            str(CHART),
            "--namespace",
            namespace,
            "--kubeconfig",
            cp.kubeconfig,
            "--wait=false",
            check=False,
        )
        assert refused.returncode != 0
        assert 'enforces Pod Security level "baseline"' in refused.stderr
        assert f"kubectl label namespace {namespace} pod-security" in refused.stderr
        assert cp.kubectl("get", "daemonset", "-n", namespace, "-o", "name").stdout == ""
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false")
