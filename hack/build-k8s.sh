#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the pinned Kubernetes binaries (control plane, kubelet, kubectl) from
# the k8s.io/kubernetes Go module into an ignored cache folder, once.
# Usage: hack/build-k8s.sh [binary ...]   (default: all five)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
version="$(awk '/^require k8s.io\/kubernetes /{print $3}' "$here/k8s-bin/go.mod")"
out="${K8S_BIN_DIR:-$root/.cache/k8s/$version/bin}"
mkdir -p "$out"
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
cd "$here/k8s-bin"
for b in "${bins[@]}"; do
  if [ -x "$out/$b" ]; then
    continue
  fi
  echo "building $b $version into $out (the first kube-apiserver build takes ~12 min on 2 cores)" >&2
  CGO_ENABLED=0 go build -trimpath -o "$out/$b.tmp" \
    -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36" \
    "k8s.io/kubernetes/cmd/$b"
  mv "$out/$b.tmp" "$out/$b"
done
echo "$out"
