#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Debian packages the test harness and the image build need. Idempotent (nothing
# is fetched when all is there); needs root (or sudo). Called by `make test`,
# `make demo`, `make image` and .ci/run.
set -euo pipefail
# etcd: the control plane; runc, CNI plugins, busybox-static: the real node (containerd
# itself comes from hack/fetch-containerd.sh); iptables, iproute2: host-cleanliness checks;
# buildah, debootstrap: the driver's image (tests/harness/driver_image.py).
pkgs=(etcd-server openssl runc containernetworking-plugins busybox-static iptables iproute2
  util-linux buildah debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
updated=""
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -q
  updated=1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# qemu-user-static for the ppc64le smoke test, unpacked into the cache rather than
# installed: installing the package registers binfmt handlers on the host (through
# systemd-binfmt), and the tests register them only in a private user namespace.
cache="${POWER_DRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/power-dra-driver}/qemu"
if [ ! -x "$cache/root/usr/bin/qemu-ppc64le-static" ]; then
  mkdir -p "$cache/debs"
  [ -n "$updated" ] || $SUDO apt-get update -q
  (cd "$cache/debs" && apt-get download -q qemu-user-static)
  rm -rf "$cache/root.tmp"
  dpkg-deb -x "$(ls -t "$cache"/debs/qemu-user-static_*.deb | head -1)" "$cache/root.tmp"
  rm -rf "$cache/root" "$cache/debs"
  mv "$cache/root.tmp" "$cache/root"
fi
