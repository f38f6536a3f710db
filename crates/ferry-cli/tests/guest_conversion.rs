//! A guest installed on VMware hardware — GRUB, a PVSCSI disk, a VMXNET3 NIC with a
//! static address on its predictable name, open-vm-tools, an initramfs built host-only
//! without virtio drivers (`scripts/testbed/build-vmware-guest.sh`) — does not boot on
//! KVM's virtio devices as it is; through the appliance (`ferry quickstart --guest
//! vmware`) it is synced while it writes, converted into an overlay for its test boot and
//! again for production, and keeps its address and every acknowledged record; the synced
//! disk stays unconverted, and a rollback leaves nothing converted behind.
//!
//! These need root, qemu-system-x86_64, virt-v2v and libguestfs-tools:
//! `scripts/install-deps.sh` installs them.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Guests are heavy under software emulation: one test at a time.
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn vmware_image() -> PathBuf {
    ferry_qemu::testbed::image(ferry_qemu::testbed::Guest::Vmware, false)
        .unwrap_or_else(|e| panic!("building the VMware test guest: {e}"))
}

/// The disk of `image`, under a fresh qcow2 overlay in `dir`.
fn overlay(image: &Path, dir: &Path) -> PathBuf {
    let disk = dir.join("disk0.qcow2");
    succeed(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.join("disk.qcow2"))
            .arg(&disk),
    );
    disk
}

#[test]
fn a_vmware_guest_does_not_boot_on_virtio_unconverted() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let image = vmware_image();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(&image, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let accel = ferry_qemu::detect_accel().await;
        let run = dir.path().join("run");
        let mut spec = ferry_qemu::VmSpec::new("vmw-on-virtio", &run, accel);
        spec.hardware = ferry_qemu::Hardware::Virtio;
        spec.disks = vec![ferry_qemu::VmDisk {
            path: disk,
            format: "qcow2".into(),
            node_name: "disk0".into(),
            read_only: false,
        }];
        let vm = ferry_qemu::Vm::launch(&spec).await.unwrap();
        // Debian's initramfs looks for the root device for a while, then gives up into
        // its emergency shell; the service marker must never come.
        let r = vm
            .wait_serial("Gave up waiting for root", Duration::from_secs(420))
            .await;
        let log = std::fs::read_to_string(vm.serial_log()).unwrap_or_default();
        let _ = vm.kill().await;
        assert!(
            r.is_ok(),
            "the unconverted guest did not stop at its root device: {r:?}\n{log}"
        );
        assert!(!log.contains("FERRY-GUEST-READY"), "{log}");
        println!(
            "on virtio without conversion: {}",
            r.unwrap().lines().last().unwrap_or("")
        );
    });
}

fn quickstart(dir: &Path, extra: &[&str]) -> (std::process::Output, String) {
    let out = ferry()
        .args([
            "quickstart",
            "--guest",
            "vmware",
            "--data-dir",
            dir.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

/// Cleans up what a kept quickstart left running, even when the test fails.
struct Kept<'a>(&'a Path);
impl Drop for Kept<'_> {
    fn drop(&mut self) {
        let _ = ferry()
            .args([
                "quickstart",
                "--clean",
                "--data-dir",
                self.0.to_str().unwrap(),
            ])
            .output();
    }
}

fn after<'a>(text: &'a str, prefix: &str) -> &'a str {
    let i = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    &text[i + prefix.len()..]
}

fn word_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    after(text, prefix).split_whitespace().next().unwrap()
}

/// The migration's synced disk and its directory on the local target.
fn synced_disk(data: &Path) -> PathBuf {
    let target = data.join("target");
    for e in std::fs::read_dir(&target).unwrap().flatten() {
        let d = e.path().join("disk0.qcow2");
        if d.is_file() {
            return d;
        }
    }
    panic!("no synced disk under {}", target.display())
}

/// Whether `path` exists in the guest on `disk` (read-only, its format stated).
fn guest_has(disk: &Path, path: &str) -> bool {
    let out = succeed(
        std::process::Command::new("guestfish")
            .env("LIBGUESTFS_BACKEND", "direct")
            .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
            .args(["--ro", "--format=qcow2", "-a"])
            .arg(disk)
            .args(["-i", "exists", path]),
    );
    out.trim() == "true"
}

#[test]
fn a_vmware_guest_is_converted_migrated_and_rolled_back() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let _kept = Kept(dir.path());
    let (out, stdout) = quickstart(dir.path(), &["--keep"]);
    assert!(
        out.status.success(),
        "quickstart --guest vmware failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    // Synced while it wrote: a full sync, two deltas, and one after the UAT.
    assert_eq!(stdout.matches("generation ").count(), 4, "{stdout}");
    // The test boot and the production boot were each converted, and each passed.
    assert!(stdout.contains("uat boot: converted Debian 12"), "{stdout}");
    assert!(
        stdout.contains("production boot: converted Debian"),
        "{stdout}"
    );
    assert!(stdout.contains("UAT validation passed"), "{stdout}");
    assert!(stdout.contains("NIC names kept: enp"), "{stdout}");
    for check in [
        "target: open-vm-tools removed",
        "target: virtio_blk in the initramfs it booted",
        "target: its disk on virtio",
        "target: its NIC keeps its name",
    ] {
        assert!(stdout.contains(check), "{check}:\n{stdout}");
    }
    assert!(
        stdout.contains("    conversion "),
        "downtime has a conversion phase:\n{stdout}"
    );
    // The target answers on the source's static address.
    let ns = word_after(&stdout, "ip netns exec ");
    let body = ferry_net::http_get(ns, "http://10.200.1.10/", Duration::from_secs(10))
        .unwrap()
        .body_text();
    assert!(body.contains("ferry test guest"), "{body}");

    // The synced generation was never converted: VMware's tools are still in it.
    let synced = synced_disk(dir.path());
    let boot = synced.parent().unwrap().join("boot");
    assert!(
        boot.join("disk0.qcow2").is_file(),
        "production boots an overlay"
    );
    assert!(
        guest_has(&synced, "/usr/bin/vmtoolsd"),
        "the synced disk was converted"
    );

    // Rollback: the overlays go, the synced disk stays, the source comes back.
    let url = word_after(&stdout, "--url ");
    let token = std::fs::read_to_string(dir.path().join("appliance/admin-token")).unwrap();
    ok(&[
        "migration",
        "rollback",
        "web",
        "--follow",
        "--url",
        url,
        "--token",
        token.trim(),
    ]);
    let st = json(&ok(&[
        "migration",
        "show",
        "web",
        "--json",
        "--url",
        url,
        "--token",
        token.trim(),
    ]));
    assert_eq!(st["migration"]["status"]["state"], "rolled_back", "{st}");
    assert!(
        !boot.exists(),
        "the converted overlays outlived the rollback"
    );
    assert!(synced.is_file());
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        match ferry_net::http_get(ns, "http://10.200.1.10/", Duration::from_secs(3)) {
            Ok(r) if r.status == 200 => break,
            other if std::time::Instant::now() > deadline => {
                panic!("the source did not come back after the rollback: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}
