//! The KVM source against a real libvirt: a Debian guest defined as a libvirt domain
//! (software emulation), discovered, then synced through pull-mode backups with
//! checkpoints: a full copy, deltas that read only the checkpoint's dirty bitmap, a sync
//! that never commits (its changes must reach the next one), an appliance that vanished
//! mid-sync, and the shutdown / offline read / restart of cutover and rollback.
//!
//! Needs root, libvirtd answering on `$FERRY_TEST_LIBVIRT` (scripts/test.sh starts it;
//! qemu:///system is tried otherwise) and the guest image recipe's tools. Without libvirt
//! the test prints SKIP and passes.

use ferry_adapter::{SourceAdapter, SourceDisk, StepContext};
use ferry_model::{Source, SourceKind, Workload};
use ferry_replication::{Mode, Progress, SendOptions};
use ferry_source_kvm::KvmSource;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

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

fn libvirt_uri() -> Option<String> {
    let uri = std::env::var("FERRY_TEST_LIBVIRT").unwrap_or_else(|_| "qemu:///system".into());
    match virsh(&uri, &["version"]) {
        Ok(_) => Some(uri),
        Err(e) if std::env::var("FERRY_TEST_LIBVIRT").is_ok() => {
            panic!("FERRY_TEST_LIBVIRT={uri} is set but libvirt does not answer: {e}")
        }
        Err(_) => None,
    }
}

/// Undefines the domain and removes its files, also when the test fails.
struct Domain {
    uri: String,
    name: String,
    dirs: Vec<PathBuf>,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&self.uri, &["destroy", &self.name]);
        let _ = virsh(
            &self.uri,
            &["undefine", &self.name, "--checkpoints-metadata", "--nvram"],
        );
        let _ = virsh(
            &self.uri,
            &["undefine", &self.name, "--checkpoints-metadata"],
        );
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn define_domain(uri: &str, name: &str) -> Domain {
    let image = ferry_qemu::testbed::guest_image(false).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    // QEMU runs as libvirt's user: the guest's files go where that user may read them,
    // as copies (libvirt relabels a disk's whole backing chain, the cache must stay as is).
    let dir = PathBuf::from(format!("/var/lib/libvirt/images/{name}"));
    let scratch = PathBuf::from(format!("/var/lib/libvirt/{name}-scratch"));
    let d = Domain {
        uri: uri.into(),
        name: name.into(),
        dirs: vec![dir.clone(), scratch],
    };
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        std::fs::copy(image.join(f), dir.join(f)).unwrap();
    }
    // A second, blank data disk: one backup covers both at the same instant.
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.join("data.qcow2"))
        .arg("256M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let xml = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel><initrd>{dir}/initrd.img</initrd>
    <cmdline>{append}</cmdline></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{dir}/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{dir}/data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='{dir}/serial.log'/></serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>",
        dir = dir.display(),
        append = manifest["append"].as_str().unwrap(),
    );
    let x = dir.join("domain.xml");
    std::fs::write(&x, xml).unwrap();
    virsh(uri, &["define", x.to_str().unwrap()]).unwrap();
    virsh(uri, &["start", name]).unwrap();
    d
}

fn context(source: &Source, workload: Workload, work_dir: &Path, migration: Uuid) -> StepContext {
    StepContext::standalone(
        Some(source.clone()),
        workload,
        work_dir.to_path_buf(),
        migration,
    )
}

async fn sync(src: &SourceDisk, dst: &Path) -> ferry_replication::SyncReport {
    let disk = ferry_disk::open(
        &src.spec,
        &ferry_disk::OpenOptions {
            format: src.format.clone(),
            dirty_bitmap: src.dirty_bitmap.clone(),
            changed_areas: None,
        },
    )
    .await
    .unwrap();
    let opts = SendOptions {
        mode: if src.dirty_bitmap.is_some() {
            Mode::DirtyBitmap
        } else {
            Mode::HashCompare
        },
        compress: false,
        ..SendOptions::default()
    };
    ferry_replication::sync_local(&disk, dst, &opts, Arc::new(Progress::default()))
        .await
        .unwrap()
}

/// A file's contents in the ext4 file system of a raw image (`debugfs`, read-only).
fn file_in_image(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Writes marker `n` into a file on the system disk and into block `n` of the data disk.
async fn write_marker(src: &KvmSource, ctx: &StepContext, n: u32) {
    src.guest_command(
        ctx,
        &format!(
            "echo marker-{n} > /root/marker{n} && printf 'data-marker-{n}' | dd of=/dev/vdb bs=4096 seek={n} conv=notrunc,fsync 2>/dev/null && sync"
        ),
    )
    .await
    .unwrap();
}

/// Block `n` of a raw data-disk image, as written by `write_marker`.
fn data_marker(image: &Path, n: u64) -> String {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 13];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut b, n * 4096)
        .unwrap();
    String::from_utf8_lossy(&b).into_owned()
}

fn ferry_checkpoints(uri: &str, name: &str) -> Vec<String> {
    virsh(uri, &["checkpoint-list", name, "--name"])
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| l.starts_with("ferry-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_domain_is_discovered_synced_through_checkpoints_and_shut_down() {
    let Some(uri) = libvirt_uri() else {
        eprintln!("SKIP: libvirt does not answer (scripts/start-libvirt.sh starts it)");
        return;
    };
    let name = format!("ferry-lv-{}", std::process::id());
    let dom = define_domain(&uri, &name);
    let work = tempfile::tempdir().unwrap();
    let dst = work.path().join("target.raw");
    let dst_data = work.path().join("data.raw");
    let source = Source {
        id: Uuid::new_v4(),
        name: "kvm-host".into(),
        kind: SourceKind::Kvm,
        endpoint: None,
        credential_id: None,
        config: json!({"libvirt": uri, "scratch_dir": dom.dirs[1]}),
        created_at: 0,
    };
    let adapter = KvmSource::default();

    // The agent answers once the guest has booted.
    let t = Instant::now();
    ferry_qemu::Qga::connect_libvirt(&uri, &name, Duration::from_secs(180))
        .await
        .expect("the guest agent answers through libvirt");
    eprintln!("guest up in {:.1}s", t.elapsed().as_secs_f64());

    // Discovery: the domain, its disk and hardware, and what the agent knows.
    let found = adapter
        .discover(&source, &Default::default())
        .await
        .unwrap();
    let w = found
        .into_iter()
        .find(|w| w.name == name)
        .expect("the domain is discovered");
    assert_eq!(w.cpus, Some(1));
    assert_eq!(w.memory_mib, Some(512));
    assert_eq!(w.disks.len(), 2);
    assert_eq!(w.disks[0].name, "vda");
    assert_eq!(w.disks[0].size_bytes, 2 << 30);
    assert_eq!(w.disks[1].name, "vdb");
    assert_eq!(w.disks[1].size_bytes, 256 << 20);
    assert!(
        w.os.as_deref().unwrap_or("").contains("Debian"),
        "OS from the agent: {:?}",
        w.os
    );
    let workload = Workload {
        id: Uuid::new_v4(),
        name: w.name,
        source_id: w.source_id,
        os: w.os,
        cpus: w.cpus,
        memory_mib: w.memory_mib,
        disks: w.disks,
        nics: w.nics,
        services: vec![],
        hardware: None,
        move_group_id: None,
        group_order: 0,
        credential_id: None,
        agent: false,
        domain: None,
        assigned_email: None,
        cloud_sizing: None,
        target_migration_date: None,
        tags: vec![],
        created_at: 0,
    };
    let ctx = context(&source, workload, work.path(), Uuid::new_v4());
    adapter.preflight(&ctx).await.unwrap();

    // Full copy through a backup that also creates the first checkpoint.
    write_marker(&adapter, &ctx, 1).await;
    let disks = adapter.open_disks(&ctx, true).await.unwrap();
    assert_eq!(disks.len(), 2);
    assert!(
        disks[0].spec.starts_with("nbd+unix:///"),
        "{}",
        disks[0].spec
    );
    assert_eq!(disks[0].dirty_bitmap, None);
    let r = sync(&disks[0], &dst).await;
    sync(&disks[1], &dst_data).await;
    adapter.close_disks(&ctx, &disks, true).await.unwrap();
    eprintln!("full: read {} bytes in {:.2}s", r.bytes_read, r.duration_s);
    assert_eq!(file_in_image(&dst, "/root/marker1"), "marker-1");
    assert_eq!(data_marker(&dst_data, 1), "data-marker-1");
    assert_eq!(ferry_checkpoints(&uri, &name).len(), 1);

    // A delta reads only the checkpoint's dirty bitmap.
    write_marker(&adapter, &ctx, 2).await;
    let disks = adapter.open_disks(&ctx, false).await.unwrap();
    assert_eq!(disks[0].dirty_bitmap.as_deref(), Some("backup-vda"));
    assert_eq!(disks[1].dirty_bitmap.as_deref(), Some("backup-vdb"));
    let r = sync(&disks[0], &dst).await;
    sync(&disks[1], &dst_data).await;
    adapter.close_disks(&ctx, &disks, true).await.unwrap();
    eprintln!(
        "delta: read {} bytes, {} chunks changed",
        r.bytes_read, r.chunks_changed
    );
    assert!(
        r.bytes_read < 64 << 20,
        "a delta read {} bytes",
        r.bytes_read
    );
    assert_eq!(file_in_image(&dst, "/root/marker2"), "marker-2");
    assert_eq!(data_marker(&dst_data, 2), "data-marker-2");
    assert_eq!(ferry_checkpoints(&uri, &name).len(), 1);

    // A sync that never commits: its changes reach the next delta.
    write_marker(&adapter, &ctx, 3).await;
    let disks = adapter.open_disks(&ctx, false).await.unwrap();
    adapter.close_disks(&ctx, &disks, false).await.unwrap();
    write_marker(&adapter, &ctx, 4).await;
    let disks = adapter.open_disks(&ctx, false).await.unwrap();
    sync(&disks[0], &dst).await;
    sync(&disks[1], &dst_data).await;
    adapter.close_disks(&ctx, &disks, true).await.unwrap();
    assert_eq!(file_in_image(&dst, "/root/marker3"), "marker-3");
    assert_eq!(data_marker(&dst_data, 3), "data-marker-3");
    assert_eq!(file_in_image(&dst, "/root/marker4"), "marker-4");
    assert_eq!(data_marker(&dst_data, 4), "data-marker-4");

    // The appliance vanishes with a backup job open: a new one cleans up, loses nothing.
    let gone = KvmSource::default();
    write_marker(&gone, &ctx, 5).await;
    let _ = gone.open_disks(&ctx, false).await.unwrap();
    drop(gone);
    assert!(
        virsh(&uri, &["backup-dumpxml", &name]).is_ok(),
        "the job is still open"
    );
    write_marker(&adapter, &ctx, 6).await;
    let disks = adapter.open_disks(&ctx, false).await.unwrap();
    sync(&disks[0], &dst).await;
    sync(&disks[1], &dst_data).await;
    adapter.close_disks(&ctx, &disks, true).await.unwrap();
    assert_eq!(file_in_image(&dst, "/root/marker5"), "marker-5");
    assert_eq!(data_marker(&dst_data, 5), "data-marker-5");
    assert_eq!(file_in_image(&dst, "/root/marker6"), "marker-6");
    assert_eq!(data_marker(&dst_data, 6), "data-marker-6");
    assert_eq!(ferry_checkpoints(&uri, &name).len(), 1);
    assert!(
        virsh(&uri, &["backup-dumpxml", &name]).is_err(),
        "no job left"
    );

    // Cutover: shut down, read the quiescent image; rollback: start again.
    adapter.shutdown(&ctx).await.unwrap();
    assert_eq!(
        virsh(&uri, &["domstate", &name]).unwrap().trim(),
        "shut off"
    );
    let disks = adapter.open_disks(&ctx, false).await.unwrap();
    assert_eq!(disks[0].format.as_deref(), Some("qcow2"));
    assert_eq!(disks[0].dirty_bitmap, None);
    sync(&disks[0], &dst).await;
    sync(&disks[1], &dst_data).await;
    adapter.close_disks(&ctx, &disks, true).await.unwrap();
    for (d, t) in [(&disks[0], &dst), (&disks[1], &dst_data)] {
        let img = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&d.spec)
            .arg(t)
            .output()
            .unwrap();
        assert!(
            img.status.success(),
            "the target equals the powered-off source: {}",
            String::from_utf8_lossy(&img.stdout)
        );
    }
    adapter.restart(&ctx).await.unwrap();
    assert_eq!(virsh(&uri, &["domstate", &name]).unwrap().trim(), "running");
    ferry_qemu::Qga::connect_libvirt(&uri, &name, Duration::from_secs(180))
        .await
        .expect("the restarted guest answers");
    let out = adapter
        .guest_command(&ctx, "cat /root/marker6")
        .await
        .unwrap();
    assert_eq!(out.trim(), "marker-6");
    drop(dom);
}
