# SPDX-License-Identifier: Apache-2.0
"""Reading the controller's YAML configuration files, with errors that name the file."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigFileError(ValueError):
    """A configuration file is missing, unreadable or wrong; the message names it and the field."""


def load_yaml_file(path: str | Path, what: str) -> Any:
    """Parse one YAML document; an empty file is None.

    Raises:
        ConfigFileError: unreadable file or invalid YAML, naming `what` and the path.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigFileError(f"{what} {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{what} {path}: not valid YAML: {exc}") from exc


def check_keys(obj: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    """Refuse keys outside `allowed`, naming the first one and listing the known ones.

    Raises:
        ConfigFileError: an unknown key.
    """
    for key in obj:
        if key not in allowed:
            raise ConfigFileError(
                f"{where}.{key}: unknown field (known: {', '.join(sorted(allowed))})"
            )


def covers(actual: Any, desired: Any) -> bool:
    """Whether `actual` already says everything `desired` says.

    Mappings: every desired key is present and covered (extra keys in
    `actual`, such as server defaults, are fine). Lists: same length and
    covered element by element. Anything else: equal.
    """
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and covers(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)
