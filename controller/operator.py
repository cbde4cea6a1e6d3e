# SPDX-License-Identifier: Apache-2.0
"""Operator mode: the controller owns the kubelet plugin DaemonSet.

An OLM bundle can only carry the controller's Deployment and RBAC, so with
`--manage-plugin-daemonset` the controller applies the plugin DaemonSet in
its own namespace (server-side apply, field manager `power-dra-driver`) and
re-applies it whenever it drifts or is deleted. Its content is a pure
function of a small YAML file (`--plugin-daemonset-config`):

    image: power-dra-driver:0.1.0     # required
    imagePullPolicy: IfNotPresent
    imagePullSecrets: [pull-secret]
    nodeSelector: {kubernetes.io/arch: ppc64le}
    tolerations: [{operator: Exists}]
    resources: {requests: {cpu: 10m, memory: 64Mi}, limits: {memory: 256Mi}}
    deviceMode: shared            # DEVICE_MODE: shared | slots
    reservedCredits: 1            # RESERVED_CREDITS
    verbosity: 1
    env: [{name: MAX_SLOTS, value: "16"}]   # extra variables; win over the above
    seLinuxOptions: {type: spc_t}
    priorityClassName: system-node-critical
    serviceAccountName: power-dra-kubeletplugin
    name: power-dra-kubeletplugin
    kubeletRegistrarDirectoryPath: /var/lib/kubelet/plugins_registry
    kubeletPluginsDirectoryPath: /var/lib/kubelet/plugins
    cdiRoot: /var/run/cdi

DaemonSets in the namespace that carry our labels but another name are
deleted; others are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from controller.config import ConfigFileError, check_keys, covers, load_yaml_file
from controller.kube.client import ApiClient
from controller.kube.informer import Informer
from controller.kube.resources import DAEMONSETS
from controller.kube.validation import is_dns_label, is_env_var_name
from controller.kube.workqueue import WorkQueue
from controller.nx.names import FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE

log = logging.getLogger(__name__)

COMPONENT = "kubeletplugin"
SELECTOR_LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "power-dra-driver",
    "app.kubernetes.io/component": COMPONENT,
}
DAEMONSET_LABELS: Mapping[str, str] = {
    **SELECTOR_LABELS,
    MANAGED_BY_LABEL: MANAGED_BY_VALUE,
}
OURS_SELECTOR = ",".join(f"{k}={v}" for k, v in DAEMONSET_LABELS.items())
HEALTH_PORT = 8081
SYSFS_MOUNT = "/host-sys"
HOST_DEV_ROOT = "/host-dev"
DEVICE_MODES = ("shared", "slots")

_CONFIG_KEYS = (
    "image",
    "imagePullPolicy",
    "imagePullSecrets",
    "name",
    "serviceAccountName",
    "priorityClassName",
    "nodeSelector",
    "tolerations",
    "resources",
    "env",
    "deviceMode",
    "reservedCredits",
    "verbosity",
    "seLinuxOptions",
    "kubeletRegistrarDirectoryPath",
    "kubeletPluginsDirectoryPath",
    "cdiRoot",
)

Obj = dict[str, Any]


@dataclass(frozen=True)
class PluginDaemonSetConfig:
    """What the plugin DaemonSet is made from (see the module docstring for the YAML)."""

    image: str
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    name: str = "power-dra-kubeletplugin"
    service_account_name: str = "power-dra-kubeletplugin"
    priority_class_name: str = "system-node-critical"
    node_selector: Mapping[str, str] = field(
        default_factory=lambda: {"kubernetes.io/arch": "ppc64le"}
    )
    tolerations: tuple[Obj, ...] = ({"operator": "Exists"},)
    resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "10m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )
    env: tuple[Obj, ...] = ()
    device_mode: str = "shared"
    reserved_credits: int = 1
    verbosity: int = 1
    se_linux_options: Mapping[str, str] | None = None
    kubelet_registrar_directory_path: str = "/var/lib/kubelet/plugins_registry"
    kubelet_plugins_directory_path: str = "/var/lib/kubelet/plugins"
    cdi_root: str = "/var/run/cdi"


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigFileError(f"{where}: must map strings to strings")
    return dict(value)


def _object_list(value: Any, where: str) -> tuple[Obj, ...]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigFileError(f"{where}: must be a list of objects")
    return tuple(dict(v) for v in value)


def _absolute(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigFileError(f"{where}: must be an absolute host path, got {value!r}")
    return value


def parse_plugin_daemonset_config(doc: Any, *, source: str) -> PluginDaemonSetConfig:
    """Validate a parsed plugin DaemonSet config.

    Raises:
        ConfigFileError: naming the file and the field at fault.
    """
    prefix = f"plugin DaemonSet config {source}"
    if not isinstance(doc, Mapping):
        raise ConfigFileError(f"{prefix}: expected a mapping with at least image")
    try:
        check_keys(doc, _CONFIG_KEYS, "")
    except ConfigFileError as exc:
        raise ConfigFileError(f"{prefix}: {str(exc).lstrip('.')}") from None
    values: dict[str, Any] = {}
    try:
        image = doc.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ConfigFileError("image: required, the plugin's container image")
        values["image"] = image
        if "imagePullPolicy" in doc:
            policy = doc["imagePullPolicy"]
            if policy not in ("Always", "IfNotPresent", "Never"):
                raise ConfigFileError(
                    f"imagePullPolicy: must be Always, IfNotPresent or Never, got {policy!r}"
                )
            values["image_pull_policy"] = policy
        if "imagePullSecrets" in doc:
            secrets = doc["imagePullSecrets"]
            if not isinstance(secrets, list) or not all(isinstance(s, str) for s in secrets):
                raise ConfigFileError("imagePullSecrets: must be a list of Secret names")
            values["image_pull_secrets"] = tuple(secrets)
        for key, attr in (("name", "name"), ("serviceAccountName", "service_account_name")):
            if key in doc:
                if not isinstance(doc[key], str) or not is_dns_label(doc[key]):
                    raise ConfigFileError(f"{key}: must be a DNS label, got {doc[key]!r}")
                values[attr] = doc[key]
        if "priorityClassName" in doc:
            if not isinstance(doc["priorityClassName"], str):
                raise ConfigFileError("priorityClassName: must be a string")
            values["priority_class_name"] = doc["priorityClassName"]
        if "nodeSelector" in doc:
            values["node_selector"] = _string_map(doc["nodeSelector"], "nodeSelector")
        if "tolerations" in doc:
            values["tolerations"] = _object_list(doc["tolerations"], "tolerations")
        if "resources" in doc:
            if not isinstance(doc["resources"], Mapping):
                raise ConfigFileError("resources: must be an object (requests, limits)")
            values["resources"] = dict(doc["resources"])
        if "env" in doc:
            env = _object_list(doc["env"], "env")
            for i, var in enumerate(env):
                name = var.get("name")
                if not isinstance(name, str) or not is_env_var_name(name):
                    raise ConfigFileError(f"env[{i}].name: must be a variable name, got {name!r}")
                if "value" in var and not isinstance(var["value"], str):
                    raise ConfigFileError(
                        f"env[{i}].value: must be a string (quote numbers), got {var['value']!r}"
                    )
            values["env"] = env
        if "deviceMode" in doc:
            if doc["deviceMode"] not in DEVICE_MODES:
                raise ConfigFileError(
                    f"deviceMode: must be one of {', '.join(DEVICE_MODES)}, got {doc['deviceMode']!r}"
                )
            values["device_mode"] = doc["deviceMode"]
        for key, attr in (("reservedCredits", "reserved_credits"), ("verbosity", "verbosity")):
            if key in doc:
                value = doc[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigFileError(f"{key}: must be an integer >= 0, got {value!r}")
                values[attr] = value
        if "seLinuxOptions" in doc:
            values["se_linux_options"] = _string_map(doc["seLinuxOptions"], "seLinuxOptions")
        for key, attr in (
            ("kubeletRegistrarDirectoryPath", "kubelet_registrar_directory_path"),
            ("kubeletPluginsDirectoryPath", "kubelet_plugins_directory_path"),
            ("cdiRoot", "cdi_root"),
        ):
            if key in doc:
                values[attr] = _absolute(doc[key], key)
    except ConfigFileError as exc:
        raise ConfigFileError(f"{prefix}: {exc}") from None
    return PluginDaemonSetConfig(**values)


def load_plugin_daemonset_config(path: str | None) -> PluginDaemonSetConfig:
    """The plugin DaemonSet config from `path`.

    Raises:
        ConfigFileError: no path, unreadable file or invalid content.
    """
    if not path:
        raise ConfigFileError(
            "--manage-plugin-daemonset needs --plugin-daemonset-config "
            "(PLUGIN_DAEMONSET_CONFIG): a YAML file with at least the plugin image"
        )
    return parse_plugin_daemonset_config(
        load_yaml_file(path, "plugin DaemonSet config"), source=path
    )


def _plugin_env(config: PluginDaemonSetConfig) -> list[Obj]:
    env: list[Obj] = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "DEVICE_MODE", "value": config.device_mode},
        {"name": "RESERVED_CREDITS", "value": str(config.reserved_credits)},
        {"name": "SYSFS_ROOT", "value": SYSFS_MOUNT},
        {"name": "HOST_DEV_ROOT", "value": HOST_DEV_ROOT},
        {
            "name": "KUBELET_REGISTRAR_DIRECTORY_PATH",
            "value": config.kubelet_registrar_directory_path,
        },
        {"name": "KUBELET_PLUGINS_DIRECTORY_PATH", "value": config.kubelet_plugins_directory_path},
        {"name": "CDI_ROOT", "value": config.cdi_root},
        {"name": "METRICS_BIND_ADDRESS", "value": f":{HEALTH_PORT}"},
    ]
    # The config's own variables win, in place; new ones are appended.
    position = {var["name"]: i for i, var in enumerate(env)}
    for var in config.env:
        if var["name"] in position:
            env[position[var["name"]]] = dict(var)
        else:
            position[var["name"]] = len(env)
            env.append(dict(var))
    return env


def plugin_daemonset(
    config: PluginDaemonSetConfig,
    namespace: str,
    owner_references: Sequence[Mapping[str, Any]] = (),
) -> Obj:
    """The kubelet plugin DaemonSet to apply in `namespace`. No I/O.

    `owner_references` (the controller's Deployment) let the garbage collector
    remove the DaemonSet when the operator is uninstalled.

    The kubelet directories are mounted at their host paths (the plugin hands
    socket paths to the kubelet), sysfs read-only at /host-sys, /dev
    read-only under /host-dev. The container is not privileged, drops every
    capability and has a read-only root filesystem; it runs as root only to
    write the root-owned kubelet and CDI directories. Rolling updates start
    the new pod before the old one stops (maxSurge 1, maxUnavailable 0).
    """
    container_security: Obj = {
        "runAsUser": 0,
        "runAsNonRoot": False,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    if config.se_linux_options:
        container_security["seLinuxOptions"] = dict(config.se_linux_options)
    container: Obj = {
        "name": "plugin",
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["power-dra-kubeletplugin"],
        "args": [f"-v={config.verbosity}"],
        "env": _plugin_env(config),
        "ports": [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 5},
        "resources": dict(config.resources),
        "securityContext": container_security,
        "volumeMounts": [
            {
                "name": "plugins-registry",
                "mountPath": config.kubelet_registrar_directory_path,
            },
            {"name": "plugins", "mountPath": config.kubelet_plugins_directory_path},
            {"name": "cdi", "mountPath": config.cdi_root},
            # Read-only all the way down (submounts too), where the node supports it.
            {
                "name": "host-sys",
                "mountPath": SYSFS_MOUNT,
                "readOnly": True,
                "recursiveReadOnly": "IfPossible",
            },
            {
                "name": "host-dev",
                "mountPath": f"{HOST_DEV_ROOT}/dev",
                "readOnly": True,
                "recursiveReadOnly": "IfPossible",
            },
        ],
    }
    pod_spec: Obj = {
        "serviceAccountName": config.service_account_name,
        "nodeSelector": dict(config.node_selector),
        "tolerations": [dict(t) for t in config.tolerations],
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            _host_path("plugins-registry", config.kubelet_registrar_directory_path, "Directory"),
            _host_path("plugins", config.kubelet_plugins_directory_path, "DirectoryOrCreate"),
            _host_path("cdi", config.cdi_root, "DirectoryOrCreate"),
            _host_path("host-sys", "/sys", "Directory"),
            _host_path("host-dev", "/dev", "Directory"),
        ],
    }
    if config.priority_class_name:
        pod_spec["priorityClassName"] = config.priority_class_name
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    metadata: Obj = {"name": config.name, "namespace": namespace, "labels": dict(DAEMONSET_LABELS)}
    if owner_references:
        metadata["ownerReferences"] = [dict(o) for o in owner_references]
    return {
        "apiVersion": DAEMONSETS.api_version,
        "kind": DAEMONSETS.kind,
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": dict(SELECTOR_LABELS)},
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": dict(SELECTOR_LABELS)}, "spec": pod_spec},
        },
    }


def _host_path(name: str, path: str, kind: str) -> Obj:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


class PluginDaemonSetController:
    """Keeps the plugin DaemonSet applied in `namespace`."""

    name = "plugin-daemonset"

    def __init__(
        self,
        client: ApiClient,
        namespace: str,
        config: PluginDaemonSetConfig,
        *,
        owner_references: Sequence[Mapping[str, Any]] = (),
        on_result: Callable[[str, BaseException | None, float], None] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.config = config
        self.desired = plugin_daemonset(config, namespace, owner_references)
        self.key = f"{namespace}/{config.name}"
        self.informer = Informer(
            client, DAEMONSETS, namespace=namespace, label_selector=OURS_SELECTOR
        )
        self.informers = (self.informer,)
        self.queue = WorkQueue(self.name)
        self.on_result = on_result
        self.informer.add_handler(lambda key, _old, _new: self.queue.add(key))

    async def reconcile(self, key: str) -> None:
        """Apply the DaemonSet when it differs from the desired one; delete stray ones of ours."""
        actual = self.informer.get(key)
        if key == self.key:
            wanted = {k: self.desired[k] for k in ("metadata", "spec")}
            if actual is not None and covers(actual, wanted):
                return
            await self.client.apply(DAEMONSETS, self.desired, field_manager=FIELD_MANAGER)
            log.info(
                "applied plugin DaemonSet",
                extra={"daemonSet": key, "repaired": actual is not None},
            )
            return
        if actual is not None:
            meta = actual.get("metadata") or {}
            await self.client.delete(
                DAEMONSETS, str(meta.get("name")), self.namespace, uid=meta.get("uid")
            )
            log.info("deleted stray plugin DaemonSet", extra={"daemonSet": key})

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch our DaemonSets, then reconcile until cancelled; `started` once synced."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.informer.run)
            await self.informer.synced.wait()
            self.queue.add(self.key)
            task_status.started()
            await self.queue.run_workers(self.reconcile, workers=1, on_result=self.on_result)
