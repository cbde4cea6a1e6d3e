# SPDX-License-Identifier: Apache-2.0
"""`python -m kubeletplugin` = `power-dra-kubeletplugin`."""

from .main import main

main()
