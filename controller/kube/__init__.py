# SPDX-License-Identifier: Apache-2.0
"""The Kubernetes client layer both processes use: API client, kubeconfig, informer, work queue."""
