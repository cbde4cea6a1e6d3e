# SPDX-License-Identifier: Apache-2.0
"""The driver's own domain model: its names, NxConfig, and reading a claim's allocation."""
