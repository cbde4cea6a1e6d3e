# SPDX-License-Identifier: Apache-2.0
"""The serving half of the plugin: gRPC for the kubelet, slice publishing,
rediscovery, health, metrics; one task group, cancelled on SIGTERM/SIGINT.

Start order: the registration socket serves first, with only asyncio, grpclib
and the registration messages imported (the DRA socket is bound then too);
the driver, its state and the DRA services load in a worker thread while
the kubelet registers us, then the HTTP stack and the API connection.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from controller.nx.names import DEVICE_PATH, DRIVER_NAME

from .grpc_service import DeviceHealth, PluginServers, SocketPaths

if TYPE_CHECKING:
    from controller.process.metrics import CollectorRegistry, Metric
    from kubeletplugin.slices import Device

    from .discovery import Inventory
    from .driver import NxDriver
    from .publisher import SlicePublisher

log = logging.getLogger("kubeletplugin")

T = TypeVar("T")


class NodeView:
    """What the node offers now: the publisher's view once it runs, discovery's before."""

    def __init__(self, node_name: str, inventory: Inventory, args: argparse.Namespace) -> None:
        from .node_discovery import device_options  # loaded after the registration socket

        self.node_name = node_name
        self._inventory = inventory
        self._options = device_options(args)
        self.publisher: SlicePublisher | None = None
        # Every device offered during this run: one that disappears (device node
        # gone) must be reported unhealthy, not silently dropped from the health list.
        self.known: dict[str, None] = {}

    @property
    def inventory(self) -> Inventory:
        return self.publisher.inventory if self.publisher else self._inventory

    def devices(self) -> list[Device]:
        if self.publisher is not None:
            return self.publisher.devices
        from .devices import build_devices

        return build_devices(self._inventory, self._options)


def inventory_problem(inv: Inventory) -> str:
    """Why the node's NX-gzip is unusable now ("" when it is fine)."""
    if not inv.device_node_present:
        return f"device node {DEVICE_PATH} is missing"
    if inv.platform is None:
        return "NX-gzip capability is gone from sysfs"
    return ""


def inventory_note(inv: Inventory) -> str:
    """A remark on a healthy device: every credit in use is load, not a fault."""
    total, used = inv.credits.total, inv.credits.used
    if total is not None and used is not None and used >= total:
        return f"all {total} NX-gzip credits are in use (busy, not faulty)"
    return ""


def device_health(view: NodeView) -> list[DeviceHealth]:
    """Health of every device offered in this run, from the latest inventory."""
    problem = inventory_problem(view.inventory)
    message = problem or inventory_note(view.inventory)
    current = [d.name for d in view.devices()]
    view.known.update(dict.fromkeys(current))
    result = [
        DeviceHealth(view.node_name, name, healthy=not problem, message=message) for name in current
    ]
    gone = problem or "device is no longer offered on this node"
    result += [
        DeviceHealth(view.node_name, name, healthy=False, message=gone)
        for name in view.known
        if name not in current
    ]
    return result


async def run_plugin(args: argparse.Namespace) -> None:
    """Run until SIGTERM/SIGINT.

    The kubelet's registration socket comes up first (nothing but asyncio,
    grpclib and the registration messages imported); the driver and its state
    load while the kubelet registers us, then the DRA socket answers; the
    HTTP stack and the API connection follow.
    """
    started = time.monotonic()
    plugin_dir = Path(args.kubelet_plugins_directory_path) / DRIVER_NAME
    _make_socket_dirs(Path(args.kubelet_registrar_directory_path), plugin_dir)
    sockets = SocketPaths.for_driver(
        DRIVER_NAME,
        registry_dir=Path(args.kubelet_registrar_directory_path),
        plugin_data_dir=plugin_dir,
        pod_uid=args.pod_uid,
    )
    async with PluginServers(None, driver_name=DRIVER_NAME, sockets=sockets) as servers:
        log.info(
            "registration socket serving",
            extra={
                "registrationSocket": str(sockets.registration),
                "startupSeconds": round(time.monotonic() - started, 3),
            },
        )
        view, driver = await _load_driver(args, plugin_dir)
        # Prepare and unprepare are served only now, after the start-up repair.
        await servers.serve_dra(driver)
        # Start-up objects (modules, generated protobuf classes) live for the whole
        # run: moving them out of the collector's view keeps full collections short,
        # which is what shows up in prepare tail latency.
        gc.freeze()
        log.info(
            "serving the kubelet",
            extra={
                "registrationSocket": str(sockets.registration),
                "draSocket": str(sockets.dra),
                "startupSeconds": round(time.monotonic() - started, 3),
            },
        )
        # The kubelet asks GetInfo (1 s timeout) as soon as the socket appears: let
        # it be answered before the imports below compete for the interpreter.
        with anyio.move_on_after(GET_INFO_HEAD_START):
            await servers.info_answered.wait()
        await _serve_cluster_side(args, view, driver, sockets)
    # The sockets are gone: leave the state in the format the previous release reads.
    await anyio.to_thread.run_sync(driver.close_state)
    log.info("stopped")


def _make_socket_dirs(registry_dir: Path, plugin_dir: Path) -> None:
    # The kubelet creates its registry dir when it starts; do not depend on the order.
    # On the event loop: nothing waits for it yet, and anyio's worker thread would
    # import anyio's backend first.
    registry_dir.mkdir(parents=True, exist_ok=True)
    plugin_dir.mkdir(parents=True, exist_ok=True)  # the DRA socket's directory


# Imported in a worker thread once the registration socket serves: anyio's
# event-loop backend first (~20 ms; anyio is used from here on), then the
# driver, its state and the DRA services.
DRIVER_SIDE_MODULES = (
    "anyio._backends._asyncio",
    "kubeletplugin.node_discovery",
    "kubeletplugin.devices",
    "kubeletplugin.driver",
    "kubeletplugin.dra_service",
)


def _discover_in_thread(args: argparse.Namespace) -> Inventory:
    _import_cluster_side(DRIVER_SIDE_MODULES)
    from .node_discovery import discover_node

    return discover_node(args)


async def _load_driver(args: argparse.Namespace, plugin_dir: Path) -> tuple[NodeView, NxDriver]:
    """Import the driver side and discover the node (in a worker thread, the event
    loop answering the kubelet meanwhile), then repair the state."""
    inventory = await _in_import_thread(_discover_in_thread, args)
    from .driver import DriverPaths, NxDriver

    view = NodeView(args.node_name, inventory, args)
    # --host-dev-root is where this container sees the host's /dev; the CDI spec is
    # read by the container runtime on the host, so it names the host path itself.
    paths = DriverPaths(
        plugin_dir=plugin_dir, cdi_root=Path(args.cdi_root), device_path=DEVICE_PATH
    )
    driver = NxDriver(
        None,
        driver=DRIVER_NAME,
        node_name=args.node_name,
        paths=paths,
        device_names=lambda: {d.name for d in view.devices()},
        health=lambda: device_health(view),
        claim_read=args.claim_read,
    )
    # Each repair is logged once, where it is made (checkpoint, driver).
    repairs = await anyio.to_thread.run_sync(driver.load_state)
    if repairs:
        log.info("state repaired at start", extra={"repairs": len(repairs)})
    return view, driver


CLUSTER_SIDE_MODULES = (
    "controller.kube.client",
    "controller.process.http_server",
    "controller.kube.kubeconfig",
    "kubeletplugin.publisher",
    "kubeletplugin.self_probe",
    # The codec yarl encodes the API server's host name with, at the first request.
    "encodings.idna",
)


# How long the cluster side waits for the kubelet's first GetInfo before starting.
GET_INFO_HEAD_START = 0.2
# While the worker thread imports, the GIL is handed over this often (default 5 ms):
# the event loop answering the kubelet waits less for it.
IMPORT_SWITCH_INTERVAL = 0.0005


def _import_cluster_side(modules: tuple[str, ...]) -> None:
    """Import `modules` (a worker thread's job: the driver side's ~0.1 s and the
    cluster side's ~0.4 s of imports on the event loop would stall the kubelet's GetInfo)."""
    default = sys.getswitchinterval()
    sys.setswitchinterval(IMPORT_SWITCH_INTERVAL)
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        sys.setswitchinterval(default)


async def _in_import_thread(func: Callable[[Any], T], arg: Any) -> T:
    """`func(arg)` in a worker thread that imports, the event loop answering meanwhile.

    The import thread holds the GIL for up to the switch interval (5 ms) each
    time the event loop wants it: the kubelet's GetInfo, which needs the loop a
    few dozen times, would wait ~0.2 s. A short interval while importing.
    (asyncio's thread, not anyio's: its backend may not be imported yet.)
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        return await asyncio.to_thread(func, arg)
    finally:
        sys.setswitchinterval(interval)


def _import_cluster_side_for(kubeconfig: str | None) -> None:
    """The cluster side's modules, and the YAML parser when the kubeconfig file given
    is YAML (imported here rather than on the event loop that reads the file)."""
    _import_cluster_side(CLUSTER_SIDE_MODULES)
    from controller.kube.kubeconfig import needs_yaml_parser

    if needs_yaml_parser(kubeconfig):
        _import_cluster_side(("yaml",))


async def _serve_cluster_side(
    args: argparse.Namespace, view: NodeView, driver: NxDriver, sockets: SocketPaths
) -> None:
    await _in_import_thread(_import_cluster_side_for, args.kubeconfig)
    # Already imported: these are dictionary lookups now.
    from controller.kube.client import ApiClient
    from controller.kube.kubeconfig import load_cluster_config
    from controller.process.http_server import serve_http
    from controller.process.metrics import new_registry

    from .node_discovery import device_options
    from .publisher import SlicePublisher
    from .self_probe import SelfProbe

    config = await load_cluster_config(args.kubeconfig)
    client = ApiClient(
        config,
        qps=args.kube_api_qps,
        burst=args.kube_api_burst,
        user_agent=f"power-dra-kubeletplugin/{args.node_name}",
        watch_timeout=args.watch_timeout,
    )
    publisher = SlicePublisher(
        client,
        driver=DRIVER_NAME,
        node_name=args.node_name,
        options=device_options(args),
        inventory=view.inventory,
        held_credits=driver.credits_outside_our_slice,
        on_mode_change=lambda _mode: forget_devices_of_old_mode(view, driver),
    )
    view.publisher = publisher
    driver.on_outside_credits_change = publisher.held_credits_changed
    driver.set_client(client, devices_settled=publisher.published)
    registry = new_registry()
    _register_metrics(registry, driver, publisher)
    probe = SelfProbe(sockets, interval=args.health_probe_interval)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_handle_signals, tg.cancel_scope, args, publisher, driver)
            await tg.start(
                functools.partial(
                    serve_http,
                    args.metrics_bind_address,
                    registry,
                    publisher.published.is_set,
                    probe.healthy,
                    not_ready_reason=lambda: (
                        f"ResourceSlice not published: waiting for {publisher.waiting_for}"
                    ),
                    unhealthy_reason=probe.problem,
                )
            )
            tg.start_soon(probe.run)
            tg.start_soon(publisher.run)
            tg.start_soon(_rediscover_forever, args, publisher, driver)
    finally:
        await client.close()


def forget_devices_of_old_mode(view: NodeView, driver: NxDriver) -> None:
    """After the publisher changed device mode: forget the devices offered so far.

    The shared `nx-gzip` device of the mode we fell back from was never really
    offered: reporting it "gone" (unhealthy) forever would be a phantom."""
    view.known.clear()
    driver.notify_health_changed()


def _rediscover(args: argparse.Namespace, publisher: SlicePublisher, driver: NxDriver) -> None:
    from .node_discovery import discover_node

    if publisher.update_inventory(discover_node(args, publisher.inventory.warnings)):
        driver.notify_health_changed()


async def _rediscover_forever(
    args: argparse.Namespace, publisher: SlicePublisher, driver: NxDriver
) -> None:
    while True:
        await anyio.sleep(args.rediscovery_interval)
        _rediscover(args, publisher, driver)


async def _handle_signals(
    scope: anyio.CancelScope,
    args: argparse.Namespace,
    publisher: SlicePublisher,
    driver: NxDriver,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: rediscovering")
                _rediscover(args, publisher, driver)
                continue
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            scope.cancel()
            return


def _register_metrics(
    registry: CollectorRegistry, driver: NxDriver, publisher: SlicePublisher
) -> None:
    from controller.process.metrics import DEFAULT_BUCKETS, GaugeMetricFamily, Histogram, ScrapeTime

    latency = Histogram(
        "power_dra_plugin_request_seconds",
        "Latency of NodePrepareResources / NodeUnprepareResources",
        ["operation"],
        registry=registry,
        buckets=DEFAULT_BUCKETS,
    )
    # One child per operation, looked up once: `labels()` takes a lock and builds
    # a key on every call, a few per cent of a call's CPU.
    by_operation = {op: latency.labels(operation=op) for op in ("prepare", "unprepare")}
    driver.on_latency = lambda op, seconds: by_operation[op].observe(seconds)

    def node_state() -> list[Metric]:
        node = publisher.node_name
        prepared = GaugeMetricFamily(
            "power_dra_plugin_prepared_claims", "Claims prepared on this node", len(driver.claims)
        )
        stats = driver.stats
        calls = _by_label(
            "power_dra_plugin_claims_total",
            "Claims handled since start",
            "operation",
            {
                "prepare": stats["prepared"],
                "unprepare": stats["unprepared"],
                "prepare_error": stats["prepare_errors"],
            },
        )
        reads = _by_label(
            "power_dra_plugin_claim_reads_total",
            "Claims prepare read, by where the answer came from (cache: the API server's "
            "watch cache; etcd: a quorum read)",
            "source",
            {"cache": stats["claim_reads_cache"], "etcd": stats["claim_reads_etcd"]},
        )
        state_calls = _by_label(
            "power_dra_plugin_state_calls_total",
            "Prepare and unprepare calls by the thread that wrote the state (loop: the "
            "event loop, quick writes; state: the state thread)",
            "thread",
            {"loop": stats["state_calls_loop"], "state": stats["state_calls_thread"]},
        )
        total = sum(sum(c.value for c in d.capacity.values()) for d in publisher.devices)
        credits_total = GaugeMetricFamily(
            "power_dra_plugin_credits_total", "NX-gzip credits published", labels=["node"]
        )
        credits_total.add_metric([node], total)
        used = sum(dev.credits for claim in driver.claims.values() for dev in claim.devices)
        credits_allocated = GaugeMetricFamily(
            "power_dra_plugin_credits_allocated",
            "NX-gzip credits of prepared claims",
            labels=["node"],
        )
        credits_allocated.add_metric([node], used)
        return [prepared, calls, reads, state_calls, credits_total, credits_allocated]

    registry.register(ScrapeTime(node_state))


def _by_label(name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
    """A gauge family with one sample per value of `label`."""
    from controller.process.metrics import GaugeMetricFamily

    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family
