# SPDX-License-Identifier: Apache-2.0
"""Names both processes share: the driver, our field manager, our label, the device node,
the capacity our devices offer."""

from __future__ import annotations

DRIVER_NAME = "nx.device.power.ibm.com"
DRIVER_VERSION = "0.1.0"
FIELD_MANAGER = "power-dra-driver"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "power-dra-driver"
# The NX-gzip device node, on the host and inside containers.
DEVICE_PATH = "/dev/crypto/nx-gzip"
# The consumable capacity of our devices: NX-gzip (VAS) credits.
CREDITS_CAPACITY = "credits"
# The resource.k8s.io versions whose ResourceSlice the plugin can write (newest first);
# here rather than in kubeletplugin.slices: the plugin's command line names them
# before the serving process loads that module.
SLICE_API_VERSIONS = ("v1", "v1beta2", "v1beta1")
