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

import anyio
import pytest
import yaml

from controller.kube.client import ApiClient
from controller.kube.errors import NotFound
from controller.kube.resources import CLUSTERROLES, DAEMONSETS, DEPLOYMENTS, resource_kinds
from controller.nx.names import DRIVER_NAME as DRIVER
from controller.operator import parse_plugin_daemonset_config, plugin_daemonset
from tests.harness.cluster import REPO, ControlPlane, write_kubeconfig
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
from tests.test_controller_hostile_objects import run_controller

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


@pytest.fixture(scope="module")
def openshift() -> list[Obj]:
    return kustomize(MANIFESTS / "openshift")


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
    # No SELinux type of its own: the narrow SCC fills it in, as in the openshift overlay.
    assert made_c["securityContext"] == plain_c["securityContext"]


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


def test_install_modes_are_own_namespace_only(csv: Obj) -> None:
    # AllNamespaces (or Multi/SingleNamespace) would make OLM grant the namespaced
    # rights (DaemonSets, the SCC) in other or all namespaces.
    modes = {m["type"]: m["supported"] for m in csv["spec"]["installModes"]}
    assert modes == {
        "OwnNamespace": True,
        "SingleNamespace": False,
        "MultiNamespace": False,
        "AllNamespaces": False,
    }


def test_controller_cluster_permissions_equal_the_plain_cluster_role_and_the_owner(
    csv: Obj, base: list[Obj]
) -> None:
    ours = _grants(_rules_of(_strategy(csv)["clusterPermissions"], CONTROLLER_SA))
    plain = _grants(one(base, "ClusterRole", CONTROLLER_SA)["rules"])
    assert ours - plain == {
        ("rbac.authorization.k8s.io", "clusterroles", "get", "power-dra-driver-owner")
    }
    assert plain <= ours


def test_controller_namespace_permissions_add_only_the_plugin_daemonset_and_its_owner(
    csv: Obj, base: list[Obj]
) -> None:
    ours = _grants(_rules_of(_strategy(csv)["permissions"], CONTROLLER_SA))
    plain = _grants(one(base, "Role", "power-dra-controller-leader-election")["rules"])
    assert ours - plain == {
        ("apps", "daemonsets", "list", "*"),
        ("apps", "daemonsets", "watch", "*"),
        ("apps", "daemonsets", "create", "*"),
        ("apps", "daemonsets", "delete", "*"),
        ("apps", "daemonsets", "patch", "power-dra-kubeletplugin"),
        ("apps", "deployments", "get", "power-dra-controller"),
    }
    assert plain <= ours


def test_plugin_gets_the_plain_grants_and_only_the_narrow_scc_in_its_namespace(
    csv: Obj, base: list[Obj], openshift: list[Obj]
) -> None:
    strategy = _strategy(csv)
    ours = _grants(_rules_of(strategy["clusterPermissions"], PLUGIN_SA))
    assert ours == _grants(one(base, "ClusterRole", PLUGIN_SA)["rules"])
    namespaced = _grants(_rules_of(strategy["permissions"], PLUGIN_SA))
    scc = one(openshift, "SecurityContextConstraints")
    assert namespaced == {
        ("security.openshift.io", "securitycontextconstraints", "use", scc["metadata"]["name"])
    }
    assert scc["allowPrivilegedContainer"] is False
    assert "privileged" not in json.dumps(strategy["clusterPermissions"])
    assert "privileged" not in json.dumps(strategy["permissions"])


def test_plugin_config_leaves_the_selinux_type_to_the_scc(bundle_objects: list[Obj]) -> None:
    assert "seLinuxOptions" not in _plugin_config(bundle_objects)


def test_the_device_class_owner_ships_in_the_bundle_and_grants_nothing(
    csv: Obj, bundle_objects: list[Obj]
) -> None:
    owner = one(bundle_objects, "ClusterRole", "power-dra-driver-owner")
    assert owner["rules"] == []
    env = env_of(container(_controller_deployment(csv)))
    assert env["OWNER_CLUSTER_ROLE"] == owner["metadata"]["name"]
    assert env["OWNER_DEPLOYMENT"] == _strategy(csv)["deployments"][0]["name"]


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


def _olm_rbac(csv: Obj, namespace: str) -> list[Obj]:
    """The (Cluster)Roles and bindings OLM makes of the install strategy (OwnNamespace)."""
    objs: list[Obj] = []
    rbac = "rbac.authorization.k8s.io/v1"
    strategy = _strategy(csv)
    for scope, entries in (
        ("Cluster", strategy["clusterPermissions"]),
        ("", strategy["permissions"]),
    ):
        for entry in entries:
            sa = entry["serviceAccountName"]
            name = f"{namespace}-{sa}"
            meta: Obj = {"name": name} if scope else {"name": name, "namespace": namespace}
            objs.append(
                {
                    "apiVersion": rbac,
                    "kind": f"{scope}Role",
                    "metadata": meta,
                    "rules": entry["rules"],
                }
            )
            objs.append(
                {
                    "apiVersion": rbac,
                    "kind": f"{scope}RoleBinding",
                    "metadata": meta,
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": f"{scope}Role",
                        "name": name,
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
                }
            )
    return objs


@pytest.mark.cluster
@pytest.mark.anyio
async def test_uninstall_removes_the_plugin_daemonset_and_the_device_class(
    control_plane: ControlPlane,
    *,
    api: ApiClient,
    csv: Obj,
    bundle_objects: list[Obj],
    unique_name: str,
    tmp_path: Path,
) -> None:
    """An OwnNamespace install as OLM makes it; the controller runs as its ServiceAccount with
    exactly the CSV's rules; removing what OLM removes with the CSV removes the rest."""
    cp = control_plane
    ns = unique_name
    ensure_namespace(cp, ns)
    deployment = _controller_deployment(csv)
    deployment["metadata"]["namespace"] = ns
    deployment["spec"] = {**deployment["spec"], "replicas": 0}  # no kubelet here to run it
    owner_role = one(bundle_objects, "ClusterRole", "power-dra-driver-owner")
    config_map = one(bundle_objects, "ConfigMap", "power-dra-plugin-daemonset")
    config_map = {**config_map, "metadata": {**config_map["metadata"], "namespace": ns}}
    sas = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}}
        for sa in (CONTROLLER_SA, PLUGIN_SA)
    ]
    cp.apply([*sas, *_olm_rbac(csv, ns), owner_role, config_map, deployment])
    token = cp.kubectl("create", "token", CONTROLLER_SA, "-n", ns, "--duration=1h").stdout.strip()
    kubeconfig = write_kubeconfig(
        tmp_path / "controller.kube.kubeconfig", cp.server, cp.ca_file, token, CONTROLLER_SA
    )
    config_file = tmp_path / "plugin-daemonset.yaml"
    config_file.write_text(config_map["data"]["plugin-daemonset.yaml"])
    c = container(deployment)
    env = {k: str(v) for k, v in env_of(c).items() if isinstance(v, str)}
    env.update({"PLUGIN_DAEMONSET_CONFIG": str(config_file), "METRICS_BIND_ADDRESS": "0"})
    daemonsets = DAEMONSETS
    classes = resource_kinds(await api.resource_api_version())["DeviceClass"]
    dep_uid = (await api.get(DEPLOYMENTS, deployment["metadata"]["name"], ns))["metadata"]["uid"]
    role_uid = (await api.get(CLUSTERROLES, "power-dra-driver-owner"))["metadata"]["uid"]

    async def owned(res: Any, name: str, namespace: str | None, uid: str) -> bool:
        try:
            obj = await api.get(res, name, namespace)
        except NotFound:
            return False
        return uid in {o["uid"] for o in obj["metadata"].get("ownerReferences") or []}

    async def gone(res: Any, name: str, namespace: str | None) -> bool:
        try:
            await api.get(res, name, namespace)
        except NotFound:
            return True
        return False

    async def until(check: Any, what: str, timeout: float = 60) -> None:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(0.1)

    try:
        with run_controller(kubeconfig, ns, *c["args"], env=env) as (_, log_path):
            try:
                await until(lambda: owned(daemonsets, PLUGIN_SA, ns, dep_uid), "DaemonSet owned")
                await until(lambda: owned(classes, DRIVER, None, role_uid), "DeviceClass owned")
            except TimeoutError:
                raise AssertionError(log_path.read_text()[-3000:]) from None
        # What OLM deletes with the CSV: the Deployment and the bundle's ClusterRole.
        await api.delete(DEPLOYMENTS, deployment["metadata"]["name"], ns)
        await api.delete(CLUSTERROLES, "power-dra-driver-owner")
        await until(lambda: gone(daemonsets, PLUGIN_SA, ns), "DaemonSet collected")
        await until(lambda: gone(classes, DRIVER, None), "DeviceClass collected")
    finally:
        cp.kubectl("delete", "namespace", ns, "--wait=false")
        for obj in _olm_rbac(csv, ns):
            if obj["kind"].startswith("Cluster"):
                cp.kubectl(
                    "delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found"
                )
        cp.kubectl("delete", "clusterrole", "power-dra-driver-owner", "--ignore-not-found")
