# SPDX-License-Identifier: Apache-2.0
"""The kustomize manifests (base, OpenShift overlay, examples): what they
promise, checked on the rendered objects, and accepted by a real API server."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import REPO, ControlPlane, write_kubeconfig
from tests.rendering import (
    CONTROLLER_SA,
    DRIVER,
    MANIFESTS,
    NAMESPACE,
    PLUGIN_SA,
    SCC_CRD,
    Obj,
    container,
    env_of,
    install_crd,
    key,
    kustomize,
    one,
    server_dry_run,
)

BASE = MANIFESTS / "base"
OPENSHIFT = MANIFESTS / "openshift"
EXAMPLES = MANIFESTS / "examples"
# Each release's examples directory (manifests/examples/README.md) and its resource.k8s.io version.
EXAMPLE_DIRS = {"examples": "v1", "examples/k8s-1.34": "v1", "examples/k8s-1.32": "v1beta1"}
PLUGIN_USER = f"system:serviceaccount:{NAMESPACE}:{PLUGIN_SA}"

# Hosts of public registries that must never be baked into our files.
REGISTRY_HOSTS = re.compile(
    r"\b(quay\.io|docker\.io|registry-1\.docker\.io|registry\.access\.redhat\.com|"
    r"registry\.redhat\.io|gcr\.io|ghcr\.io|registry\.k8s\.io|k8s\.gcr\.io|icr\.io|"
    r"public\.ecr\.aws|mcr\.microsoft\.com|nvcr\.io)\b"
)


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return kustomize(BASE)


@pytest.fixture(scope="module")
def openshift() -> list[Obj]:
    return kustomize(OPENSHIFT)


@pytest.fixture(scope="module")
def examples() -> list[Obj]:
    return kustomize(EXAMPLES)


@pytest.fixture(scope="module", params=sorted(EXAMPLE_DIRS))
def release_examples(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    """(resource.k8s.io version, objects) of one release's examples directory."""
    return EXAMPLE_DIRS[request.param], kustomize(MANIFESTS / request.param)


def _request_fields(version: str, request: Obj) -> Obj:
    """The device fields of a request: under `exactly` from v1beta2 on, in it in v1beta1."""
    fields: Obj = request if version == "v1beta1" else request["exactly"]
    return fields


def _packaging_files() -> list[Path]:
    files = [p for p in MANIFESTS.rglob("*") if p.is_file()]
    return [
        *files,
        REPO / "Containerfile",
        REPO / ".containerignore",
        REPO / "hack" / "build-tools.sh",
    ]


def _images(objs: list[Obj]) -> list[str]:
    images = []
    for obj in objs:
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec) if isinstance(spec, dict) else {}
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            images.append(c["image"])
    return images


# --- files ------------------------------------------------------------------------


def test_every_packaging_file_that_allows_comments_starts_with_spdx() -> None:
    missing = []
    for path in _packaging_files():
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        if path.suffix == ".json":
            continue  # JSON has no comments
        if path.suffix == ".md":
            ok = first == "<!-- SPDX-License-Identifier: Apache-2.0 -->"
        elif path.suffix in (".tpl", ".txt"):
            ok = first.startswith("{{/* SPDX-License-Identifier: Apache-2.0 */")
        elif first.startswith("#!"):
            ok = path.read_text().splitlines()[1] == "# SPDX-License-Identifier: Apache-2.0"
        else:
            ok = first == "# SPDX-License-Identifier: Apache-2.0"
        if not ok:
            missing.append(str(path.relative_to(REPO)))
    assert not missing, f"no SPDX line first: {missing}"


def test_no_registry_host_is_named_in_any_packaging_file() -> None:
    hits = [
        f"{p.relative_to(REPO)}: {m.group(0)}"
        for p in _packaging_files()
        for m in REGISTRY_HOSTS.finditer(p.read_text())
    ]
    assert not hits


def test_images_carry_no_registry_host(base: list[Obj], examples: list[Obj]) -> None:
    for image in _images(base) + _images(examples):
        first = image.split("/")[0]
        assert "/" not in image or not re.search(r"[.:]|^localhost$", first), image
    assert set(_images(base)) == {"power-dra-driver:0.1.0"}
    assert set(_images(examples)) == {"busybox"}


# --- base -------------------------------------------------------------------------


def test_base_has_exactly_the_driver_objects(base: list[Obj]) -> None:
    assert sorted(key(o) for o in base) == sorted(
        [
            ("Namespace", "", NAMESPACE),
            ("ServiceAccount", NAMESPACE, PLUGIN_SA),
            ("ServiceAccount", NAMESPACE, CONTROLLER_SA),
            ("ClusterRole", "", PLUGIN_SA),
            ("ClusterRoleBinding", "", PLUGIN_SA),
            ("ClusterRole", "", CONTROLLER_SA),
            ("ClusterRoleBinding", "", CONTROLLER_SA),
            ("Role", NAMESPACE, "power-dra-controller-leader-election"),
            ("RoleBinding", NAMESPACE, "power-dra-controller-leader-election"),
            ("ValidatingAdmissionPolicy", "", "power-dra-kubeletplugin-resourceslices"),
            ("ValidatingAdmissionPolicyBinding", "", "power-dra-kubeletplugin-resourceslices"),
            ("DaemonSet", NAMESPACE, "power-dra-kubeletplugin"),
            ("Deployment", NAMESPACE, "power-dra-controller"),
        ]
    )


def test_plugin_daemonset_is_unprivileged_with_read_only_root(base: list[Obj]) -> None:
    ds = one(base, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    sc = container(ds)["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in sc["capabilities"]
    assert sc["runAsUser"] == 0
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["serviceAccountName"] == PLUGIN_SA
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "ppc64le"}


def test_plugin_daemonset_surges_so_old_and_new_plugin_overlap(base: list[Obj]) -> None:
    strategy = one(base, "DaemonSet")["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_plugin_mounts_kubelet_and_cdi_dirs_at_their_host_paths(base: list[Obj]) -> None:
    ds = one(base, "DaemonSet")
    c = container(ds)
    env = env_of(c)
    volumes = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for var, host in (
        ("KUBELET_REGISTRAR_DIRECTORY_PATH", "/var/lib/kubelet/plugins_registry"),
        ("KUBELET_PLUGINS_DIRECTORY_PATH", "/var/lib/kubelet/plugins"),
        ("CDI_ROOT", "/var/run/cdi"),
    ):
        # The plugin tells the kubelet and CRI-O these paths: pod path == host path.
        assert env[var] == host
        assert volumes[mounts[host]["name"]] == host
        assert not mounts[host].get("readOnly")


def test_plugin_sees_host_sys_and_dev_read_only_where_its_flags_point(base: list[Obj]) -> None:
    ds = one(base, "DaemonSet")
    c = container(ds)
    env = env_of(c)
    volumes = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert env["SYSFS_ROOT"] == "/host-sys"
    assert volumes[mounts["/host-sys"]["name"]] == "/sys"
    assert mounts["/host-sys"]["readOnly"] is True
    # The plugin checks <HOST_DEV_ROOT>/dev/crypto/nx-gzip.
    dev_mount = env["HOST_DEV_ROOT"] + "/dev"
    assert volumes[mounts[dev_mount]["name"]] == "/dev"
    assert mounts[dev_mount]["readOnly"] is True
    # Submounts of the host's /sys and /dev (say, /dev/shm) read-only too, where supported.
    assert mounts["/host-sys"]["recursiveReadOnly"] == "IfPossible"
    assert mounts[dev_mount]["recursiveReadOnly"] == "IfPossible"


def test_plugin_gets_node_name_and_pod_uid_from_the_downward_api(base: list[Obj]) -> None:
    env = env_of(container(one(base, "DaemonSet")))
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["DEVICE_MODE"] == "shared"
    assert env["RESERVED_CREDITS"] == "1"


def test_plugin_probes_its_health_endpoints_on_8081(base: list[Obj]) -> None:
    c = container(one(base, "DaemonSet"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert ports[probe["httpGet"]["port"]] == 8081
    assert env_of(c)["METRICS_BIND_ADDRESS"] == ":8081"


def test_controller_runs_two_non_root_replicas_with_leader_election(base: list[Obj]) -> None:
    dep = one(base, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in pod["securityContext"]  # OpenShift assigns one
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == CONTROLLER_SA
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[c["livenessProbe"]["httpGet"]["port"]] == 8080
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = env_of(c)
    assert env["LEADER_ELECT"] == "true"
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def _rules(objs: list[Obj], kind: str, name: str) -> list[Obj]:
    rules: list[Obj] = one(objs, kind, name)["rules"]
    return rules


def _grants(rules: list[Obj]) -> set[tuple[str, str, str, str]]:
    return {
        (g, r, v, n)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
        for n in rule.get("resourceNames", ["*"])
    }


def test_no_rbac_rule_uses_wildcards(base: list[Obj], openshift: list[Obj]) -> None:
    for obj in base + openshift:
        for rule in obj.get("rules", []) if obj["kind"] in ("ClusterRole", "Role") else []:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], obj


def test_plugin_rbac_is_slices_claims_and_its_node(base: list[Obj]) -> None:
    grants = _grants(_rules(base, "ClusterRole", PLUGIN_SA))
    slice_verbs = {v for g, r, v, _ in grants if r == "resourceslices"}
    assert slice_verbs == {"get", "list", "watch", "create", "update", "delete"}
    assert {(r, v) for g, r, v, _ in grants if r != "resourceslices"} == {
        ("resourceclaims", "get"),
        ("nodes", "get"),
    }


def test_controller_rbac_covers_granular_claim_status_for_this_driver_only(
    base: list[Obj],
) -> None:
    grants = _grants(_rules(base, "ClusterRole", CONTROLLER_SA))
    assert {v for g, r, v, _ in grants if r == "resourceclaims/status"} == {"patch"}
    driver = {(v, n) for g, r, v, n in grants if r == "resourceclaims/driver"}
    assert driver == {("arbitrary-node:patch", DRIVER)}
    assert {v for g, r, v, _ in grants if r == "resourceslices"} == {"list", "watch", "delete"}
    assert {g for g, r, _, _ in grants if r == "events"} == {"events.k8s.io"}
    # Only our own class may be changed or deleted.
    assert {
        (v, n) for g, r, v, n in grants if r == "deviceclasses" and v in ("patch", "delete")
    } == {
        ("patch", DRIVER),
        ("delete", DRIVER),
    }
    assert not any(r in ("daemonsets", "pods", "secrets") for _, r, _, _ in grants)


def test_controller_leader_election_is_limited_to_its_lease(base: list[Obj]) -> None:
    grants = _grants(_rules(base, "Role", "power-dra-controller-leader-election"))
    assert grants == {
        ("coordination.k8s.io", "leases", "create", "*"),
        ("coordination.k8s.io", "leases", "get", "power-dra-controller"),
        ("coordination.k8s.io", "leases", "update", "power-dra-controller"),
    }


def test_bindings_name_the_right_service_accounts(base: list[Obj]) -> None:
    for kind, name, sa in (
        ("ClusterRoleBinding", PLUGIN_SA, PLUGIN_SA),
        ("ClusterRoleBinding", CONTROLLER_SA, CONTROLLER_SA),
        ("RoleBinding", "power-dra-controller-leader-election", CONTROLLER_SA),
    ):
        binding = one(base, kind, name)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}
        ]


def test_slice_policy_matches_every_resource_version_and_only_the_plugin(
    base: list[Obj],
) -> None:
    vap = one(base, "ValidatingAdmissionPolicy")
    rules = vap["spec"]["matchConstraints"]["resourceRules"]
    assert len(rules) == 1
    assert set(rules[0]["apiVersions"]) == {"v1", "v1beta1", "v1beta2"}
    assert set(rules[0]["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    assert rules[0]["resources"] == ["resourceslices"]
    assert vap["spec"]["failurePolicy"] == "Fail"
    (condition,) = vap["spec"]["matchConditions"]
    # The plugin's ServiceAccount by name, in whatever namespace an overlay or OLM puts it.
    assert f"endsWith(':{PLUGIN_SA}')" in condition["expression"]
    assert f"serviceaccount:{NAMESPACE}:" not in json.dumps(vap["spec"])
    assert any(f"== '{DRIVER}'" in v["expression"] for v in vap["spec"]["validations"])
    binding = one(base, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}


def test_namespace_allows_the_plugins_host_path_volumes(base: list[Obj]) -> None:
    labels = one(base, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# --- OpenShift overlay ----------------------------------------------------------------


def test_openshift_overlay_adds_an_unprivileged_scc_for_the_plugin(openshift: list[Obj]) -> None:
    scc = one(openshift, "SecurityContextConstraints")
    assert scc["allowPrivilegedContainer"] is False
    assert scc["allowPrivilegeEscalation"] is False
    assert scc["allowHostDirVolumePlugin"] is True
    assert not (scc["allowHostNetwork"] or scc["allowHostPID"] or scc["allowHostIPC"])
    assert scc["allowedCapabilities"] is None
    assert scc["requiredDropCapabilities"] == ["ALL"]
    assert scc["readOnlyRootFilesystem"] is True
    assert scc["users"] == [] and scc["groups"] == []
    assert set(scc["volumes"]) == {"hostPath", "projected"}
    role = one(openshift, "ClusterRole", "power-dra-kubeletplugin-scc")
    assert _grants(role["rules"]) == {
        ("security.openshift.io", "securitycontextconstraints", "use", scc["metadata"]["name"])
    }
    binding = one(openshift, "RoleBinding", "power-dra-kubeletplugin-scc")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": PLUGIN_SA, "namespace": NAMESPACE}
    ]


def test_openshift_plugin_pod_fits_its_scc(openshift: list[Obj]) -> None:
    scc = one(openshift, "SecurityContextConstraints")
    ds = one(openshift, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    sc = container(ds)["securityContext"]
    assert sc["runAsUser"] == scc["runAsUser"]["uid"]
    # Unset, so that the SCC fills in spc_t and the namespace's MCS level.
    assert "seLinuxOptions" not in sc and "seLinuxOptions" not in pod["securityContext"]
    kinds = {next(k for k in v if k != "name") for v in pod["volumes"]}
    assert kinds <= set(scc["volumes"])


def test_base_and_openshift_overlay_leave_the_device_class_to_the_controller(
    base: list[Obj], openshift: list[Obj]
) -> None:
    # Nothing resource.k8s.io/v1-only in what every release applies: the controller
    # creates the class in the version the server serves (tests/test_release_matrix.py).
    assert not [o for o in base + openshift if o["apiVersion"].startswith("resource.k8s.io/")]
    assert {key(o) for o in base} <= {key(o) for o in openshift}


# --- examples ---------------------------------------------------------------------


def _workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Pod", "Deployment", "Job", "StatefulSet")]


def test_every_example_workload_claims_nx_from_a_template_that_exists(
    release_examples: tuple[str, list[Obj]],
) -> None:
    _, examples = release_examples
    templates = {o["metadata"]["name"] for o in examples if o["kind"] == "ResourceClaimTemplate"}
    workloads = _workloads(examples)
    assert len(workloads) >= 5
    for w in workloads:
        spec = w["spec"]
        pod = spec["template"]["spec"] if "template" in spec else spec
        claims = {c["name"]: c["resourceClaimTemplateName"] for c in pod["resourceClaims"]}
        assert set(claims.values()) <= templates, w["metadata"]["name"]
        for c in pod["containers"]:
            assert {x["name"] for x in c["resources"]["claims"]} <= set(claims)
            assert c["image"] == "busybox"
            assert c["imagePullPolicy"] == "IfNotPresent"


def test_every_example_template_asks_for_the_driver_class_in_its_release_version(
    release_examples: tuple[str, list[Obj]],
) -> None:
    version, examples = release_examples
    templates = [o for o in examples if o["kind"] == "ResourceClaimTemplate"]
    assert len(templates) == 5
    for t in templates:
        assert t["apiVersion"] == f"resource.k8s.io/{version}"
        for request in t["spec"]["spec"]["devices"]["requests"]:
            assert _request_fields(version, request)["deviceClassName"] == DRIVER


def test_credits_example_asks_for_four_credits_in_the_release_mode(
    release_examples: tuple[str, list[Obj]],
) -> None:
    version, examples = release_examples
    t = one(examples, "ResourceClaimTemplate", "nx-gzip-4-credits")
    (request,) = t["spec"]["spec"]["devices"]["requests"]
    fields = _request_fields(version, request)
    if "capacity" in fields:  # shared mode (1.36+): 4 credits of one device ...
        assert fields["capacity"] == {"requests": {"credits": "4"}}
        # ... and only a device that has them, so a server that drops `capacity`
        # leaves the pod Pending instead of running it with one credit.
        (selector,) = fields["selectors"]
        assert "credits.compareTo(quantity('4')) >= 0" in selector["cel"]["expression"]
    else:  # slot mode: 4 exclusive devices of one credit each
        assert (fields["allocationMode"], fields["count"]) == ("ExactCount", 4)


def test_nxconfig_example_passes_an_opaque_nxconfig_to_the_driver(
    release_examples: tuple[str, list[Obj]],
) -> None:
    _, examples = release_examples
    t = one(examples, "ResourceClaimTemplate", "nx-gzip-configured")
    (config,) = t["spec"]["spec"]["devices"]["config"]
    assert config["requests"] == ["nx"]
    assert config["opaque"]["driver"] == DRIVER
    params = config["opaque"]["parameters"]
    assert params["apiVersion"] == f"{DRIVER}/v1alpha1"
    assert params["kind"] == "NxConfig"


def test_shared_node_example_puts_several_claims_on_one_node(
    release_examples: tuple[str, list[Obj]],
) -> None:
    _, examples = release_examples
    dep = one(examples, "Deployment", "nx-shared-node")
    assert dep["spec"]["replicas"] >= 2
    (term,) = dep["spec"]["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["labelSelector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


# --- against the API server -------------------------------------------------------


def _assert_dry_run_ok(cp: ControlPlane, objs: list[Obj]) -> None:
    out = server_dry_run(cp, objs)
    assert out.returncode == 0, out.stdout + out.stderr
    applied = [line for line in out.stdout.splitlines() if "serverside-applied" in line]
    assert len(applied) == len(objs), out.stdout + out.stderr


@pytest.mark.cluster
def test_base_passes_server_side_dry_run(control_plane: ControlPlane, base: list[Obj]) -> None:
    _assert_dry_run_ok(control_plane, base)


@pytest.mark.cluster
def test_openshift_overlay_passes_server_side_dry_run(
    control_plane: ControlPlane, openshift: list[Obj]
) -> None:
    # No OpenShift here: a stand-in CRD with the SCC's group, kind and
    # required fields lets the server check the SCC object too.
    install_crd(control_plane, SCC_CRD)
    _assert_dry_run_ok(control_plane, openshift)


@pytest.mark.cluster
def test_examples_pass_server_side_dry_run(
    control_plane: ControlPlane, examples: list[Obj]
) -> None:
    _assert_dry_run_ok(control_plane, examples)


# --- the slice policy, enforced by a real API server ----------------------------------


def _slice(name: str, node: str, version: str = "v1") -> Obj:
    spec: dict[str, Any] = {
        "driver": DRIVER,
        "nodeName": node,
        "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
        "devices": [],
    }
    return {
        "apiVersion": f"resource.k8s.io/{version}",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": spec,
    }


class PluginIdentity:
    """kubectl as the plugin's ServiceAccount, with a given token."""

    def __init__(self, cp: ControlPlane, token: str, path: Path) -> None:
        self.cp = cp
        self.kubeconfig = str(write_kubeconfig(path, cp.server, cp.ca_file, token, PLUGIN_SA))

    def create(self, obj: Obj) -> Any:
        return self.cp.kubectl(
            "create", "-f", "-", input=json.dumps(obj), check=False, kubeconfig=self.kubeconfig
        )

    def run(self, *args: str) -> Any:
        return self.cp.kubectl(*args, check=False, kubeconfig=self.kubeconfig)

    def run_with_input(self, text: str, *args: str) -> Any:
        return self.cp.kubectl(*args, input=text, check=False, kubeconfig=self.kubeconfig)


@pytest.fixture(scope="module")
def slice_policy(control_plane: ControlPlane, base: list[Obj]) -> Iterator[list[Obj]]:
    """The plugin's ServiceAccount, RBAC and slice policy from the base, applied for real."""
    wanted = {
        "Namespace",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    objs = [
        o
        for o in base
        if o["kind"] in wanted or (o["metadata"]["name"] == PLUGIN_SA and "Role" in o["kind"])
    ]
    control_plane.apply(objs)
    yield objs
    for o in reversed(objs):
        if o["kind"] not in ("Namespace", "ServiceAccount"):
            control_plane.kubectl(
                "delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found"
            )


def _plugin_pod_on_node_a(
    cp: ControlPlane, unique_name: str, namespace: str
) -> tuple[str, str, str, str]:
    """Nodes `<name>-a` and `<name>-b`, a pod of the plugin's ServiceAccount in
    `namespace` on node a, and a token bound to that pod (as the DaemonSet's pod
    gets): (node a, node b, pod name, token)."""
    node_a, node_b = f"{unique_name}-a", f"{unique_name}-b"
    cp.create_node(node_a)
    cp.create_node(node_b)
    pod_name = f"{unique_name}-plugin"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": namespace},
        "spec": {
            "nodeName": node_a,
            "serviceAccountName": PLUGIN_SA,
            "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "IfNotPresent"}],
        },
    }
    cp.kubectl("create", "-f", "-", input=json.dumps(pod))
    to_pod = ["--bound-object-kind", "Pod", "--bound-object-name", pod_name]
    token = cp.kubectl("create", "token", PLUGIN_SA, "-n", namespace, *to_pod).stdout.strip()
    return node_a, node_b, pod_name, token


@pytest.mark.cluster
def test_slice_policy_lets_the_plugin_write_only_its_own_nodes_slices(
    control_plane: ControlPlane, slice_policy: list[Obj], unique_name: str, tmp_path: Path
) -> None:
    cp = control_plane
    node_a, node_b, pod_name, bound = _plugin_pod_on_node_a(cp, unique_name, NAMESPACE)
    unbound = cp.kubectl("create", "token", PLUGIN_SA, "-n", NAMESPACE).stdout.strip()
    plugin = PluginIdentity(cp, bound, tmp_path / "plugin.kubeconfig")
    nodeless = PluginIdentity(cp, unbound, tmp_path / "nodeless.kubeconfig")
    whoami = json.loads(plugin.run("auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"] == [
        node_a
    ]

    # The policy is enforced once the API server's admission informers have it.
    other = _slice(f"{unique_name}-b-slice", node_b)
    deadline = time.monotonic() + 30
    while True:
        denied = plugin.create(other)
        if denied.returncode != 0 or time.monotonic() > deadline:
            break
        cp.kubectl("delete", "resourceslice", other["metadata"]["name"])
        time.sleep(0.2)
    assert denied.returncode != 0, "slice for another node was allowed"
    assert "power-dra-kubeletplugin-resourceslices" in denied.stderr
    assert f"on node {node_a} may only write ResourceSlices of that node" in denied.stderr
    assert f"not of node {node_b}" in denied.stderr

    own = _slice(f"{unique_name}-a-slice", node_a)
    created = plugin.create(own)
    assert created.returncode == 0, created.stderr

    # Its own node, but another driver's slice: denied.
    foreign = {**_slice(f"{unique_name}-a-foreign", node_a)}
    foreign["spec"] = {**foreign["spec"], "driver": "other.example.com"}
    result = plugin.create(foreign)
    assert result.returncode != 0, "slice of another driver was allowed"
    assert "may only write ResourceSlices of driver nx.device.power.ibm.com" in result.stderr
    assert "not of other.example.com" in result.stderr

    # Older API versions are checked as well.
    for version in ("v1beta1", "v1beta2"):
        old = _slice(f"{unique_name}-b-{version}", node_b, version)
        result = plugin.create(old)
        assert result.returncode != 0 and "may only write ResourceSlices" in result.stderr

    # Another node's existing slice can be neither changed nor deleted.
    cp.kubectl("create", "-f", "-", input=json.dumps(other))
    # (The plugin updates with PUT; it is granted no patch at all.)
    current = json.loads(
        cp.kubectl("get", "resourceslice", other["metadata"]["name"], "-o", "json").stdout
    )
    current["metadata"].setdefault("labels", {})["touched"] = "yes"
    replaced = plugin.run_with_input(json.dumps(current), "replace", "-f", "-")
    assert replaced.returncode != 0 and "may only write ResourceSlices" in replaced.stderr
    deleted = plugin.run("delete", "resourceslice", other["metadata"]["name"])
    assert deleted.returncode != 0 and "may only write ResourceSlices" in deleted.stderr

    # A token not bound to a pod on a node carries no node name: denied.
    result = nodeless.create(_slice(f"{unique_name}-a-nodeless", node_a))
    assert result.returncode != 0 and "carries no node name" in result.stderr

    # Its own slice: deleted fine.
    assert plugin.run("delete", "resourceslice", own["metadata"]["name"]).returncode == 0

    cp.kubectl("delete", "resourceslice", other["metadata"]["name"])
    cp.kubectl("delete", "pod", pod_name, "-n", NAMESPACE, "--grace-period=0", "--force")
    cp.kubectl("delete", "node", node_a, node_b)


@pytest.mark.cluster
def test_slice_policy_binds_the_plugin_of_an_overlay_in_another_namespace(
    control_plane: ControlPlane, slice_policy: list[Obj], unique_name: str, tmp_path: Path
) -> None:
    # A kustomize overlay that only sets another namespace: its plugin is held to its node too.
    cp = control_plane
    moved = f"{unique_name}-ns"[-63:]
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"namespace: {moved}\nresources:\n  - {os.path.relpath(MANIFESTS / 'base', overlay)}\n"
    )
    objs = kustomize(overlay)
    policy = one(slice_policy, "ValidatingAdmissionPolicy")
    assert one(objs, "ValidatingAdmissionPolicy")["spec"] == policy["spec"]
    binding = one(objs, "ClusterRoleBinding", PLUGIN_SA)
    binding["metadata"]["name"] = f"{unique_name}-plugin"  # next to the base's binding
    assert binding["subjects"][0]["namespace"] == moved
    cp.apply([one(objs, "Namespace"), one(objs, "ServiceAccount", PLUGIN_SA), binding])
    node_a, node_b, _, token = _plugin_pod_on_node_a(cp, unique_name, moved)
    plugin = PluginIdentity(cp, token, tmp_path / "plugin.kubeconfig")
    try:
        own = plugin.create(_slice(f"{unique_name}-a-slice", node_a))
        assert own.returncode == 0, own.stderr  # RBAC of the overlay works
        denied = plugin.create(_slice(f"{unique_name}-b-slice", node_b))
        assert denied.returncode != 0, "the moved plugin wrote another node's slice"
        assert f"on node {node_a} may only write ResourceSlices of that node" in denied.stderr
    finally:
        cp.kubectl("delete", "resourceslice", f"{unique_name}-a-slice", "--ignore-not-found")
        cp.kubectl("delete", "resourceslice", f"{unique_name}-b-slice", "--ignore-not-found")
        cp.kubectl("delete", "clusterrolebinding", f"{unique_name}-plugin")
        cp.kubectl("delete", "namespace", moved, "--wait=false")
        cp.kubectl("delete", "node", node_a, node_b)
