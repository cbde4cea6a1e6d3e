# SPDX-License-Identifier: Apache-2.0
"""`make bench`: every benchmark, each printing a table and writing JSON to bench/results/.

python -m bench.run [--busy N]   # N busy-looping processes beside the plugin bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHES = ["bench.plugin_bench", "bench.controller_bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--busy", type=int, default=0, help="passed to bench.plugin_bench")
    args = parser.parse_args()
    extra = {"bench.plugin_bench": ["--busy", str(args.busy)] if args.busy else []}
    root = Path(__file__).resolve().parent.parent
    failed = []
    for module in BENCHES[:1] if args.busy else BENCHES:
        if not (root / (module.replace(".", "/") + ".py")).exists():
            continue
        print(f"\n===== {module} =====", flush=True)
        if subprocess.run(
            [sys.executable, "-m", module, *extra.get(module, [])], cwd=root
        ).returncode:
            failed.append(module)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
