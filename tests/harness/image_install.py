# SPDX-License-Identifier: Apache-2.0
"""The shipped manifests, installed on the harness's one-machine nodes with the
driver's own image: the plugin DaemonSet and the controller Deployment run as
pods under the real kubelet.

Only what one machine needs is changed, by a kustomize overlay generated here
(the shipped files stay as they are), for `manifests/base` and for the Helm
chart alike (for Helm: values for what the chart has values for, the rest by
the same overlay as a post-renderer of `helm install`):

- the image: the local `localhost/power-dra-driver:TAG`, `imagePullPolicy: Never`
  (there is no registry; the tarball is imported into containerd);
- `hostNetwork: true` (the node's CNI config is never run), and free ports for
  the plugin's health and the controller's metrics (host ports are shared);
- `KUBERNETES_SERVICE_HOST/PORT` = the API server's loopback address (there is
  no kube-proxy, so the `kubernetes` Service's ClusterIP leads nowhere);
- the plugin's arch nodeSelector = this machine's (it ships as ppc64le);
- the plugin's `/sys` hostPath = the node's fake Power10 sysfs tree (bound at
  the same path in every node's namespace);
- controller replicas 1, on the real node (the harness's other nodes are
  API objects without a kubelet).

Everything else (securityContext, hostPath types, probes, RBAC, the slice
admission policy) is as shipped.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.harness.cluster import REPO, ControlPlane, free_port, yaml_stream
from tests.harness.images import oci_arch
from tests.harness.node import NODE_SYSFS, RealNode, wait_for
from tests.harness.plugin import DRIVER

NAMESPACE = "power-dra-driver"
BASE = REPO / "manifests" / "base"
CHART = REPO / "manifests" / "helm" / "power-dra-driver"
PLUGIN_DS = "power-dra-kubeletplugin"
CONTROLLER_DEPLOY = "power-dra-controller"
PLUGIN_LABEL = "app.kubernetes.io/component=kubeletplugin"
CONTROLLER_LABEL = "app.kubernetes.io/component=controller"


@dataclass(frozen=True)
class OneMachine:
    """The one-machine settings an install needs."""

    image: str  # localhost/power-dra-driver:TAG
    api_host: str
    api_port: int
    sysfs_root: str  # the fake Power10 tree, as the nodes' namespaces see it
    plugin_port: int
    controller_port: int
    arch: str
    node_name: str

    @classmethod
    def for_node(cls, cp: ControlPlane, node: RealNode, image: str) -> OneMachine:
        host, _, port = cp.server.removeprefix("https://").rpartition(":")
        return cls(
            image=image,
            api_host=host,
            api_port=int(port),
            sysfs_root=NODE_SYSFS,
            plugin_port=free_port(),
            controller_port=free_port(),
            arch=oci_arch(),
            node_name=node.name,
        )

    def api_env(self) -> list[dict[str, str]]:
        return [
            {"name": "KUBERNETES_SERVICE_HOST", "value": self.api_host},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(self.api_port)},
        ]

    def patches(self) -> list[dict[str, Any]]:
        """Kustomize patches (strategic merge + JSON 6902) for both workloads."""
        repo, _, tag = self.image.rpartition(":")
        plugin = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": PLUGIN_DS, "namespace": NAMESPACE},
            "spec": {
                "template": {
                    "spec": {
                        "hostNetwork": True,
                        "nodeSelector": {"kubernetes.io/arch": self.arch},
                        "containers": [
                            {
                                "name": "plugin",
                                "image": f"{repo}:{tag}",
                                "imagePullPolicy": "Never",
                                "env": [
                                    *self.api_env(),
                                    {
                                        "name": "METRICS_BIND_ADDRESS",
                                        "value": f":{self.plugin_port}",
                                    },
                                ],
                            }
                        ],
                        "volumes": [
                            {
                                "name": "host-sys",
                                "hostPath": {"path": self.sysfs_root, "type": "Directory"},
                            }
                        ],
                    }
                }
            },
        }
        controller = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": CONTROLLER_DEPLOY, "namespace": NAMESPACE},
            "spec": {
                "replicas": 1,
                "template": {
                    "spec": {
                        "hostNetwork": True,
                        # The harness's other nodes are API objects only.
                        "nodeSelector": {"kubernetes.io/hostname": self.node_name},
                        "containers": [
                            {
                                "name": "controller",
                                "image": f"{repo}:{tag}",
                                "imagePullPolicy": "Never",
                                "env": [
                                    *self.api_env(),
                                    {
                                        "name": "METRICS_BIND_ADDRESS",
                                        "value": f":{self.controller_port}",
                                    },
                                ],
                            }
                        ],
                    }
                },
            },
        }

        def port(kind: str, name: str, number: int) -> dict[str, Any]:
            # A port's merge key is its number, so the number is replaced by path.
            return {
                "target": {"kind": kind, "name": name},
                "patch": json.dumps(
                    [
                        {
                            "op": "replace",
                            "path": "/spec/template/spec/containers/0/ports/0/containerPort",
                            "value": number,
                        }
                    ]
                ),
            }

        return [
            {"patch": yaml.safe_dump(plugin)},
            {"patch": yaml.safe_dump(controller)},
            port("DaemonSet", PLUGIN_DS, self.plugin_port),
            port("Deployment", CONTROLLER_DEPLOY, self.controller_port),
        ]

    def helm_values(self) -> dict[str, Any]:
        """The chart's own values for what it has values for."""
        repo, _, tag = self.image.rpartition(":")
        return {
            "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
            "kubeletPlugin": {"nodeSelector": {"kubernetes.io/arch": self.arch}},
            "controller": {"replicas": 1},
        }


def write_overlay(directory: Path, resources: Sequence[str], machine: OneMachine) -> Path:
    """A kustomization over `resources` with the one-machine patches."""
    directory.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(resources),
        "patches": machine.patches(),
    }
    (directory / "kustomization.yaml").write_text(
        "# SPDX-License-Identifier: Apache-2.0\n# Generated by tests/harness/image_install.py\n"
        + yaml.safe_dump(kustomization, sort_keys=False)
    )
    return directory


@dataclass
class Install:
    """One install of the driver; `uninstall` removes it."""

    how: str  # "kustomize" or "helm"
    uninstall: Callable[[], None]
    applied_at: float  # time.monotonic() right after the apply/install returned


def remove_controller_objects(cp: ControlPlane) -> None:
    """What the controller made beside the manifests: the DeviceClass (the base does
    not ship it), which a later install (e.g. Helm's, which owns it) would trip over."""
    cp.kubectl("delete", "deviceclass", DRIVER, "--ignore-not-found")


def install_kustomize(cp: ControlPlane, machine: OneMachine, workdir: Path) -> Install:
    """`kubectl apply --server-side -k` of an overlay over manifests/base."""
    overlay = write_overlay(
        workdir / "overlay-kustomize",
        [os.path.relpath(BASE, workdir / "overlay-kustomize")],
        machine,
    )
    cp.kubectl("apply", "--server-side", "-k", str(overlay))
    applied = time.monotonic()

    def uninstall() -> None:
        # Waits until the namespace is gone too, so that another install can follow.
        cp.kubectl("delete", "-k", str(overlay), "--ignore-not-found", "--timeout=120s")
        remove_controller_objects(cp)

    return Install("kustomize", uninstall, applied)


def install_helm(cp: ControlPlane, machine: OneMachine, workdir: Path, helm: Path) -> Install:
    """`helm install` of the chart with generated values and the same overlay as a
    post-renderer (for hostNetwork, ports, the API address and the sysfs path)."""
    post = workdir / "overlay-helm"
    write_overlay(post, ["helm-output.yaml"], machine)
    kubectl = cp.bin_dir / "kubectl"
    renderer = workdir / "helm-post-render.sh"
    renderer.write_text(
        "#!/bin/sh\n# SPDX-License-Identifier: Apache-2.0\n"
        f"cat >'{post}/helm-output.yaml' && exec '{kubectl}' kustomize '{post}'\n"
    )
    renderer.chmod(renderer.stat().st_mode | stat.S_IXUSR)
    values = workdir / "helm-values.yaml"
    values.write_text(yaml.safe_dump(machine.helm_values()))
    env = {**os.environ, "KUBECONFIG": cp.kubeconfig, "HELM_CACHE_HOME": str(workdir / "helm")}
    env["HELM_CONFIG_HOME"] = env["HELM_DATA_HOME"] = str(workdir / "helm")

    def helm_run(*args: str) -> None:
        proc = subprocess.run(
            [str(helm), *args], capture_output=True, text=True, env=env, check=False, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"helm {args[0]} failed: {proc.stderr}")

    helm_run(
        "install", "power-dra-driver", str(CHART), "--namespace", NAMESPACE,
        "--create-namespace", "-f", str(values), "--post-renderer", str(renderer),
    )  # fmt: skip
    applied = time.monotonic()

    def uninstall() -> None:
        helm_run("uninstall", "power-dra-driver", "--namespace", NAMESPACE, "--wait")
        remove_controller_objects(cp)

    return Install("helm", uninstall, applied)


def pods(cp: ControlPlane, label: str, node: str | None = None) -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", NAMESPACE, "-l", label, "-o", "json"]
    if node:
        args.append(f"--field-selector=spec.nodeName={node}")
    out = cp.kubectl(*args).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def wait_running(
    cp: ControlPlane, node: RealNode, label: str, timeout: float = 120
) -> dict[str, Any]:
    """The one pod with `label`, Running and Ready (the kubelet's probes passed)."""

    def one_ready() -> dict[str, Any] | None:
        kubelet = node.kubelet
        if kubelet is not None and not kubelet.alive():
            raise RuntimeError(f"kubelet exited:\n{kubelet.tail(40)}")
        found = [
            p
            for p in pods(cp, label, node.name)
            if p.get("metadata", {}).get("deletionTimestamp") is None
        ]
        for p in found:
            for status in p.get("status", {}).get("containerStatuses") or []:
                waiting = (status.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in ("ErrImageNeverPull", "CreateContainerConfigError"):
                    raise RuntimeError(f"{p['metadata']['name']}: {waiting}")
        return found[0] if len(found) == 1 and ready(found[0]) else None

    pod: dict[str, Any] = wait_for(f"pod {label} Ready", one_ready, timeout, 0.1)
    return pod


def container_rss_mib(node: RealNode, script: str) -> float:
    """RSS of the process in the node's containers whose command line names `script`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            cgroup = (proc / "cgroup").read_text()
            status = (proc / "status").read_text()
        except OSError:
            continue
        if node.cgroup_root not in cgroup or not any(script.encode() in a for a in cmdline[:3]):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {script} process in the containers of {node.name}")


def pod_log(cp: ControlPlane, pod: dict[str, Any]) -> str:
    out = cp.kubectl("logs", "-n", NAMESPACE, pod["metadata"]["name"], check=False).stdout
    return str(out)


def wait_plugin_registered(cp: ControlPlane, pod: dict[str, Any], timeout: float = 60) -> None:
    """The plugin in `pod` says the kubelet registered it."""
    wait_for(
        f"kubelet registration of {pod['metadata']['name']}",
        lambda: "kubelet registered DRA driver" in pod_log(cp, pod),
        timeout,
        0.2,
    )


def per_node_daemonsets(objs: list[dict[str, Any]], nodes: Sequence[str]) -> list[dict[str, Any]]:
    """The plugin DaemonSet split into one per node, each with its own health port.

    Only for several harness nodes on one machine: they share the host network, so
    one DaemonSet's fixed health port would collide between its pods."""
    out = [o for o in objs if not (o["kind"] == "DaemonSet" and o["metadata"]["name"] == PLUGIN_DS)]
    (ds,) = [o for o in objs if o not in out]
    for node in nodes:
        copy = json.loads(json.dumps(ds))
        copy["metadata"]["name"] = f"{PLUGIN_DS}-{node}"
        extra = {"power-dra-driver.test/node": node}
        copy["spec"]["selector"]["matchLabels"].update(extra)
        template = copy["spec"]["template"]
        template["metadata"]["labels"].update(extra)
        template["spec"].setdefault("nodeSelector", {})["kubernetes.io/hostname"] = node
        container = template["spec"]["containers"][0]
        port = free_port()
        container["ports"][0]["containerPort"] = port
        for env in container["env"]:
            if env["name"] == "METRICS_BIND_ADDRESS":
                env["value"] = f":{port}"
        out.append(copy)
    return out


def install_rendered(cp: ControlPlane, objs: list[dict[str, Any]]) -> float:
    """Server-side apply of rendered objects; returns time.monotonic() after it."""
    cp.kubectl("apply", "--server-side", "-f", "-", input=yaml_stream(objs))
    return time.monotonic()
