#!/usr/bin/env bash
# Builds ferry-vcsim (scripts/testbed/vcsim/*.go: govmomi's vSphere simulator with a
# certificate of our choosing and a front layer adding sessions, CBT and guest operations)
# against Debian's golang-github-vmware-govmomi-dev, cached in
# $FERRY_CACHE/vcsim/<hash of the sources, the library version and go>/. Prints the binary's
# path as the last line of stdout. Needs golang-go and golang-github-vmware-govmomi-dev
# (scripts/install-deps.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${FERRY_CACHE:-/var/cache/ferry}
command -v go >/dev/null || { echo "build-vcsim: go not found: apt-get install golang-go golang-github-vmware-govmomi-dev" >&2; exit 1; }
[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || { echo "build-vcsim: govmomi sources not found: apt-get install golang-github-vmware-govmomi-dev" >&2; exit 1; }
lib=$(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null || echo unknown)
# Every source file (names included, in a fixed order) feeds the key, so editing any of
# them rebuilds.
key=$( { for f in $(cd "$here/vcsim" && LC_ALL=C ls -- *.go); do echo "== $f"; cat "$here/vcsim/$f"; done
         echo "$lib"; go version; } | sha256sum | cut -c1-16)
out=$cache_root/vcsim/$key
if [ ! -x "$out/ferry-vcsim" ]; then
  mkdir -p "$out"
  echo "build-vcsim: building ferry-vcsim (govmomi $lib)" >&2
  (cd "$here/vcsim" && GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE=$cache_root/go-build \
     go build -o "$out/ferry-vcsim.tmp" .)
  mv "$out/ferry-vcsim.tmp" "$out/ferry-vcsim"
fi
echo "$out/ferry-vcsim"
