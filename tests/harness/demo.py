# SPDX-License-Identifier: Apache-2.0
"""`make demo`: the driver's main job on an embedded local setup (being built)."""

from __future__ import annotations


def main() -> None:
    print("make demo: not yet — the demo lands with the deployment issue; run `make test`.")


if __name__ == "__main__":
    main()
