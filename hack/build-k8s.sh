#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds one Kubernetes release's binaries (control plane, kubelet, kubectl)
# from the k8s.io/kubernetes Go module, once, into a cache folder outside the
# clone (so CI and later clones reuse it):
#   ${POWER_DRA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/power-dra-driver}/k8s/<version>/bin
# The release is K8S_RELEASE (a minor such as 1.32, default: hack/k8s-bin/DEFAULT);
# its tool module is hack/k8s-bin/v<minor> (written by hack/k8s-mod.sh).
# Usage: hack/build-k8s.sh [binary ...]   (default: all five); prints the folder.
#        K8S_RELEASE=all hack/build-k8s.sh   builds every release of the matrix
#        (K8S_MATRIX="1.32 1.37" narrows it, as it narrows the matrix tests).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
release="${K8S_RELEASE:-$(cat "$here/k8s-bin/DEFAULT")}"
if [ "$release" = all ]; then
  wanted=" $(echo "${K8S_MATRIX:-}" | tr ',' ' ') "
  for m in "$here"/k8s-bin/v1.*/; do
    r="$(basename "$m" | sed 's/^v//')"
    if [ -n "${K8S_MATRIX:-}" ] && [[ "$wanted" != *" $r "* ]]; then
      continue
    fi
    K8S_RELEASE="$r" "$0" "$@" >/dev/null
  done
  exit 0
fi
release="${release#v}"
minor="$(echo "$release" | cut -d. -f2)"
mod="$here/k8s-bin/v1.$minor"
if [ ! -f "$mod/go.mod" ]; then
  echo "no tool module for Kubernetes $release ($mod/go.mod); known: $(cd "$here/k8s-bin" && ls -d v1.* | tr '\n' ' ')" >&2
  exit 2
fi
version="$(awk '/^require k8s.io\/kubernetes /{print $3}' "$mod/go.mod")"
cache="${POWER_DRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/power-dra-driver}"
out="${K8S_BIN_DIR:-$cache/k8s/$version/bin}"
mkdir -p "$out"
# One build per release at a time (parallel test runs would race on the same files).
exec 9>"$out/.lock"
flock 9
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
cd "$mod"
for b in "${bins[@]}"; do
  if [ -x "$out/$b" ]; then
    continue
  fi
  echo "building $b $version into $out (the first kube-apiserver build takes ~12 min on 2 cores, later releases ~6 min in all)" >&2
  start=$(date +%s)
  CGO_ENABLED=0 go build -trimpath -o "$out/$b.tmp" \
    -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
    "k8s.io/kubernetes/cmd/$b"
  mv "$out/$b.tmp" "$out/$b"
  echo "built $b $version in $(( $(date +%s) - start ))s" >&2
done
echo "$out"
