# SPDX-License-Identifier: Apache-2.0
"""`make demo` runs in CI: it must finish and show shared NX-gzip working.

Where this machine can run a real node, the demo's pods really start on two
real nodes and a container shows the device node and its environment; a
second run checks the fallback (`--fake-nodes`: the demo plays the kubelet).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.harness.cluster import REPO, k8s_release, k8s_version, matrix_releases, release_info
from tests.harness.node import missing_requirements
from tests.release_table import release_rows

pytestmark = pytest.mark.cluster


def run_demo(*args: str, release: str | None = None) -> str:
    env = {**os.environ, "K8S_RELEASE": release or k8s_release()}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.demo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "ERROR" not in out, out
    return out


def assert_shared_and_reported(out: str, done: str, release: str | None = None) -> None:
    info = release_info(release)
    rows = [line for line in out.splitlines() if line.rstrip().endswith(f"  {done}")]
    assert len(rows) == 8, out  # every example pod (5 objects, 8 pods) got its credits
    # Three pods of one Deployment share one node's single nx-gzip device.
    shared = [line for line in rows if "nx-shared-node" in line]
    assert len(shared) == 3 and len({line.split()[0] for line in shared}) == 1, out
    four = [line for line in rows if " nx-4-credits " in line]
    assert len(four) == 1 and "credits 4" in four[0], out
    slices = out.split("-- ResourceSlices published by the plugins --", 1)[1].split("\n\n", 1)[0]
    if info.device_mode == "shared":
        assert "credits   9  (shared by many pods)" in slices, out
        assert "credits   5  (shared by many pods)" in slices, out
    else:  # one exclusive device per schedulable credit: 9 + 5
        assert slices.count("credits   1  (exclusive)") == 14, out
        assert "shared by many pods" not in slices, out
    assert '"path": "/dev/crypto/nx-gzip"' in out
    if info.device_status:
        assert out.count("Ready=True") >= len(rows), out
    else:  # the server drops status.devices: the controller says so, once
        assert "none: the controller said: the API server dropped status.devices" in out, out
        assert "Ready=True" not in out, out
    assert "pods still pending" not in out, out


@pytest.mark.parametrize("release", matrix_releases())
def test_demo_shares_nx_gzip_between_pods_and_reports_status(release: str) -> None:
    out = run_demo(release=release)
    info = release_info(release)
    row = release_rows()[info.name]
    # The README's row for this release is what this run shows.
    assert f"(Kubernetes {k8s_version(release)}, resource.k8s.io/{row['resource.k8s.io']})" in out
    assert f"applied {row['examples'].strip('`')} " in out, out
    skipped = re.search(r"^real node skipped: (.*)$", out, re.MULTILINE)
    if missing_requirements():
        assert skipped, out
    if skipped:
        assert_shared_and_reported(out, "prepared", release)
        return
    # Real nodes: the kubelets prepared the claims with our plugins and started the pods.
    assert_shared_and_reported(out, "Running", release)
    assert re.search(r"^  node-0: Ready in \d+s; plugin registered", out, re.MULTILINE), out
    assert re.search(r"^  node-1: Ready in \d+s; plugin registered", out, re.MULTILINE), out
    # From inside a container (kubectl exec): the device node from our CDI spec ...
    inside = out.split("-- inside ", 1)[1].split("\n-- ", 1)[0]
    assert re.search(r"^  crw-rw-rw-\s.*\s1,\s+3\s.*/dev/crypto/nx-gzip$", inside, re.M), out
    # ... and the environment, with the NxConfig of nx-configured's claim.
    env = dict(
        line.strip().split("=", 1) for line in inside.splitlines() if line.startswith("  NX_")
    )
    assert env.get("NX_DRA_CREDITS") == "1", out
    devices = env.get("NX_DRA_DEVICES", "")
    if info.device_mode == "shared":
        assert devices == "nx-gzip", out
    else:
        assert re.fullmatch(r"nx-gzip-\d+", devices), out
    assert env.get("NX_GZIP_VERBOSE") == "1", out
    assert env.get("NX_GZIP_TYPE_SELECTOR") == "2", out
    assert "stopped; the host is as before" in out, out


def test_demo_without_real_nodes_plays_the_kubelet() -> None:
    out = run_demo("--fake-nodes")
    assert "real node skipped: --fake-nodes given" in out
    assert_shared_and_reported(out, "prepared")
