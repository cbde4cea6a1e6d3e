# SPDX-License-Identifier: Apache-2.0
"""Node half of power-dra-driver: discovery, slice publishing, kubelet gRPC, CDI."""
