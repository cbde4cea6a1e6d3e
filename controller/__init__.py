# SPDX-License-Identifier: Apache-2.0
"""Kubernetes-facing half of power-dra-driver, and what both processes share."""
