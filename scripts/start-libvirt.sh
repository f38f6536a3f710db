#!/usr/bin/env bash
# Starts libvirt (for the KVM source's libvirt tests) and prints its connection URI.
#   export FERRY_TEST_LIBVIRT=$(scripts/start-libvirt.sh)
# With systemd it starts the libvirtd unit; without (containers, CI) it starts virtlogd
# and libvirtd as daemons. Waits until virsh answers. Idempotent.
set -euo pipefail
URI=${FERRY_LIBVIRT_URI:-qemu:///system}
answers() { virsh -q -c "$URI" version >/dev/null 2>&1; }
if ! answers; then
  if [ -d /run/systemd/system ]; then
    systemctl start virtlogd libvirtd >&2 || true
  fi
  if ! answers; then
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
  fi
  for _ in $(seq 1 60); do answers && break; sleep 1; done
fi
answers || { echo "start-libvirt: libvirtd does not answer on $URI" >&2; exit 1; }
echo "$URI"
