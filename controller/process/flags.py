# SPDX-License-Identifier: Apache-2.0
"""Command-line flags with environment fallbacks (flag > env > default)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def parse_duration(text: str) -> float:
    """Seconds from `30`, `30s`, `500ms`, `2m`, `1h`; raises ValueError naming the input."""
    raw = text.strip().lower()
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    for suffix, factor in units:
        if raw.endswith(suffix) and raw[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(raw[: -len(suffix)]) * factor
    if raw.replace(".", "", 1).isdigit():
        return float(raw)
    raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 500ms, 2m)")


def parse_bool(text: str) -> bool:
    """`true/false/1/0/yes/no/on/off`."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def add_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    env: str | None,
    default: Any,
    help: str,
    *,
    type: Callable[[str], Any] = str,
    required: bool = False,
    choices: list[str] | None = None,
) -> None:
    """Add `--flag`, defaulting to `$ENV` when set, else `default`.

    The environment value goes through `type` at parse time, so a bad value
    fails with the flag's name like a bad command-line value does.
    """
    env_value = os.environ.get(env) if env else None
    effective: Any = default if env_value is None or env_value == "" else env_value
    suffix = f" [env {env}]" if env else ""
    shown = "" if default is None or default == "" else f" (default: {default})"
    convert = type
    if choices is not None:
        # argparse checks `choices` on the command line only, never on a default:
        # a value from the environment is checked here, at parse time too.
        def convert(text: str) -> Any:
            value = type(text)
            if value not in choices:
                source = f" (from ${env})" if env and text == env_value else ""
                raise argparse.ArgumentTypeError(
                    f"invalid choice: {text!r}{source} (choose from {', '.join(choices)})"
                )
            return value

    parser.add_argument(
        flag,
        dest=flag.lstrip("-").replace("-", "_"),
        default=effective,
        type=convert,
        required=required and effective in (None, ""),
        choices=choices,
        help=f"{help}{shown}{suffix}",
    )


def add_bool_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    env: str | None,
    default: bool,
    help: str,
) -> None:
    """A boolean flag: `--x`, `--x=false`, or `$ENV=true`."""
    env_value = os.environ.get(env) if env else None
    effective = default if env_value in (None, "") else parse_bool(env_value or "")
    parser.add_argument(
        flag,
        dest=flag.lstrip("-").replace("-", "_"),
        nargs="?",
        const=True,
        default=effective,
        type=parse_bool,
        help=f"{help} (default: {str(default).lower()}) [env {env}]" if env else help,
    )


def add_common_flags(
    parser: argparse.ArgumentParser, *, qps: float = 50.0, burst: int = 100
) -> None:
    """Flags both processes share: API connection, rate limits (defaults per process), verbosity."""
    add_flag(
        parser, "--kubeconfig", "KUBECONFIG", None, "kubeconfig file; in-cluster config when unset"
    )
    add_flag(
        parser,
        "--kube-api-qps",
        "KUBE_API_QPS",
        qps,
        "client-side API request rate (0 disables the limit)",
        type=float,
    )
    add_flag(
        parser,
        "--kube-api-burst",
        "KUBE_API_BURST",
        burst,
        "client-side API burst: requests allowed at once before the rate applies",
        type=int,
    )
    add_flag(
        parser,
        "--watch-timeout",
        "WATCH_TIMEOUT",
        "5m",
        "how long one watch runs before the server ends it and it is renewed; a watch "
        "silent for longer (a dead connection) is dropped and re-opened",
        type=parse_duration,
    )
    parser.add_argument(
        "-v",
        "--verbosity",
        type=int,
        default=int(os.environ.get("VERBOSITY", "0") or 0),
        help="log verbosity: 0 info, 1+ debug, 5+ library debug [env VERBOSITY]",
    )
