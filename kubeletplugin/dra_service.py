# SPDX-License-Identifier: Apache-2.0
"""The DRA socket's services: DRA `v1` and `v1beta1` (`NodePrepareResources`,
`NodeUnprepareResources`) and the device health stream (`v1alpha1`,
`v1beta1`, `v1`), translating between wire messages and a
`grpc_calls.DraBackend`.

Apart from `grpc_service` (the sockets, the registration service) so that the
registration socket serves before these messages and the claim code are
imported: the plugin loads this module in a worker thread once the kubelet
can already register it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from kubeletplugin.claims import ClaimRef, clip
from proto_gen.generated import v1 as health_v1
from proto_gen.generated import v1alpha1 as health_v1alpha1
from proto_gen.generated import v1beta1 as health_v1beta1
from proto_gen.generated.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from proto_gen.generated.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1

from .grpc_calls import CallLifecycle, DeviceHealth, DraBackend, Send, Servable

if TYPE_CHECKING:
    from kubeletplugin.state import PrepareResult

__all__ = ["MIN_HEALTH_INTERVAL", "dra_services"]

# Shortest time between two health lists on one stream.
MIN_HEALTH_INTERVAL = 0.1

# --- wire <-> backend ------------------------------------------------------------


_CLAIM_FIELDS = (("namespace", 1), ("uid", 2), ("name", 3))


def _claim_refs(method: str, api: Any, claims: list[Any]) -> list[ClaimRef]:
    """Claims of a request, first occurrence of each UID; empty UIDs are a bad request."""
    refs: dict[str, ClaimRef] = {}
    for i, claim in enumerate(claims):
        # betterproto2 turns a claim with an invalid wire type into None, and
        # a string field sent as a number into an int.
        if not isinstance(claim, api.Claim):
            raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: claim #{i} is malformed")
        for name, number in _CLAIM_FIELDS:
            value = getattr(claim, name, None)
            if not isinstance(value, str):
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"{method}: claim #{i}: field {name} ({number}) must be a string, "
                    f"got {type(value).__name__}",
                )
        if not claim.uid:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"{method}: claim #{i} ({clip(claim.namespace)}/{clip(claim.name)}) "
                "has an empty uid",
            )
        refs.setdefault(claim.uid, ClaimRef(claim.namespace, claim.uid, claim.name))
    return list(refs.values())


def _prepare_response(
    api: Any, claims: list[ClaimRef], results: Mapping[str, PrepareResult], shares: bool
) -> Any:
    """The wire answer to NodePrepareResources: the one place results become messages.

    `shares`: the API version's Device has `share_id` (DRA v1, not v1beta1).
    """
    device_type, answer_type = api.Device, api.NodePrepareResourceResponse
    out: dict[str, Any] = {}
    for claim in claims:
        result = results.get(claim.uid)
        if result is None:
            out[claim.uid] = answer_type(error=_missing(claim))
        elif result.error:
            out[claim.uid] = answer_type(error=result.error)
        else:
            out[claim.uid] = answer_type(
                devices=[
                    device_type(
                        request_names=list(d.request_names),
                        pool_name=d.pool_name,
                        device_name=d.device_name,
                        cdi_device_ids=list(d.cdi_device_ids),
                        **({"share_id": d.share_id} if shares and d.share_id else {}),
                    )
                    for d in result.devices
                ]
            )
    return api.NodePrepareResourcesResponse(claims=out)


def _unprepare_response(api: Any, claims: list[ClaimRef], errors: Mapping[str, str]) -> Any:
    """The wire answer to NodeUnprepareResources."""
    answer_type = api.NodeUnprepareResourceResponse
    out: dict[str, Any] = {}
    for claim in claims:
        error = errors.get(claim.uid)
        out[claim.uid] = answer_type(error=_missing(claim) if error is None else error)
    return api.NodeUnprepareResourcesResponse(claims=out)


def _missing(claim: ClaimRef) -> str:
    return f"claim {claim} ({claim.uid}): the plugin returned no result (plugin bug)"


class _DraService:
    """NodePrepareResources / NodeUnprepareResources for one DRA API version."""

    def __init__(self, api: Any, backend: DraBackend) -> None:
        self._api = api
        self._backend = backend
        self._shares = "share_id" in api.Device.__dataclass_fields__  # DRA v1, not v1beta1

    async def node_prepare_resources(self, request: Any, budget: float) -> Any:
        claims = _claim_refs("NodePrepareResources", self._api, request.claims)
        results = await self._backend.prepare_claims(claims, budget=budget) if claims else {}
        return _prepare_response(self._api, claims, results, self._shares)

    async def node_unprepare_resources(self, request: Any, budget: float) -> Any:
        claims = _claim_refs("NodeUnprepareResources", self._api, request.claims)
        errors = await self._backend.unprepare_claims(claims, budget=budget) if claims else {}
        return _unprepare_response(self._api, claims, errors)


class _HealthService:
    """NodeWatchResources for one health API version: the full device list
    on connect, on every change, and at least every `resend_interval` seconds.

    The periodic resend matters: the kubelet stamps each device with the time
    it received the list and turns it "Unknown" once that is older than
    health_check_timeout_seconds (30 s when unset), so a list sent only on
    change would go stale on a healthy node.
    """

    def __init__(
        self,
        api: Any,
        backend: DraBackend,
        lifecycle: CallLifecycle,
        resend_interval: float,
        check_timeout: int,
    ) -> None:
        self._api = api
        self._backend = backend
        self._lifecycle = lifecycle
        self._resend_interval = resend_interval
        self._check_timeout = check_timeout

    def _response(self, devices: list[DeviceHealth]) -> Any:
        api = self._api
        now = int(time.time())
        return api.NodeWatchResourcesResponse(
            devices=[
                api.DeviceHealth(
                    device=api.DeviceIdentifier(pool_name=d.pool_name, device_name=d.device_name),
                    health=(
                        api.HealthStatus.UNKNOWN
                        if d.healthy is None
                        else api.HealthStatus.HEALTHY
                        if d.healthy
                        else api.HealthStatus.UNHEALTHY
                    ),
                    last_updated_time=now,
                    health_check_timeout_seconds=self._check_timeout,
                    message=d.message,
                )
                for d in devices
            ]
        )

    async def node_watch_resources(self, request: Any, send: Send) -> None:
        # Returning ends the stream with status OK, which the kubelet takes
        # as a clean end (it reconnects every 5 s while we are registered).
        while not self._lifecycle.stopping:
            changed = self._backend.health_changed()
            await send(self._response(self._backend.device_health()))
            with self._lifecycle.interruptible(self._resend_interval):
                await changed.wait()
                # Coalesce bursts of changes (and bound a backend whose
                # signal never resets) to one list per MIN_HEALTH_INTERVAL.
                await anyio.sleep(MIN_HEALTH_INTERVAL)


def dra_services(
    backend: DraBackend,
    lifecycle: CallLifecycle,
    health_resend_interval: float,
    health_check_timeout: int,
) -> list[Servable]:
    """All services of the DRA socket: DRA v1 and v1beta1, health v1alpha1, v1beta1, v1."""
    services = [
        Servable(dra_v1.DraPluginBase, _DraService(dra_v1, backend), lifecycle),
        Servable(dra_v1beta1.DraPluginBase, _DraService(dra_v1beta1, backend), lifecycle),
    ]
    for api in (health_v1alpha1, health_v1beta1, health_v1):
        impl = _HealthService(api, backend, lifecycle, health_resend_interval, health_check_timeout)
        services.append(Servable(api.DraResourceHealthBase, impl, lifecycle))
    return services
