# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the real control plane (session scope) and API clients."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.kube.client import ApiClient
from controller.kube.kubeconfig import load_cluster_config
from kubeletplugin.state import DriverPaths
from tests.harness.cluster import ControlPlane


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    # The harness starts daemons in their own sessions; turning SIGTERM into
    # KeyboardInterrupt lets pytest run the fixture teardown that stops them.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


@pytest.fixture
def paths(tmp_path: Path) -> DriverPaths:
    """A plugin directory and a CDI root, both there, as the plugin finds them on a node."""
    p = DriverPaths(plugin_dir=tmp_path / "plugin", cdi_root=tmp_path / "cdi")
    p.plugin_dir.mkdir()
    p.cdi_root.mkdir()
    return p


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + scheduler + controller-manager on loopback, for the session."""
    keep = os.environ.get("KEEP_CLUSTER_DIR")
    workdir = Path(keep) if keep else tmp_path_factory.mktemp("control-plane")
    cp = ControlPlane(workdir).start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[ApiClient]:
    """An admin API client (the project's own API layer) against the control plane."""
    config = await load_cluster_config(control_plane.kubeconfig)
    async with ApiClient(config) as client:
        yield client


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A DNS-safe name unique to the test, for objects it creates."""
    base = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")
    return base[-40:].strip("-") + f"-{os.getpid() % 1000}"
