# SPDX-License-Identifier: Apache-2.0
"""The device model we publish, and its ResourceSlice shapes per API version.

Plain data in, plain data out: `Device` is our own small model; the functions
here turn it into the JSON shape of `resource.k8s.io` v1, v1beta2 or v1beta1,
split a node's devices into the slices of one pool, and decide whether the
slice the server holds still says what we want. No I/O.

Shapes (checked against k8s.io/api v0.36.3 `resource/{v1,v1beta2,v1beta1}/types.go`):

- v1 and v1beta2: `attributes`, `capacity`, `allowMultipleAllocations` are
  fields of the device itself.
- v1beta1: the same fields live under `device.basic` (`BasicDevice`).
- Attribute values: exactly one of `{"int": n}`, `{"bool": b}`, `{"string": s}`,
  `{"version": semver}`.
- Capacity: `{"value": "<quantity>", "requestPolicy": {"default": q,
  "validRange": {"min": q, "max": q, "step": q}}}`; quantities are strings.
- `allowMultipleAllocations` and `requestPolicy` sit behind the
  DRAConsumableCapacity feature gate (alpha, off by default in 1.34 and 1.35;
  beta, on by default from 1.36). A server with the gate off silently drops
  both on write, which `server_dropped_multi_allocation` detects.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from controller.kube.quantity import parse_quantity
from controller.kube.resources import RESOURCE_GROUP
from controller.kube.validation import is_c_identifier, is_dns_label, is_dns_subdomain
from controller.nx.names import MANAGED_BY_LABEL, MANAGED_BY_VALUE, SLICE_API_VERSIONS

# Kubernetes objects travel as plain JSON dicts.
JsonObject = dict[str, Any]


API_VERSIONS = SLICE_API_VERSIONS
SLICE_LABELS: Mapping[str, str] = MappingProxyType({MANAGED_BY_LABEL: MANAGED_BY_VALUE})
# Upper bound the API server enforces on devices per slice (ResourceSliceMaxDevices;
# 64 once taints, counters or list attributes are used, none of which we publish).
MAX_DEVICES_PER_SLICE = 128
# Object names are DNS subdomains: at most 253 characters.
MAX_OBJECT_NAME_LENGTH = 253
SLICE_NAME_INFIX = "-nx-gzip-"

# Limits the API server validates (k8s.io/api resource types and validation).
MAX_ATTRIBUTE_VALUE_LENGTH = 64
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


@dataclass(frozen=True)
class SemVer:
    """A device attribute typed as a semantic version (the API's `version` value)."""

    value: str

    def __post_init__(self) -> None:
        if not is_semver(self.value):
            raise ValueError(f"{self.value!r} is not a semantic version (semver.org 2.0.0)")

    def __str__(self) -> str:
        return self.value


AttributeValue = bool | int | str | SemVer


@dataclass(frozen=True)
class RequestPolicy:
    """How one allocation consumes a shared capacity: default amount and valid range."""

    default: int
    min: int
    step: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class Capacity:
    """One capacity of a device; `request_policy` only for multi-allocatable devices."""

    value: int
    request_policy: RequestPolicy | None = None


@dataclass(frozen=True)
class Device:
    """One device of our pool, independent of the API version it is published in.

    Unqualified attribute and capacity names live in the driver's domain
    (`nx.device.power.ibm.com/<name>` in CEL selectors). The mappings are
    frozen copies, so a Device can be shared freely.
    """

    name: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    capacity: Mapping[str, Capacity] = field(default_factory=dict)
    allow_multiple_allocations: bool = False

    def __post_init__(self) -> None:
        # Checked here so a bad name fails where it is made, not as a 422 on publish.
        if not is_dns_label(self.name):
            raise ValueError(f"device name {self.name!r} is not a DNS label")
        for name in (*self.attributes, *self.capacity):
            if not _is_qualified_name(name):
                raise ValueError(f"device {self.name}: {name!r} is not a valid attribute name")
        for name, value in self.attributes.items():
            if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_VALUE_LENGTH:
                raise ValueError(
                    f"device {self.name}: attribute {name} is longer than "
                    f"{MAX_ATTRIBUTE_VALUE_LENGTH} characters"
                )
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        object.__setattr__(self, "capacity", MappingProxyType(dict(self.capacity)))


def _is_qualified_name(name: str) -> bool:
    domain, slash, identifier = name.rpartition("/")
    if slash and (len(domain) > 63 or not is_dns_subdomain(domain)):
        return False
    return len(identifier) <= 32 and is_c_identifier(identifier)


def is_semver(value: str) -> bool:
    """Whether `value` is a semantic version the API server accepts as a `version` attribute."""
    return _SEMVER_RE.fullmatch(value) is not None


def _check_api_version(api_version: str) -> None:
    if api_version not in API_VERSIONS:
        raise ValueError(
            f"unsupported {RESOURCE_GROUP} version {api_version!r}; "
            f"expected one of {', '.join(API_VERSIONS)}"
        )


def _quantity_to_int(quantity: object, where: str) -> int:
    if not isinstance(quantity, str | int):
        raise ValueError(f"{where}: {quantity!r} is not a quantity")
    value = parse_quantity(quantity)
    if value.denominator != 1:
        raise ValueError(f"{where}: {quantity!r} is not a whole number")
    return int(value)


# --- Device <-> API shape -----------------------------------------------------


def _attribute_to_api(value: AttributeValue) -> JsonObject:
    # bool first: bool is a subclass of int.
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, SemVer):
        return {"version": value.value}
    return {"string": value}


def _capacity_to_api(capacity: Capacity) -> JsonObject:
    out: JsonObject = {"value": str(capacity.value)}
    policy = capacity.request_policy
    if policy is not None:
        valid_range: JsonObject = {"min": str(policy.min)}
        if policy.max is not None:
            valid_range["max"] = str(policy.max)
        if policy.step is not None:
            valid_range["step"] = str(policy.step)
        out["requestPolicy"] = {"default": str(policy.default), "validRange": valid_range}
    return out


def device_to_api(device: Device, api_version: str) -> JsonObject:
    """The JSON shape of `device` in a ResourceSlice of `resource.k8s.io/<api_version>`."""
    _check_api_version(api_version)
    fields: JsonObject = {}
    if device.attributes:
        fields["attributes"] = {
            name: _attribute_to_api(value) for name, value in sorted(device.attributes.items())
        }
    if device.capacity:
        fields["capacity"] = {
            name: _capacity_to_api(cap) for name, cap in sorted(device.capacity.items())
        }
    # Omitted rather than false: a server without consumable capacity drops the
    # key anyway, and omission keeps exclusive devices identical on every server.
    if device.allow_multiple_allocations:
        fields["allowMultipleAllocations"] = True
    if api_version == "v1beta1":
        return {"name": device.name, "basic": fields}
    return {"name": device.name, **fields}


def _device_fields(dev: Mapping[str, Any], api_version: str) -> Mapping[str, Any]:
    """The dict holding attributes/capacity of an API device: itself, or `basic` in v1beta1."""
    if api_version == "v1beta1":
        basic = dev.get("basic")
        return basic if isinstance(basic, Mapping) else {}
    return dev


def _attribute_from_api(name: str, raw: object) -> AttributeValue:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ValueError(f"attribute {name}: expected exactly one typed value, got {raw!r}")
    ((kind, value),) = raw.items()
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "version" and isinstance(value, str):
        return SemVer(value)
    raise ValueError(f"attribute {name}: unsupported value {raw!r}")


def _optional_quantity(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    return None if value is None else _quantity_to_int(value, f"{where}.{key}")


def _capacity_from_api(name: str, raw: object) -> Capacity:
    where = f"capacity {name}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an object, got {raw!r}")
    value = _quantity_to_int(raw.get("value"), f"{where}.value")
    policy_raw = raw.get("requestPolicy")
    if policy_raw is None:
        return Capacity(value)
    if not isinstance(policy_raw, Mapping):
        raise ValueError(f"{where}.requestPolicy: expected an object, got {policy_raw!r}")
    if policy_raw.get("validValues"):
        raise ValueError(f"{where}.requestPolicy: validValues is not part of our device model")
    range_raw = policy_raw.get("validRange") or {}
    if not isinstance(range_raw, Mapping):
        raise ValueError(f"{where}.requestPolicy.validRange: expected an object")
    default = _optional_quantity(policy_raw, "default", f"{where}.requestPolicy")
    minimum = _optional_quantity(range_raw, "min", f"{where}.requestPolicy.validRange")
    if default is None or minimum is None:
        raise ValueError(f"{where}.requestPolicy: default and validRange.min are required")
    return Capacity(
        value,
        RequestPolicy(
            default=default,
            min=minimum,
            step=_optional_quantity(range_raw, "step", f"{where}.requestPolicy.validRange"),
            max=_optional_quantity(range_raw, "max", f"{where}.requestPolicy.validRange"),
        ),
    )


def api_to_device(dev: Mapping[str, Any], api_version: str) -> Device:
    """Our `Device` from its JSON shape in `resource.k8s.io/<api_version>`.

    Fields outside our model (taints, counters, binding conditions, ...) are
    ignored. Raises ValueError when a field we model holds something we never
    publish (list attributes, validValues, fractional quantities).
    """
    _check_api_version(api_version)
    name = dev.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"device without a name: {dev!r}")
    fields = _device_fields(dev, api_version)
    attributes = fields.get("attributes") or {}
    capacity = fields.get("capacity") or {}
    if not isinstance(attributes, Mapping) or not isinstance(capacity, Mapping):
        raise ValueError(f"device {name}: attributes and capacity must be objects")
    return Device(
        name=name,
        attributes={k: _attribute_from_api(k, v) for k, v in attributes.items()},
        capacity={k: _capacity_from_api(k, v) for k, v in capacity.items()},
        allow_multiple_allocations=fields.get("allowMultipleAllocations") is True,
    )


# --- slices of one pool -------------------------------------------------------


def slice_name(node_name: str, index: int) -> str:
    """The deterministic name of slice `index` of the pool of `node_name`.

    `<node>-nx-gzip-<index>` when that fits in 253 characters; otherwise the
    node name is cut and a hash of the full name keeps names of different
    long nodes apart. The result is always a valid DNS subdomain, given a
    node name that is one.
    """
    if index < 0:
        raise ValueError(f"slice index must be >= 0, got {index}")
    suffix = f"{SLICE_NAME_INFIX}{index}"
    name = f"{node_name}{suffix}"
    if len(name) <= MAX_OBJECT_NAME_LENGTH:
        return name
    digest = hashlib.sha256(node_name.encode()).hexdigest()[:10]
    keep = MAX_OBJECT_NAME_LENGTH - len(suffix) - len(digest) - 1
    # The cut must end in an alphanumeric: "-" or "." before "-" is not a DNS subdomain.
    prefix = node_name[:keep].rstrip(".-")
    return f"{prefix}-{digest}{suffix}"


def _chunks(devices: Sequence[Device], size: int) -> list[Sequence[Device]]:
    if not devices:
        # An empty pool is still published: it shows the driver is up on this node.
        return [devices]
    return [devices[i : i + size] for i in range(0, len(devices), size)]


def build_pool_slices(
    driver: str,
    node_name: str,
    node_uid: str | None,
    devices: Sequence[Device],
    *,
    generation: int,
    api_version: str,
    max_devices_per_slice: int = MAX_DEVICES_PER_SLICE,
) -> list[JsonObject]:
    """The complete ResourceSlice objects of the pool of one node.

    The pool is named after the node; devices are split over as many slices as
    needed (at most `max_devices_per_slice` each, in the given order), and
    every slice carries the pool's generation and slice count. A pool without
    devices is one empty slice. `node_uid` makes the Node the slices' owner, so
    they are garbage-collected with it; None leaves them without an owner.
    """
    _check_api_version(api_version)
    if not 1 <= max_devices_per_slice <= MAX_DEVICES_PER_SLICE:
        raise ValueError(
            f"max_devices_per_slice must be in 1..{MAX_DEVICES_PER_SLICE}, "
            f"got {max_devices_per_slice}"
        )
    if generation < 0:
        raise ValueError(f"pool generation must be >= 0, got {generation}")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ValueError(f"device names in a pool must be unique: {names}")
    chunks = _chunks(devices, max_devices_per_slice)
    metadata_common: JsonObject = {"labels": dict(SLICE_LABELS)}
    if node_uid:
        # controller=true like other node-local slices; no blockOwnerDeletion,
        # which would need update rights on nodes/finalizers.
        metadata_common["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "name": node_name,
                "uid": node_uid,
                "controller": True,
            }
        ]
    slices: list[JsonObject] = []
    for index, chunk in enumerate(chunks):
        slices.append(
            {
                "apiVersion": f"{RESOURCE_GROUP}/{api_version}",
                "kind": "ResourceSlice",
                "metadata": {
                    "name": slice_name(node_name, index),
                    **copy.deepcopy(metadata_common),
                },
                "spec": {
                    "driver": driver,
                    "pool": {
                        "name": node_name,
                        "generation": generation,
                        "resourceSliceCount": len(chunks),
                    },
                    "nodeName": node_name,
                    "devices": [device_to_api(d, api_version) for d in chunk],
                },
            }
        )
    return slices


# --- desired vs actual ----------------------------------------------------------


def _version_of(obj: Mapping[str, Any], fallback: str) -> str:
    api_version = obj.get("apiVersion")
    if isinstance(api_version, str) and api_version.startswith(f"{RESOURCE_GROUP}/"):
        version = api_version.split("/", 1)[1]
        if version in API_VERSIONS:
            return version
    return fallback


def _api_devices(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = obj.get("spec") or {}
    devices = spec.get("devices") if isinstance(spec, Mapping) else None
    if not isinstance(devices, list):
        return []
    return [d for d in devices if isinstance(d, Mapping)]


def _devices_by_name(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(d.get("name")): d for d in _api_devices(obj)}


def _multi_allocation_dropped(
    desired_fields: Mapping[str, Any], actual_fields: Mapping[str, Any]
) -> bool:
    # The server removes the key (it never writes false), so absence is the sign.
    return (
        desired_fields.get("allowMultipleAllocations") is True
        and "allowMultipleAllocations" not in actual_fields
    )


def server_dropped_multi_allocation(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether the server dropped `allowMultipleAllocations` from a slice we wrote.

    That is what a server without the DRAConsumableCapacity feature does: it
    accepts the slice but stores our shared device as an exclusive one (and
    without request policies). The plugin then falls back to slot mode.
    `actual` is the object the server answered with or holds.
    """
    desired_version = _version_of(desired, "v1")
    actual_version = _version_of(actual, desired_version)
    actual_devices = _devices_by_name(actual)
    for name, dev in _devices_by_name(desired).items():
        got = actual_devices.get(name)
        if got is None:
            continue
        if _multi_allocation_dropped(
            _device_fields(dev, desired_version), _device_fields(got, actual_version)
        ):
            return True
    return False


def _without_consumable_capacity(device: Device) -> Device:
    """`device` as a server without consumable capacity stores it."""
    return Device(
        name=device.name,
        attributes=device.attributes,
        capacity={k: Capacity(c.value) for k, c in device.capacity.items()},
        allow_multiple_allocations=False,
    )


def _devices_differ(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    desired_version = _version_of(desired, "v1")
    actual_version = _version_of(actual, desired_version)
    desired_devices = _api_devices(desired)
    actual_by_name = _devices_by_name(actual)
    if len(desired_devices) != len(_api_devices(actual)):
        return True
    for raw in desired_devices:
        got_raw = actual_by_name.get(str(raw.get("name")))
        if got_raw is None:
            return True
        want = api_to_device(raw, desired_version)
        try:
            got = api_to_device(got_raw, actual_version)
        except ValueError:
            return True
        if _multi_allocation_dropped(
            _device_fields(raw, desired_version), _device_fields(got_raw, actual_version)
        ):
            # Not drift we can repair by writing again: the server would drop it
            # again. The caller sees it through server_dropped_multi_allocation.
            want = _without_consumable_capacity(want)
        if want != got:
            return True
    return False


def _owner_key(ref: Mapping[str, Any]) -> tuple[object, ...]:
    return (
        ref.get("apiVersion"),
        ref.get("kind"),
        ref.get("name"),
        ref.get("uid"),
        ref.get("controller") is True,
    )


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _refs(meta: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    refs = meta.get("ownerReferences")
    return [r for r in refs if isinstance(r, Mapping)] if isinstance(refs, list) else []


def slice_needs_update(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether the slice the server holds (`actual`) differs from `desired` in what we own.

    We own our labels, our owner reference to the Node and the spec's driver,
    nodeName, pool and devices. Everything else is ignored: server-filled
    metadata (uid, resourceVersion, managedFields), labels or owner references
    others added, fields the server defaults, and quantities in a different
    but equal spelling ("1k" for "1000"). A slice read back in another API
    version than `desired` compares by meaning. A server that dropped
    `allowMultipleAllocations` (and with it the request policies) does not
    count as a difference, since writing again would change nothing; see
    `server_dropped_multi_allocation`.
    """
    desired_meta, actual_meta = _metadata(desired), _metadata(actual)
    actual_labels = actual_meta.get("labels") or {}
    for key, value in (desired_meta.get("labels") or {}).items():
        if actual_labels.get(key) != value:
            return True
    actual_refs = {_owner_key(r) for r in _refs(actual_meta)}
    if any(_owner_key(r) not in actual_refs for r in _refs(desired_meta)):
        return True

    desired_spec = desired.get("spec") or {}
    actual_spec = actual.get("spec")
    if not isinstance(actual_spec, Mapping):
        return True
    for key in ("driver", "nodeName"):
        if desired_spec.get(key) != actual_spec.get(key):
            return True
    desired_pool = desired_spec.get("pool") or {}
    actual_pool = actual_spec.get("pool") or {}
    if not isinstance(actual_pool, Mapping):
        return True
    for key in ("name", "generation", "resourceSliceCount"):
        if desired_pool.get(key) != actual_pool.get(key):
            return True
    return _devices_differ(desired, actual)
