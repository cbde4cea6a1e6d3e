# SPDX-License-Identifier: Apache-2.0
"""Regenerate the betterproto2 code in proto_gen/generated from proto_gen/protos.

Usage:
    python hack/gen_proto.py            # rewrite proto_gen/generated
    python hack/gen_proto.py --check    # exit 1 with a diff if the committed code is stale

Run it with the project's virtualenv Python (the dev extras pin grpcio-tools,
betterproto2-compiler and ruff, which together decide the output byte for byte).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "proto_gen" / "protos"
GENERATED = ROOT / "proto_gen" / "generated"
SPDX_HEADER = "# SPDX-License-Identifier: Apache-2.0\n"
PLUGIN = "protoc-gen-python_betterproto2"
PLUGIN_OPTIONS = "server_generation=async,client_generation=none"

# betterproto2-compiler pipes its output through `ruff check --fix` and
# `ruff format` run in protoc's working directory, so the ruff settings found
# there shape the code. Running in a scratch directory holding this file makes
# the output independent of where the script is started and of user configs.
RUFF_TOML = 'line-length = 100\ntarget-version = "py311"\n'


def proto_files() -> list[str]:
    """All .proto files, relative to PROTOS, in a stable order."""
    return sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))


def tool_path() -> str:
    """PATH with this interpreter's scripts directory first (plugin and ruff live there)."""
    scripts = str(Path(sys.executable).parent)
    return os.pathsep.join([scripts, os.environ.get("PATH", "")])


def generate(out_dir: Path) -> None:
    """Run protoc with the betterproto2 plugin once over all protos into out_dir."""
    path = tool_path()
    plugin = shutil.which(PLUGIN, path=path)
    if plugin is None:
        sys.exit(f"{PLUGIN} not found next to {sys.executable} or on PATH: install the dev extras")
    if shutil.which("ruff", path=path) is None:
        sys.exit(f"ruff not found next to {sys.executable} or on PATH: install the dev extras")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gen-proto-cwd-") as cwd:
        Path(cwd, "ruff.toml").write_text(RUFF_TOML)
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--plugin={PLUGIN}={plugin}",
            f"--python_betterproto2_out={out_dir}",
            f"--python_betterproto2_opt={PLUGIN_OPTIONS}",
            *proto_files(),
        ]
        env = {**os.environ, "PATH": path}
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        sys.exit(f"protoc failed with exit code {result.returncode}")
    for py in sorted(out_dir.rglob("*.py")):
        text = py.read_text()
        if not text.startswith(SPDX_HEADER):
            py.write_text(SPDX_HEADER + text)


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root, caches left out."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def diff_trees(want: dict[str, bytes], have: dict[str, bytes]) -> list[str]:
    """Unified diff lines turning `have` (committed) into `want` (fresh)."""
    lines: list[str] = []
    for name in sorted(want.keys() | have.keys()):
        old, new = have.get(name), want.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"only in fresh output: {name}\n")
            continue
        if new is None:
            lines.append(f"not generated any more: {name}\n")
            continue
        lines.extend(
            difflib.unified_diff(
                old.decode(errors="replace").splitlines(keepends=True),
                new.decode(errors="replace").splitlines(keepends=True),
                fromfile=f"committed/{name}",
                tofile=f"fresh/{name}",
            )
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail with a diff if it differs",
    )
    parser.add_argument(
        "--generated",
        type=Path,
        default=GENERATED,
        help="directory of the generated code (default: proto_gen/generated)",
    )
    args = parser.parse_args(argv)
    target: Path = args.generated.resolve()

    with tempfile.TemporaryDirectory(prefix="gen-proto-") as tmp:
        fresh = Path(tmp) / "generated"
        generate(fresh)
        if args.check:
            lines = diff_trees(tree(fresh), tree(target))
            if lines:
                sys.stdout.writelines(lines)
                print(
                    f"\n{target} is out of date with proto_gen/protos: "
                    "run `python hack/gen_proto.py` (make proto) and commit the result",
                    file=sys.stderr,
                )
                return 1
            print(f"{target} is up to date")
            return 0
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fresh, target)
    print(f"generated {len(proto_files())} protos into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
