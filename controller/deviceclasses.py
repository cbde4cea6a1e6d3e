# SPDX-License-Identifier: Apache-2.0
"""DeviceClasses: the configured set is kept in place with server-side apply.

The desired classes come from a YAML file (`--device-classes-config`):

    deviceClasses:
      - name: nx.device.power.ibm.com          # the default class
      - name: nx-gzip-debug                    # a class with a default NxConfig
        selectors:                             # ANDed with the driver selector
          - cel:
              expression: device.attributes['nx.device.power.ibm.com'].model == 'power10'
        config:
          - opaque:
              driver: nx.device.power.ibm.com
              parameters:
                apiVersion: nx.device.power.ibm.com/v1alpha1
                kind: NxConfig
                verbose: 2
        extendedResourceName: example.com/nx-gzip   # optional

Without a file there is one class, `nx.device.power.ibm.com`. Every class
selects only this driver's devices (`device.driver == '<driver>'` comes
first). Opaque configs for this driver are decoded with the one NxConfig
decoder when the file is loaded, so a typo fails at start, naming the class
and the field.

The controller applies each class (field manager `power-dra-driver`, label
`app.kubernetes.io/managed-by: power-dra-driver`), re-applies it when it is
edited or deleted, and deletes classes that carry our label but are no
longer configured. Classes without our label are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from controller.config import ConfigFileError, check_keys, covers, load_yaml_file
from controller.kube.client import ApiClient
from controller.kube.informer import Informer
from controller.kube.resources import resource_kinds
from controller.kube.validation import is_dns_subdomain
from controller.kube.workqueue import WorkQueue
from controller.nx.names import DRIVER_NAME, FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE
from controller.nx.nxconfig import NxConfigError, decode_nx_config

log = logging.getLogger(__name__)

DRIVER = DRIVER_NAME
CLASS_LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "power-dra-driver",
    MANAGED_BY_LABEL: MANAGED_BY_VALUE,
}
OURS_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"

_CLASS_KEYS = ("name", "selectors", "config", "extendedResourceName")

Obj = dict[str, Any]


def driver_selector(driver: str = DRIVER) -> Obj:
    """The CEL selector every class of ours starts with."""
    return {"cel": {"expression": f"device.driver == '{driver}'"}}


@dataclass(frozen=True)
class DesiredClass:
    """One DeviceClass as configured: extra selectors and configs beyond the driver selector."""

    name: str
    selectors: tuple[Obj, ...] = ()
    config: tuple[Obj, ...] = ()
    extended_resource_name: str | None = None


def default_classes(driver: str = DRIVER) -> tuple[DesiredClass, ...]:
    """The classes when no configuration file is given: one named after the driver."""
    return (DesiredClass(name=driver),)


def _parse_selectors(raw: Any, where: str) -> tuple[Obj, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigFileError(f"{where}: must be a list of {{cel: {{expression: ...}}}}")
    selectors: list[Obj] = []
    for i, sel in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(sel, Mapping):
            raise ConfigFileError(f"{at}: must be an object like {{cel: {{expression: ...}}}}")
        check_keys(sel, ("cel",), at)
        cel = sel.get("cel")
        if not isinstance(cel, Mapping):
            raise ConfigFileError(f"{at}.cel: must be an object with an expression")
        check_keys(cel, ("expression",), f"{at}.cel")
        expression = cel.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise ConfigFileError(f"{at}.cel.expression: must be a non-empty CEL expression")
        selectors.append({"cel": {"expression": expression}})
    return tuple(selectors)


def _parse_config(raw: Any, where: str, driver: str) -> tuple[Obj, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigFileError(f"{where}: must be a list of {{opaque: {{driver, parameters}}}}")
    configs: list[Obj] = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigFileError(
                f"{at}: must be an object like {{opaque: {{driver, parameters}}}}"
            )
        check_keys(entry, ("opaque",), at)
        opaque = entry.get("opaque")
        if not isinstance(opaque, Mapping):
            raise ConfigFileError(f"{at}.opaque: must be an object with driver and parameters")
        check_keys(opaque, ("driver", "parameters"), f"{at}.opaque")
        config_driver = opaque.get("driver")
        if not isinstance(config_driver, str) or not config_driver:
            raise ConfigFileError(f"{at}.opaque.driver: must be a driver name")
        if "parameters" not in opaque:
            raise ConfigFileError(f"{at}.opaque.parameters: required")
        parameters = opaque["parameters"]
        if config_driver == driver:
            try:
                decode_nx_config(parameters, path=f"{at}.opaque.parameters")
            except NxConfigError as exc:
                raise ConfigFileError(str(exc)) from None
        configs.append({"opaque": {"driver": config_driver, "parameters": parameters}})
    return tuple(configs)


def parse_device_classes(
    doc: Any, *, source: str, driver: str = DRIVER
) -> tuple[DesiredClass, ...]:
    """Validate a parsed device classes file; return the desired classes.

    Raises:
        ConfigFileError: naming the file, the class and the field at fault.
    """
    if doc is None:
        raise ConfigFileError(
            f"device classes config {source}: empty; expected deviceClasses: [...]"
        )
    if not isinstance(doc, Mapping):
        raise ConfigFileError(
            f"device classes config {source}: expected a mapping with deviceClasses"
        )
    try:
        check_keys(doc, ("deviceClasses",), "")
    except ConfigFileError as exc:
        raise ConfigFileError(f"device classes config {source}: {str(exc).lstrip('.')}") from None
    raw = doc.get("deviceClasses")
    if not isinstance(raw, list):
        raise ConfigFileError(f"device classes config {source}: deviceClasses must be a list")
    classes: list[DesiredClass] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"deviceClasses[{i}]"
        name = entry.get("name") if isinstance(entry, Mapping) else None
        label = f"DeviceClass {name}" if isinstance(name, str) and name else where
        try:
            if not isinstance(entry, Mapping):
                raise ConfigFileError(f"{where}: must be an object with at least a name")
            check_keys(entry, _CLASS_KEYS, where)
            if not isinstance(name, str) or not is_dns_subdomain(name):
                raise ConfigFileError(
                    f"{where}.name: must be a DNS subdomain (lower case letters, digits, '-', "
                    f"'.'), got {name!r}"
                )
            if name in seen:
                raise ConfigFileError(f"{where}.name: {name} is listed twice")
            seen.add(name)
            extended = entry.get("extendedResourceName")
            if extended is not None and (not isinstance(extended, str) or not extended):
                raise ConfigFileError(f"{where}.extendedResourceName: must be a resource name")
            selectors = _parse_selectors(entry.get("selectors"), f"{where}.selectors")
            config = _parse_config(entry.get("config"), f"{where}.config", driver)
        except ConfigFileError as exc:
            raise ConfigFileError(f"device classes config {source}: {label}: {exc}") from None
        classes.append(DesiredClass(name, selectors, config, extended))
    return tuple(classes)


def load_device_classes(path: str | None, driver: str = DRIVER) -> tuple[DesiredClass, ...]:
    """The desired classes from `path`, or the default class when `path` is empty.

    Raises:
        ConfigFileError: unreadable file or invalid content, naming the class and field.
    """
    if not path:
        return default_classes(driver)
    return parse_device_classes(
        load_yaml_file(path, "device classes config"), source=path, driver=driver
    )


def device_class_object(
    desired: DesiredClass,
    api_version: str,
    driver: str = DRIVER,
    owner_references: Sequence[Mapping[str, Any]] = (),
) -> Obj:
    """The DeviceClass to apply (same spec shape in v1, v1beta2 and v1beta1).

    `owner_references` (operator mode: a cluster-scoped object the installer
    deletes on uninstall) let the garbage collector remove the class with it.
    """
    ours = driver_selector(driver)
    selectors = [ours, *(s for s in desired.selectors if s != ours)]
    spec: Obj = {"selectors": selectors}
    if desired.config:
        spec["config"] = [dict(c) for c in desired.config]
    if desired.extended_resource_name:
        spec["extendedResourceName"] = desired.extended_resource_name
    metadata: Obj = {"name": desired.name, "labels": dict(CLASS_LABELS)}
    if owner_references:
        metadata["ownerReferences"] = [dict(o) for o in owner_references]
    return {
        "apiVersion": f"resource.k8s.io/{api_version}",
        "kind": "DeviceClass",
        "metadata": metadata,
        "spec": spec,
    }


def class_is_current(actual: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether the class on the server already says what we would apply."""
    if actual is None:
        return False
    wanted = {"metadata": {"labels": desired["metadata"]["labels"]}, "spec": desired["spec"]}
    if "ownerReferences" in desired["metadata"]:
        wanted["metadata"]["ownerReferences"] = desired["metadata"]["ownerReferences"]
    return covers(actual, wanted)


class DeviceClassController:
    """Keeps the configured DeviceClasses applied; deletes ours that are not configured."""

    name = "deviceclasses"

    def __init__(
        self,
        client: ApiClient,
        api_version: str,
        desired: Sequence[DesiredClass],
        *,
        driver: str = DRIVER,
        owner_references: Sequence[Mapping[str, Any]] = (),
        on_result: Callable[[str, BaseException | None, float], None] | None = None,
    ) -> None:
        self.client = client
        self.owner_references = tuple(owner_references)
        self.api_version = api_version
        self.resource = resource_kinds(api_version)["DeviceClass"]
        self.driver = driver
        self.desired = {d.name: d for d in desired}
        self.informer = Informer(client, self.resource, label_selector=OURS_SELECTOR)
        self.informers = (self.informer,)
        self.queue = WorkQueue(self.name)
        self.on_result = on_result
        self.informer.add_handler(lambda key, _old, _new: self.queue.add(key))

    async def reconcile(self, name: str) -> None:
        """Converge one class name: apply it if configured, else delete it if ours."""
        actual = self.informer.get(name)
        desired = self.desired.get(name)
        if desired is not None:
            obj = device_class_object(desired, self.api_version, self.driver, self.owner_references)
            if class_is_current(actual, obj):
                return
            await self.client.apply(self.resource, obj, field_manager=FIELD_MANAGER)
            log.info(
                "applied DeviceClass",
                extra={"deviceClass": name, "repaired": actual is not None},
            )
            return
        if actual is not None:
            uid = (actual.get("metadata") or {}).get("uid")
            await self.client.delete(self.resource, name, uid=uid)
            log.info("deleted DeviceClass no longer configured", extra={"deviceClass": name})

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch, then reconcile until cancelled; `started` once the cache is synced."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.informer.run)
            await self.informer.synced.wait()
            for name in self.desired:
                self.queue.add(name)
            task_status.started()
            await self.queue.run_workers(self.reconcile, workers=1, on_result=self.on_result)
