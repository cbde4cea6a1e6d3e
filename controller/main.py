# SPDX-License-Identifier: Apache-2.0
"""`power-dra-controller`: the cluster-wide half of the driver.

Runs, while it holds the leader Lease (or always, without
`--leader-elect`): the DeviceClass controller, the slice GC, the claim
status controller and, in operator mode, the plugin DaemonSet controller.
Serves /healthz, /readyz and /metrics. Every flag has an environment
fallback (flag > environment > default); `--help` lists them.

Exit codes: 0 after SIGTERM/SIGINT, 1 for a configuration or start-up
error (one log line says what to fix), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc

from controller.claim_status import ClaimStatusController
from controller.config import ConfigFileError
from controller.deviceclasses import DesiredClass, DeviceClassController, load_device_classes
from controller.kube.backoff import BackoffPolicy, retry
from controller.kube.client import ApiClient
from controller.kube.errors import ApiError, NotFound, Unauthorized
from controller.kube.informer import DEFAULT_STALL_AFTER, Informer
from controller.kube.kubeconfig import ClusterConfig, ConfigError, load_cluster_config
from controller.kube.resources import CLUSTERROLES, DEPLOYMENTS, Resource
from controller.kube.workqueue import WorkQueue
from controller.leader import LeaderElector, make_identity
from controller.operator import (
    PluginDaemonSetConfig,
    PluginDaemonSetController,
    load_plugin_daemonset_config,
)
from controller.process.flags import add_bool_flag, add_common_flags, add_flag, parse_duration
from controller.process.http_server import parse_bind_address, serve_http
from controller.process.logs import setup_logging
from controller.process.metrics import (
    Counter,
    Gauge,
    InformerState,
    LoopState,
    ReconcileMetrics,
    new_registry,
)
from controller.slice_gc import DEFAULT_ORPHAN_GRACE, SliceGC

log = logging.getLogger("controller")

PROG = "power-dra-controller"
METRICS_PREFIX = "power_dra_controller"
# Waiting for the API server at start: 0.5 s doubling up to 10 s.
API_WAIT = BackoffPolicy(initial=0.5, cap=10.0)


def build_parser() -> argparse.ArgumentParser:
    """The command line, with environment fallbacks."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Kubernetes DRA controller for the IBM Power NX-gzip accelerator "
            "(driver nx.device.power.ibm.com): keeps the DeviceClasses in place, deletes "
            "ResourceSlices of vanished nodes, checks the NxConfig of allocated claims."
        ),
    )
    # Claim status writes follow the cluster's allocation rate (100/s and more in
    # busy clusters): 200/s sustained, bursts of 500; the server's priority and
    # fairness still applies on top.
    add_common_flags(parser, qps=200.0, burst=500)
    add_flag(
        parser,
        "--namespace",
        "POD_NAMESPACE",
        None,
        "namespace the controller runs in (lease, plugin DaemonSet); "
        "default: the kubeconfig's or the service account's namespace",
    )
    add_flag(
        parser,
        "--device-classes-config",
        "DEVICE_CLASSES_CONFIG",
        None,
        "YAML file listing the DeviceClasses to keep in place; "
        "default: one class nx.device.power.ibm.com",
    )
    add_flag(
        parser,
        "--orphan-grace",
        "ORPHAN_GRACE",
        f"{DEFAULT_ORPHAN_GRACE:g}s",
        "how long a ResourceSlice's node must be gone before the slice is deleted",
        type=parse_duration,
    )
    add_flag(
        parser,
        "--claim-workers",
        "CLAIM_WORKERS",
        16,
        "claims checked concurrently",
        type=int,
    )
    add_flag(
        parser,
        "--watch-stall-timeout",
        "WATCH_STALL_TIMEOUT",
        f"{DEFAULT_STALL_AFTER:g}s",
        "how long a resource's list/watch may keep failing before /readyz fails",
        type=parse_duration,
    )
    add_bool_flag(
        parser, "--leader-elect", "LEADER_ELECT", False, "run the controllers only while leader"
    )
    add_flag(
        parser,
        "--leader-election-namespace",
        "LEADER_ELECTION_NAMESPACE",
        None,
        "namespace of the leader Lease; default: --namespace",
    )
    add_flag(
        parser,
        "--leader-election-id",
        "LEADER_ELECTION_ID",
        "power-dra-controller",
        "name of the leader Lease",
    )
    add_flag(
        parser,
        "--lease-duration",
        "LEASE_DURATION",
        "15s",
        "how long a leader's lease lasts without renewal",
        type=parse_duration,
    )
    add_flag(
        parser,
        "--renew-deadline",
        "RENEW_DEADLINE",
        "10s",
        "how long the leader keeps trying to renew before it stops leading",
        type=parse_duration,
    )
    add_flag(
        parser,
        "--retry-period",
        "RETRY_PERIOD",
        "2s",
        "interval between lease acquire and renew attempts",
        type=parse_duration,
    )
    add_bool_flag(
        parser,
        "--manage-plugin-daemonset",
        "MANAGE_PLUGIN_DAEMONSET",
        False,
        "operator mode: also apply the kubelet plugin DaemonSet in --namespace",
    )
    add_flag(
        parser,
        "--plugin-daemonset-config",
        "PLUGIN_DAEMONSET_CONFIG",
        None,
        "YAML file describing the plugin DaemonSet (operator mode; needs at least image)",
    )
    add_flag(
        parser,
        "--owner-deployment",
        "OWNER_DEPLOYMENT",
        None,
        "operator mode: the Deployment in --namespace (the controller's own) that owns the "
        "plugin DaemonSet, so that uninstalling the operator removes it",
    )
    add_flag(
        parser,
        "--owner-cluster-role",
        "OWNER_CLUSTER_ROLE",
        None,
        "operator mode: a ClusterRole the installer deletes on uninstall that owns the "
        "DeviceClasses, so that they go with it",
    )
    add_flag(
        parser,
        "--metrics-bind-address",
        "METRICS_BIND_ADDRESS",
        ":8080",
        "address of /healthz, /readyz and /metrics (host:port; 0 disables)",
    )
    return parser


@dataclass
class Settings:
    """Everything the controllers need, checked before anything connects."""

    args: argparse.Namespace
    classes: tuple[DesiredClass, ...]
    plugin_daemonset: PluginDaemonSetConfig | None
    identity: str = field(default_factory=make_identity)


def load_settings(args: argparse.Namespace) -> Settings:
    """Read and validate the configuration files named by the flags.

    Raises:
        ConfigFileError: a file is unreadable or invalid (the message names it).
    """
    classes = load_device_classes(args.device_classes_config)
    plugin = (
        load_plugin_daemonset_config(args.plugin_daemonset_config)
        if args.manage_plugin_daemonset
        else None
    )
    return Settings(args=args, classes=classes, plugin_daemonset=plugin)


# Longer than any reconcile can take (each API call times out after 30 s):
# one running this long is stuck.
MAX_RECONCILE_SECONDS = 600.0


class _Controller(Protocol):
    name: str
    queue: WorkQueue

    @property
    def informers(self) -> Sequence[Informer]: ...

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...


@dataclass
class RunState:
    """What /readyz and /metrics read."""

    connected: bool = False
    leading: bool = False
    synced: bool = False
    leader_elect: bool = False
    controllers: list[_Controller] = field(default_factory=list)

    def ready(self) -> bool:
        """Ready when connected; a leader also needs its caches synced and current."""
        return not self.not_ready_reason()

    def not_ready_reason(self) -> str:
        """Why /readyz fails ("" when ready): what a human needs to look at."""
        if not self.connected:
            return "not connected to the API server yet"
        if self.leader_elect and not self.leading:
            return ""  # a standby is ready to take over
        if not self.synced:
            return "caches not synced yet"
        stalled = [
            f"{c.name}: {i.problem()}"
            for c in list(self.controllers)
            for i in c.informers
            if not i.healthy()
        ]
        return "; ".join(stalled)

    def liveness_problems(self) -> list[str]:
        """What looks stuck: an informer loop that stopped moving, or a reconcile
        running far longer than its API calls can take. (A stuck event loop
        does not answer /healthz at all.)"""
        problems: list[str] = []
        for controller in self.controllers:
            for part in vars(controller).values():
                if isinstance(part, Informer) and (problem := part.liveness_problem()):
                    problems.append(f"{controller.name}: {problem}")
                elif isinstance(part, WorkQueue) and (running := part.longest_running()):
                    key, seconds = running
                    if seconds > MAX_RECONCILE_SECONDS:
                        problems.append(
                            f"{controller.name}: reconcile of {key} running for {seconds:.0f} s"
                        )
        return problems

    def healthy(self) -> bool:
        """Every controller loop moves (see `liveness_problems`)."""
        return not self.liveness_problems()

    def unhealthy_reason(self) -> str:
        return "; ".join(self.liveness_problems())


def _on_result(
    metrics: ReconcileMetrics, name: str
) -> Callable[[str, BaseException | None, float], None]:
    observe = metrics.for_controller(name)

    def on_result(key: str, error: BaseException | None, seconds: float) -> None:
        observe(key, error, seconds)
        log.debug(
            "reconciled",
            extra={"controller": name, "key": key, "seconds": round(seconds, 4), "ok": not error},
        )

    return on_result


def _loop_states(state: RunState) -> list[LoopState]:
    """What the running controllers report at a scrape (none while not leading)."""
    return [
        LoopState(
            controller.name,
            controller.queue.depth,
            tuple(
                InformerState(
                    informer.resource.plural,
                    quarantined=len(informer.quarantined),
                    quarantined_total=informer.quarantined_total,
                    healthy=informer.healthy(),
                )
                for informer in controller.informers
            ),
        )
        for controller in list(state.controllers)
    ]


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference to `obj` (no blockOwnerDeletion: that needs rights on the owner)."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": str(obj.get("apiVersion")),
        "kind": str(obj.get("kind")),
        "name": str(meta.get("name")),
        "uid": str(meta.get("uid")),
    }


async def _owner(
    client: ApiClient, res: Resource, name: str | None, namespace: str | None
) -> list[dict[str, Any]]:
    if not name:
        return []
    try:
        obj = await client.get(res, name, namespace)
    except NotFound as exc:
        raise LookupError(
            f"owner {res.kind} {name}{f' in namespace {namespace}' if namespace else ''} "
            "does not exist: check --owner-deployment / --owner-cluster-role"
        ) from exc
    return [owner_reference({**obj, "apiVersion": res.api_version, "kind": res.kind})]


async def run_controllers(
    client: ApiClient,
    settings: Settings,
    metrics: ReconcileMetrics,
    state: RunState,
    on_status_dropped: Callable[[], None] | None = None,
) -> None:
    """Run every enabled controller until cancelled."""
    args = settings.args
    version = await client.resource_api_version()
    class_owner = await _owner(client, CLUSTERROLES, args.owner_cluster_role, None)
    controllers: list[_Controller] = [
        DeviceClassController(
            client,
            version,
            settings.classes,
            owner_references=class_owner,
            on_result=_on_result(metrics, DeviceClassController.name),
        ),
        SliceGC(
            client,
            version,
            grace=args.orphan_grace,
            on_result=_on_result(metrics, SliceGC.name),
        ),
        ClaimStatusController(
            client,
            version,
            reporting_instance=settings.identity,
            workers=args.claim_workers,
            on_result=_on_result(metrics, ClaimStatusController.name),
            on_status_dropped=on_status_dropped,
        ),
    ]
    if settings.plugin_daemonset is not None:
        controllers.append(
            PluginDaemonSetController(
                client,
                args.namespace,
                settings.plugin_daemonset,
                owner_references=await _owner(
                    client, DEPLOYMENTS, args.owner_deployment, args.namespace
                ),
                on_result=_on_result(metrics, PluginDaemonSetController.name),
            )
        )
    for controller in controllers:
        for informer in controller.informers:
            informer.stall_after = args.watch_stall_timeout
    state.controllers = controllers
    try:
        async with anyio.create_task_group() as tg:
            for controller in controllers:
                await tg.start(_run_controller, controller)
            state.synced = True
            log.info(
                "controllers running",
                extra={
                    "controllers": [c.name for c in controllers],
                    "resourceApiVersion": version,
                },
            )
    finally:
        state.synced = False
        state.controllers = []


async def _run_controller(
    controller: _Controller, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    await controller.run(task_status=task_status)


async def wait_for_api(client: ApiClient) -> str:
    """Wait until the API answers; return the resource.k8s.io version to use.

    Raises:
        ApiError: the credentials are rejected (no point in retrying).
        LookupError: the server serves no resource.k8s.io version we know.
    """

    async def ask() -> str:
        await client.check_access()
        return await client.resource_api_version()

    def not_yet(exc: BaseException, delay: float) -> None:
        log.warning(
            "API server not reachable yet, retrying",
            extra={"server": client.config.server, "error": str(exc), "retryIn": delay},
        )

    return await retry(ask, API_WAIT, retryable=_answers_later, on_retry=not_yet)


def _answers_later(exc: BaseException) -> bool:
    # Anything but rejected credentials may be a server still starting (or RBAC
    # not bound yet).
    return isinstance(exc, ApiError) and not isinstance(exc, Unauthorized) and exc.status != 401


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            scope.cancel()
            return


async def run(settings: Settings, cluster: ClusterConfig) -> None:
    """Serve health and metrics, connect, and run the controllers (as leader when asked)."""
    args = settings.args
    registry = new_registry()
    state = RunState(leader_elect=args.leader_elect)
    metrics = ReconcileMetrics(registry, METRICS_PREFIX, lambda: _loop_states(state))
    leader_gauge = Gauge(
        f"{METRICS_PREFIX}_leader",
        "1 while this process leads (runs the reconcilers), else 0.",
        registry=registry,
    )
    status_dropped = Counter(
        f"{METRICS_PREFIX}_claim_status_dropped_total",
        "Writes of a claim's status.devices that the API server answered without them "
        "(a server that does not keep claim device status; the controller then stops writing).",
        registry=registry,
    )

    def leadership(leading: bool) -> None:
        state.leading = leading
        leader_gauge.set(1 if leading else 0)

    async with (
        ApiClient(
            cluster,
            qps=args.kube_api_qps,
            burst=args.kube_api_burst,
            watch_timeout=args.watch_timeout,
        ) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_stop_on_signal, tg.cancel_scope)
        await tg.start(
            functools.partial(
                serve_http,
                args.metrics_bind_address,
                registry,
                state.ready,
                state.healthy,
                not_ready_reason=state.not_ready_reason,
                unhealthy_reason=state.unhealthy_reason,
            )
        )
        version = await wait_for_api(client)
        state.connected = True
        log.info(
            "connected",
            extra={
                "server": cluster.server,
                "resourceApiVersion": version,
                "identity": settings.identity,
            },
        )

        async def lead() -> None:
            await run_controllers(client, settings, metrics, state, status_dropped.inc)

        if args.leader_elect:
            elector = LeaderElector(
                client,
                namespace=args.leader_election_namespace or args.namespace,
                name=args.leader_election_id,
                identity=settings.identity,
                lease_duration=args.lease_duration,
                renew_deadline=args.renew_deadline,
                retry_period=args.retry_period,
                on_change=leadership,
            )
            await elector.run(lead)
        else:
            leadership(True)
            await lead()
        tg.cancel_scope.cancel()


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        parse_bind_address(args.metrics_bind_address)
    except ValueError as exc:
        parser.error(f"--metrics-bind-address: {exc}")
    if args.leader_elect and not (
        args.lease_duration > args.renew_deadline > args.retry_period > 0
    ):
        parser.error(
            "leader election needs --lease-duration > --renew-deadline > --retry-period > 0"
        )
    if args.orphan_grace < 0:
        parser.error("--orphan-grace must not be negative")
    if args.watch_stall_timeout <= 0:
        parser.error("--watch-stall-timeout must be positive")
    if args.claim_workers < 1:
        parser.error("--claim-workers must be at least 1")


# Failures that are explained by their message alone: logged as one line, no traceback.
_EXPECTED = (ApiError, LookupError, OSError, ValueError, ConfigError)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `power-dra-controller`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    setup_logging(args.verbosity)
    try:
        settings = load_settings(args)
        cluster = anyio.run(load_cluster_config, args.kubeconfig)
    except (ConfigFileError, ConfigError) as exc:
        log.error(str(exc))
        return 1
    if not args.namespace:
        args.namespace = cluster.namespace
    try:
        anyio.run(run, settings, cluster)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        leaves = _leaves(exc)
        message = "; ".join(str(e) or type(e).__name__ for e in leaves)
        if all(isinstance(e, _EXPECTED) for e in leaves):
            log.error(message)
        else:
            log.error(message, exc_info=exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
