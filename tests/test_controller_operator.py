# SPDX-License-Identifier: Apache-2.0
"""Operator mode: the plugin DaemonSet is a pure function of its config, applied and repaired."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.config import ConfigFileError, covers
from controller.kube.client import ApiClient
from controller.kube.errors import NotFound
from controller.kube.resources import DAEMONSETS
from controller.operator import (
    PluginDaemonSetConfig,
    PluginDaemonSetController,
    load_plugin_daemonset_config,
    parse_plugin_daemonset_config,
    plugin_daemonset,
)
from tests.harness.cluster import ControlPlane
from tests.test_leader import restricted_config

IMAGE = "power-dra-driver:0.1.0"


def _ds(**config: Any) -> dict[str, Any]:
    return plugin_daemonset(
        parse_plugin_daemonset_config({"image": IMAGE, **config}, source="c.yaml"), "drivers"
    )


def _container(ds: dict[str, Any]) -> dict[str, Any]:
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(ds: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(ds)["env"]}


def _mounts(ds: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    volumes = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    return {
        volumes[m["name"]]: (m["mountPath"], m.get("readOnly", False))
        for m in _container(ds)["volumeMounts"]
    }


# --- the DaemonSet content ---------------------------------------------------------------


def test_the_daemonset_runs_the_plugin_on_power_nodes_in_the_namespace() -> None:
    ds = _ds()
    assert ds["metadata"]["namespace"] == "drivers"
    assert ds["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "power-dra-driver"
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "ppc64le"}
    assert pod["serviceAccountName"] == "power-dra-kubeletplugin"
    assert ds["spec"]["selector"]["matchLabels"].items() <= (
        ds["spec"]["template"]["metadata"]["labels"].items()
    )
    c = _container(ds)
    assert c["image"] == IMAGE
    assert c["command"] == ["power-dra-kubeletplugin"]


def test_the_kubelet_directories_are_mounted_at_their_host_paths_and_sysfs_read_only() -> None:
    assert _mounts(_ds()) == {
        "/var/lib/kubelet/plugins_registry": ("/var/lib/kubelet/plugins_registry", False),
        "/var/lib/kubelet/plugins": ("/var/lib/kubelet/plugins", False),
        "/var/run/cdi": ("/var/run/cdi", False),
        "/sys": ("/host-sys", True),
        "/dev": ("/host-dev/dev", True),
    }


def test_the_plugin_learns_its_node_pod_and_paths_from_the_environment() -> None:
    env = _env(_ds())
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["SYSFS_ROOT"] == "/host-sys"
    assert env["DEVICE_MODE"] == "shared"
    assert env["RESERVED_CREDITS"] == "1"
    assert env["KUBELET_REGISTRAR_DIRECTORY_PATH"] == "/var/lib/kubelet/plugins_registry"
    assert env["KUBELET_PLUGINS_DIRECTORY_PATH"] == "/var/lib/kubelet/plugins"
    assert env["CDI_ROOT"] == "/var/run/cdi"
    assert env["METRICS_BIND_ADDRESS"] == ":8081"


def test_the_container_is_unprivileged_with_a_read_only_root() -> None:
    sc = _container(_ds())["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_probes_use_the_health_port_and_updates_surge_before_stopping() -> None:
    ds = _ds()
    c = _container(ds)
    assert c["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_the_config_sets_mode_nodes_tolerations_resources_and_extra_env() -> None:
    ds = _ds(
        deviceMode="slots",
        reservedCredits=0,
        nodeSelector={"nx": "yes"},
        tolerations=[{"key": "k", "operator": "Exists"}],
        resources={"limits": {"memory": "1Gi"}},
        env=[{"name": "MAX_SLOTS", "value": "4"}, {"name": "DEVICE_MODE", "value": "shared"}],
        seLinuxOptions={"type": "spc_t"},
        cdiRoot="/etc/cdi",
        imagePullSecrets=["pull"],
    )
    env = _env(ds)
    assert env["MAX_SLOTS"] == "4"
    assert env["DEVICE_MODE"] == "shared"  # the explicit variable wins
    assert env["RESERVED_CREDITS"] == "0"
    assert env["CDI_ROOT"] == "/etc/cdi"
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nx": "yes"}
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    assert _container(ds)["resources"] == {"limits": {"memory": "1Gi"}}
    assert _container(ds)["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    assert _mounts(ds)["/etc/cdi"] == ("/etc/cdi", False)


def test_the_olm_configmap_shape_is_accepted() -> None:
    config = parse_plugin_daemonset_config(
        {
            "image": IMAGE,
            "nodeSelector": {"kubernetes.io/arch": "ppc64le"},
            "tolerations": [{"operator": "Exists"}],
            "resources": {"requests": {"cpu": "10m"}},
            "env": [{"name": "DEVICE_MODE", "value": "shared"}],
            "seLinuxOptions": {"type": "spc_t"},
        },
        source="c.yaml",
    )
    assert isinstance(config, PluginDaemonSetConfig)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "image: required"),
        ({"image": IMAGE, "imageName": "x"}, "imageName: unknown field"),
        ({"image": IMAGE, "deviceMode": "fast"}, "deviceMode: must be one of shared, slots"),
        ({"image": IMAGE, "env": [{"name": "X", "value": 1}]}, "env[0].value: must be a string"),
        ({"image": IMAGE, "cdiRoot": "cdi"}, "cdiRoot: must be an absolute host path"),
        ({"image": IMAGE, "reservedCredits": -1}, "reservedCredits: must be an integer >= 0"),
    ],
)
def test_config_mistakes_are_named(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigFileError) as err:
        parse_plugin_daemonset_config(doc, source="c.yaml")
    assert str(err.value).startswith("plugin DaemonSet config c.yaml: ")
    assert message in str(err.value)


def test_operator_mode_needs_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="needs --plugin-daemonset-config"):
        load_plugin_daemonset_config(None)
    path = tmp_path / "ds.yaml"
    path.write_text(f"image: {IMAGE}\n")
    assert load_plugin_daemonset_config(str(path)).image == IMAGE


# --- on the server --------------------------------------------------------------------------


async def _get(api: ApiClient, name: str, ns: str) -> dict[str, Any] | None:
    try:
        return await api.get(DAEMONSETS, name, ns)
    except NotFound:
        return None


@pytest.mark.cluster
@pytest.mark.anyio
async def test_the_plugin_daemonset_is_applied_repaired_and_strays_deleted(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    ns = unique_name
    control_plane.kubectl("create", "namespace", ns)
    # A node selector no node has: the DaemonSet controller starts no pods.
    config = parse_plugin_daemonset_config(
        {"image": IMAGE, "nodeSelector": {"no-such-label": "x"}}, source="test"
    )
    desired = plugin_daemonset(config, ns)
    stray = {**desired, "metadata": {**desired["metadata"], "name": "old-plugin"}}
    foreign = {**desired, "metadata": {"name": "foreign", "namespace": ns}}
    foreign["spec"] = {
        **desired["spec"],
        "selector": {"matchLabels": {"app": "foreign"}},
        "template": {**desired["spec"]["template"], "metadata": {"labels": {"app": "foreign"}}},
    }
    await api.create(DAEMONSETS, stray)
    await api.create(DAEMONSETS, foreign)
    name = config.name

    async def image() -> str | None:
        ds = await _get(api, name, ns)
        return None if ds is None else str(_container(ds)["image"])

    async def wait_for(check: Any) -> None:
        with anyio.fail_after(10):
            while not await check():
                await anyio.sleep(0.05)

    async def image_is_ours() -> bool:
        return await image() == IMAGE

    restricted = ApiClient(restricted_config(control_plane, ns, "controller"))
    controller = PluginDaemonSetController(restricted, ns, config)  # the documented Role
    async with restricted, anyio.create_task_group() as tg:
        await tg.start(controller.run)
        await wait_for(image_is_ours)

        async def stray_gone() -> bool:
            return await _get(api, "old-plugin", ns) is None

        await wait_for(stray_gone)
        # What the server stores (with its defaults) still covers what we apply:
        # no apply on every status change of the DaemonSet.
        stored = await _get(api, name, ns)
        assert covers(stored, {k: desired[k] for k in ("metadata", "spec")})
        # Drift: another writer changes the image; ours comes back.
        control_plane.kubectl("set", "image", f"daemonset/{name}", "plugin=evil:latest", "-n", ns)
        await wait_for(image_is_ours)
        # Deleted: re-created.
        before = await _get(api, name, ns)
        assert before is not None
        await api.delete(DAEMONSETS, name, ns)

        async def recreated() -> bool:
            ds = await _get(api, name, ns)
            return ds is not None and ds["metadata"]["uid"] != before["metadata"]["uid"]

        await wait_for(recreated)
        tg.cancel_scope.cancel()
    assert await _get(api, "foreign", ns) is not None
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")
