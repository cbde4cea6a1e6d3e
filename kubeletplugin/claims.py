# SPDX-License-Identifier: Apache-2.0
"""What to prepare for an allocated ResourceClaim: pure functions over plain data.

The input is a ResourceClaim as the API returns it (a dict, any of
`resource.k8s.io` v1, v1beta2 and v1beta1: the parts read here,
`status.allocation.devices.results[]` and `.config[]`, have the same shape in
all three). The output is a `PreparedClaim`: which devices of this node the
claim gets, their CDI device IDs, and the container environment (the merged
NxConfig plus the claim's share of the accelerator).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controller.kube.validation import DNS_SUBDOMAIN_MAX_LENGTH, is_dns_label, is_dns_subdomain
from controller.nx.allocation import (
    allocation_devices,
    driver_opaque_configs,
    driver_results,
    result_credits,
)
from controller.nx.nxconfig import (
    NxConfig,
    NxConfigError,
    decode_nx_config,
    merge_nx_configs,
    nx_config_env,
)

CDI_KIND = "k8s.nx.device.power.ibm.com/nx"

# Environment telling the workload what it was given.
ENV_CLAIM = "NX_DRA_CLAIM"
ENV_CREDITS = "NX_DRA_CREDITS"
ENV_DEVICES = "NX_DRA_DEVICES"

SOURCE_FROM_CLASS = "FromClass"
SOURCE_FROM_CLAIM = "FromClaim"

# Claim UIDs become file names and CDI device names (which must start and
# end with a letter or digit). Kubernetes UIDs are UUIDs; anything outside
# this set is refused rather than escaped.
_SAFE_UID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,126}[A-Za-z0-9])?")


class ClaimError(ValueError):
    """A claim this node cannot prepare; the message says why and what to do."""


@dataclass(frozen=True)
class ClaimRef:
    """A claim as the kubelet names it in NodePrepareResources."""

    namespace: str
    uid: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PreparedDevice:
    """One allocated device of this node, as the kubelet and CDI see it.

    Several requests of a claim can share one device (shared mode), so a
    device lists every request it serves and counts their credits together.
    Request names are the kubelet's: the parent request for a result of a
    subrequest (`firstAvailable`), as containers name the parent.
    `share_id` is the allocation's shareID of a device allocated more than
    once (the first one when several requests of the claim share it).
    """

    request_names: tuple[str, ...]
    pool_name: str
    device_name: str
    cdi_device_ids: tuple[str, ...]
    credits: int
    env: Mapping[str, str] = field(default_factory=dict)
    share_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, for the checkpoint and CDI annotations."""
        data: dict[str, Any] = {
            "requestNames": list(self.request_names),
            "poolName": self.pool_name,
            "deviceName": self.device_name,
            "cdiDeviceIds": list(self.cdi_device_ids),
            "credits": self.credits,
            "env": dict(self.env),
        }
        if self.share_id:  # optional: older plugins read the entry unchanged
            data["shareID"] = self.share_id
        return data

    @classmethod
    def from_dict(cls, data: Any) -> PreparedDevice:
        """Inverse of `to_dict`; raises ValueError on anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"prepared device must be an object, got {type(data).__name__}")
        env = data.get("env")
        if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("prepared device: env must map strings to strings")
        credits = data.get("credits")
        if isinstance(credits, bool) or not isinstance(credits, int) or credits < 0:
            raise ValueError(f"prepared device: credits must be an integer >= 0, got {credits!r}")
        return cls(
            request_names=_str_tuple(data, "requestNames"),
            pool_name=_str(data, "poolName"),
            device_name=_str(data, "deviceName"),
            cdi_device_ids=_str_tuple(data, "cdiDeviceIds"),
            credits=credits,
            env=dict(env),
            share_id=_optional_str(data, "shareID"),
        )


@dataclass(frozen=True)
class PreparedClaim:
    """Everything prepared for one claim on this node."""

    uid: str
    namespace: str
    name: str
    devices: tuple[PreparedDevice, ...]

    @property
    def ref(self) -> ClaimRef:
        """The claim's reference, as the kubelet names it."""
        return ClaimRef(self.namespace, self.uid, self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, for the checkpoint and CDI annotations."""
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "devices": [d.to_dict() for d in self.devices],
        }

    @classmethod
    def from_dict(cls, data: Any) -> PreparedClaim:
        """Inverse of `to_dict`; raises ValueError on anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"prepared claim must be an object, got {type(data).__name__}")
        uid = _str(data, "uid")
        validate_claim_uid(uid)
        devices = data.get("devices")
        if not isinstance(devices, list):
            raise ValueError("prepared claim: devices must be a list")
        return cls(
            uid=uid,
            namespace=_str(data, "namespace"),
            name=_str(data, "name"),
            devices=tuple(PreparedDevice.from_dict(d) for d in devices),
        )


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _optional_str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _str_tuple(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def clip(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters, for messages: a request can carry megabytes."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def validate_claim_uid(uid: str) -> None:
    """Refuse a claim UID that is unsafe in a file name or CDI device name.

    Accepts 1-128 letters, digits, `-` and `_`, starting and ending with a
    letter or digit (every Kubernetes UID); so `/`, `..` and empty are out.

    Raises:
        ClaimError: the UID is not such a token.
    """
    if not isinstance(uid, str) or not _SAFE_UID.fullmatch(uid):
        raise ClaimError(
            f"claim UID {clip(str(uid))!r} is not a safe token (letters, digits, '-', '_'; "
            "at most 128): refusing to use it in file names"
        )


def validate_claim_ref(ref: ClaimRef) -> None:
    """Refuse a claim reference that cannot name a ResourceClaim.

    Besides the UID (see `validate_claim_uid`), the namespace must be a
    DNS-1123 label and the name a DNS-1123 subdomain, as the API server
    demands: they go into an API URL path, where "/", "?" or "" would make
    the plugin read something else than the claim.

    Raises:
        ClaimError: naming the field that is wrong.
    """
    validate_claim_uid(ref.uid)
    # Escaped: the kubelet passes what a pod spec said, newlines and all, into error text.
    label = f"{clip(ref.namespace)!r}/{clip(ref.name)!r}"
    if not is_dns_label(ref.namespace):
        raise ClaimError(
            f"claim {label} (uid {ref.uid}): namespace {clip(ref.namespace)!r} is not a "
            "Kubernetes namespace name (lower-case letters, digits, '-'; at most 63)"
        )
    if not is_dns_subdomain(ref.name):
        raise ClaimError(
            f"claim {label} (uid {ref.uid}): name {clip(ref.name)!r} is not a ResourceClaim "
            f"name (lower-case letters, digits, '-', '.'; at most {DNS_SUBDOMAIN_MAX_LENGTH})"
        )


def cdi_device_name(claim_uid: str, device_name: str) -> str:
    """The CDI device name of one allocated device: `<claim uid>-<device>`."""
    return f"{claim_uid}-{device_name}"


def cdi_device_id(claim_uid: str, device_name: str) -> str:
    """The fully qualified CDI device ID the kubelet hands to the runtime."""
    return f"{CDI_KIND}={cdi_device_name(claim_uid, device_name)}"


def _claim_label(claim: Mapping[str, Any]) -> str:
    meta = claim.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def check_claim(claim: Mapping[str, Any], ref: ClaimRef) -> str | None:
    """Why the claim read from the API cannot be prepared for `ref`, or None.

    A different UID means the claim was deleted and re-created under the
    same name after the kubelet asked; no allocation means there is nothing
    to prepare yet.
    """
    meta = claim.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        return (
            f"claim {ref}: the API's answer carries no UID (not a readable ResourceClaim); "
            "check the plugin's log and the API server"
        )
    if uid != ref.uid:
        return (
            f"claim {ref}: the API has UID {uid}, the kubelet asked for {ref.uid}: "
            "the claim was re-created; the kubelet retries with the new one"
        )
    status = claim.get("status") or {}
    if not status.get("allocation"):
        return f"claim {ref}: not allocated; the scheduler must allocate it before prepare"
    return None


def reserved_here(claim: Mapping[str, Any], ref: ClaimRef, driver: str, pool: str) -> bool:
    """Whether a copy of a claim (from the API server's watch cache) is what the
    kubelet asked to prepare: `ref`'s UID, allocated with something of `driver`
    in `pool`, reserved for a consumer.

    The kubelet asks only for a claim in that state (it has just read it from
    etcd), so a copy that is not trails etcd and must be read again. A copy
    that is carries the claim's allocation: an allocation stays until every
    consumer is gone, so an older copy differs only if the claim was freed and
    allocated again in between.
    """
    status = claim.get("status") or {}
    return (
        check_claim(claim, ref) is None
        and bool(status.get("reservedFor"))
        and bool(our_results(claim, driver, pool))
    )


def our_results(claim: Mapping[str, Any], driver: str, pool: str) -> list[dict[str, Any]]:
    """The allocation results for `driver` in `pool`, in allocation order.

    Results of other drivers (a claim may mix drivers) and other pools are
    skipped.
    """
    return driver_results(claim, driver, pool)


@dataclass(frozen=True)
class _OpaqueConfig:
    index: int
    source: str
    requests: tuple[str, ...]
    parameters: Any


def _our_configs(claim: Mapping[str, Any], driver: str) -> list[_OpaqueConfig]:
    """Opaque configs for `driver`, class configs first, each group in API order.

    Later entries win when merged, so a claim's own config overrides its
    class's.
    """
    found: list[_OpaqueConfig] = []
    for index, entry, opaque in driver_opaque_configs(claim, driver):
        requests = entry.get("requests") or []
        found.append(
            _OpaqueConfig(
                index=index,
                source=str(entry.get("source", "")),
                requests=tuple(str(r) for r in requests),
                parameters=opaque.get("parameters"),
            )
        )
    # sorted() is stable: API order is kept within each source.
    return sorted(found, key=lambda c: 0 if c.source == SOURCE_FROM_CLASS else 1)


def _targets(config_requests: tuple[str, ...], request_name: str) -> bool:
    """Whether a config listing `config_requests` applies to `request_name`.

    An empty list means every request; a main request name also covers its
    subrequests (`req` applies to `req/sub`).
    """
    if not config_requests:
        return True
    return any(request_name == r or request_name.startswith(r + "/") for r in config_requests)


def parent_request(request_name: str) -> str:
    """The main request of an allocation result's request name (`parent/sub` -> `parent`).

    Containers reference a claim's requests by their main names, so that is
    what the kubelet matches prepared devices against.
    """
    return request_name.split("/", 1)[0]


def _result_credits(result: Mapping[str, Any]) -> int:
    """Credits one result holds: its consumed capacity in shared mode, else 1.

    The controller's parser (controller.nx.allocation), so both judge a claim alike.
    """
    return result_credits(result, "nx.device.power.ibm.com")


def build_prepared_claim(
    claim: Mapping[str, Any],
    driver: str,
    pool: str,
    inventory_device_names: Collection[str],
) -> PreparedClaim:
    """Decide what one allocated claim gets on this node.

    Every opaque config addressed to `driver` must be a valid NxConfig, even
    one that applies to no device here: the controller judges the same way,
    and a typo should fail loudly rather than depend on the allocation.

    Raises:
        ClaimError: naming the claim and what to do: unsafe UID, not
            allocated, nothing of this driver allocated in `pool`, a device
            missing from the inventory, an invalid config.
    """
    label = _claim_label(claim)
    meta = claim.get("metadata") or {}
    uid = meta.get("uid", "")
    try:
        validate_claim_uid(uid)
    except ClaimError as exc:
        raise ClaimError(f"claim {label}: {exc}") from None
    status = claim.get("status") or {}
    if not status.get("allocation"):
        raise ClaimError(
            f"claim {label}: not allocated; the scheduler must allocate it before prepare"
        )

    configs = _our_configs(claim, driver)
    decoded: dict[int, NxConfig] = {}
    for cfg in configs:
        try:
            decoded[cfg.index] = decode_nx_config(cfg.parameters)
        except NxConfigError as exc:
            where = "the DeviceClass" if cfg.source == SOURCE_FROM_CLASS else "the claim"
            raise ClaimError(
                f"claim {label}: invalid opaque config "
                f"(status.allocation.devices.config[{cfg.index}], {cfg.source}): {exc}; "
                f"fix it in {where} and re-create the pod"
            ) from None

    results = our_results(claim, driver, pool)
    if not results:
        pools = sorted(
            {
                str(r.get("pool"))
                for r in allocation_devices(claim).get("results") or []
                if isinstance(r, Mapping) and r.get("driver") == driver
            }
        )
        where = f"pools {', '.join(pools)}" if pools else "no pool"
        raise ClaimError(
            f"claim {label}: nothing of {driver} is allocated in this node's pool {pool} "
            f"(allocated in {where}); the pod belongs on another node"
        )

    # Group results by device: in shared mode several requests can land on
    # the one `nx-gzip` device, which is one CDI device for the container.
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        groups.setdefault(str(result.get("device", "")), []).append(result)

    inventory = set(inventory_device_names)
    devices: list[PreparedDevice] = []
    for device_name, device_results in groups.items():
        if device_name not in inventory:
            listed = ", ".join(sorted(inventory)) or "empty"
            raise ClaimError(
                f"claim {label}: device {device_name} is not on this node "
                f"(inventory: {listed}); re-create the pod so it gets a device this node has"
            )
        # Configs name requests as allocated (`parent/sub` included); the
        # kubelet matches containers by the parent name.
        allocated_requests = tuple(dict.fromkeys(str(r.get("request", "")) for r in device_results))
        request_names = tuple(dict.fromkeys(parent_request(r) for r in allocated_requests))
        share_ids = [str(r["shareID"]) for r in device_results if r.get("shareID")]
        try:
            credits = sum(_result_credits(r) for r in device_results)
        except ValueError as exc:
            raise ClaimError(
                f"claim {label}: device {device_name}: unreadable consumedCapacity: {exc}"
            ) from None
        applied = [
            decoded[c.index]
            for c in configs
            if any(_targets(c.requests, request) for request in allocated_requests)
        ]
        devices.append(
            PreparedDevice(
                request_names=request_names,
                pool_name=pool,
                device_name=device_name,
                cdi_device_ids=(cdi_device_id(uid, device_name),),
                credits=credits,
                env=nx_config_env(merge_nx_configs(applied)),
                share_id=share_ids[0] if share_ids else "",
            )
        )

    # Every device tells the workload the claim's whole share.
    share = {
        ENV_CLAIM: label,
        ENV_CREDITS: str(sum(d.credits for d in devices)),
        ENV_DEVICES: ",".join(d.device_name for d in devices),
    }
    return PreparedClaim(
        uid=uid,
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        devices=tuple(replace(d, env=dict(sorted({**d.env, **share}.items()))) for d in devices),
    )
