# SPDX-License-Identifier: Apache-2.0
"""Kubernetes' own naming rules (as in k8s.io/apimachinery/pkg/util/validation).

What the API server accepts as an object name, a namespace, a label or an
environment variable name: checked before a request, so a bad value fails with
our error naming the field instead of a 422 from the server.
"""

from __future__ import annotations

import re

DNS_LABEL_MAX_LENGTH = 63
DNS_SUBDOMAIN_MAX_LENGTH = 253

_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_VAR_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def is_dns_label(value: str) -> bool:
    """A DNS-1123 label: lower-case letters, digits and '-', starting and ending with a
    letter or digit, at most 63 characters (a namespace, most object names)."""
    return len(value) <= DNS_LABEL_MAX_LENGTH and _DNS_LABEL.fullmatch(value) is not None


def is_dns_subdomain(value: str) -> bool:
    """A DNS-1123 subdomain: DNS labels joined by '.', at most 253 characters in all
    (a ResourceClaim or DeviceClass name)."""
    return len(value) <= DNS_SUBDOMAIN_MAX_LENGTH and _DNS_SUBDOMAIN.fullmatch(value) is not None


def is_c_identifier(value: str) -> bool:
    """A C identifier: a letter or '_', then letters, digits and '_'."""
    return _C_IDENTIFIER.fullmatch(value) is not None


def is_env_var_name(value: str) -> bool:
    """A name the API server accepts for a container's environment variable."""
    return _ENV_VAR_NAME.fullmatch(value) is not None
