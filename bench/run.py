# SPDX-License-Identifier: Apache-2.0
"""`make bench`: every benchmark, each printing a table and writing JSON to bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["bench.plugin_bench", "bench.controller_bench"]


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    failed = []
    for module in BENCHES:
        if not (root / (module.replace(".", "/") + ".py")).exists():
            continue
        print(f"\n===== {module} =====", flush=True)
        if subprocess.run([sys.executable, "-m", module], cwd=root).returncode:
            failed.append(module)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
