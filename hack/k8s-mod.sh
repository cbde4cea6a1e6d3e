#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Writes the Go tool module that builds one Kubernetes release's binaries:
# hack/k8s-bin/v1.MINOR/{go.mod,go.sum}. k8s.io/kubernetes points its staging
# modules at ./staging with replace lines that do not apply to a module that
# depends on it, so each staging module is pinned here: at the release's own
# patch where the Go module proxy serves it, else at the newest patch of the
# same minor (some are served only at a neighbouring patch); modules the proxy
# does not serve at all for that minor (k8s.io/sample-*) are left out, as
# nothing built needs them.
# Usage: hack/k8s-mod.sh v1.32.13
set -euo pipefail
version="${1:?usage: hack/k8s-mod.sh v1.MINOR.PATCH}"
here="$(cd "$(dirname "$0")" && pwd)"
minor="$(echo "$version" | cut -d. -f2)"
dest="$here/k8s-bin/v1.$minor"
tmp="$(mktemp -d)"
q="$(mktemp -d)"  # version queries run outside any module
trap 'rm -rf "$tmp" "$q"' EXIT
gomod="$(cd "$q" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
go_directive="$(awk '$1 == "go" {print $2; exit}' "$gomod")"
staging="$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod" | sort -u)"
{
  echo "// SPDX-License-Identifier: Apache-2.0"
  echo "// Tool module: builds the Kubernetes $version binaries the test harness runs."
  echo "// Written by hack/k8s-mod.sh $version."
  echo "module power-dra-driver/hack/k8s-bin/v1.$minor"
  echo
  echo "go $go_directive"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  for m in $staging; do
    want="v0.$minor.${version##*.}"
    served="$(cd "$q" && GOFLAGS=-mod=mod go list -m -versions "$m" 2>/dev/null | tr ' ' '\n' | grep -E "^v0\.$minor\.[0-9]+$" | sort -V || true)"
    if echo "$served" | grep -qx "$want"; then
      pick="$want"
    else
      pick="$(echo "$served" | tail -1)"
    fi
    if [ -n "$pick" ]; then
      echo "	$m => $m $pick"
    else
      echo "$m: no v0.$minor.x served; left out" >&2
    fi
  done
  echo ")"
} >"$tmp/go.mod"
cp "$here/k8s-bin/tools.go" "$tmp/tools.go"
(cd "$tmp" && GOFLAGS=-mod=mod go mod tidy >&2)
mkdir -p "$dest"
cp "$tmp/go.mod" "$tmp/go.sum" "$dest/"
echo "$dest"
