# SPDX-License-Identifier: Apache-2.0
"""The OLM bundle: accepted by operator-framework's own validator, consistent
with the kustomize RBAC and controller, and its CSV accepted by a real API
server under the CSV CRD that operator-framework/api ships."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.operator import parse_plugin_daemonset_config, plugin_daemonset
from tests.harness.cluster import REPO, ControlPlane
from tests.rendering import (
    CONTROLLER_SA,
    MANIFESTS,
    OLM_BUNDLE,
    PLUGIN_SA,
    Obj,
    container,
    ensure_namespace,
    env_of,
    install_crd,
    kustomize,
    one,
    server_dry_run,
    tool,
)

CSV_FILE = OLM_BUNDLE / "manifests" / "power-dra-driver.clusterserviceversion.yaml"
# Printed on every run of the deprecated "operatorhub" validator; not about us.
KNOWN_NOTICE = "validator is deprecated; for equivalent validation use"


@pytest.fixture(scope="module")
def csv() -> Obj:
    doc: Obj = yaml.safe_load(CSV_FILE.read_text())
    return doc


@pytest.fixture(scope="module")
def bundle_objects() -> list[Obj]:
    return [
        yaml.safe_load(p.read_text()) for p in sorted((OLM_BUNDLE / "manifests").glob("*.yaml"))
    ]


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return kustomize(MANIFESTS / "base")


def _strategy(csv: Obj) -> Obj:
    spec: Obj = csv["spec"]["install"]["spec"]
    return spec


def _rules_of(entries: list[Obj], service_account: str) -> list[Obj]:
    (entry,) = [e for e in entries if e["serviceAccountName"] == service_account]
    rules: list[Obj] = entry["rules"]
    return rules


def _controller_deployment(csv: Obj) -> Obj:
    (dep,) = _strategy(csv)["deployments"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": dep["name"], "labels": dep.get("label", {})},
        "spec": dep["spec"],
    }


def _plugin_config(bundle_objects: list[Obj]) -> Obj:
    cm = one(bundle_objects, "ConfigMap", "power-dra-plugin-daemonset")
    config: Obj = yaml.safe_load(cm["data"]["plugin-daemonset.yaml"])
    return config


# --- operator-framework's validator -----------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--object_validate"], ["--operatorhub_validate"]])
def test_operator_verify_finds_nothing(flags: list[str]) -> None:
    out = subprocess.run(
        [str(tool("operator-verify")), "manifests", *flags, str(OLM_BUNDLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    # It exits 0 even when it reports errors, so read what it says.
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if KNOWN_NOTICE not in ln]
    assert out.returncode == 0 and not [ln for ln in lines if "level=" in ln], lines


def test_operator_verify_does_report_a_broken_csv(tmp_path: Path, csv: Obj) -> None:
    # Guards the test above: the validator really reads our bundle.
    broken = json.loads(json.dumps(csv))
    broken["spec"]["minKubeVersion"] = "not-a-version"
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / CSV_FILE.name).write_text(yaml.safe_dump(broken))
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "annotations.yaml").write_text(
        (OLM_BUNDLE / "metadata" / "annotations.yaml").read_text()
    )
    out = subprocess.run(
        [str(tool("operator-verify")), "manifests", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "MinKubeVersion has an invalid value" in out.stdout + out.stderr


# --- bundle metadata ----------------------------------------------------------------


def test_bundle_dockerfile_labels_repeat_the_annotations() -> None:
    annotations = yaml.safe_load((OLM_BUNDLE / "metadata" / "annotations.yaml").read_text())[
        "annotations"
    ]
    dockerfile = (OLM_BUNDLE / "bundle.Dockerfile").read_text()
    labels = dict(re.findall(r"^LABEL (\S+)=(\S+)$", dockerfile, flags=re.M))
    assert {k: v for k, v in labels.items() if not k.startswith("org.opencontainers")} == {
        k: str(v) for k, v in annotations.items()
    }
    assert annotations["operators.operatorframework.io.bundle.mediatype.v1"] == "registry+v1"
    assert "COPY manifests /manifests/" in dockerfile
    assert "COPY metadata /metadata/" in dockerfile


def test_csv_declares_power_and_x86_support(csv: Obj) -> None:
    labels = csv["metadata"]["labels"]
    assert labels["operatorframework.io/arch.ppc64le"] == "supported"
    assert labels["operatorframework.io/arch.amd64"] == "supported"
    assert labels["operatorframework.io/os.linux"] == "supported"
    assert csv["metadata"]["annotations"]["operatorframework.io/suggested-namespace"] == (
        "power-dra-driver"
    )


# --- what the operator runs -------------------------------------------------------


def test_controller_runs_in_operator_mode_with_its_plugin_config(
    csv: Obj, bundle_objects: list[Obj]
) -> None:
    dep = _controller_deployment(csv)
    c = container(dep)
    assert c["command"] == ["power-dra-controller"]
    assert "--manage-plugin-daemonset" in c["args"]
    config_path = env_of(c)["PLUGIN_DAEMONSET_CONFIG"]
    (mount,) = c["volumeMounts"]
    assert config_path == f"{mount['mountPath']}/plugin-daemonset.yaml"
    (volume,) = dep["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    one(bundle_objects, "ConfigMap", volume["configMap"]["name"])


def test_operator_controller_matches_the_plain_install_otherwise(csv: Obj, base: list[Obj]) -> None:
    ours = _controller_deployment(csv)["spec"]
    plain = one(base, "Deployment")["spec"]
    assert ours["replicas"] == plain["replicas"] == 2
    assert ours["selector"] == plain["selector"]
    ours_pod, plain_pod = ours["template"]["spec"], plain["template"]["spec"]
    for field in ("serviceAccountName", "securityContext", "nodeSelector", "affinity"):
        assert ours_pod[field] == plain_pod[field], field
    ours_c, plain_c = container(_controller_deployment(csv)), container(one(base, "Deployment"))
    for field in (
        "image",
        "securityContext",
        "resources",
        "ports",
        "livenessProbe",
        "readinessProbe",
    ):
        assert ours_c[field] == plain_c[field], field
    assert env_of(plain_c).items() <= env_of(ours_c).items()


def test_plugin_config_targets_power_nodes_with_the_same_image(
    csv: Obj, bundle_objects: list[Obj]
) -> None:
    config = _plugin_config(bundle_objects)
    assert config["image"] == container(_controller_deployment(csv))["image"]
    assert config["nodeSelector"] == {"kubernetes.io/arch": "ppc64le"}
    assert config["deviceMode"] == "shared"
    related = {r["image"] for r in csv["spec"]["relatedImages"]}
    assert config["image"] in related


def test_operator_makes_the_same_plugin_daemonset_as_the_plain_install(
    bundle_objects: list[Obj], base: list[Obj]
) -> None:
    # The controller's own builder, fed the bundle's ConfigMap.
    config = parse_plugin_daemonset_config(_plugin_config(bundle_objects), source="bundle")
    made = plugin_daemonset(config, "power-dra-driver")
    plain = one(base, "DaemonSet")
    assert made["metadata"]["name"] == plain["metadata"]["name"]
    assert made["spec"]["selector"] == plain["spec"]["selector"]
    assert made["spec"]["updateStrategy"] == plain["spec"]["updateStrategy"]
    made_pod, plain_pod = made["spec"]["template"]["spec"], plain["spec"]["template"]["spec"]
    for field in (
        "serviceAccountName",
        "priorityClassName",
        "nodeSelector",
        "tolerations",
        "volumes",
    ):
        assert made_pod[field] == plain_pod[field], field
    made_c, plain_c = container(made), container(plain)
    assert env_of(made_c) == env_of(plain_c)
    for field in ("image", "command", "ports", "livenessProbe", "readinessProbe", "resources"):
        assert made_c[field] == plain_c[field], field
    by_path = {m["mountPath"]: m for m in made_c["volumeMounts"]}
    assert by_path == {m["mountPath"]: m for m in plain_c["volumeMounts"]}
    # Only the SELinux type differs: OLM cannot ship our SCC (manifests/README.md).
    made_sc = dict(made_c["securityContext"])
    assert made_sc.pop("seLinuxOptions") == {"type": "spc_t"}
    assert made_sc == plain_c["securityContext"]


# --- RBAC: the same grants as the plain install ---------------------------------------


def _grants(rules: list[Obj]) -> set[tuple[str, str, str, str]]:
    return {
        (g, r, v, n)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
        for n in rule.get("resourceNames", ["*"])
    }


def test_controller_cluster_permissions_equal_the_plain_cluster_role(
    csv: Obj, base: list[Obj]
) -> None:
    ours = _rules_of(_strategy(csv)["clusterPermissions"], CONTROLLER_SA)
    assert _grants(ours) == _grants(one(base, "ClusterRole", CONTROLLER_SA)["rules"])


def test_controller_namespace_permissions_add_only_the_plugin_daemonset(
    csv: Obj, base: list[Obj]
) -> None:
    ours = _grants(_rules_of(_strategy(csv)["permissions"], CONTROLLER_SA))
    plain = _grants(one(base, "Role", "power-dra-controller-leader-election")["rules"])
    assert {(g, r) for g, r, _, _ in ours - plain} == {("apps", "daemonsets")}
    assert plain <= ours


def test_plugin_service_account_gets_the_plain_grants_and_an_scc(csv: Obj, base: list[Obj]) -> None:
    ours = _grants(_rules_of(_strategy(csv)["clusterPermissions"], PLUGIN_SA))
    plain = _grants(one(base, "ClusterRole", PLUGIN_SA)["rules"])
    assert ours - plain == {
        ("security.openshift.io", "securitycontextconstraints", "use", "privileged")
    }
    assert plain <= ours


# --- against the API server -------------------------------------------------------


def _csv_crd() -> Obj:
    """The CSV CRD from the operator-framework/api module that built operator-verify."""
    version = re.search(
        r"^operator_api_version=(\S+)$",
        (REPO / "hack" / "build-tools.sh").read_text(),
        flags=re.M,
    )
    assert version
    module = f"github.com/operator-framework/api@{version.group(1)}"
    out = subprocess.run(
        ["go", "mod", "download", "-json", module], capture_output=True, text=True, check=True
    )
    directory = Path(json.loads(out.stdout)["Dir"])
    crd: Obj = yaml.safe_load(
        (directory / "crds" / "operators.coreos.com_clusterserviceversions.yaml").read_text()
    )
    return crd


@pytest.mark.cluster
def test_csv_and_its_objects_pass_server_side_dry_run(
    control_plane: ControlPlane, csv: Obj, bundle_objects: list[Obj]
) -> None:
    namespace = "power-dra-olm-test"
    ensure_namespace(control_plane, namespace)
    install_crd(control_plane, _csv_crd())

    def placed(obj: Obj) -> Obj:
        meta = {**obj["metadata"], "namespace": namespace}
        return {**obj, "metadata": meta}

    strategy = _strategy(csv)
    objs: list[Any] = [placed(o) for o in bundle_objects]
    # What OLM makes of the install strategy, as plain objects.
    objs.append(placed(_controller_deployment(csv)))
    for entry in strategy["clusterPermissions"]:
        objs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": f"olm-test-{entry['serviceAccountName']}"},
                "rules": entry["rules"],
            }
        )
    for entry in strategy["permissions"]:
        objs.append(
            placed(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": f"olm-test-{entry['serviceAccountName']}"},
                    "rules": entry["rules"],
                }
            )
        )
    out = server_dry_run(control_plane, objs)
    assert out.returncode == 0, out.stdout + out.stderr
    applied = [line for line in out.stdout.splitlines() if "serverside-applied" in line]
    assert len(applied) == len(objs), out.stdout
