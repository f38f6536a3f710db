#!/usr/bin/env bash
# Builds Ferry's test guest image (Debian bookworm, systemd, a web server, a ledger that
# writes fsync'ed records, the QEMU guest agent) and caches it outside the repository.
#
# Usage: scripts/testbed/build-guest-image.sh
# Prints progress on stderr and, as the last line of stdout, the cache directory holding
#   disk.qcow2     2 GiB qcow2, ext4 directly on the disk (no partition table)
#   vmlinuz        the kernel and initramfs to boot it with -kernel/-initrd
#   initrd.img     (copies of the host's, so the directory is self-contained)
#   manifest.json  {"key", "kernel", "append", "built_at", ...}
# Boot with: -append "<manifest append> ferry.ip=10.200.1.10/24 [ferry.gw=10.200.1.1]"
#
# The directory name is derived from a hash of this script, of every file under
# scripts/testbed/guest/ (copied into the guest as is) and of the kernel version, so
# the image is rebuilt exactly when its recipe changes; otherwise the cached path is
# printed right away. Always boot a qcow2 overlay on top of disk.qcow2: the cached
# image must stay pristine for the next test.
#
# Environment:
#   FERRY_CACHE         cache root (default /var/cache/ferry)
#   FERRY_GUEST_KERNEL  kernel version to use (default: newest /boot/vmlinuz-* with modules)
#   FERRY_GUEST_MIRROR  Debian mirror (default: the bookworm one in the apt sources)
# Needs root (debootstrap), debootstrap, mkfs.ext4 (e2fsprogs >= 1.43 for -d), qemu-img,
# kmod (modprobe/depmod), flock.
set -euo pipefail

log() { printf 'build-guest-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/$(basename "${BASH_SOURCE[0]}")
guest_src=$here/guest
cache_root=${FERRY_CACHE:-/var/cache/ferry}

# The kernel command line the image is made for. Only the host adds ferry.ip=/ferry.gw=.
# net.ifnames=0 keeps the NIC named eth0 whatever PCI slot the hypervisor gives it.
append='root=/dev/vda rw console=ttyS0 net.ifnames=0'

# Kernel modules the guest loads after the switch to the real root (the initramfs has
# its own copies for the disk): the NIC, the agent's virtio-serial port, the ACPI power
# button and the input events logind turns into a clean shutdown, entropy, the default
# qdisc systemd asks for, and the disk/fs drivers so modprobe finds them in the root too.
# Their dependencies are added by modprobe --show-depends; built-ins are skipped.
guest_modules=(
    virtio_net net_failover failover virtio_console virtio_rng virtio_balloon
    button evdev sch_fq_codel autofs4
    virtio_pci virtio_blk virtio_scsi ext4
)

# --- the recipe key -------------------------------------------------------------------
if [ -n "${FERRY_GUEST_KERNEL:-}" ]; then
    kver=$FERRY_GUEST_KERNEL
else
    # The host's running kernel (Firecracker's) is not bootable here: pick the newest
    # Debian kernel installed under /boot that also has its modules.
    kver=
    for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V); do
        [ -d "/lib/modules/$k" ] && kver=$k
    done
    [ -n "$kver" ] || die "no /boot/vmlinuz-* with /lib/modules/<version> (apt-get install linux-image-amd64)"
fi
vmlinuz=/boot/vmlinuz-$kver
initrd=/boot/initrd.img-$kver
[ -r "$vmlinuz" ] && [ -r "$initrd" ] || die "missing $vmlinuz or $initrd"

# Paths, modes and contents of the guest files all count: an exec bit matters as much as
# a changed line. A handful of processes only, so the cached case stays well under 1 s.
key=$(
    {
        sha256sum <"$self"
        if [ -d "$guest_src" ]; then
            (cd "$guest_src" && find . -type f -printf '%p %m\n' | LC_ALL=C sort)
            (cd "$guest_src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
        fi
        printf 'kernel %s\n' "$kver"
    } | sha256sum | cut -c1-64
)
guest_cache=$cache_root/guest
final=$guest_cache/${key:0:16}

complete() {
    [ -f "$1/manifest.json" ] && [ -f "$1/disk.qcow2" ] && [ -f "$1/vmlinuz" ] && [ -f "$1/initrd.img" ]
}

# Fast path. The directory only ever appears by an atomic rename of a finished build,
# so existing means complete; the file check guards against hand-made damage.
if complete "$final"; then
    echo "$final"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building the image needs root (debootstrap, chroot)"
for tool in debootstrap mkfs.ext4 qemu-img modprobe depmod flock chroot; do
    command -v "$tool" >/dev/null || die "$tool not found (see scripts/install-deps.sh)"
done

# --- one builder at a time --------------------------------------------------------------
mkdir -p "$guest_cache"
exec 9>"$cache_root/guest.lock"
if ! flock -n 9; then
    log "another build holds $cache_root/guest.lock, waiting"
    flock 9
fi
# The other builder may just have produced the very same image.
if complete "$final"; then
    echo "$final"
    exit 0
fi
# We hold the lock, so any build directory left over is from a builder that died.
for stale in "$guest_cache"/.build-*; do
    [ -e "$stale" ] || continue
    log "removing stale build directory $stale"
    rm -rf --one-file-system "$stale"
done
# A directory with the final name but not complete can only be hand-made damage.
[ ! -e "$final" ] || rm -rf --one-file-system "$final"

start=$(date +%s)
work=$(mktemp -d "$guest_cache/.build-XXXXXX")
root=$work/root
out=$work/out
mkdir -p "$root" "$out"

cleanup() {
    # debootstrap mounts proc/sys inside the root and may leave them mounted if it
    # fails: unmount before deleting so rm never walks into the host's /proc or /dev.
    local m
    for m in $(awk -v r="$root" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# --- the root filesystem ----------------------------------------------------------------
# The mirror of the machine's own apt sources (a proxy or local mirror may be the only
# one reachable); deb.debian.org otherwise.
find_mirror() {
    local f line uris suites
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uris='' suites=''
        # deb822: stanzas separated by blank lines; take the first URI of a stanza whose
        # Suites has exactly "bookworm" (not bookworm-security/-backports).
        while IFS= read -r line || [ -n "$line" ]; do
            case $line in
                URIs:*) uris=${line#URIs:} ;;
                Suites:*) suites=${line#Suites:} ;;
                '' | [[:space:]])
                    if [[ " ${suites//$'\t'/ } " == *" bookworm "* ]] && [ -n "$uris" ]; then
                        set -- $uris; echo "$1"; return 0
                    fi
                    uris='' suites=''
                    ;;
            esac
        done <"$f"
        if [[ " ${suites//$'\t'/ } " == *" bookworm "* ]] && [ -n "$uris" ]; then
            set -- $uris; echo "$1"; return 0
        fi
    done
    # One-line format: deb [options] URI bookworm components...
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm([[:space:]].*)?$/\2/p' |
        head -n 1
}
mirror=${FERRY_GUEST_MIRROR:-$(find_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

log "building guest image ${key:0:16} (kernel $kver, mirror $mirror)"
log "debootstrap (about 1 min)"
# dbus is required: without it logind does not act on the ACPI power button and the
# agent's guest-shutdown fails. busybox provides httpd; ifupdown/netbase keep the usual
# Debian network files in place; no DHCP client: the address comes from ferry.ip=.
debootstrap --variant=minbase \
    --include=systemd-sysv,udev,kmod,iproute2,busybox,ifupdown,netbase,qemu-guest-agent,dbus \
    bookworm "$root" "$mirror" >&2

log "installing kernel modules"
mod_dst=$root/lib/modules/$kver
mkdir -p "$mod_dst"
# The index files tell depmod/modprobe in the guest which modules are built in, so
# udev and systemd do not try (and fail) to load them.
for f in modules.builtin modules.builtin.modinfo modules.order; do
    [ -e "/lib/modules/$kver/$f" ] && cp "/lib/modules/$kver/$f" "$mod_dst/"
done
for m in "${guest_modules[@]}"; do
    deps=$(modprobe -S "$kver" --show-depends "$m") || die "module $m not found for $kver"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        mkdir -p "$root$(dirname "$path")"
        cp "$path" "$root$path"
    done <<<"$deps"
done
depmod -b "$root" "$kver"

log "installing guest files and services"
# --no-preserve=ownership: the checkout may belong to any user; the guest wants root.
if [ -d "$guest_src" ]; then
    cp -R --no-preserve=ownership "$guest_src/." "$root/"
fi
mkdir -p "$root/var/lib/ledger"
chroot "$root" systemctl enable --quiet ferry-net.service ferry-web.service \
    ferry-ledger.service ferry-ready.service
# Nothing logs in: the host drives the guest through the agent. Periodic jobs (apt,
# fstrim, e2scrub) would burn the emulated CPU and write to the disk at random moments,
# which blurs what a migration test measures. firstboot would prompt on the console
# when it sees the empty machine-id below.
chroot "$root" systemctl mask --quiet \
    getty@.service serial-getty@.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer \
    systemd-firstboot.service
chroot "$root" usermod -p '!' root
# Every booted copy must get its own identity: an empty machine-id makes systemd
# generate one at first boot; dbus reads the same one.
: >"$root/etc/machine-id"
ln -sf /etc/machine-id "$root/var/lib/dbus/machine-id"
rm -f "$root/var/lib/systemd/random-seed"

# Only what a running guest needs: package caches and indexes, docs, translations.
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*.log \
    "$root"/var/cache/debconf/*-old "$root"/tmp/*

# --- the disk -----------------------------------------------------------------------------
log "making the ext4 filesystem"
# No mount needed: mke2fs copies the tree itself (-d). Inode tables and journal are
# zeroed now rather than lazily by the guest kernel after boot, which would otherwise
# write in the background for minutes and show up in every dirty-block measurement.
truncate -s 2G "$work/disk.raw"
mkfs.ext4 -q -F -L ferry-root -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$root" "$work/disk.raw" >&2
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$out/disk.qcow2"
rm -f "$work/disk.raw"

cp "$vmlinuz" "$out/vmlinuz"
cp "$initrd" "$out/initrd.img"
cat >"$out/manifest.json" <<JSON
{
  "key": "$key",
  "kernel": "$kver",
  "append": "$append",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "mirror": "$mirror",
  "disk": "disk.qcow2",
  "vmlinuz": "vmlinuz",
  "initrd": "initrd.img"
}
JSON

# Contents durable before the name appears, and the name durable after: a power cut
# leaves either no directory or a complete one.
sync "$out"/* "$out"
mv -T "$out" "$final"
sync "$guest_cache"

log "done in $(($(date +%s) - start)) s: $final ($(du -sh "$final/disk.qcow2" | cut -f1) disk)"
echo "$final"
