# SPDX-License-Identifier: Apache-2.0
"""ppc64le, proven on this machine: Debian's ppc64el Python 3.11 installs every
runtime dependency from the pins, offline (ppc64le wheels, PyYAML as pure
Python), and runs the kubelet plugin's `inspect` on a fake Power10 node, under
qemu-user-static registered only in a private user namespace
(tests/harness/ppc64le.py); and the ppc64le image, built from the Containerfile
under qemu (tests/harness/driver_image.py, tests/harness/binfmt.py), runs it too."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fake_sysfs import make_powervm_tree, write_dev_node
from tests.harness.cluster import REPO
from tests.harness.driver_image import Buildah, build_image
from tests.harness.ppc64le import install_and_inspect


def _orjson_pin() -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith("orjson=="):
            return line.split("==")[1]
    raise AssertionError("orjson is not pinned")


def test_plugin_installs_from_the_pins_and_inspects_a_power10_node_on_ppc64le(
    tmp_path: Path,
) -> None:
    node = tmp_path / "node"
    make_powervm_tree(node / "sys", total_credits=240)
    write_dev_node(node / "host")

    out = install_and_inspect(node, tmp_path / "work")

    first, _, rest = out.partition("\n")
    # The interpreter really is ppc64le, with the pinned orjson wheel and pure PyYAML.
    assert first.split() == ["ppc64le", _orjson_pin(), "False"]
    doc = json.loads(rest)
    assert doc["inventory"]["platform"] == "powervm"
    assert doc["inventory"]["processor_generation"] == "power10"
    assert doc["inventory"]["credits"]["total"] == 240
    (only,) = doc["resourceSlices"]
    assert only["spec"]["nodeName"] == "power10-node"
    (device,) = only["spec"]["devices"]
    assert device["capacity"]["credits"]["value"] == "239"


def test_the_ppc64le_image_builds_from_the_containerfile_and_runs_the_plugin(
    tmp_path: Path,
) -> None:
    # The whole Containerfile under qemu (stand-ins from a ppc64el debootstrap);
    # the first build takes about half an hour on 2 cores, later ones use the cache.
    image = build_image(arch="ppc64le")
    print(image.figures())
    node = tmp_path / "node"
    make_powervm_tree(node / "sys", total_credits=240)
    write_dev_node(node / "host")
    buildah = Buildah(arch="ppc64le")
    proc = buildah.run_in(
        image.name,
        [
            "sh", "-c",
            "uname -m && exec power-dra-kubeletplugin inspect --sysfs-root=/fake/sys "
            "--host-dev-root=/fake/host --node-name=power10-node",
        ],
        volumes=[f"{node}:/fake:ro"],
        user="0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first, _, rest = proc.stdout.partition("\n")
    assert first == "ppc64le"
    doc = json.loads(rest)
    assert doc["inventory"]["processor_generation"] == "power10"
    assert image.tarball.name.endswith("-ppc64le.tar")
