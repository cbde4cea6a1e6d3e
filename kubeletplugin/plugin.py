# SPDX-License-Identifier: Apache-2.0
"""The serving half of the plugin: gRPC for the kubelet, slice publishing,
rediscovery, health, metrics; one task group, cancelled on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import anyio

from controller.apiclient import ApiClient
from controller.http_server import serve_http
from controller.kubeconfig import load_cluster_config
from controller.metrics import Registry

from .driver import DriverPaths, NxDriver
from .grpc_service import DeviceHealth, PluginServers, SocketPaths
from .main import DEVICE_PATH, DRIVER_NAME, device_options, discover_node
from .publisher import SlicePublisher

log = logging.getLogger("kubeletplugin")


def device_health(publisher: SlicePublisher) -> list[DeviceHealth]:
    """Health of every published device, from the latest inventory."""
    inv = publisher.inventory
    problem = ""
    if not inv.device_node_present:
        problem = f"device node {DEVICE_PATH} is missing"
    elif inv.platform is None:
        problem = "NX-gzip capability is gone from sysfs"
    elif (
        inv.credits.total is not None
        and inv.credits.used is not None
        and inv.credits.used >= inv.credits.total
    ):
        problem = f"all {inv.credits.total} NX-gzip credits are in use"
    return [
        DeviceHealth(publisher.node_name, d.name, healthy=not problem, message=problem)
        for d in publisher.devices
    ]


async def run_plugin(args: argparse.Namespace) -> None:
    """Run until SIGTERM/SIGINT."""
    started = time.monotonic()
    inventory = discover_node(args)
    options = device_options(args)
    plugin_dir = Path(args.kubelet_plugins_directory_path) / DRIVER_NAME
    # --host-dev-root is where this container sees the host's /dev; the CDI spec is
    # read by the container runtime on the host, so it names the host path itself.
    paths = DriverPaths(
        plugin_dir=plugin_dir, cdi_root=Path(args.cdi_root), device_path=DEVICE_PATH
    )
    config = await load_cluster_config(args.kubeconfig)
    client = ApiClient(
        config,
        qps=args.kube_api_qps,
        burst=args.kube_api_burst,
        user_agent=f"power-dra-kubeletplugin/{args.node_name}",
    )
    publisher = SlicePublisher(
        client,
        driver=DRIVER_NAME,
        node_name=args.node_name,
        options=options,
        inventory=inventory,
    )
    driver = NxDriver(
        client,
        driver=DRIVER_NAME,
        node_name=args.node_name,
        paths=paths,
        device_names=lambda: {d.name for d in publisher.devices},
        health=lambda: device_health(publisher),
    )
    registry = Registry()
    _register_metrics(registry, driver, publisher)
    for problem in await anyio.to_thread.run_sync(driver.load_state):
        log.warning("state repaired at start: %s", problem)
    sockets = SocketPaths.for_driver(
        DRIVER_NAME,
        registry_dir=Path(args.kubelet_registrar_directory_path),
        plugin_data_dir=plugin_dir,
        pod_uid=args.pod_uid,
    )
    try:
        async with (
            PluginServers(driver, driver_name=DRIVER_NAME, sockets=sockets),
            anyio.create_task_group() as tg,
        ):
            log.info(
                "serving the kubelet",
                extra={
                    "registrationSocket": str(sockets.registration),
                    "draSocket": str(sockets.dra),
                    "startupSeconds": round(time.monotonic() - started, 3),
                },
            )
            tg.start_soon(_handle_signals, tg.cancel_scope, args, publisher, driver)
            await tg.start(
                serve_http,
                args.metrics_bind_address,
                registry,
                publisher.published.is_set,
                lambda: True,
            )
            tg.start_soon(publisher.run)
            tg.start_soon(_rediscover_forever, args, publisher, driver)
    finally:
        await client.close()
        log.info("stopped")


def _rediscover(args: argparse.Namespace, publisher: SlicePublisher, driver: NxDriver) -> None:
    if publisher.update_inventory(discover_node(args)):
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


def _register_metrics(registry: Registry, driver: NxDriver, publisher: SlicePublisher) -> None:
    latency = registry.histogram(
        "power_dra_plugin_request_seconds",
        "Latency of NodePrepareResources / NodeUnprepareResources",
        ["operation"],
    )
    driver.on_latency = lambda op, seconds: latency.observe(seconds, operation=op)
    prepared = registry.gauge("power_dra_plugin_prepared_claims", "Claims prepared on this node")
    calls = registry.gauge(
        "power_dra_plugin_claims_total", "Claims handled since start", ["operation"]
    )
    credits_total = registry.gauge(
        "power_dra_plugin_credits_total", "NX-gzip credits published", ["node"]
    )
    credits_allocated = registry.gauge(
        "power_dra_plugin_credits_allocated", "NX-gzip credits of prepared claims", ["node"]
    )

    def collect() -> None:
        node = publisher.node_name
        prepared.set(len(driver.claims))
        calls.set(driver.stats["prepared"], operation="prepare")
        calls.set(driver.stats["unprepared"], operation="unprepare")
        calls.set(driver.stats["prepare_errors"], operation="prepare_error")
        total = sum(sum(c.value for c in d.capacity.values()) for d in publisher.devices)
        credits_total.set(total, node=node)
        used = sum(dev.credits for claim in driver.claims.values() for dev in claim.devices)
        credits_allocated.set(used, node=node)

    registry.on_collect(collect)
