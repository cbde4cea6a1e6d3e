# SPDX-License-Identifier: Apache-2.0
"""The README documents what users set: every NxConfig field and every plugin flag."""

from __future__ import annotations

import re

from controller.nx.nxconfig import NX_CONFIG_FIELDS
from kubeletplugin.main import build_parser
from tests.harness.cluster import REPO

README = (REPO / "README.md").read_text()


def test_every_nxconfig_field_and_its_env_is_in_the_readme() -> None:
    for field in NX_CONFIG_FIELDS:
        assert f"`{field.name}`" in README and f"`{field.env}`" in README, field.name


def test_every_plugin_flag_is_in_the_readme() -> None:
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", build_parser().format_help()))
    assert "--node-name" in flags
    missing = sorted(f for f in flags - {"--help", "--verbosity"} if f"`{f}`" not in README)
    assert not missing, f"README lacks plugin flags: {missing}"


def test_readme_names_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README
