# SPDX-License-Identifier: Apache-2.0
"""Liveness that proves something: the plugin calls its own sockets, as the kubelet would.

Every `interval` seconds: GetInfo on the registration socket and an empty
NodePrepareResources on the DRA socket (answered without touching any claim).
`/healthz` is healthy while the last round succeeded and is recent; a wedged
event loop, a deleted socket file or a server that stopped answering turns it
unhealthy, and the kubelet's liveness probe restarts the container.
"""

from __future__ import annotations

import logging
import time

import anyio
from grpclib.client import Channel
from grpclib.const import Cardinality

from proto_gen.generated import pluginregistration as registration_api
from proto_gen.generated.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1

from .grpc_service import PLUGIN_TYPE, SocketPaths

log = logging.getLogger(__name__)

GET_INFO = "/pluginregistration.Registration/GetInfo"
PREPARE = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"


async def _unary(
    path: str, method: str, request: object, reply_type: type, seconds: float
) -> object:
    channel = Channel(path=path)
    try:
        async with channel.request(
            method, Cardinality.UNARY_UNARY, type(request), reply_type, timeout=seconds
        ) as stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
            return reply
    finally:
        channel.close()


async def probe_sockets(sockets: SocketPaths, seconds: float = 5.0) -> str:
    """Call both sockets once; "" when both answer as they should, else what is wrong."""
    try:
        info = await _unary(
            str(sockets.registration),
            GET_INFO,
            registration_api.InfoRequest(),
            registration_api.PluginInfo,
            seconds,
        )
        if not isinstance(info, registration_api.PluginInfo) or info.type != PLUGIN_TYPE:
            return f"registration socket {sockets.registration}: unexpected GetInfo answer"
    except Exception as exc:  # any failure is the finding
        return f"registration socket {sockets.registration}: GetInfo failed: {exc!r}"
    try:
        await _unary(
            str(sockets.dra),
            PREPARE,
            dra_v1.NodePrepareResourcesRequest(),
            dra_v1.NodePrepareResourcesResponse,
            seconds,
        )
    except Exception as exc:
        return f"DRA socket {sockets.dra}: NodePrepareResources failed: {exc!r}"
    return ""


class SelfProbe:
    """Probes the plugin's own sockets periodically; answers `/healthz`."""

    def __init__(self, sockets: SocketPaths, interval: float = 10.0, timeout: float = 5.0) -> None:
        self.sockets = sockets
        self.interval = interval
        self.timeout = timeout
        self._problem = ""
        self._last_ok = time.monotonic()  # the sockets were just started

    def problem(self) -> str:
        """Why the plugin is unhealthy ("" when healthy)."""
        if self._problem:
            return self._problem
        age = time.monotonic() - self._last_ok
        if age > 3 * (self.interval + self.timeout):
            return f"no successful self-probe for {age:.0f} s (probe loop stuck)"
        return ""

    def healthy(self) -> bool:
        return not self.problem()

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            problem = await probe_sockets(self.sockets, self.timeout)
            if problem != self._problem:
                if problem:
                    log.error("self-probe failed: %s", problem)
                else:
                    log.info("self-probe succeeds again")
            self._problem = problem
            if not problem:
                self._last_ok = time.monotonic()
            await anyio.sleep(self.interval)
