# SPDX-License-Identifier: Apache-2.0
"""`python -m controller` = `power-dra-controller`."""

from .main import main

main()
