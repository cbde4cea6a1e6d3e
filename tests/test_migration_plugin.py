# SPDX-License-Identifier: Apache-2.0
"""Our plugin process starting on IBM's driver's files, against the real API server:
an adopted claim holds one credit of the published slice (one slot in slot mode)
until the kubelet unprepares it. The kubelet is grpcio (tests.kubelet_standin)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeletplugin.ibm_state import ibm_cdi_device_ids
from tests.harness.cluster import ControlPlane
from tests.harness.plugin import PluginProcess
from tests.ibm_driver_standin import write_ibm_files
from tests.kubelet_standin import ClaimName, DraClient

pytestmark = pytest.mark.cluster

CREDITS = 8  # 7 offered: one is reserved


@pytest.fixture
def node(control_plane: ControlPlane) -> Iterator[str]:
    name = f"ibm-{uuid.uuid4().hex[:6]}"
    control_plane.create_node(name)
    yield name
    control_plane.kubectl("delete", "node", name, "--wait=false", check=False)


def published(plugin: PluginProcess) -> dict[str, int]:
    return {
        d["name"]: int(d["capacity"]["credits"]["value"])
        for s in plugin.slices()
        for d in s["spec"]["devices"]
    }


@pytest.mark.parametrize(
    ("mode", "with_adopted", "without"),
    [
        ("shared", {"nx-gzip": CREDITS - 2}, {"nx-gzip": CREDITS - 1}),
        (
            "slots",
            {f"nx-gzip-{i}": 1 for i in range(CREDITS - 2)},
            {f"nx-gzip-{i}": 1 for i in range(CREDITS - 1)},
        ),
    ],
)
def test_an_adopted_claim_holds_one_credit_until_unprepared(
    control_plane: ControlPlane,
    node: str,
    mode: str,
    with_adopted: dict[str, int],
    without: dict[str, int],
) -> None:
    root = Path(tempfile.mkdtemp(prefix="nxm-", dir="/tmp"))  # short socket paths
    plugin = PluginProcess(control_plane, node, root, total_credits=CREDITS, device_mode=mode)
    ref = ClaimName("ns", str(uuid.uuid4()), "ibm-claim")
    write_ibm_files(plugin.plugin_dir, plugin.cdi_root, node, [ref.uid])
    plugin.start()
    try:
        plugin.wait_for(lambda: published(plugin) == with_adopted, 15, "slice without its credit")
        with DraClient(plugin.dra_socket) as kubelet:
            (device,) = kubelet.prepare([ref])[ref.uid].devices
            assert tuple(device.cdi_device_ids) == ibm_cdi_device_ids(ref.uid)
            assert kubelet.unprepare([ref]) == {ref.uid: ""}
        plugin.wait_for(lambda: published(plugin) == without, 15, "slice with its credit back")
        assert list(plugin.cdi_root.iterdir()) == []
    finally:
        plugin.stop()
