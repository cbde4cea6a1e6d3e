# SPDX-License-Identifier: Apache-2.0
"""`make demo` runs in CI: it must finish and show shared NX-gzip working."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness.cluster import REPO

pytestmark = pytest.mark.cluster


def test_demo_shares_nx_gzip_between_pods_and_reports_status() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    prepared = [line for line in out.splitlines() if line.rstrip().endswith("prepared")]
    # Three pods of one Deployment share one node's single nx-gzip device.
    shared = [line for line in prepared if "nx-shared-node" in line]
    assert len(shared) == 3 and len({line.split()[0] for line in shared}) == 1
    assert "ERROR" not in out
    assert "credits   9  (shared by many pods)" in out
    assert '"path": "/dev/crypto/nx-gzip"' in out
    assert out.count("Ready=True") >= len(prepared)
