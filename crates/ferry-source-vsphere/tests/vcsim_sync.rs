//! The vSphere source adapter against govmomi's simulator behind the project's launcher
//! (scripts/testbed/vcsim/: real snapshot change ids, QueryChangedDiskAreas answered from
//! the datastore files, guest process operations, sessions that expire, outages).
//!
//! One VM's disk is a real 64 MiB flat extent in the simulator's datastore directory; the
//! test writes into it as a guest would, and checks after every sync that the target
//! equals it byte for byte, that a delta reads only what CBT listed, and that no snapshot
//! is ever left behind, whatever failed.

use ferry_adapter::{
    SourceAdapter, SourceDisk, StepContext, GUEST_PASSWORD, GUEST_USERNAME, SOURCE_PASSWORD,
    SOURCE_USERNAME,
};
use ferry_model::{Source, SourceKind, Workload};
use ferry_replication::{Mode, Progress, SendOptions, SyncReport};
use ferry_source_vsphere::VsphereSource;
use ferry_vsphere::vcsim::Vcsim;
use ferry_vsphere::{Client, ClientOptions};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const VM: &str = "DC0_H0_VM0";
const NO_TOOLS: &str = "DC0_H0_VM1";
const MIB: u64 = 1 << 20;

struct Lab {
    sim: Vcsim,
    ca: PathBuf,
    source: Source,
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

fn lab() -> Option<Lab> {
    let bin = match Vcsim::build() {
        Ok(b) => b,
        Err(e) if std::env::var("FERRY_TEST_VCSIM").is_ok() => panic!("building vcsim: {e}"),
        Err(e) => {
            eprintln!("SKIP: vcsim cannot be built here: {e}");
            return None;
        }
    };
    if std::process::Command::new("nbdkit")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("FERRY_TEST_VCSIM").is_err(),
            "nbdkit is missing (scripts/install-deps.sh installs it)"
        );
        eprintln!("SKIP: nbdkit is not installed");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let ca = ferry_pki::CaDir::new(dir.join("pki"));
    ca.init("ferry-test-ca").unwrap();
    ca.issue("vcsim", &["127.0.0.1".to_string()]).unwrap();
    let key = dir.join("vcsim.key");
    ca.export_key("vcsim", &key).unwrap();
    let log = dir.join("guest.log");
    let sim = Vcsim::start_with(
        &bin,
        &ca.cert_path("vcsim"),
        &key,
        &dir,
        &[
            "--disk-mib",
            "64",
            "--guest-log",
            log.to_str().unwrap(),
            "--no-tools",
            NO_TOOLS,
        ],
    )
    .unwrap();
    let source = Source {
        id: uuid::Uuid::new_v4(),
        name: "vc1".into(),
        kind: SourceKind::Vsphere,
        endpoint: Some(sim.url().to_string()),
        credential_id: None,
        config: json!({"ca_bundle": ca.ca_cert_path(), "shutdown_timeout_s": 20}),
        created_at: 0,
    };
    Some(Lab {
        ca: ca.ca_cert_path(),
        sim,
        source,
        _dir: tmp,
        dir,
    })
}

impl Lab {
    fn ctx(&self, vm: &str, migration: uuid::Uuid) -> StepContext {
        let w = Workload {
            id: uuid::Uuid::new_v4(),
            name: vm.into(),
            source_id: Some(self.source.id),
            os: None,
            cpus: None,
            memory_mib: None,
            disks: vec![],
            nics: vec![],
            services: vec![],
            hardware: Some("vmware".into()),
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
        let mut c = StepContext::standalone(
            Some(self.source.clone()),
            w,
            self.dir.join("work"),
            migration,
        );
        for (k, v) in [
            (SOURCE_USERNAME, self.sim.username()),
            (SOURCE_PASSWORD, self.sim.password()),
            (GUEST_USERNAME, "root"),
            (GUEST_PASSWORD, "Ferry-guest-1!"),
        ] {
            c.secrets.0.insert(k.into(), v.into());
        }
        c
    }

    fn flat(&self, vm: &str) -> PathBuf {
        self.sim
            .datastore_dir("LocalDS_0")
            .unwrap()
            .join(vm)
            .join("disk1-flat.vmdk")
    }

    /// Writes as the guest would: straight into the VM's flat extent.
    fn write(&self, vm: &str, offset: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.flat(vm))
            .unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }

    async fn client(&self) -> Client {
        let mut o = ClientOptions::new(self.sim.url());
        o.ca_bundle = Some(self.ca.clone());
        let c = Client::connect(&o).await.unwrap();
        c.login(self.sim.username(), self.sim.password())
            .await
            .unwrap();
        c
    }

    async fn snapshots(&self, vm: &str) -> Vec<String> {
        let c = self.client().await;
        let inv = c.inventory().await.unwrap();
        let moref = inv.vms.iter().find(|v| v.name == vm).unwrap().moref.clone();
        let s = c.snapshots(&moref).await.unwrap();
        let _ = c.logout().await;
        s.into_iter().map(|(_, n)| n).collect()
    }

    async fn power(&self, vm: &str) -> String {
        let c = self.client().await;
        let inv = c.inventory().await.unwrap();
        let _ = c.logout().await;
        inv.vms
            .iter()
            .find(|v| v.name == vm)
            .unwrap()
            .power_state
            .clone()
    }

    async fn admin(&self, what: &str) {
        self.sim.admin(&self.ca, what).await.unwrap();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn sync(src: &SourceDisk, dst: &Path) -> SyncReport {
    let disk = ferry_disk::open(
        &src.spec,
        &ferry_disk::OpenOptions {
            format: src.format.clone(),
            dirty_bitmap: None,
            changed_areas: src.changed_areas.clone(),
        },
    )
    .await
    .unwrap();
    let opts = SendOptions {
        mode: if src.changed_areas.is_some() {
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

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_cbt_deltas_and_failures_against_vcsim() {
    let Some(lab) = lab() else { return };
    let a = VsphereSource::default();
    let m = uuid::Uuid::new_v4();
    let ctx = lab.ctx(VM, m);
    let dst = lab.dir.join("target").join("disk1.img");
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();

    // Wrong password: named as such.
    let mut bad = lab.ctx(VM, m);
    bad.secrets.0.insert(SOURCE_PASSWORD.into(), "nope".into());
    let e = a.preflight(&bad).await.unwrap_err();
    assert!(e.message.contains("refused the login"), "{}", e.message);

    // Pre-flight: CBT is off, and the fix is named; Ferry's fix turns it on.
    let e = a.preflight(&ctx).await.unwrap_err();
    assert!(
        e.message.contains("changed block tracking is off")
            && e.message.contains("ferry source fix"),
        "{}",
        e.message
    );
    let done = a
        .fix(&lab.source, &ctx.secrets, "enable-cbt", &[VM.to_string()])
        .await
        .unwrap();
    assert_eq!(done, vec![format!("{VM}: changed block tracking enabled")]);
    a.preflight(&ctx).await.unwrap();
    assert!(
        lab.snapshots(VM).await.is_empty(),
        "the CBT cycle's snapshot stayed"
    );

    // The guest's data: 8 MiB of pattern, a few scattered blocks; the rest never written.
    lab.write(VM, 4 * MIB, &pattern(1, 8 * MIB as usize));
    lab.write(VM, 40 * MIB + 12_345, &pattern(2, 70_000));
    lab.write(VM, 63 * MIB, &pattern(3, 4096));

    // Full sync: a snapshot while it runs, none after; the target equals the disk.
    let t = std::time::Instant::now();
    let disks = a.open_disks(&ctx, true).await.unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].size_bytes, 64 * MIB);
    assert_eq!(disks[0].changed_areas, None);
    let snaps = lab.snapshots(VM).await;
    assert!(
        snaps.len() == 1 && snaps[0].starts_with("ferry-sync"),
        "{snaps:?}"
    );
    let full = sync(&disks[0], &dst).await;
    a.close_disks(&ctx, &disks, true).await.unwrap();
    let full_s = t.elapsed().as_secs_f64();
    assert!(same(&dst, &lab.flat(VM)));
    assert!(lab.snapshots(VM).await.is_empty());

    // A delta: exactly the changed 64 KiB blocks are listed, and only they are read.
    lab.write(VM, 4 * MIB + 100, b"changed");
    lab.write(VM, 20 * MIB, &pattern(4, 200_000));
    lab.write(VM, 50 * MIB + 65_530, b"straddles two blocks");
    let t = std::time::Instant::now();
    let disks = a.open_disks(&ctx, false).await.unwrap();
    let areas = disks[0].changed_areas.clone().expect("a CBT delta");
    let listed: u64 = areas.iter().map(|a| a.1).sum();
    // 1 block + ceil(200000/65536)=4 blocks (aligned start) + 2 blocks.
    assert_eq!(listed, 7 * 65_536, "{areas:?}");
    let delta = sync(&disks[0], &dst).await;
    a.close_disks(&ctx, &disks, true).await.unwrap();
    let delta_s = t.elapsed().as_secs_f64();
    assert!(same(&dst, &lab.flat(VM)));
    assert!(
        delta.bytes_read <= listed + 2 * delta.chunk_size as u64,
        "read {} for {listed} listed",
        delta.bytes_read
    );

    // A sync that never commits: its snapshot goes, and its changes come with the next.
    lab.write(VM, 30 * MIB, b"first");
    let disks = a.open_disks(&ctx, false).await.unwrap();
    a.close_disks(&ctx, &disks, false).await.unwrap();
    assert!(lab.snapshots(VM).await.is_empty());
    lab.write(VM, 31 * MIB, b"second");
    let disks = a.open_disks(&ctx, false).await.unwrap();
    assert_eq!(
        disks[0].changed_areas.as_ref().unwrap().len(),
        2,
        "{:?}",
        disks[0].changed_areas
    );
    sync(&disks[0], &dst).await;
    a.close_disks(&ctx, &disks, true).await.unwrap();
    assert!(same(&dst, &lab.flat(VM)));

    // The datastore fails while the disks are opened: an error, and no snapshot left.
    lab.admin("/ferry/datastore-fail?ms=3000").await;
    let e = a.open_disks(&ctx, false).await.unwrap_err();
    assert!(
        e.message.contains("datastore") || e.message.contains("reach"),
        "{}",
        e.message
    );
    assert!(lab.snapshots(VM).await.is_empty());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    // The session expires during a sync: renewed, the snapshot still goes.
    lab.write(VM, 32 * MIB, b"third");
    let disks = a.open_disks(&ctx, false).await.unwrap();
    lab.admin("/ferry/expire-sessions").await;
    sync(&disks[0], &dst).await;
    a.close_disks(&ctx, &disks, true).await.unwrap();
    assert!(lab.snapshots(VM).await.is_empty());
    assert!(same(&dst, &lab.flat(VM)));

    // vCenter unreachable at the end of a sync: a clear error; the snapshot left behind
    // is removed by the next pre-flight.
    let disks = a.open_disks(&ctx, false).await.unwrap();
    lab.admin("/ferry/outage?ms=2500").await;
    let e = a.close_disks(&ctx, &disks, false).await.unwrap_err();
    assert!(
        e.message.contains("cannot reach")
            && e.message.contains("next sync or pre-flight removes it"),
        "{}",
        e.message
    );
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    assert_eq!(lab.snapshots(VM).await.len(), 1);
    a.preflight(&ctx).await.unwrap();
    assert!(lab.snapshots(VM).await.is_empty());

    // CBT reset: the change id is refused, the delta compares hashes and stays exact.
    lab.admin(&format!("/ferry/reset-cbt?vm={VM}")).await;
    lab.write(VM, 33 * MIB, b"after the reset");
    let disks = a.open_disks(&ctx, false).await.unwrap();
    assert_eq!(disks[0].changed_areas, None);
    let reset = sync(&disks[0], &dst).await;
    a.close_disks(&ctx, &disks, true).await.unwrap();
    assert!(same(&dst, &lab.flat(VM)));
    assert!(reset.bytes_scanned >= 8 * MIB, "{reset:?}");

    eprintln!(
        "vsphere sync: full {} MiB read in {full_s:.2} s (open+sync+close); CBT delta: {} KiB listed, {} KiB read, {delta_s:.2} s; after a CBT reset: {} MiB scanned",
        full.bytes_read / MIB,
        listed / 1024,
        delta.bytes_read / 1024,
        reset.bytes_scanned / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_stops_services_shuts_down_and_rollback_powers_on() {
    let Some(lab) = lab() else { return };
    let a = VsphereSource::default();
    let ctx = lab.ctx(VM, uuid::Uuid::new_v4());

    a.stop_services(&ctx, &["nginx".into(), "postgresql".into()])
        .await
        .unwrap();
    let log = std::fs::read_to_string(lab.dir.join("guest.log")).unwrap();
    assert!(
        log.contains(r#""arguments":"stop nginx","exit":0"#),
        "{log}"
    );
    assert!(
        log.contains(r#""arguments":"stop postgresql","exit":0"#),
        "{log}"
    );
    let e = a.stop_services(&ctx, &["nosuch".into()]).await.unwrap_err();
    assert!(e.message.contains("exited with 5"), "{}", e.message);

    let mut wrong = lab.ctx(VM, uuid::Uuid::new_v4());
    wrong.secrets.0.insert(GUEST_PASSWORD.into(), "nope".into());
    let e = a
        .stop_services(&wrong, &["nginx".into()])
        .await
        .unwrap_err();
    assert!(
        e.message.contains("refused the guest account"),
        "{}",
        e.message
    );

    let e = a
        .stop_services(&lab.ctx(NO_TOOLS, uuid::Uuid::new_v4()), &["nginx".into()])
        .await
        .unwrap_err();
    assert!(
        e.message.contains("VMware Tools are not running"),
        "{}",
        e.message
    );

    a.shutdown(&ctx).await.unwrap();
    assert_eq!(lab.power(VM).await, "poweredOff");
    // Without Tools, shutdown powers off.
    a.shutdown(&lab.ctx(NO_TOOLS, uuid::Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(lab.power(NO_TOOLS).await, "poweredOff");
    a.restart(&ctx).await.unwrap();
    assert_eq!(lab.power(VM).await, "poweredOn");
}
