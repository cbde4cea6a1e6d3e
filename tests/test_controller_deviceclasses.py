# SPDX-License-Identifier: Apache-2.0
"""DeviceClasses: the configured set is validated at load and kept in place on the server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.config import ConfigFileError
from controller.deviceclasses import (
    DRIVER,
    DesiredClass,
    DeviceClassController,
    class_is_current,
    default_classes,
    device_class_object,
    load_device_classes,
    parse_device_classes,
)
from controller.kube.client import ApiClient
from controller.kube.errors import NotFound
from controller.kube.resources import resource_kinds
from tests.harness.cluster import ControlPlane
from tests.test_leader import restricted_config

NX = {"apiVersion": "nx.device.power.ibm.com/v1alpha1", "kind": "NxConfig"}
OURS = {"app.kubernetes.io/managed-by": "power-dra-driver"}


def _parse(classes: list[Any]) -> tuple[DesiredClass, ...]:
    return parse_device_classes({"deviceClasses": classes}, source="classes.yaml")


# --- configuration ------------------------------------------------------------------


def test_without_a_file_there_is_one_class_named_after_the_driver() -> None:
    assert load_device_classes(None) == default_classes() == (DesiredClass(DRIVER),)


def test_a_class_selects_only_our_driver_plus_its_own_selectors() -> None:
    (cls,) = _parse(
        [{"name": "nx-p11", "selectors": [{"cel": {"expression": "device.attributes['x'].y"}}]}]
    )
    obj = device_class_object(cls, "v1")
    assert obj["apiVersion"] == "resource.k8s.io/v1"
    assert obj["metadata"] == {
        "name": "nx-p11",
        "labels": {"app.kubernetes.io/name": "power-dra-driver", **OURS},
    }
    assert obj["spec"] == {
        "selectors": [
            {"cel": {"expression": f"device.driver == '{DRIVER}'"}},
            {"cel": {"expression": "device.attributes['x'].y"}},
        ]
    }


def test_the_same_shape_is_written_in_v1beta1() -> None:
    obj = device_class_object(DesiredClass(DRIVER), "v1beta1")
    assert obj["apiVersion"] == "resource.k8s.io/v1beta1"
    assert obj["spec"] == device_class_object(DesiredClass(DRIVER), "v1")["spec"]


def test_a_class_can_carry_a_default_nxconfig_and_foreign_configs() -> None:
    config = [
        {"opaque": {"driver": DRIVER, "parameters": {**NX, "verbose": 2}}},
        {"opaque": {"driver": "other.example.com", "parameters": {"anything": True}}},
    ]
    (cls,) = _parse([{"name": "debug", "config": config, "extendedResourceName": "x.io/nx"}])
    spec = device_class_object(cls, "v1")["spec"]
    assert spec["config"] == config
    assert spec["extendedResourceName"] == "x.io/nx"


def test_an_invalid_nxconfig_names_the_file_class_and_field() -> None:
    bad = [{"opaque": {"driver": DRIVER, "parameters": {**NX, "verbos": 1}}}]
    with pytest.raises(ConfigFileError) as err:
        _parse([{"name": "ok"}, {"name": "debug", "config": bad}])
    assert str(err.value).startswith(
        "device classes config classes.yaml: DeviceClass debug: "
        "deviceClasses[1].config[0].opaque.parameters.verbos: unknown field"
    )
    assert 'did you mean "verbose"' in str(err.value)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([{"name": "Bad_Name"}], "deviceClasses[0].name: must be a DNS subdomain"),
        ([{"name": "a"}, {"name": "a"}], "DeviceClass a: deviceClasses[1].name: a is listed twice"),
        ([{"name": "a", "selector": []}], "deviceClasses[0].selector: unknown field"),
        ([{"name": "a", "selectors": ["x"]}], "deviceClasses[0].selectors[0]: must be an object"),
        (
            [{"name": "a", "selectors": [{"cel": {"expression": ""}}]}],
            "selectors[0].cel.expression: must be a non-empty CEL expression",
        ),
        (
            [{"name": "a", "config": [{"opaque": {"driver": DRIVER}}]}],
            "config[0].opaque.parameters: required",
        ),
    ],
)
def test_mistakes_are_named(classes: list[Any], message: str) -> None:
    with pytest.raises(ConfigFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _parse(classes)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"device classes config .*missing.yaml: cannot read"):
        load_device_classes(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("deviceClasses: [")
    with pytest.raises(ConfigFileError, match="not valid YAML"):
        load_device_classes(str(broken))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigFileError, match="empty; expected deviceClasses"):
        load_device_classes(str(empty))


def test_a_file_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "classes.yaml"
    path.write_text(f"deviceClasses:\n  - name: {DRIVER}\n  - name: extra\n")
    assert [c.name for c in load_device_classes(str(path))] == [DRIVER, "extra"]


def test_server_defaults_and_foreign_labels_do_not_count_as_drift() -> None:
    desired = device_class_object(DesiredClass("a"), "v1")
    actual = {
        "metadata": {
            "name": "a",
            "uid": "u",
            "labels": {**desired["metadata"]["labels"], "x": "y"},
        },
        "spec": desired["spec"],
    }
    assert class_is_current(actual, desired)
    edited = {**actual, "spec": {"selectors": [{"cel": {"expression": "true"}}]}}
    assert not class_is_current(edited, desired)
    assert not class_is_current(None, desired)


# --- on the server ----------------------------------------------------------------------


async def _wait(pred: Callable[[], Any], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await pred():
            await anyio.sleep(0.05)


@pytest.mark.cluster
@pytest.mark.anyio
async def test_configured_classes_are_applied_and_repaired_and_stale_ones_deleted(
    api: ApiClient, control_plane: ControlPlane, unique_name: str
) -> None:
    classes = resource_kinds(await api.resource_api_version())["DeviceClass"]
    a, b = f"{unique_name}-a", f"{unique_name}-b"
    stale, foreign = f"{unique_name}-stale", f"{unique_name}-foreign"
    selector = {"selectors": [{"cel": {"expression": "true"}}]}
    await api.create(classes, {"metadata": {"name": stale, "labels": OURS}, "spec": selector})
    await api.create(classes, {"metadata": {"name": foreign}, "spec": selector})
    foreign_before = await api.get(classes, foreign)
    nx = {"opaque": {"driver": DRIVER, "parameters": {**NX, "verbose": 1}}}
    desired = (DesiredClass(DRIVER), DesiredClass(a), DesiredClass(b, config=(nx,)))
    # Run with exactly the documented RBAC, plus the names of the classes configured
    # (and once configured) here, as docs/RBAC-controller.md tells users to add.
    control_plane.kubectl("create", "namespace", unique_name)
    restricted = ApiClient(
        restricted_config(control_plane, unique_name, "controller", class_names=(a, b, stale))
    )
    controller = DeviceClassController(restricted, classes.version, desired)

    async def get(name: str) -> dict[str, Any] | None:
        try:
            return await api.get(classes, name)
        except NotFound:
            return None

    async def as_desired(name: str) -> bool:
        want = device_class_object(next(d for d in desired if d.name == name), classes.version)
        return class_is_current(await get(name), want)

    async with restricted, anyio.create_task_group() as tg:
        await tg.start(controller.run)
        for name in (DRIVER, a, b):
            await _wait(lambda name=name: as_desired(name))
        await _wait(lambda: _is_none(get(stale)))
        managers = {m["manager"] for m in (await get(b) or {})["metadata"]["managedFields"]}
        assert managers == {"power-dra-driver"}

        # Edited: another writer changes the selectors; ours come back.
        control_plane.kubectl(
            "patch", "deviceclass", a, "--type=merge", "-p", '{"spec":{"selectors":[]}}'
        )
        await _wait(lambda: as_desired(a))
        # Our label removed: the class leaves our watch, and is re-labelled.
        control_plane.kubectl("label", "deviceclass", a, "app.kubernetes.io/managed-by-")
        await _wait(lambda: as_desired(a))
        # Deleted: re-created.
        await api.delete(classes, b)
        await _wait(lambda: as_desired(b))
        tg.cancel_scope.cancel()
    control_plane.kubectl("delete", "namespace", unique_name, "--wait=false")

    foreign_after = await api.get(classes, foreign)
    assert (
        foreign_after["metadata"]["resourceVersion"]
        == foreign_before["metadata"]["resourceVersion"]
    )
    for name in (a, b, foreign):
        await api.delete(classes, name)


async def _is_none(value: Any) -> bool:
    return await value is None


@pytest.mark.cluster
@pytest.mark.anyio
async def test_a_class_applied_in_v1beta1_reads_back_the_same_in_v1(
    api: ApiClient, unique_name: str
) -> None:
    nx = {"opaque": {"driver": DRIVER, "parameters": {**NX, "verbose": 1}}}
    desired = DesiredClass(unique_name, config=(nx,))
    beta = resource_kinds("v1beta1")["DeviceClass"]
    await api.apply(beta, device_class_object(desired, "v1beta1"), field_manager="power-dra-driver")
    stored = await api.get(resource_kinds("v1")["DeviceClass"], unique_name)
    assert class_is_current(stored, device_class_object(desired, "v1"))
    await api.delete(beta, unique_name)
