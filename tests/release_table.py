# SPDX-License-Identifier: Apache-2.0
"""The README's table of Kubernetes releases, as data the matrix tests compare with."""

from __future__ import annotations

from tests.harness.cluster import REPO

MARKER = "<!-- release-table:"


def release_rows() -> dict[str, dict[str, str]]:
    """README row per minor release ("1.32" -> {column header: cell})."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER)) + 1
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        row = dict(zip(header, cells, strict=True))
        minor = ".".join(row["Kubernetes"].split(".")[:2])
        rows[minor] = row
    return rows
