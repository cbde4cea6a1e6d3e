#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the pinned packaging tools that the manifest tests use, from their Go
# modules, into an ignored cache folder, once:
#   helm             helm.sh/helm/v3/cmd/helm                            (lint, template, install)
#   operator-verify  github.com/operator-framework/api/cmd/operator-verify (OLM bundle validator)
# `go install module@version` checks every module against the Go checksum
# database, so the pins below are as strict as a go.sum.
# Usage: hack/build-tools.sh [tool ...]   (default: both)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
helm_version=v3.22.0
operator_api_version=v0.45.0
out="${TOOLS_BIN_DIR:-${POWER_DRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/power-dra-driver}/tools/bin}"
mkdir -p "$out"
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(helm operator-verify)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Outside any module, so no go.mod of this repository is consulted.
cd "$tmp"

for t in "${tools[@]}"; do
  case "$t" in
    helm) version="$helm_version" ;;
    operator-verify) version="$operator_api_version" ;;
    *)
      echo "unknown tool $t (known: helm operator-verify)" >&2
      exit 2
      ;;
  esac
  # A stamp per tool, so bumping a pin rebuilds it.
  if [ -x "$out/$t" ] && [ "$(cat "$out/.$t.version" 2>/dev/null)" = "$version" ]; then
    continue
  fi
  echo "building $t $version into $out (a few minutes on 2 cores the first time)" >&2
  case "$t" in
    helm)
      pkg="helm.sh/helm/v3/cmd/helm@$helm_version"
      # As helm's own Makefile does: the Kubernetes version that `helm
      # template` and `helm lint` assume offline is the one of helm's
      # client-go (unset it is 1.20, which fails the chart's kubeVersion).
      gomod="$(go mod download -json "helm.sh/helm/v3@$helm_version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
      k8s_minor="$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$gomod")"
      ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
      for p in pkg/chartutil pkg/lint/rules; do
        ldflags+=" -X helm.sh/helm/v3/$p.k8sVersionMajor=1 -X helm.sh/helm/v3/$p.k8sVersionMinor=$k8s_minor"
      done
      ;;
    operator-verify)
      pkg="github.com/operator-framework/api/cmd/operator-verify@$operator_api_version"
      ldflags="-s -w"
      ;;
  esac
  CGO_ENABLED=0 GOBIN="$tmp/bin" go install -trimpath -ldflags "$ldflags" "$pkg"
  mv "$tmp/bin/$t" "$out/$t"
  echo "$version" >"$out/.$t.version"
done
echo "$out"
