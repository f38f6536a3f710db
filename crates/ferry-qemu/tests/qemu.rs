//! Integration tests against a real qemu-system-x86_64 under TCG. No guest OS is
//! needed: the VMs start paused (`-S`), and "guest writes" go through the guest
//! device's own block backend with HMP `qemu-io -d <dev>/virtio-backend`, so they
//! take the same path (and the same copy-before-write filter) as real ones.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_nbd::{dirty_bitmap_context, ConnectOptions, NbdClient, NbdTarget, STATE_DIRTY};
use ferry_qemu::accel::{detect_with, DetectOptions};
use ferry_qemu::view::{self, ferry_bitmaps};
use ferry_qemu::{Accel, PowerdownOutcome, Qmp, QmpError, Vm, VmDisk, VmError, VmSpec};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry_qemu=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A VM that is SIGKILLed (and its directory removed) when the test ends, even
/// when it fails.
struct TestVm {
    vm: Vm,
    dir: tempfile::TempDir,
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if self.vm.is_running() {
            // SAFETY: kill(2) on the pid of the QEMU this test started.
            unsafe {
                libc::kill(self.vm.pid() as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

impl TestVm {
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

fn qemu_img(args: &[&str]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img runs");
    assert!(st.success(), "qemu-img {args:?}");
}

/// A paused VM with one disk `disk0` of `format`, 64 MiB.
async fn start_vm(name: &str, format: &str) -> TestVm {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join(format!("disk.{format}"));
    qemu_img(&["create", "-q", "-f", format, disk.to_str().unwrap(), "64M"]);
    let mut spec = VmSpec::new(name, &dir.path().join("run"), Accel::Tcg);
    spec.memory_mib = 64;
    spec.paused = true;
    spec.disks.push(VmDisk {
        path: disk,
        format: format.into(),
        node_name: "disk0".into(),
        read_only: false,
    });
    let vm = Vm::launch(&spec).await.expect("QEMU starts");
    TestVm { vm, dir }
}

/// Write `len` bytes of `pattern` at `offset` as the guest would.
async fn guest_write(qmp: &mut Qmp, offset: u64, len: u64, pattern: u8) {
    qmp.qemu_io(
        "disk0-dev/virtio-backend",
        &format!("write -P {pattern:#x} {offset} {len}"),
    )
    .await
    .expect("qemu-io write");
}

async fn connect(v: &view::View) -> NbdClient {
    let target = NbdTarget::parse_uri(&v.nbd_uri).unwrap();
    let meta_contexts = v.bitmap.iter().map(|b| dirty_bitmap_context(b)).collect();
    NbdClient::connect(&target, ConnectOptions { meta_contexts })
        .await
        .expect("NBD connect")
}

async fn read(c: &NbdClient, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    c.read(offset, &mut buf).await.unwrap();
    buf
}

async fn dirty_extents(c: &NbdClient, bitmap: &str) -> Vec<(u64, u64)> {
    c.block_status_all(&dirty_bitmap_context(bitmap), 0, c.size())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect()
}

fn all(buf: &[u8], b: u8) -> bool {
    buf.iter().all(|&x| x == b)
}

#[tokio::test]
async fn views_full_incremental_point_in_time_merge_and_crash_recovery() {
    let t0 = Instant::now();
    let t = start_vm("view-vm", "qcow2").await;
    let scratch = t.path().join("scratch");
    let sock = t.run_dir().join("nbd.sock");
    let mut qmp = t.vm.qmp().await.unwrap();

    guest_write(&mut qmp, 0, 64 * KIB, 0xab).await;

    // Incremental without a base is refused.
    let e = view::begin(&mut qmp, "disk0", &scratch, &sock, true, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("take a full view first"), "{e}");

    // Full view: everything readable; a write after begin is not in the view.
    let v1 = view::begin(&mut qmp, "disk0", &scratch, &sock, false, None)
        .await
        .unwrap();
    assert_eq!(v1.bitmap, None);
    assert_eq!(v1.recording, "ferry-1");
    assert_eq!(v1.size, 64 * MIB);
    assert!(v1.fleece_path.exists());
    guest_write(&mut qmp, MIB, 64 * KIB, 0xcd).await;
    let c = connect(&v1).await;
    assert!(c.read_only());
    assert!(all(&read(&c, 0, 64 * KIB).await, 0xab));
    assert!(all(&read(&c, 64 * KIB, 64 * KIB).await, 0));
    assert!(
        all(&read(&c, MIB, 64 * KIB).await, 0),
        "a write after begin leaked into the point-in-time view"
    );
    c.disconnect().await.unwrap();
    let fleece = v1.fleece_path.clone();
    v1.end(&mut qmp, true).await.unwrap();
    assert!(!fleece.exists(), "the fleece image is removed");

    // Incremental: exactly the extents written since the full view.
    guest_write(&mut qmp, 2 * MIB, 128 * KIB, 0xee).await;
    let v2 = view::begin(&mut qmp, "disk0", &scratch, &sock, true, None)
        .await
        .unwrap();
    assert_eq!(v2.bitmap.as_deref(), Some("ferry-1"));
    assert_eq!(v2.recording, "ferry-2");
    guest_write(&mut qmp, 4 * MIB, 64 * KIB, 0x77).await;
    let c = connect(&v2).await;
    assert_eq!(
        dirty_extents(&c, "ferry-1").await,
        vec![(MIB, 64 * KIB), (2 * MIB, 128 * KIB)]
    );
    assert!(all(&read(&c, MIB, 64 * KIB).await, 0xcd));
    assert!(all(&read(&c, 2 * MIB, 128 * KIB).await, 0xee));
    assert!(all(&read(&c, 4 * MIB, 64 * KIB).await, 0), "point in time");
    c.disconnect().await.unwrap();
    // The reader failed: the extents it did not take must come back next time.
    v2.end(&mut qmp, false).await.unwrap();
    let names: Vec<String> = ferry_bitmaps(&mut qmp, "disk0")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["ferry-2"]);

    let v3 = view::begin(&mut qmp, "disk0", &scratch, &sock, true, None)
        .await
        .unwrap();
    assert_eq!(v3.bitmap.as_deref(), Some("ferry-2"));
    let c = connect(&v3).await;
    assert_eq!(
        dirty_extents(&c, "ferry-2").await,
        vec![(MIB, 64 * KIB), (2 * MIB, 128 * KIB), (4 * MIB, 64 * KIB)],
        "a failed delta is merged into the next one"
    );
    c.disconnect().await.unwrap();
    v3.end(&mut qmp, true).await.unwrap();

    // The caller "crashes" with a view open: nothing is ended, the QMP session
    // goes away, and a new caller finds the VM from its run directory alone.
    guest_write(&mut qmp, 8 * MIB, 64 * KIB, 0x55).await;
    let v4 = view::begin(&mut qmp, "disk0", &scratch, &sock, true, None)
        .await
        .unwrap();
    assert_eq!(v4.bitmap.as_deref(), Some("ferry-3"));
    let stale_fleece = v4.fleece_path.clone();
    drop(v4);
    drop(qmp);
    let vm = Vm::attach(&t.run_dir()).unwrap();
    assert_eq!(vm.pid(), t.vm.pid());
    let mut qmp = vm.qmp().await.unwrap();
    let e = view::begin(&mut qmp, "disk0", &scratch, &sock, true, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cleanup_stale"), "{e}");
    let r = view::cleanup_stale(&mut qmp, "disk0").await.unwrap();
    assert!(r.removed_export && r.cancelled_job, "{r:?}");
    assert_eq!(r.merged_bitmaps, ["ferry-3"]);
    assert_eq!(r.recording.as_deref(), Some("ferry-4"));
    assert!(!stale_fleece.exists());
    let again = view::cleanup_stale(&mut qmp, "disk0").await.unwrap();
    assert!(!again.changed(), "cleanup is idempotent: {again:?}");
    let v5 = view::begin(&mut qmp, "disk0", &scratch, &sock, true, None)
        .await
        .unwrap();
    assert_eq!(v5.bitmap.as_deref(), Some("ferry-4"));
    let c = connect(&v5).await;
    assert_eq!(
        dirty_extents(&c, "ferry-4").await,
        vec![(8 * MIB, 64 * KIB)]
    );
    assert!(all(&read(&c, 8 * MIB, 64 * KIB).await, 0x55));
    c.disconnect().await.unwrap();
    v5.end(&mut qmp, true).await.unwrap();

    // A new full view starts a new chain.
    let v6 = view::begin(&mut qmp, "disk0", &scratch, &sock, false, None)
        .await
        .unwrap();
    assert_eq!(v6.recording, "ferry-6");
    v6.end(&mut qmp, true).await.unwrap();
    let names: Vec<String> = ferry_bitmaps(&mut qmp, "disk0")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["ferry-6"]);
    let exports = qmp
        .execute("query-block-exports", serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(exports, serde_json::json!([]));
    eprintln!("views test took {:?}", t0.elapsed());
}

#[tokio::test]
async fn raw_disks_cannot_have_views() {
    let t = start_vm("raw-vm", "raw").await;
    let mut qmp = t.vm.qmp().await.unwrap();
    let e = view::begin(
        &mut qmp,
        "disk0",
        &t.path().join("s"),
        &t.run_dir().join("nbd.sock"),
        false,
        None,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("need a qcow2 node"), "{e}");
    let e = view::begin(
        &mut qmp,
        "nope",
        &t.path().join("s"),
        &t.run_dir().join("nbd.sock"),
        false,
        None,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no block node named nope"), "{e}");
}

#[tokio::test]
async fn launch_attach_query_powerdown_and_kill() {
    let t = start_vm("life-vm", "qcow2").await;
    // Detached: not our child, in its own session, so killing us leaves it running.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", t.vm.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let (ppid, sid): (u32, u32) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
    assert_ne!(ppid, std::process::id());
    // SAFETY: getsid(0) only reads our own session id.
    let our_sid = unsafe { libc::getsid(0) } as u32;
    assert_ne!(sid, our_sid, "QEMU runs in a session of its own");

    // A second launch in the same run directory is refused.
    let spec = t.vm.spec().unwrap().clone();
    match Vm::launch(&spec).await {
        Err(VmError::AlreadyRunning { pid, .. }) => assert_eq!(pid, t.vm.pid()),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }

    let vm = Vm::attach(&t.run_dir()).unwrap();
    assert_eq!(vm.name(), "life-vm");
    assert_eq!(vm.spec().unwrap().disks[0].node_name, "disk0");
    let mut qmp = vm.qmp().await.unwrap();
    assert_eq!(qmp.query_name().await.unwrap().as_deref(), Some("life-vm"));
    let st = qmp.query_status().await.unwrap();
    assert!(!st.running);
    assert_eq!(st.status, "prelaunch");
    let blocks = qmp.query_block().await.unwrap();
    let b = blocks
        .iter()
        .find(|b| b.node_name.as_deref() == Some("disk0"))
        .expect("disk0 in query-block");
    assert_eq!(b.format.as_deref(), Some("qcow2"));
    assert_eq!(b.virtual_size, Some(64 * MIB));
    assert!(b.file.as_deref().unwrap().ends_with("disk.qcow2"));
    qmp.execute("cont", serde_json::Value::Null).await.unwrap();
    assert!(qmp.query_status().await.unwrap().running);
    drop(qmp);

    // No OS answers the power button: powerdown falls back to quit, and says so.
    let started = Instant::now();
    let out = vm.powerdown(Duration::from_millis(500)).await.unwrap();
    assert_eq!(out, PowerdownOutcome::Quit);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!vm.is_running());
    assert!(matches!(
        Vm::attach(&t.run_dir()),
        Err(VmError::NotRunning { .. })
    ));

    // Relaunch in the same run directory, then kill.
    let vm2 = Vm::launch(&spec).await.unwrap();
    assert!(vm2.is_running());
    vm2.kill().await.unwrap();
    assert!(!vm2.is_running());
}

#[tokio::test]
async fn qmp_errors_are_typed_and_the_agent_absence_is_explained() {
    let t = start_vm("err-vm", "qcow2").await;
    let mut qmp = t.vm.qmp().await.unwrap();
    match qmp
        .execute("no-such-command", serde_json::Value::Null)
        .await
    {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected a command error, got {other:?}"),
    }
    let e = qmp
        .execute("blockdev-del", serde_json::json!({"node-name": "ghost"}))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { ref class, .. } if class == "GenericError"));
    assert!(e.to_string().contains("ghost"), "{e}");
    let e = qmp
        .qemu_io("ghost-dev/virtio-backend", "write 0 4k")
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Hmp { .. }), "{e}");
    // Still usable after errors.
    assert!(qmp.query_status().await.is_ok());
    // Events that arrive around an answer are buffered for wait_event.
    qmp.execute("cont", serde_json::Value::Null).await.unwrap();
    let ev = qmp
        .wait_event("RESUME", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ev.name, "RESUME");
    assert!(ev.timestamp.0 > 0);
    qmp.execute("stop", serde_json::Value::Null).await.unwrap();
    qmp.wait_event("STOP", Duration::from_secs(5))
        .await
        .unwrap();
    let e = qmp
        .wait_event("NEVER", Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Timeout { .. }), "{e}");

    // The agent channel exists, but nothing runs in the (paused) guest.
    let started = Instant::now();
    let e = t.vm.qga(Duration::from_secs(1)).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("the QEMU guest agent in err-vm does not answer on")
            && msg.contains("is qemu-guest-agent installed and running in the guest?"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn bad_specs_are_refused_before_qemu_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("bad", &dir.path().join("run"), Accel::Tcg);
    spec.disks.push(VmDisk {
        path: dir.path().join("missing.qcow2"),
        format: "qcow2".into(),
        node_name: "disk0".into(),
        read_only: false,
    });
    let e = Vm::launch(&spec).await.unwrap_err();
    assert!(matches!(e, VmError::BadSpec { .. }), "{e}");
    assert!(!dir.path().join("run").exists());

    // QEMU itself refusing (a disk that is not qcow2) is reported with its words.
    let raw = dir.path().join("d.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let mut spec = VmSpec::new("bad2", &dir.path().join("run2"), Accel::Tcg);
    spec.paused = true;
    spec.disks.push(VmDisk {
        path: raw,
        format: "qcow2".into(),
        node_name: "disk0".into(),
        read_only: false,
    });
    let e = Vm::launch(&spec).await.unwrap_err();
    assert!(matches!(e, VmError::LaunchFailed { .. }), "{e}");
    assert!(e.to_string().contains("qcow2"), "{e}");
}

#[tokio::test]
async fn a_kernel_boots_and_the_serial_log_is_followed() {
    init_logs();
    let Some(kernel) = std::fs::read_dir("/boot").ok().and_then(|d| {
        d.filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().contains("vmlinuz-"))
    }) else {
        eprintln!("no kernel under /boot: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut spec = VmSpec::new("boot-vm", &dir.path().join("run"), Accel::Tcg);
    spec.memory_mib = 256;
    spec.kernel = Some(kernel);
    spec.append = Some("console=ttyS0 panic=-1".into());
    spec.no_reboot = true;
    let vm = Vm::launch(&spec).await.unwrap();
    let guard = TestVm {
        vm: vm.clone(),
        dir,
    };
    let line = vm
        .wait_serial("Linux version", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(line.contains("Linux version"), "{line}");
    let e = vm
        .wait_serial("never printed", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("last output"), "{e}");
    vm.kill().await.unwrap();
    drop(guard);
}

#[tokio::test]
async fn accel_detection_picks_tcg_here_and_caches_it() {
    init_logs();
    let cache = tempfile::tempdir().unwrap();
    let mut opts = DetectOptions::from_env();
    opts.forced = None;
    opts.cache_file = cache.path().join("accel");
    let started = Instant::now();
    let v = detect_with(&opts).await;
    eprintln!("verdict {v:?} in {:?}", started.elapsed());
    if Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/modules")
            .map_or(true, |m| !m.contains("kvm_intel") && !m.contains("kvm_amd"))
    {
        // This test bed: /dev/kvm is PVM, which cannot run a stock kernel.
        assert_eq!(v.accel, Accel::Tcg, "{}", v.reason);
    }
    assert!(!v.cached);
    let started = Instant::now();
    let again = detect_with(&opts).await;
    assert!(again.cached);
    assert_eq!(again.accel, v.accel);
    assert!(started.elapsed() < Duration::from_secs(2));
}
