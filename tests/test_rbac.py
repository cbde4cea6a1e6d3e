# SPDX-License-Identifier: Apache-2.0
"""Every RBAC grant we ship is used by the code, and the code needs no more.

`USES` names, for every grant of the shipped manifests (base, Helm, OLM), the
code that calls it and the real-cluster test that runs that code as the
grant's ServiceAccount. The tests below fail on a grant nobody uses, on a
call site that moved away, and on a test that no longer exists; the last
one runs every plugin call as the plugin's ServiceAccount with the shipped
RBAC and slice policy, and shows that a verb we do not grant (patch) is
really refused.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from controller.kube.client import ApiClient
from controller.kube.errors import AlreadyExists, Forbidden
from controller.kube.kubeconfig import ClusterConfig
from controller.kube.resources import NODES, resource_kinds
from tests.fake_sysfs import write_sysfs_file
from tests.harness.cluster import REPO, ControlPlane, write_kubeconfig
from tests.harness.plugin import PluginProcess
from tests.rendering import (
    CONTROLLER_SA,
    DRIVER,
    MANIFESTS,
    NAMESPACE,
    OLM_BUNDLE,
    PLUGIN_SA,
    Obj,
    helm_template,
    kustomize,
)
from tests.test_publisher_cluster import TOTAL_CREDITS_FILE

Grant = tuple[str, str, str, str, str]  # service account, group, resource, verb, name ("*": any)
R = "resource.k8s.io"
CLAIMS_TEST = "tests/test_controller_claim_status.py::test_an_allocated_claim_gets_ready_entries"
CLASSES_TEST = "tests/test_controller_deviceclasses.py::test_configured_classes_are_applied"
GC_TEST = "tests/test_controller_slice_gc.py::test_slices_of_a_deleted_node_are_deleted"
LEADER_TEST = "tests/test_leader.py::test_a_released_lease_passes_to_the_waiting_elector"
OPERATOR_TEST = "tests/test_controller_operator.py::test_the_plugin_daemonset_is_applied"
OLM_TEST = "tests/test_olm.py::test_uninstall_removes_the_plugin_daemonset_and_the_device_class"
PLUGIN_TEST = "tests/test_rbac.py::test_every_plugin_call_works_as_its_service_account"
INFORMER = ("controller/kube/informer.py", "self.client.list(")
WATCH = ("controller/kube/informer.py", "self.client.watch(")

# grant -> ((file, code that needs it), test that runs it as the ServiceAccount)
USES: dict[Grant, tuple[tuple[str, str], str]] = {
    # --- controller, cluster-wide (manifests/base/rbac-controller.yaml) ---
    (CONTROLLER_SA, R, "deviceclasses", "list", "*"): (INFORMER, CLASSES_TEST),
    (CONTROLLER_SA, R, "deviceclasses", "watch", "*"): (WATCH, CLASSES_TEST),
    (CONTROLLER_SA, R, "deviceclasses", "create", "*"): (
        ("controller/deviceclasses.py", "await self.client.apply(self.resource, obj"),
        CLASSES_TEST,
    ),
    (CONTROLLER_SA, R, "deviceclasses", "patch", DRIVER): (
        ("controller/deviceclasses.py", "await self.client.apply(self.resource, obj"),
        CLASSES_TEST,
    ),
    (CONTROLLER_SA, R, "deviceclasses", "delete", DRIVER): (
        ("controller/deviceclasses.py", "await self.client.delete(self.resource, name"),
        CLASSES_TEST,
    ),
    (CONTROLLER_SA, R, "resourceslices", "list", "*"): (INFORMER, GC_TEST),
    (CONTROLLER_SA, R, "resourceslices", "watch", "*"): (WATCH, GC_TEST),
    (CONTROLLER_SA, R, "resourceslices", "delete", "*"): (
        ("controller/slice_gc.py", "await self.client.delete(self.resource, name"),
        GC_TEST,
    ),
    (CONTROLLER_SA, "", "nodes", "list", "*"): (INFORMER, GC_TEST),
    (CONTROLLER_SA, "", "nodes", "watch", "*"): (WATCH, GC_TEST),
    (CONTROLLER_SA, "", "nodes", "get", "*"): (
        ("controller/slice_gc.py", "await self.client.get(NODES"),
        GC_TEST,
    ),
    (CONTROLLER_SA, R, "resourceclaims", "list", "*"): (INFORMER, CLAIMS_TEST),
    (CONTROLLER_SA, R, "resourceclaims", "watch", "*"): (WATCH, CLAIMS_TEST),
    (CONTROLLER_SA, R, "resourceclaims/status", "patch", "*"): (
        ("controller/claim_status.py", 'subresource="status"'),
        CLAIMS_TEST,
    ),
    (CONTROLLER_SA, R, "resourceclaims/driver", "arbitrary-node:patch", DRIVER): (
        ("controller/claim_status.py", 'subresource="status"'),
        CLAIMS_TEST,
    ),
    (CONTROLLER_SA, "events.k8s.io", "events", "create", "*"): (
        ("controller/events.py", "await client.create(EVENTS, event)"),
        "tests/test_controller_claim_status.py::test_a_bad_nxconfig_gets_one_warning_event",
    ),
    # --- controller, its namespace (leader election) ---
    (CONTROLLER_SA, "coordination.k8s.io", "leases", "create", "*"): (
        ("controller/leader.py", "await self.client.create(LEASES"),
        LEADER_TEST,
    ),
    (CONTROLLER_SA, "coordination.k8s.io", "leases", "get", "power-dra-controller"): (
        ("controller/leader.py", "await self.client.get(LEASES"),
        LEADER_TEST,
    ),
    (CONTROLLER_SA, "coordination.k8s.io", "leases", "update", "power-dra-controller"): (
        ("controller/leader.py", "await self.client.replace(LEASES"),
        LEADER_TEST,
    ),
    # --- plugin, cluster-wide (manifests/base/rbac-kubeletplugin.yaml) ---
    (PLUGIN_SA, R, "resourceslices", "list", "*"): (INFORMER, PLUGIN_TEST),
    (PLUGIN_SA, R, "resourceslices", "watch", "*"): (WATCH, PLUGIN_TEST),
    (PLUGIN_SA, R, "resourceslices", "create", "*"): (
        ("kubeletplugin/publisher.py", "return await self.client.create(slices, want)"),
        PLUGIN_TEST,
    ),
    (PLUGIN_SA, R, "resourceslices", "get", "*"): (
        ("kubeletplugin/publisher.py", 'have = await self.client.get(slices, want["metadata"]'),
        PLUGIN_TEST,
    ),
    (PLUGIN_SA, R, "resourceslices", "update", "*"): (
        ("kubeletplugin/publisher.py", "return await self.client.replace(slices, body)"),
        PLUGIN_TEST,
    ),
    (PLUGIN_SA, R, "resourceslices", "delete", "*"): (
        ("kubeletplugin/publisher.py", "await self.client.delete(\n                slices"),
        PLUGIN_TEST,
    ),
    (PLUGIN_SA, R, "resourceclaims", "get", "*"): (
        (
            "kubeletplugin/driver.py",
            "return await client.get(res, ref.name, ref.namespace, from_cache",
        ),
        PLUGIN_TEST,
    ),
    (PLUGIN_SA, "", "nodes", "get", "*"): (
        ("kubeletplugin/publisher.py", "node = await self.client.get(NODES, self.node_name)"),
        PLUGIN_TEST,
    ),
}

# Only in the OLM bundle (operator mode, OwnNamespace).
OLM_USES: dict[Grant, tuple[tuple[str, str], str]] = {
    (CONTROLLER_SA, "apps", "daemonsets", "list", "*"): (INFORMER, OPERATOR_TEST),
    (CONTROLLER_SA, "apps", "daemonsets", "watch", "*"): (WATCH, OPERATOR_TEST),
    (CONTROLLER_SA, "apps", "daemonsets", "create", "*"): (
        ("controller/operator.py", "await self.client.apply(DAEMONSETS"),
        OPERATOR_TEST,
    ),
    (CONTROLLER_SA, "apps", "daemonsets", "patch", PLUGIN_SA): (
        ("controller/operator.py", "await self.client.apply(DAEMONSETS"),
        OPERATOR_TEST,
    ),
    (CONTROLLER_SA, "apps", "daemonsets", "delete", "*"): (
        ("controller/operator.py", "await self.client.delete(\n                DAEMONSETS"),
        OPERATOR_TEST,
    ),
    (CONTROLLER_SA, "apps", "deployments", "get", "power-dra-controller"): (
        ("controller/main.py", "obj = await client.get(res, name, namespace)"),
        OLM_TEST,
    ),
    (CONTROLLER_SA, "rbac.authorization.k8s.io", "clusterroles", "get", "power-dra-driver-owner"): (
        ("controller/main.py", "obj = await client.get(res, name, namespace)"),
        OLM_TEST,
    ),
    # Pod admission on OpenShift (SCC), not an API call of ours.
    (
        PLUGIN_SA,
        "security.openshift.io",
        "securitycontextconstraints",
        "use",
        "power-dra-kubeletplugin",
    ): (("manifests/openshift/kubeletplugin-scc.yaml", "name: power-dra-kubeletplugin"), ""),
}


def _grants(sa: str, rules: list[Obj]) -> set[Grant]:
    return {
        (sa, g, r, v, n)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
        for n in rule.get("resourceNames", ["*"])
    }


def _bound(objs: list[Obj]) -> set[Grant]:
    """Every grant the objects bind to one of our ServiceAccounts."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"].endswith("Role")}
    found: set[Grant] = set()
    for binding in (o for o in objs if o["kind"].endswith("RoleBinding")):
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], ref["name"]))
        for subject in binding["subjects"]:
            if role is not None and subject["name"] in (CONTROLLER_SA, PLUGIN_SA):
                found |= _grants(subject["name"], role.get("rules") or [])
    return found


def _csv_grants() -> set[Grant]:
    csv = yaml.safe_load(
        (OLM_BUNDLE / "manifests" / "power-dra-driver.clusterserviceversion.yaml").read_text()
    )
    spec = csv["spec"]["install"]["spec"]
    return {
        grant
        for entry in spec["clusterPermissions"] + spec["permissions"]
        for grant in _grants(entry["serviceAccountName"], entry["rules"])
    }


def _test_exists(ref: str) -> bool:
    path, _, prefix = ref.partition("::")
    tree = ast.parse((REPO / path).read_text())
    names = [
        n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    return any(name.startswith(prefix) for name in names)


def test_the_base_grants_exactly_what_the_code_uses() -> None:
    shipped = _bound(kustomize(MANIFESTS / "base"))
    assert shipped - USES.keys() == set(), "granted, but no code uses it"
    assert USES.keys() - shipped == set(), "used, but not granted"


def test_the_helm_chart_grants_the_same() -> None:
    assert _bound(helm_template()) == set(USES)


def test_the_olm_bundle_grants_the_same_plus_operator_mode_only() -> None:
    assert _csv_grants() == set(USES) | set(OLM_USES)


def test_the_documented_rbac_is_what_the_tests_grant_the_controller() -> None:
    text = (REPO / "docs" / "RBAC-controller.md").read_text()
    docs = {
        grant
        for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
        for grant in _grants(CONTROLLER_SA, yaml.safe_load(block)["rules"])
    }
    ours = {g for g in set(USES) | set(OLM_USES) if g[0] == CONTROLLER_SA}
    assert docs == ours


@pytest.mark.parametrize(
    "grant", sorted(set(USES) | set(OLM_USES)), ids=lambda g: "/".join(g[1:]).replace(":", "-")
)
def test_every_grant_has_a_caller_and_a_test_that_runs_it_as_its_service_account(
    grant: Grant,
) -> None:
    (path, code), test = {**USES, **OLM_USES}[grant]
    assert code in (REPO / path).read_text(), f"{grant}: {path} no longer contains {code!r}"
    if test:
        assert _test_exists(test), f"{grant}: no test {test}"


# --- the plugin's calls, as its ServiceAccount, against the real control plane ------------


def _plugin_config(cp: ControlPlane, ns: str, node: str) -> ClusterConfig:
    """A token of the plugin's ServiceAccount bound to a pod on `node`, like the DaemonSet's."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{node}-plugin", "namespace": ns},
        "spec": {
            "nodeName": node,
            "serviceAccountName": PLUGIN_SA,
            "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "IfNotPresent"}],
        },
    }
    cp.kubectl("create", "-f", "-", input=json.dumps(pod))
    token = cp.kubectl(
        "create",
        "token",
        PLUGIN_SA,
        "-n",
        ns,
        "--bound-object-kind=Pod",
        f"--bound-object-name={node}-plugin",
    ).stdout.strip()
    return ClusterConfig(server=cp.server, ca_file=str(cp.ca_file), token=token)


@pytest.mark.cluster
@pytest.mark.anyio
async def test_every_plugin_call_works_as_its_service_account(
    control_plane: ControlPlane, api: ApiClient, unique_name: str, tmp_path: Path
) -> None:
    """The plugin process publishes, republishes and cleans up its slices and reads a claim
    with a pod-bound token of its ServiceAccount, under the shipped RBAC and slice policy."""
    cp = control_plane
    base = kustomize(MANIFESTS / "base")
    wanted = {"Namespace", "ServiceAccount", "ValidatingAdmissionPolicy"}
    objs = [
        o
        for o in base
        if o["kind"] in wanted
        or o["kind"] == "ValidatingAdmissionPolicyBinding"
        or (o["metadata"]["name"] == PLUGIN_SA and "Role" in o["kind"])
    ]
    cp.apply(objs)
    try:
        await _plugin_calls(cp, api, unique_name, tmp_path)
    finally:
        for o in reversed(objs):  # leave the shared control plane as it was
            if o["kind"] not in ("Namespace", "ServiceAccount"):
                cp.kubectl("delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found")


async def _plugin_calls(cp: ControlPlane, api: ApiClient, unique_name: str, tmp_path: Path) -> None:
    node = unique_name
    cp.create_node(node)
    config = _plugin_config(cp, NAMESPACE, node)
    kubeconfig = tmp_path / "plugin.kubeconfig"
    write_kubeconfig(kubeconfig, cp.server, cp.ca_file, str(config.token), PLUGIN_SA)
    slices = resource_kinds(await api.resource_api_version())["ResourceSlice"]
    extra_name = f"{node}-extra"

    async def node_slices() -> list[dict[str, Any]]:
        listing = await api.list(slices, field_selector=f"spec.nodeName={node}")
        return list(listing["items"])

    async def until(check: Any, what: str) -> None:
        with anyio.fail_after(30):
            while not await check():
                await anyio.sleep(0.1)

    workdir = Path(tempfile.mkdtemp(prefix="nx-rbac-"))  # unix socket paths stay short
    plugin = PluginProcess(cp, node, workdir, kubeconfig=str(kubeconfig)).start()
    try:
        # Published: node get, slice list/watch, dry-run create, create.
        async def published() -> bool:
            return any(s["metadata"]["name"] != extra_name for s in await node_slices())

        await until(published, "the plugin's slice")
        (first,) = await node_slices()
        # A credit change: update (PUT) of the slice.
        write_sysfs_file(plugin.sysfs_root, TOTAL_CREDITS_FILE, 12)
        plugin.reload()

        async def updated() -> bool:
            current = await node_slices()
            return (
                bool(current)
                and current[0]["metadata"]["resourceVersion"]
                != (first["metadata"]["resourceVersion"])
            )

        await until(updated, "the updated slice")
        # A slice of its node it does not want: deleted by the plugin.
        extra = {
            "apiVersion": slices.api_version,
            "kind": "ResourceSlice",
            "metadata": {"name": extra_name, "labels": first["metadata"].get("labels") or {}},
            "spec": {**first["spec"], "pool": {**first["spec"]["pool"]}},
        }
        await api.create(slices, extra)

        async def extra_gone() -> bool:
            return all(s["metadata"]["name"] != extra_name for s in await node_slices())

        await until(extra_gone, "the extra slice deleted")
        assert "deleting slice no longer desired" in plugin.log()
    finally:
        plugin.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    # The calls the process makes only on a race or per claim, made the same way.
    async with ApiClient(config) as as_plugin:
        (mine,) = await node_slices()
        with pytest.raises(AlreadyExists):  # -> publisher reads it back with get
            await as_plugin.create(slices, {**mine, "metadata": {"name": mine["metadata"]["name"]}})
        assert (await as_plugin.get(slices, mine["metadata"]["name"]))["metadata"]["uid"]
        claims = resource_kinds(await api.resource_api_version())["ResourceClaim"]
        claim = {
            "metadata": {"name": "c", "namespace": NAMESPACE},
            "spec": {},
        }
        await api.create(claims, claim)
        try:
            assert (await as_plugin.get(claims, "c", NAMESPACE))["metadata"]["name"] == "c"
        finally:
            await api.delete(claims, "c", NAMESPACE)
        assert (await as_plugin.get(NODES, node))["metadata"]["name"] == node
        # Not granted, and not needed: patch.
        with pytest.raises(Forbidden):
            await as_plugin.patch(slices, mine["metadata"]["name"], {"metadata": {"labels": {}}})
        await as_plugin.delete(slices, mine["metadata"]["name"])
    cp.kubectl("delete", "pod", f"{node}-plugin", "-n", NAMESPACE, "--grace-period=0", "--force")
    cp.kubectl("delete", "node", node)
