# SPDX-License-Identifier: Apache-2.0
"""Process plumbing both processes share: flags, logs, metrics, the health and metrics server."""
