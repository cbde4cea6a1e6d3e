# SPDX-License-Identifier: Apache-2.0
"""Descriptors of the API resources we touch, and URL paths for them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RESOURCE_GROUP = "resource.k8s.io"
# Best first: the order in which we prefer served versions of resource.k8s.io.
RESOURCE_VERSIONS_PREFERRED = ("v1", "v1beta2", "v1beta1")


@dataclass(frozen=True)
class Resource:
    """One API resource: where it lives and what it is called."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        """The `apiVersion` field of objects of this resource."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The URL path of the collection, or of one object (and subresource)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            if not name:
                raise ValueError(f"empty {self.kind} name")
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


def resource_kinds(version: str) -> dict[str, Resource]:
    """The `resource.k8s.io` resources at one version."""
    return {
        "ResourceSlice": Resource(
            RESOURCE_GROUP, version, "resourceslices", "ResourceSlice", False
        ),
        "ResourceClaim": Resource(RESOURCE_GROUP, version, "resourceclaims", "ResourceClaim", True),
        "ResourceClaimTemplate": Resource(
            RESOURCE_GROUP, version, "resourceclaimtemplates", "ResourceClaimTemplate", True
        ),
        "DeviceClass": Resource(RESOURCE_GROUP, version, "deviceclasses", "DeviceClass", False),
    }


NODES = Resource("", "v1", "nodes", "Node", False)
PODS = Resource("", "v1", "pods", "Pod", True)
EVENTS = Resource("events.k8s.io", "v1", "events", "Event", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
DAEMONSETS = Resource("apps", "v1", "daemonsets", "DaemonSet", True)
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", True)
CLUSTERROLES = Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False)


def pick_resource_version(served: Iterable[str]) -> str:
    """Choose the best `resource.k8s.io` version among those the server serves.

    Raises LookupError naming what we need when none of ours is served.
    """
    served_set = set(served)
    for version in RESOURCE_VERSIONS_PREFERRED:
        if version in served_set:
            return version
    raise LookupError(
        f"the API server serves none of {RESOURCE_GROUP} "
        f"{', '.join(RESOURCE_VERSIONS_PREFERRED)} (it serves: {sorted(served_set) or 'nothing'}); "
        "DRA needs Kubernetes 1.32+ with the resource.k8s.io API enabled"
    )


def object_key(obj: dict[str, object]) -> str:
    """The cache key of an object: `namespace/name`, or `name` when cluster-scoped."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError("object without metadata")
    name = str(meta.get("name", ""))
    namespace = meta.get("namespace")
    return f"{namespace}/{name}" if namespace else name
