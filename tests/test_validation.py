# SPDX-License-Identifier: Apache-2.0
"""Kubernetes' naming rules, as pure functions (controller/kube/validation.py)."""

from __future__ import annotations

import pytest

from controller.kube.validation import (
    is_c_identifier,
    is_dns_label,
    is_dns_subdomain,
    is_env_var_name,
)


@pytest.mark.parametrize("name", ["a", "0", "nx-gzip", "kube-system", "a" * 63, "1-2-3"])
def test_dns_labels(name: str) -> None:
    assert is_dns_label(name)


@pytest.mark.parametrize("name", ["", "a" * 64, "-a", "a-", "A", "a.b", "a_b", "a/b", "ä", "a\n"])
def test_not_dns_labels(name: str) -> None:
    assert not is_dns_label(name)


@pytest.mark.parametrize(
    "name",
    ["a", "nx.device.power.ibm.com", "a-b.c-d", "a" * 253, ".".join(["a" * 63] * 4)[:253]],
)
def test_dns_subdomains(name: str) -> None:
    assert is_dns_subdomain(name)


@pytest.mark.parametrize(
    "name", ["", "a" * 254, ".a", "a.", "a..b", "-a.b", "a-.b", "A.b", "a/b", "a_b", "a b"]
)
def test_not_dns_subdomains(name: str) -> None:
    assert not is_dns_subdomain(name)


def test_a_subdomain_limits_its_length_not_each_label() -> None:
    # Kubernetes checks only the whole name's 253 characters.
    assert is_dns_subdomain("a" * 100 + ".b")
    assert not is_dns_label("a" * 100)


@pytest.mark.parametrize("name", ["credits", "_x", "A1_b", "a" * 100])
def test_c_identifiers(name: str) -> None:
    assert is_c_identifier(name)


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a.b", "a b", "ä"])
def test_not_c_identifiers(name: str) -> None:
    assert not is_c_identifier(name)


@pytest.mark.parametrize("name", ["PATH", "NX_GZIP", "-x", ".x", "a.b-c_1"])
def test_env_var_names(name: str) -> None:
    assert is_env_var_name(name)


@pytest.mark.parametrize("name", ["", "1A", "A=B", "A B", "ä"])
def test_not_env_var_names(name: str) -> None:
    assert not is_env_var_name(name)
