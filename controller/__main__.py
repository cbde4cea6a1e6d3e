# SPDX-License-Identifier: Apache-2.0
"""`python -m controller` = `power-dra-controller`."""

from controller.main import main

main()
