#!/usr/bin/env bash
# Installs what Ferry's test suite and benchmarks need on a fresh Debian 12 machine.
# Idempotent: packages already present are left alone; safe to run on every CI run.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# qemu-utils (qemu-img, qemu-nbd, qemu-storage-daemon, qemu-io) and the NBD tools;
# rsync is the baseline the delta benchmark compares against; PostgreSQL for the store suite;
# nbdkit (its curl plugin) reads vSphere disks over the datastore's HTTPS file access.
for p in qemu-utils libnbd-bin nbdkit rsync postgresql postgresql-contrib ca-certificates; do
  have "$p" || need+=("$p")
done

if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi


# --- guests, networks, DNS (end-to-end tests and `ferry quickstart`) -----------------
# qemu-system-x86 comes from bookworm-backports (the same QEMU 10 as qemu-utils); the
# Debian kernel under /boot boots the test guest directly; debootstrap builds its image;
# Knot answers RFC 2136 updates signed with TSIG; libvirt runs the KVM source's libvirt test.
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  mirror=$(grep -rhoE 'https?://[^ ]*debian/?$' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | sed -n 1p || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  cat >/etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
fi
guest=()
for p in qemu-system-x86 linux-image-amd64 debootstrap busybox-static iproute2 knot knot-dnsutils e2fsprogs binutils \
         libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu \
         golang-go golang-github-vmware-govmomi-dev; do
  have "$p" || guest+=("$p")
done
if [ ${#guest[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: installing ${guest[*]}"
  apt-get update -qq
  # libvirt from the same backports as QEMU: its pull-mode backups need QEMU >= 6.
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils \
    libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu >/dev/null
  apt-get install -y -qq --no-install-recommends "${guest[@]}" >/dev/null
fi

# --- guest conversion -----------------------------------------------------------------
# virt-v2v (virt-v2v-inspector, virt-v2v-in-place) converts a guest installed on VMware
# to boot on KVM virtio; guestfish (libguestfs-tools) reads and writes its network
# configuration offline. libguestfs boots its own appliance under QEMU with the kernel
# under /boot, on the direct backend (no libvirtd needed).
conv=()
for p in virt-v2v libguestfs-tools; do
  have "$p" || conv+=("$p")
done
if [ ${#conv[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: installing ${conv[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${conv[@]}" >/dev/null
fi

# --- dashboard ----------------------------------------------------------------------
# Headless Chromium and its WebDriver for the browser test (crates/ferry-cli/tests/web_ui.rs).
ui=()
for p in chromium chromium-driver; do
  have "$p" || ui+=("$p")
done
if [ ${#ui[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: installing ${ui[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${ui[@]}" >/dev/null
fi

# --- control plane ------------------------------------------------------------------
# Schemathesis (API conformance test, crates/ferry-cli/tests/control_plane.rs) in a venv
# outside the repository; the test looks for it at /var/cache/ferry/venv/bin/st
# (or $FERRY_SCHEMATHESIS) and prints a SKIP line when it is missing.
FERRY_VENV=${FERRY_VENV:-/var/cache/ferry/venv}
if [ ! -x "$FERRY_VENV/bin/st" ]; then
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  fi
  mkdir -p "$(dirname "$FERRY_VENV")"
  if ! { python3 -m venv "$FERRY_VENV" &&
         "$FERRY_VENV/bin/pip" install -q --disable-pip-version-check 'schemathesis>=4,<5'; }; then
    rm -rf "$FERRY_VENV"
    echo "install-deps: WARNING: schemathesis could not be installed; the API conformance test will be SKIPPED" >&2
  fi
fi
