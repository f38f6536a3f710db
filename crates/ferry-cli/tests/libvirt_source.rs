//! A libvirt domain through the appliance to a `local_dir` target, cut over and rolled
//! back: discovery, a full sync through a pull-mode backup, a delta through a checkpoint,
//! cutover (the domain shut down, a last delta read from its powered-off qcow2 images,
//! validation comparing each qcow2 disk with its raw copy), rollback (the domain runs
//! again). The domain boots no OS: what is tested is the disks' path, not a guest's.
//!
//! Needs root and libvirtd on `$FERRY_TEST_LIBVIRT` (scripts/test.sh starts it); without
//! libvirt it prints SKIP and passes.

mod common;
mod cp;

use cp::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn virsh(uri: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Undefines the domain and removes its files, also when the test fails.
struct Domain {
    uri: String,
    name: String,
    dir: PathBuf,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&self.uri, &["destroy", &self.name]);
        let _ = virsh(
            &self.uri,
            &["undefine", &self.name, "--checkpoints-metadata"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `len` bytes of a pattern at `offset` of the qcow2 image `image` (the domain
/// must be off).
fn write_qcow2(image: &Path, offset: u64, len: usize) {
    common::qemu_io("qcow2", image, &format!("write -P 0x5a {offset} {len}"));
}

fn same(src: &Path, dst: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(src)
        .arg(dst)
        .output()
        .unwrap()
        .status
        .success()
}

fn find_image(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_image(&p) {
                return Some(f);
            }
        } else if p.extension().is_some_and(|x| x == "img") {
            return Some(p);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_domain_cuts_over_to_local_dir_and_rolls_back() {
    let uri = std::env::var("FERRY_TEST_LIBVIRT").unwrap_or_else(|_| "qemu:///system".into());
    if let Err(e) = virsh(&uri, &["version"]) {
        if std::env::var("FERRY_TEST_LIBVIRT").is_ok() {
            panic!("FERRY_TEST_LIBVIRT={uri} is set but libvirt does not answer: {e}");
        }
        note("SKIP: libvirt does not answer (scripts/start-libvirt.sh starts it)");
        return;
    }
    let name = format!("ferry-lvcut-{}", std::process::id());
    // QEMU runs as libvirt's user: the domain's files go where that user may read them.
    let dir = PathBuf::from(format!("/var/lib/libvirt/images/{name}"));
    let dom = Domain {
        uri: uri.clone(),
        name: name.clone(),
        dir: dir.clone(),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.qcow2");
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1",
        disk.to_str().unwrap(),
        "64M",
    ]);
    write_qcow2(&disk, 1 << 20, 3 << 20);
    // No OS: the firmware finds nothing to boot and waits; the disks are what matter.
    let xml = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{}'/><target dev='vda' bus='virtio'/></disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>",
        disk.display()
    );
    let x = dir.join("domain.xml");
    std::fs::write(&x, xml).unwrap();
    virsh(&uri, &["define", x.to_str().unwrap()]).unwrap();
    virsh(&uri, &["start", &name]).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("appliance"), &[], None);
    // A domain without an OS ignores the power button: destroyed after 2 s.
    let config =
        json!({"libvirt": uri, "scratch_dir": dir.join("scratch"), "shutdown_timeout_s": 2})
            .to_string();
    app.ok(&["source", "add", "lv", "--kind", "kvm", "--config", &config]);
    let out = app.ok(&["source", "discover", "lv", "--json"]);
    assert!(out.contains(&name), "{out}");
    let api = app.client();
    api.ok("/api/targets", Some(json!({"name": "lab", "kind": "local_dir", "config": {"path": tmp.path().join("target")}}))).await;
    api.ok("/api/profiles", Some(json!({"name": "p", "target": "lab"})))
        .await;

    let out = app.ferry(&[
        "migration",
        "start",
        &name,
        "--profile",
        "p",
        "--follow",
        "--json",
    ]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "start: {}\n{m}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["status"]["state"], "synced", "{m}");
    let target = find_image(&tmp.path().join("target")).expect("a target disk");
    app.ok(&["migration", "sync", &id, "--follow"]);

    let t = std::time::Instant::now();
    let out = app.ferry(&["migration", "cutover", &id, "--follow"]);
    let cutover_s = t.elapsed().as_secs_f64();
    let st = app.ok(&["migration", "status", &id, "--json"]);
    assert!(
        out.status.success(),
        "cutover: {}\n{st}\n{}",
        String::from_utf8_lossy(&out.stderr),
        app.ok(&["migration", "logs", &id])
    );
    assert!(st.contains("\"completed\""), "{st}");
    assert_eq!(
        virsh(&uri, &["domstate", &name]).unwrap().trim(),
        "shut off"
    );
    assert!(
        same(&disk, &target),
        "the raw copy differs from the qcow2 source"
    );
    let events = app.ok(&["migration", "events", &id]);
    assert!(
        events.contains("destroying"),
        "the forced power-off is a warning of the migration: {events}"
    );

    // What changed while the domain was off stays on the source: a rollback starts it
    // again and leaves the synced copy as it was.
    write_qcow2(&disk, 40 << 20, 4096);
    app.ok(&["migration", "rollback", &id, "--follow"]);
    let st = app.ok(&["migration", "status", &id, "--json"]);
    assert!(st.contains("\"rolled_back\""), "{st}");
    assert_eq!(virsh(&uri, &["domstate", &name]).unwrap().trim(), "running");
    note(&format!(
        "libvirt → local_dir: cutover {cutover_s:.1} s (2 s of it the forced power-off)"
    ));
    drop(dom);
}
