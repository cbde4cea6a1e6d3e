# SPDX-License-Identifier: Apache-2.0
"""Claims allocated to this driver: opaque configs checked early, results in `status.devices`.

For every ResourceClaim with this driver's devices in
`status.allocation.devices.results`, the controller decodes this driver's
opaque configs (`status.allocation.devices.config[]`) with the one NxConfig
decoder, long before the kubelet plugin would fail the pod on them, and
writes one `status.devices` entry per allocated device of ours:

- config valid: condition `Ready=True` (reason `ConfigValid`) and
  `data: {"credits": N}`, the credits the allocation consumes (1 when the
  result names none, as in slot mode);
- config invalid: condition `Ready=False` (reason `InvalidConfig`, the
  message names the field) and one Warning Event `InvalidNxConfig` on the
  claim per allocation (not per retry);
- config valid but carrying settings without effect here (IBM's driver's
  `sharing`): `Ready=True` as above, and one Warning Event
  `IneffectiveNxConfig` per allocation saying what replaces them.

`status.devices` is a map list keyed by driver/pool/device/shareID, so the
entries are written with server-side apply on the `status` subresource under
our field manager: other drivers' entries are left alone, and ours vanish
when we stop applying them. The API server itself drops the entries of
devices that are no longer allocated (deallocation).

Writing them needs, besides `patch` on `resourceclaims/status`, the verb
`arbitrary-node:patch` on `resourceclaims/driver` with resourceName = the
driver name (Kubernetes 1.36 DRAResourceClaimGranularStatusAuthorization);
see docs/RBAC-controller.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import orjson

from controller.events import WARNING, event_name, event_object, fingerprint, record_event
from controller.kube.client import ApiClient
from controller.kube.errors import Forbidden, Invalid
from controller.kube.informer import Informer
from controller.kube.resources import resource_kinds
from controller.kube.workqueue import WorkQueue
from controller.nx.allocation import driver_opaque_configs, driver_results
from controller.nx.allocation import result_credits as allocation_result_credits
from controller.nx.names import DRIVER_NAME, FIELD_MANAGER
from controller.nx.nxconfig import NxConfigError, decode_nx_config

log = logging.getLogger(__name__)

DRIVER = DRIVER_NAME

READY = "Ready"
REASON_VALID = "ConfigValid"
REASON_INVALID = "InvalidConfig"
EVENT_REASON_INVALID = "InvalidNxConfig"
EVENT_REASON_INEFFECTIVE = "IneffectiveNxConfig"
EVENT_ACTION = "ValidateConfig"
SOURCE_FROM_CLASS = "FromClass"

# metav1.Condition message limit.
_MESSAGE_MAX = 32768

Obj = dict[str, Any]
DeviceKey = tuple[str, str, str, str]  # driver, pool, device, shareID ("" when none)


def our_results(claim: Mapping[str, Any], driver: str = DRIVER) -> list[Obj]:
    """The allocation results of `driver`, in allocation order."""
    return driver_results(claim, driver)


def involves_driver(claim: Mapping[str, Any] | None, driver: str = DRIVER) -> bool:
    """Whether the claim has devices of `driver` allocated or status entries of it."""
    if claim is None:
        return False
    if our_results(claim, driver):
        return True
    return any(
        isinstance(e, Mapping) and e.get("driver") == driver
        for e in (claim.get("status") or {}).get("devices") or []
    )


def device_key(entry: Mapping[str, Any]) -> DeviceKey:
    """The map-list key of a result or a `status.devices` entry."""
    return (
        str(entry.get("driver") or ""),
        str(entry.get("pool") or ""),
        str(entry.get("device") or ""),
        str(entry.get("shareID") or ""),
    )


def _label(claim: Mapping[str, Any]) -> str:
    meta = claim.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def config_problem(claim: Mapping[str, Any], driver: str = DRIVER) -> str | None:
    """Why this driver's opaque configs in the allocation are not valid NxConfigs, or None.

    Every config addressed to `driver` must decode, as the kubelet plugin
    refuses the whole claim otherwise. The message names the config entry,
    where it came from and the field.
    """
    for index, entry, opaque in driver_opaque_configs(claim, driver):
        try:
            decode_nx_config(opaque.get("parameters"))
        except NxConfigError as exc:
            source = str(entry.get("source") or "")
            where = "the DeviceClass" if source == SOURCE_FROM_CLASS else "the claim"
            return (
                f"claim {_label(claim)}: invalid NxConfig in "
                f"status.allocation.devices.config[{index}] ({source or 'unknown source'}): "
                f"{exc}; fix it in {where} and re-create the claim"
            )
    return None


def config_notes(claim: Mapping[str, Any], driver: str = DRIVER) -> str | None:
    """What of this driver's valid opaque configs has no effect here (IBM's
    `sharing`), naming each config entry; None when everything takes effect."""
    notes = []
    for index, entry, opaque in driver_opaque_configs(claim, driver):
        try:
            decoded = decode_nx_config(opaque.get("parameters"))
        except NxConfigError:
            continue
        source = str(entry.get("source") or "") or "unknown source"
        notes += [
            f"status.allocation.devices.config[{index}] ({source}): {note}"
            for note in decoded.notes
        ]
    if not notes:
        return None
    return f"claim {_label(claim)}: " + "; ".join(notes)


def result_credits(result: Mapping[str, Any], driver: str = DRIVER) -> int:
    """Credits one result consumes: its `credits` consumed capacity, else 1 (one slot).

    Raises:
        ValueError: an unreadable consumed capacity (the plugin refuses such a claim).
    """
    return allocation_result_credits(result, driver)


def _time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ready_condition(
    problem: str | None,
    credits: int,
    generation: int,
    previous: Mapping[str, Any] | None,
    now: datetime,
) -> Obj:
    status = "False" if problem else "True"
    if problem:
        reason, message = REASON_INVALID, problem[:_MESSAGE_MAX]
    else:
        reason = REASON_VALID
        message = f"opaque config valid (or none); {credits} credit{'s' if credits != 1 else ''} allocated"
    since = _time(now)
    for cond in (previous or {}).get("conditions") or []:
        if cond.get("type") == READY and cond.get("status") == status:
            since = str(cond.get("lastTransitionTime") or since)
    condition: Obj = {
        "type": READY,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if generation > 0:  # claims have no generation today; the API omits a zero
        condition["observedGeneration"] = generation
    return condition


def current_entries(claim: Mapping[str, Any], driver: str = DRIVER) -> dict[DeviceKey, Obj]:
    """This driver's `status.devices` entries, by key."""
    return {
        device_key(e): e
        for e in (claim.get("status") or {}).get("devices") or []
        if isinstance(e, dict) and e.get("driver") == driver
    }


def desired_entries(
    claim: Mapping[str, Any], now: datetime, driver: str = DRIVER
) -> tuple[list[Obj], str | None]:
    """Our `status.devices` entries for the claim as it is now, and the config problem if any.

    One entry per allocated device (and share) of `driver`; results naming
    the same device and share add up their credits. A condition keeps its
    lastTransitionTime while its status does not change.
    """
    problem = config_problem(claim, driver)
    generation = int((claim.get("metadata") or {}).get("generation") or 0)
    existing = current_entries(claim, driver)
    credits: dict[DeviceKey, int] = {}
    for result in our_results(claim, driver):
        key = device_key(result)
        try:
            amount = result_credits(result, driver)
        except ValueError as exc:
            # The plugin refuses the claim for this: say so instead of counting 1.
            amount = 0
            problem = problem or (
                f"claim {_label(claim)}: device {key[2]}: unreadable consumedCapacity: {exc}"
            )
        credits[key] = credits.get(key, 0) + amount
    entries: list[Obj] = []
    for key, amount in credits.items():
        _, pool, device, share = key
        entry: Obj = {"driver": driver, "pool": pool, "device": device}
        if share:
            entry["shareID"] = share
        entry["conditions"] = [
            _ready_condition(problem, amount, generation, existing.get(key), now)
        ]
        entry["data"] = {"credits": amount}
        entries.append(entry)
    return entries, problem


def _comparable(entry: Mapping[str, Any]) -> Obj:
    return {k: entry.get(k) for k in ("driver", "pool", "device", "shareID", "conditions", "data")}


def entries_match(current: Mapping[DeviceKey, Obj], desired: list[Obj]) -> bool:
    """Whether the claim already carries exactly the desired entries of ours."""
    wanted = {device_key(e): _comparable(e) for e in desired}
    return wanted == {k: _comparable(v) for k, v in current.items()}


def status_apply_body(claim: Mapping[str, Any], entries: list[Obj], api_version: str) -> Obj:
    """The server-side apply body for the `status` subresource (UID pinned)."""
    meta = claim.get("metadata") or {}
    return {
        "apiVersion": f"resource.k8s.io/{api_version}",
        "kind": "ResourceClaim",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "status": {"devices": entries},
    }


def allocation_fingerprint(claim: Mapping[str, Any], problem: str) -> str:
    """Identifies one report: the claim, its allocation and the problem found in it."""
    meta = claim.get("metadata") or {}
    allocation = (claim.get("status") or {}).get("allocation") or {}
    try:
        allocated = orjson.dumps(allocation, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        # Parameters nested deeper than orjson writes (255 levels): the results and
        # the problem found still identify the report.
        results = (allocation.get("devices") or {}).get("results") or []
        allocated = orjson.dumps(results, option=orjson.OPT_SORT_KEYS).decode()
    return fingerprint(str(meta.get("uid") or ""), allocated, problem)


class ClaimStatusController:
    """Validates the opaque configs of claims allocated to this driver; writes `status.devices`."""

    name = "claim-status"

    def __init__(
        self,
        client: ApiClient,
        api_version: str,
        *,
        reporting_instance: str,
        driver: str = DRIVER,
        workers: int = 4,
        on_result: Callable[[str, BaseException | None, float], None] | None = None,
        on_status_dropped: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.api_version = api_version
        self.resource = resource_kinds(api_version)["ResourceClaim"]
        self.driver = driver
        self.reporting_instance = reporting_instance
        self.workers = workers
        self.informer = Informer(client, self.resource)
        self.informers = (self.informer,)
        self.queue = WorkQueue(self.name)
        self.on_result = on_result
        # claim key -> name of the Event last recorded for it (so retries do not call the API)
        self._reported: dict[str, str] = {}
        # False once the server was seen dropping status.devices (Kubernetes 1.32, or
        # DRAResourceClaimDeviceStatus off): writes stop, Events go on.
        self.device_status_kept = True
        self.on_status_dropped = on_status_dropped
        self.informer.add_handler(self._changed)

    def _changed(self, key: str, old: Obj | None, new: Obj | None) -> None:
        if new is None:
            self._reported.pop(key, None)
            return
        if involves_driver(new, self.driver) or involves_driver(old, self.driver):
            self.queue.add(key)

    async def _report(
        self, key: str, claim: Obj, problem: str, reason: str = EVENT_REASON_INVALID
    ) -> None:
        name = event_name(
            str((claim.get("metadata") or {}).get("name") or "claim"),
            allocation_fingerprint(claim, problem),
        )
        if self._reported.get(key) == name:
            return
        regarding = {**claim, "apiVersion": self.resource.api_version, "kind": "ResourceClaim"}
        event = event_object(
            regarding=regarding,
            reason=reason,
            note=problem,
            action=EVENT_ACTION,
            reporting_instance=self.reporting_instance,
            now=datetime.now(UTC),
            name=name,
            type=WARNING,
        )
        await record_event(self.client, event)
        self._reported[key] = name

    async def reconcile(self, key: str) -> None:
        """Converge one claim's `status.devices` entries of ours (and report a bad config)."""
        claim = self.informer.get(key)
        if claim is None:
            self._reported.pop(key, None)
            return
        entries, problem = desired_entries(claim, datetime.now(UTC), self.driver)
        if problem:
            await self._report(key, claim, problem)
        elif notes := config_notes(claim, self.driver):
            await self._report(key, claim, notes, EVENT_REASON_INEFFECTIVE)
        if not self.device_status_kept or entries_match(
            current_entries(claim, self.driver), entries
        ):
            return
        body = status_apply_body(claim, entries, self.api_version)
        try:
            written = await self.client.apply(
                self.resource, body, field_manager=FIELD_MANAGER, subresource="status"
            )
        except Invalid as exc:
            # Kubernetes 1.36 refuses a status.devices change without the per-driver
            # permission as a validation error (422), not as 403.
            if "resourceclaims/driver" not in exc.message:
                raise
            raise Forbidden(
                403,
                "Forbidden",
                f"claim {key}: not allowed to write status.devices of {self.driver}: grant verb "
                f"arbitrary-node:patch on resource.k8s.io resourceclaims/driver, resourceName "
                f"{self.driver} (see docs/RBAC-controller.md); server said: {exc.message}",
                what=exc.what,
            ) from exc
        if entries and not entries_match(current_entries(written, self.driver), entries):
            self._status_dropped(key)
            return
        log.info(
            "updated claim device status",
            extra={"claim": key, "devices": len(entries), "ready": problem is None},
        )

    def _status_dropped(self, key: str) -> None:
        """The server answered the write without our entries: it does not keep them.
        Said once per process (writes already under way when it is first seen only count)."""
        if self.on_status_dropped is not None:
            self.on_status_dropped()
        if not self.device_status_kept:
            return
        self.device_status_kept = False
        log.warning(
            "the API server dropped status.devices of claim %s: it does not keep claim device "
            "status (Kubernetes 1.32, or the DRAResourceClaimDeviceStatus feature gate off); "
            "no claim of this driver gets status.devices from this controller until it "
            "restarts, invalid NxConfig parameters are still reported as Warning Events",
            key,
            extra={"claim": key},
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch claims, then reconcile until cancelled; `started` once synced."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.informer.run)
            await self.informer.synced.wait()
            task_status.started()
            await self.queue.run_workers(
                self.reconcile, workers=self.workers, on_result=self.on_result
            )
