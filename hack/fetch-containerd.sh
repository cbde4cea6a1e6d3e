#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Fetches containerd >= 1.7 (needed for CDI devices from kubelet 1.36: 1.6
# ignores the CRI field CDIDevices) from Debian trixie into an ignored cache
# folder, once, for the real-node tests (tests/harness/node.py).
#
# The system's apt setup is left alone: apt runs with a private sources list,
# lists, cache and an empty dpkg status under the cache folder, only downloads
# the .deb and unpacks it with dpkg-deb -x. Nothing is installed. containerd
# from trixie needs only runc (bookworm's works) and libc6 >= 2.34.
#
# Usage: hack/fetch-containerd.sh      # prints the folder holding the binaries
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${CONTAINERD_CACHE_DIR:-${POWER_DRA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/power-dra-driver}/containerd}"
suite="${CONTAINERD_DEBIAN_SUITE:-trixie}"
# The mirror is the one this machine's apt already uses (DEBIAN_MIRROR overrides).
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror="$(grep -hE '^(deb |URIs:)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security \
    | grep -oE 'https?://[^ ]+' | head -1 || true)"
fi
if [ -z "$mirror" ]; then
  echo "no Debian mirror in the system's apt sources; set DEBIAN_MIRROR" >&2
  exit 1
fi
keyring="${CONTAINERD_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
out="$cache/root"

if [ -x "$out/usr/bin/containerd" ] && [ -x "$out/usr/bin/ctr" ]; then
  echo "$out/usr/bin"
  exit 0
fi

state="$cache/apt"
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/parts" \
  "$state/prefs" "$state/debs"
: >"$state/status"
echo "deb [signed-by=$keyring] $mirror $suite main" >"$state/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$state/sources.list"
  -o "Dir::Etc::SourceParts=$state/parts"
  -o "Dir::Etc::Preferences=$state/prefs/none"
  -o "Dir::Etc::PreferencesParts=$state/prefs"
  -o "Dir::State::Lists=$state/lists"
  -o "Dir::State::Status=$state/status"
  -o "Dir::Cache=$state/cache"
  -o "APT::Get::List-Cleanup=0"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
  -o "Acquire::Languages=none"
  -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
  -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
  -q
)
echo "fetching containerd from Debian $suite (private apt state in $state)" >&2
apt-get "${apt_opts[@]}" update >&2
(cd "$state/debs" && apt-get "${apt_opts[@]}" download containerd >&2)
deb="$(ls -t "$state/debs"/containerd_*.deb | head -1)"
version="$(dpkg-deb -f "$deb" Version)"
case "$version" in
  0.* | 1.[0-6].*) echo "containerd $version from $suite is older than 1.7" >&2; exit 1 ;;
esac
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
dpkg-deb -x "$deb" "$out.tmp"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$version" >"$cache/VERSION"
rm -rf "$state"
echo "containerd $version unpacked into $out" >&2
echo "$out/usr/bin"
