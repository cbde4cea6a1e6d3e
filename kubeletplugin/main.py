# SPDX-License-Identifier: Apache-2.0
"""`power-dra-kubeletplugin`: the node plugin.

    power-dra-kubeletplugin [run] --node-name N ...   # serve the kubelet, publish slices
    power-dra-kubeletplugin inspect --sysfs-root R    # inventory, slices, node state as JSON

Start order is chosen for pod-start latency: the gRPC sockets answer before
the API connection is up (prepare waits for it), discovery is a few file reads.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controller.nx.names import DRIVER_NAME, SLICE_API_VERSIONS
from controller.process.flags import add_common_flags, add_flag, parse_duration
from controller.process.logs import setup_logging

log = logging.getLogger("kubeletplugin")


def _add_discovery_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser, "--sysfs-root", "SYSFS_ROOT", "/sys", "sysfs to discover NX-gzip in", type=Path
    )
    add_flag(
        parser,
        "--host-dev-root",
        "HOST_DEV_ROOT",
        "/",
        "root under which the host's /dev/crypto/nx-gzip is checked",
        type=Path,
    )
    add_flag(
        parser,
        "--device-mode",
        "DEVICE_MODE",
        "shared",
        "shared: one device many pods share by credits (falls back to slots when the API "
        "server lacks consumable capacity); slots: one exclusive device per credit",
        choices=["shared", "slots"],
    )
    add_flag(
        parser,
        "--reserved-credits",
        "RESERVED_CREDITS",
        1,
        "credits kept back from scheduling (libnxz keeps one spare)",
        type=int,
    )
    add_flag(parser, "--max-slots", "MAX_SLOTS", 16, "most devices in slot mode", type=int)
    add_flag(
        parser,
        "--fallback-credits",
        "FALLBACK_CREDITS",
        20,
        "credits assumed where sysfs has no credit files (PowerNV)",
        type=int,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line (flags fall back to environment variables)."""
    parser = argparse.ArgumentParser(
        prog="power-dra-kubeletplugin",
        description="Kubernetes DRA kubelet plugin for the IBM Power NX-gzip accelerator "
        f"(driver {DRIVER_NAME}).",
    )
    # An explicit prog: argparse would otherwise build a help formatter (and import
    # shutil for the terminal width) on every start just to name the subcommands.
    sub = parser.add_subparsers(dest="command", prog="power-dra-kubeletplugin")
    run = sub.add_parser("run", help="serve the kubelet and publish the node's slices (default)")
    inspect = sub.add_parser("inspect", help="print what the plugin sees and would publish")
    for p in (parser, run):
        _add_run_flags(p)
    _add_discovery_flags(inspect)
    add_flag(inspect, "--node-name", "NODE_NAME", "this-node", "node (and pool) name")
    add_flag(
        inspect,
        "--api-version",
        None,
        "v1",
        "resource.k8s.io version of the printed slices",
        choices=list(SLICE_API_VERSIONS),
    )
    _add_state_flags(inspect)
    return parser


def _add_state_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--kubelet-plugins-directory-path",
        "KUBELET_PLUGINS_DIRECTORY_PATH",
        "/var/lib/kubelet/plugins",
        "the kubelet's plugin data directory (our socket and checkpoint go in <it>/<driver>)",
        type=Path,
    )
    add_flag(parser, "--cdi-root", "CDI_ROOT", "/var/run/cdi", "where CDI specs go", type=Path)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--node-name",
        "NODE_NAME",
        None,
        "this node's name (downward API spec.nodeName); required",
    )
    add_flag(
        parser,
        "--pod-uid",
        "POD_UID",
        "",
        "this pod's UID (downward API metadata.uid); socket names carry it so the old and "
        "new pod of a rolling update serve side by side",
    )
    # A node's pod starts come in bursts the kubelet already paces: let 1000 claim
    # reads through at once, and cap a runaway loop at 100 requests/s.
    add_common_flags(parser, qps=100.0, burst=1000)
    _add_discovery_flags(parser)
    add_flag(
        parser,
        "--kubelet-registrar-directory-path",
        "KUBELET_REGISTRAR_DIRECTORY_PATH",
        "/var/lib/kubelet/plugins_registry",
        "the kubelet's plugin registration directory",
        type=Path,
    )
    _add_state_flags(parser)
    add_flag(
        parser,
        "--rediscovery-interval",
        "REDISCOVERY_INTERVAL",
        "30s",
        "how often sysfs is read again (also on SIGHUP)",
        type=parse_duration,
    )
    add_flag(
        parser,
        "--claim-read",
        "CLAIM_READ",
        "cache",
        "where prepare reads a claim: 'cache' (the API server's watch cache, no etcd "
        "read; a copy not yet allocated on this node is read again from etcd) or "
        "'quorum' (always from etcd)",
        choices=["cache", "quorum"],
    )
    add_flag(
        parser,
        "--metrics-bind-address",
        "METRICS_BIND_ADDRESS",
        ":8081",
        "address of /healthz, /readyz and /metrics; 0 disables",
    )
    add_flag(
        parser,
        "--health-probe-interval",
        "HEALTH_PROBE_INTERVAL",
        "10s",
        "how often the plugin calls its own sockets for /healthz",
        type=parse_duration,
    )


def inspect(args: argparse.Namespace) -> int:
    """Print the inventory, the slices the plugin would publish and what its state
    file and CDI directory hold (claims, and what is left of IBM's driver), as JSON."""
    # Imported here: `run` serves the kubelet's registration socket before loading them.
    import orjson

    from kubeletplugin.slices import build_pool_slices

    from .checkpoint import CHECKPOINT_FILE_NAME, describe_state
    from .devices import build_devices
    from .node_discovery import device_options, discover_node

    inventory = discover_node(args)
    devices = build_devices(inventory, device_options(args))
    slices = build_pool_slices(
        DRIVER_NAME, args.node_name, None, devices, generation=1, api_version=args.api_version
    )
    state = describe_state(
        Path(args.kubelet_plugins_directory_path) / DRIVER_NAME / CHECKPOINT_FILE_NAME,
        Path(args.cdi_root),
    )
    doc: dict[str, Any] = {
        "inventory": asdict(inventory),
        "resourceSlices": slices,
        "nodeState": state,
    }
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    setup_logging(getattr(args, "verbosity", 0))
    try:
        if command == "inspect":
            sys.exit(inspect(args))
        if not args.node_name:
            raise SystemExit("power-dra-kubeletplugin: --node-name (or NODE_NAME) is required")
        from .plugin import run_plugin  # the serving half: imported only to serve

        asyncio.run(run_plugin(args))
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        sys.exit(2)
    except Exception as exc:
        # Configuration and API errors already say what to fix; no traceback for them.
        from controller.kube.errors import ApiError
        from controller.kube.kubeconfig import ConfigError

        if not isinstance(exc, ConfigError | ApiError):
            raise
        log.error("cannot run: %s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
