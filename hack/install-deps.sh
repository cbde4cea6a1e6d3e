#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Debian packages the test harness needs. Idempotent; needs root (or sudo).
set -euo pipefail
# etcd: the control plane; runc, CNI plugins, busybox-static: the real node (containerd
# itself comes from hack/fetch-containerd.sh); iptables, iproute2: host-cleanliness checks.
pkgs=(etcd-server openssl runc containernetworking-plugins busybox-static iptables iproute2 util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
