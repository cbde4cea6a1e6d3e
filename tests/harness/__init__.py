# SPDX-License-Identifier: Apache-2.0
"""Test harness: a real Kubernetes control plane (and later real nodes) on loopback."""
