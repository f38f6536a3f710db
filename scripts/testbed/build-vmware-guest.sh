#!/usr/bin/env bash
# Builds Ferry's VMware-style test guest: a Debian bookworm disk that looks as if it had
# been installed on VMware hardware, and caches it outside the repository. Tests use it
# to show that guest conversion (virt-v2v-in-place) makes such a guest boot on KVM's
# virtio devices; unconverted, it cannot find its root disk there.
#
# Usage: scripts/testbed/build-vmware-guest.sh
# Prints progress on stderr and, as the last line of stdout, the cache directory holding
#   disk.qcow2     3 GiB qcow2 (compat=1.1): MBR, one ext4 partition (/dev/sda1), GRUB
#                  (grub-pc) in the MBR, Debian's own kernel, booted by the firmware
#                  (SeaBIOS) alone; no -kernel needed
#   manifest.json  {"key", "built_at", "kernel", "nic_name", "mac", "ip", "gateway",
#                   "root_device", "qemu_args", ...}
#
# What makes it "VMware" (and old-style, so conversion has something to do):
#   - it was installed (first boot) on pvscsi + vmxnet3 with VMware's SMBIOS strings;
#   - the initramfs is host-only (MODULES=dep, left set): vmw_pvscsi, no virtio driver;
#   - root=/dev/sda1 on the kernel command line and in /etc/fstab, not UUID=;
#   - /etc/network/interfaces names the NIC by its predictable name in PCI slot 5
#     (enp0s5), with a static 10.200.1.10/24 via 10.200.1.1;
#   - open-vm-tools is installed and enabled, as on a real VMware guest. Under QEMU it
#     stays inactive, by its own ConditionVirtualization=vmware: systemd trusts CPUID
#     before DMI, and QEMU's CPUID hypervisor leaf (TCGTCGTCGTCG, or KVM's) says
#     "qemu"/"kvm". With -cpu ...,-hypervisor systemd does see "vmware", but vmtoolsd
#     then exits 1 (QEMU's vmport has no VMware RPC channel), so the unit fails: leave
#     the CPU alone.
# It also carries the test services of scripts/testbed/guest/ (web server on port 80,
# ledger, the FERRY-GUEST-READY marker on the serial console) and the QEMU guest agent
# (started by udev once a virtio-serial port named org.qemu.guest_agent.0 appears).
#
# Boot it as VMware hardware with the manifest's qemu_args plus a drive with id disk0
# and a netdev with id net0, always on a qcow2 overlay: the cached image must stay
# pristine for the next test. For example:
#   qemu-img create -f qcow2 -F qcow2 -b "$dir/disk.qcow2" /tmp/o.qcow2
#   qemu-system-x86_64 -accel tcg -m 1024 -nodefaults -serial stdio \
#     -drive file=/tmp/o.qcow2,format=qcow2,if=none,id=disk0 -netdev tap,id=net0,... \
#     <qemu_args>
#
# The directory name is derived from a hash of this script, of every file under
# scripts/testbed/guest/ and scripts/testbed/vmware-guest/ (copied into the guest) and
# of the guest kernel's version, so the image is rebuilt exactly when its recipe
# changes; otherwise the cached path is printed right away.
#
# Environment:
#   FERRY_CACHE         cache root (default /var/cache/ferry)
#   FERRY_GUEST_MIRROR  Debian mirror (default: the bookworm one in the apt sources)
#   FERRY_QEMU_ACCEL    QEMU accelerator for the build's boots (default tcg)
#   FERRY_KEEP_BUILD=1  on failure keep the build directory (serial logs, build.log) for
#                       a look; the next build removes it as stale
# Needs root (debootstrap, chroot), debootstrap, mkfs.ext4 (e2fsprogs >= 1.43 for -d),
# debugfs, sfdisk (package fdisk), qemu-img, qemu-system-x86_64 with SeaBIOS,
# lsinitramfs (initramfs-tools-core), flock. No loop devices, nbd or mounts: the
# filesystem is made from a directory (mkfs.ext4 -d) and read back with debugfs.
# Takes 4 to 10 minutes under TCG (debootstrap's downloads, then two emulated boots of
# about a minute each); the log of each step stays in the build directory and is
# printed only if that step fails.
set -euo pipefail

log() { printf 'build-vmware-guest: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self=$here/$(basename "${BASH_SOURCE[0]}")
guest_src=$here/guest
vmware_src=$here/vmware-guest
cache_root=${FERRY_CACHE:-/var/cache/ferry}
vm_cache=$cache_root/vmware-guest

# The VMware hardware the guest is installed on and verified on. addr=0x5 pins the NIC's
# PCI slot, which its predictable name (nic_name, written into
# vmware-guest/rootfs/etc/network/interfaces) is derived from; the first boot checks
# that udev really gives it that name. ",," is QEMU's escape for a comma.
nic_name=enp0s5
nic_pci_addr=0x5
mac=52:54:00:fe:01:10
ip_cidr=10.200.1.10/24
gateway=10.200.1.1
root_device=/dev/sda1
smbios='type=1,manufacturer=VMware,, Inc.,product=VMware Virtual Platform'
# shellcheck disable=SC2054 # the commas are inside QEMU option values
vmware_args=(
    -machine q35
    -smbios "$smbios"
    -device pvscsi,id=scsi0
    -device scsi-hd,bus=scsi0.0,drive=disk0
    -device "vmxnet3,netdev=net0,mac=$mac,addr=$nic_pci_addr"
)

# --- the recipe key -------------------------------------------------------------------
# The guest's kernel is Debian's linux-image-amd64 as debootstrap installs it from the
# bookworm suite. Its version is known before the build only from the host's apt lists;
# apt-cache is given a cache file of its own because this machine's apt config turns
# its binary cache off, and rebuilding it each time would cost a second on the fast
# path. The cache file is regenerated by apt whenever the lists change.
guest_kernel_version() {
    mkdir -p "$vm_cache" 2>/dev/null || true
    apt-cache -o Dir::Cache::pkgcache="$vm_cache/.apt-pkgcache.bin" \
        -o Dir::Cache::srcpkgcache= madison linux-image-amd64 2>/dev/null |
        awk -F'|' '$3 ~ / bookworm\/main / { gsub(/ /, "", $2); print $2; exit }'
}
kernel_pkg=$(guest_kernel_version || true)
if [ -z "$kernel_pkg" ]; then
    # Still buildable (debootstrap reads the mirror itself), but a kernel update would
    # not show in the key until the lists are there.
    log "warning: no bookworm linux-image-amd64 in the apt lists (run apt-get update)"
    kernel_pkg=unknown
fi

# Paths, modes and contents of the guest files all count: an exec bit matters as much as
# a changed line. A handful of processes only, so the cached case stays well under 1 s.
hash_tree() {
    [ -d "$1" ] || return 0
    (cd "$1" && find . -type f -printf '%p %m\n' | LC_ALL=C sort)
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
}
key=$(
    {
        sha256sum <"$self"
        printf 'guest\n'
        hash_tree "$guest_src"
        printf 'vmware-guest\n'
        hash_tree "$vmware_src"
        printf 'kernel %s\n' "$kernel_pkg"
    } | sha256sum | cut -c1-64
)
final=$vm_cache/${key:0:16}

complete() {
    [ -f "$1/manifest.json" ] && [ -f "$1/disk.qcow2" ]
}

# Fast path. The directory only ever appears by an atomic rename of a finished build,
# so existing means complete; the file check guards against hand-made damage.
if complete "$final"; then
    echo "$final"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building the image needs root (debootstrap, chroot)"
for tool in debootstrap mkfs.ext4 debugfs sfdisk qemu-img qemu-system-x86_64 lsinitramfs \
    flock chroot; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap e2fsprogs fdisk qemu-utils qemu-system-x86 initramfs-tools-core)"
done
if [ ! -d "$vmware_src/rootfs" ] || [ ! -d "$vmware_src/firstboot" ]; then
    die "missing $vmware_src/rootfs or $vmware_src/firstboot"
fi

# --- one builder at a time --------------------------------------------------------------
mkdir -p "$vm_cache"
exec 9>"$cache_root/vmware-guest.lock"
if ! flock -n 9; then
    log "another build holds $cache_root/vmware-guest.lock, waiting"
    flock 9
fi
# The other builder may just have produced the very same image.
if complete "$final"; then
    echo "$final"
    exit 0
fi
# We hold the lock, so any build directory left over is from a builder that died.
for stale in "$vm_cache"/.build-*; do
    [ -e "$stale" ] || continue
    log "removing stale build directory $stale"
    rm -rf --one-file-system "$stale"
done
# A directory with the final name but not complete can only be hand-made damage.
[ ! -e "$final" ] || rm -rf --one-file-system "$final"

start=$(date +%s)
work=$(mktemp -d "$vm_cache/.build-XXXXXX")
root=$work/root
out=$work/out
buildlog=$work/build.log
mkdir -p "$root" "$out"
: >"$buildlog"

qemu_pid=
cleanup() {
    local rc=$?
    # A QEMU of ours still running (a failed or interrupted boot) holds the disk open.
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    # debootstrap mounts proc/sys inside the root and may leave them mounted if it
    # fails: unmount before deleting so rm never walks into the host's /proc or /dev.
    local m
    awk -v r="$root" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
        while IFS= read -r m; do
            umount -l "$m" 2>/dev/null || true
        done
    if [ "$rc" -ne 0 ] && [ "${FERRY_KEEP_BUILD:-}" = 1 ]; then
        log "kept $work"
        return
    fi
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# Failure with the evidence: the last lines of a log that is otherwise kept quiet.
fail_with_log() {
    local file=$1
    shift
    log "error: $*"
    if [ -s "$file" ]; then
        log "last lines of $(basename "$file"):"
        tail -n 60 "$file" | sed 's/^/    /' >&2
    fi
    exit 1
}

# Runs a build step with its chatter going to the build log.
quiet() {
    local what=$1
    shift
    printf '\n=== %s: %s\n' "$what" "$*" >>"$buildlog"
    "$@" >>"$buildlog" 2>&1 || fail_with_log "$buildlog" "$what failed"
}

# --- the root filesystem ----------------------------------------------------------------
# The mirror of the machine's own apt sources (a proxy or local mirror may be the only
# one reachable); deb.debian.org otherwise. Same lookup as build-guest-image.sh.
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
                        # shellcheck disable=SC2086 # split the URI list on purpose
                        set -- $uris
                        echo "$1"
                        return 0
                    fi
                    uris='' suites=''
                    ;;
            esac
        done <"$f"
        if [[ " ${suites//$'\t'/ } " == *" bookworm "* ]] && [ -n "$uris" ]; then
            # shellcheck disable=SC2086 # split the URI list on purpose
            set -- $uris
            echo "$1"
            return 0
        fi
    done
    # One-line format: deb [options] URI bookworm components...
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm([[:space:]].*)?$/\2/p' |
        head -n 1
}
mirror=${FERRY_GUEST_MIRROR:-$(find_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

log "building VMware-style guest ${key:0:16} (linux-image-amd64 $kernel_pkg, mirror $mirror)"
log "debootstrap (1 to 3 min)"
# minbase plus what an installed VMware guest has: Debian's kernel and initramfs-tools,
# GRUB for BIOS, ifupdown for /etc/network/interfaces, open-vm-tools. debootstrap
# installs no Recommends. dbus is required: without it logind does not act on the ACPI
# power button and the agent's guest-shutdown fails. busybox provides httpd for
# ferry-web. zstd: initramfs.conf says COMPRESS=zstd, and without the tool (a Recommends
# of initramfs-tools, so not pulled in here) update-initramfs falls back to gzip. No
# DHCP client: the address is static.
quiet debootstrap debootstrap --variant=minbase \
    --include=systemd-sysv,udev,kmod,iproute2,busybox,ifupdown,netbase,dbus,qemu-guest-agent,linux-image-amd64,initramfs-tools,zstd,grub-pc,open-vm-tools \
    bookworm "$root" "$mirror"

# The one kernel debootstrap installed (linux-image-amd64 depends on exactly one).
kver=
for k in "$root"/boot/vmlinuz-*; do
    [ -e "$k" ] || continue
    [ -z "$kver" ] || die "more than one kernel in the guest's /boot"
    kver=${k##*/vmlinuz-}
done
if [ -z "$kver" ] || [ ! -r "$root/boot/initrd.img-$kver" ]; then
    die "no kernel/initrd in the guest's /boot"
fi
# shellcheck disable=SC2016 # ${Version} is dpkg-query's, not the shell's
installed_pkg=$(chroot "$root" dpkg-query -W -f '${Version}' linux-image-amd64)
if [ "$installed_pkg" != "$kernel_pkg" ]; then
    # The key named another version: the host's apt lists are older than the mirror.
    # The image is still right; the manifest says what it really has.
    log "warning: guest got linux-image-amd64 $installed_pkg, the key says $kernel_pkg (apt-get update)"
fi

log "configuring the guest (kernel $kver)"
# The test services, as in build-guest-image.sh, then this guest's own files on top
# (fstab, interfaces, GRUB settings, hostname, the ready marker's ordering).
# --no-preserve=ownership: the checkout may belong to any user; the guest wants root.
if [ -d "$guest_src" ]; then
    cp -R --no-preserve=ownership "$guest_src/." "$root/"
fi
cp -R --no-preserve=ownership "$vmware_src/rootfs/." "$root/"
# The address comes from /etc/network/interfaces, not from ferry.ip= on the kernel
# command line: without ferry-net in the image nobody can enable it by mistake and
# fight ifupdown over the NIC (it also expects eth0, which this guest does not have).
rm -f "$root/etc/systemd/system/ferry-net.service" "$root/usr/local/sbin/ferry-net"
mkdir -p "$root/var/lib/ledger"
# open-vm-tools' postinst enabled it already; saying so keeps that true if it ever
# stops doing it. qemu-guest-agent has no [Install]: udev starts it with its port.
chroot "$root" systemctl enable --quiet ferry-web.service ferry-ledger.service \
    ferry-ready.service open-vm-tools.service
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
# Where a grub-pc upgrade would reinstall GRUB, as the installer records it.
echo 'grub-pc grub-pc/install_devices multiselect /dev/sda' |
    chroot "$root" debconf-set-selections
# Host-only initramfs from now on, and left so in the image: the first boot rebuilds it
# on the VMware hardware. The initrd debootstrap made (MODULES=most, every storage
# driver) is the one that first boot starts with.
sed -i 's/^MODULES=.*/MODULES=dep/' "$root/etc/initramfs-tools/initramfs.conf"
grep -qx 'MODULES=dep' "$root/etc/initramfs-tools/initramfs.conf" ||
    die "could not set MODULES=dep in initramfs.conf"

# The one-shot first-boot unit (it removes itself).
install -m 0644 "$vmware_src/firstboot/ferry-vmware-firstboot.service" "$root/etc/systemd/system/"
install -m 0755 "$vmware_src/firstboot/ferry-vmware-firstboot" "$root/usr/local/sbin/"
chroot "$root" systemctl enable --quiet ferry-vmware-firstboot.service

# Every booted copy must get its own identity: an empty machine-id makes systemd
# generate one at first boot; dbus reads the same one.
: >"$root/etc/machine-id"
ln -sf /etc/machine-id "$root/var/lib/dbus/machine-id"
rm -f "$root/var/lib/systemd/random-seed"

# The kernel and initrd for the first boot, before the tree becomes a filesystem.
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"

# Only what a running guest needs: package caches and indexes, docs, translations.
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*.log \
    "$root"/var/cache/debconf/*-old "$root"/tmp/*

# --- the disk -----------------------------------------------------------------------------
log "making the disk (MBR, ext4 at 1 MiB)"
disk=$work/disk.raw
part=$work/part.raw
disk_size=$((3 * 1024 * 1024 * 1024))
part_offset=$((1024 * 1024))
# The first MiB holds the MBR and GRUB's core.img (embedded after the MBR, as grub-pc
# does on a DOS label); partition 1 takes the rest, bootable, type Linux.
truncate -s "$disk_size" "$disk"
quiet sfdisk sfdisk --quiet "$disk" <<EOF
label: dos
unit: sectors
start=$((part_offset / 512)), type=83, bootable
EOF
# No mount needed: mke2fs copies the tree itself (-d). Inode tables and journal are
# zeroed now rather than lazily by the guest kernel after boot, which would otherwise
# write in the background for minutes and show up in every dirty-block measurement.
truncate -s $((disk_size - part_offset)) "$part"
quiet mkfs.ext4 mkfs.ext4 -q -F -L ferry-root -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$root" "$part"
# Into the disk at the partition's offset; sparse keeps the unused blocks holes.
quiet dd dd if="$part" of="$disk" bs=1M seek=$((part_offset / 1024 / 1024)) \
    conv=notrunc,sparse status=none
rm -f "$part"
rm -rf --one-file-system "$root"

# --- boots on the VMware hardware --------------------------------------------------------
accel=${FERRY_QEMU_ACCEL:-tcg}
# Starts QEMU in the background on the VMware hardware with the serial console in a
# file, then waits until either the guest printed the pattern (QEMU is left running,
# the caller stops it), QEMU exited (success if it exited 0 and no pattern was asked
# for), or the timeout passed.
#   boot NAME TIMEOUT_S PATTERN QEMU_ARGS...
boot() {
    local name=$1 timeout=$2 pattern=$3
    shift 3
    local serial=$work/$name.serial qemu_err=$work/$name.qemu.log deadline rc
    : >"$serial"
    # -nodefaults: only the devices listed (no default NIC, VGA or CD-ROM); q35 brings
    # its own SATA controller, unused. The NIC's netdev is a hub port with nothing
    # else on the hub: a NIC to name and configure, but no traffic anywhere.
    qemu-system-x86_64 -accel "$accel" -m 1024 -smp 2 -nodefaults -no-reboot \
        -display none -monitor none -serial "file:$serial" \
        -drive "file=$disk_img,format=$disk_fmt,if=none,id=disk0,cache=writeback" \
        -netdev hubport,id=net0,hubid=0 \
        "${vmware_args[@]}" "$@" >"$qemu_err" 2>&1 </dev/null &
    qemu_pid=$!
    deadline=$(($(date +%s) + timeout))
    while :; do
        if [ -n "$pattern" ] && grep -qa -- "$pattern" "$serial"; then
            return 0
        fi
        if ! kill -0 "$qemu_pid" 2>/dev/null; then
            rc=0
            wait "$qemu_pid" || rc=$?
            qemu_pid=
            if [ "$rc" -ne 0 ]; then
                tail -n 40 "$serial" | sed 's/^/    /' >&2
                fail_with_log "$qemu_err" "QEMU ($name) exited with $rc"
            fi
            [ -z "$pattern" ] && return 0
            fail_with_log "$serial" "$name: QEMU exited before '$pattern' appeared"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail_with_log "$serial" "$name: no result within $timeout s"
        fi
        sleep 2
    done
}
stop_qemu() {
    [ -n "$qemu_pid" ] || return 0
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=
}

log "first boot on pvscsi/vmxnet3: GRUB, host-only initramfs (about 2 min under $accel)"
# Started by QEMU from the guest's own kernel and initrd, with the command line GRUB
# will later give it. Masked for this boot only (systemd.mask= is runtime): the test
# services, so the ledger starts empty and no ready marker is printed; vmtoolsd and
# vgauth, so they leave no logs; the random seed, so no clone inherits a saved one.
# panic=10 with -no-reboot turns a kernel panic into a QEMU exit, not a hang.
disk_img=$disk disk_fmt=raw
boot firstboot 1800 '' \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "root=$root_device ro console=ttyS0 panic=10 systemd.mask=ferry-web.service systemd.mask=ferry-ledger.service systemd.mask=ferry-ready.service systemd.mask=open-vm-tools.service systemd.mask=vgauth.service systemd.mask=systemd-random-seed.service"
# systemd puts "[time] unit[pid]: " before each line of the unit's output on the
# console: the report is what follows the marker word.
fb=$work/firstboot.serial
tr -d '\r' <"$fb" >"$fb.txt"
sed -n 's/^.*\(FERRY-FIRSTBOOT .*\)$/\1/p' "$fb.txt" >"$fb.report"
grep -qx 'FERRY-FIRSTBOOT DONE' "$fb.report" || fail_with_log "$fb.txt" "first boot did not finish"
grep -q "^FERRY-FIRSTBOOT root=$root_device " "$fb.report" ||
    fail_with_log "$fb.txt" "first boot: root is not $root_device"
# The predictable name udev gave the NIC with our MAC must be the one in
# /etc/network/interfaces, and ifupdown must have put the static address on it.
seen_nic=$(awk -v mac="$mac" '$2 == "nic" && $4 == mac { print $3 }' "$fb.report")
[ "$seen_nic" = "$nic_name" ] ||
    fail_with_log "$fb.report" "vmxnet3 NIC is named '${seen_nic:-?}' in the guest, expected $nic_name"
grep -Eq "^FERRY-FIRSTBOOT addr [0-9]+: ${nic_name}[[:space:]]+inet $ip_cidr " "$fb.report" ||
    fail_with_log "$fb.report" "ifupdown did not put $ip_cidr on $nic_name"
log "first boot done: root $root_device, NIC $seen_nic has $ip_cidr"

# --- checks from the outside --------------------------------------------------------------
# debugfs reads the partition in place (the "?offset=" of e2fsprogs' unix I/O manager).
# Files are read into variables, not piped into grep -q: with pipefail, grep quitting
# early would fail the pipeline through the writer's SIGPIPE.
fs="$disk?offset=$part_offset"
guest_file() { debugfs -R "cat $1" "$fs" 2>/dev/null; }
# GRUB's boot code in the MBR: its first sector says "GRUB".
grep -qa GRUB <(head -c 512 "$disk") || die "no GRUB boot code in the MBR"
grub_cfg=$(guest_file /boot/grub/grub.cfg)
grep -Eq "^[[:space:]]*linux[[:space:]]+/boot/vmlinuz-$kver root=$root_device .*console=ttyS0" <<<"$grub_cfg" ||
    die "grub.cfg does not boot $kver with root=$root_device console=ttyS0"
grep -qx 'MODULES=dep' <<<"$(guest_file /etc/initramfs-tools/initramfs.conf)" ||
    die "MODULES=dep is not set in the image"
grep -q "^${root_device}[[:space:]]\+/[[:space:]]" <<<"$(guest_file /etc/fstab)" ||
    die "/etc/fstab does not mount $root_device on /"
[ -z "$(guest_file /etc/machine-id)" ] || die "machine-id is not empty after the first boot"
debugfs -R "dump /boot/initrd.img-$kver $work/initrd.check" "$fs" 2>/dev/null
[ -s "$work/initrd.check" ] || die "could not read /boot/initrd.img-$kver from the image"
# Host-only means the root disk's driver and no virtio block or bus driver: on KVM's
# virtio disk this initramfs cannot find the root, which is what conversion must fix.
initrd_mods=$(lsinitramfs "$work/initrd.check" | grep -E '\.ko(\.[a-z]+)?$' | sed 's|.*/||; s|\.ko.*||' | LC_ALL=C sort)
initrd_nmods=$(grep -c . <<<"$initrd_mods")
grep -qx vmw_pvscsi <<<"$initrd_mods" || die "host-only initramfs lacks vmw_pvscsi"
for m in virtio_blk virtio_scsi virtio_pci; do
    if grep -qx "$m" <<<"$initrd_mods"; then
        die "host-only initramfs contains $m"
    fi
done
log "initramfs check: $initrd_nmods modules, vmw_pvscsi present; virtio_blk, virtio_scsi, virtio_pci absent"
rm -f "$work/initrd.check"

log "second boot from the disk alone (SeaBIOS, GRUB), on an overlay (about 1 min)"
# The boot the tests will do: no -kernel, so only the MBR and grub.cfg start the kernel
# (BOOT_IMAGE= on its command line is GRUB's mark); the agent's port is there as in the
# tests. It runs on a throwaway overlay: it starts the ledger and commits a machine-id,
# none of which belongs in the image.
qemu-img create -q -f qcow2 -F raw -b "$disk" "$work/verify.qcow2"
disk_img=$work/verify.qcow2 disk_fmt=qcow2
boot verify 900 FERRY-GUEST-READY \
    -device virtio-serial-pci -chardev "socket,id=qga0,path=$work/qga.sock,server=on,wait=off" \
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
stop_qemu
vs=$work/verify.serial
grep -qa "Command line: BOOT_IMAGE=/boot/vmlinuz-$kver root=$root_device ro console=ttyS0" "$vs" ||
    fail_with_log "$vs" "second boot was not started by GRUB with root=$root_device console=ttyS0"
rm -f "$work/verify.qcow2"
log "second boot reached FERRY-GUEST-READY"

# --- the cache entry ------------------------------------------------------------------------
quiet qemu-img qemu-img convert -f raw -O qcow2 -o compat=1.1 "$disk" "$out/disk.qcow2"
rm -f "$disk"

# qemu_args as a JSON array (no value needs escaping beyond what is written here).
qemu_json=$(printf '"%s", ' "${vmware_args[@]}")
qemu_json="[${qemu_json%, }]"
cat >"$out/manifest.json" <<JSON
{
  "key": "$key",
  "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "mirror": "$mirror",
  "disk": "disk.qcow2",
  "disk_format": "qcow2",
  "firmware": "bios",
  "partition_table": "dos",
  "root_device": "$root_device",
  "kernel": "$kver",
  "kernel_package": "linux-image-amd64 $installed_pkg",
  "append": "root=$root_device ro console=ttyS0",
  "initramfs": "host-only (MODULES=dep): vmw_pvscsi, no virtio_blk/virtio_scsi/virtio_pci",
  "nic_name": "$nic_name",
  "nic_model": "vmxnet3",
  "nic_pci_addr": "$nic_pci_addr",
  "mac": "$mac",
  "ip": "$ip_cidr",
  "gateway": "$gateway",
  "network_config": "/etc/network/interfaces (ifupdown, static)",
  "open_vm_tools": "installed and enabled; inactive under QEMU (ConditionVirtualization=vmware, systemd-detect-virt says qemu)",
  "qemu_drive_id": "disk0",
  "qemu_netdev_id": "net0",
  "qemu_args": $qemu_json
}
JSON

# Contents durable before the name appears, and the name durable after: a power cut
# leaves either no directory or a complete one.
sync "$out"/* "$out"
mv -T "$out" "$final"
sync "$vm_cache"

log "done in $(($(date +%s) - start)) s: $final ($(du -sh "$final/disk.qcow2" | cut -f1) disk)"
echo "$final"
