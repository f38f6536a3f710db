//! A guest controls every byte of its disks: a raw disk whose first bytes are a qcow2
//! header naming a backing file on this host must never be opened as qcow2 (that would
//! copy the host's file into the target), neither as a source nor as a target.
//! With the real binary, qemu-img and qemu-nbd.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// Longest any one ferry run here may take: a refusal is immediate, a sync of a few MiB
/// takes well under a second. Longer is the hang this guards against.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn have_qemu() -> bool {
    ["qemu-img", "qemu-nbd"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Runs `cmd`, killing it (and failing the test) when it outlives [`RUN_TIMEOUT`].
fn run_bounded(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: a plain signal to the child this test started (not yet reaped: the
            // waiting thread has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} hung for more than {RUN_TIMEOUT:?}");
        }
    }
}

fn ferry_run(args: &[&str]) -> Output {
    let mut cmd = ferry();
    cmd.args(args);
    run_bounded(cmd)
}

fn ferry_ok(args: &[&str]) -> String {
    let out = ferry_run(args);
    assert!(
        out.status.success(),
        "ferry {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Evil {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    /// The host file the header names as its backing file.
    secret: PathBuf,
    secret_marker: Vec<u8>,
    /// The raw disk: a qcow2 header naming `secret`, then guest data.
    raw: PathBuf,
}

/// A raw disk of 8 MiB whose first bytes are a real qcow2 header (with its tables) naming
/// a secret file of this host as the backing file: what a hostile guest writes.
fn evil_disk() -> Evil {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let secret = dir.join("appliance-secret.key");
    let secret_marker = b"FERRY-UNTRUSTED-FORMATS-TEST-SECRET-7f3c".to_vec();
    // As large as the image the header describes, so qemu would find a secret byte in
    // every cluster the overlay leaves unallocated.
    let mut content = Vec::with_capacity(MIB as usize);
    while content.len() < MIB as usize {
        content.extend_from_slice(&secret_marker);
    }
    std::fs::write(&secret, &content).unwrap();
    let hdr = dir.join("hdr.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&hdr)
        .arg("1M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = std::fs::read(&hdr).unwrap();
    assert!(header.len() < MIB as usize);
    let raw = dir.join("evil.raw");
    sparse(&raw, 8 * MIB);
    fill_random(&raw, 2 * MIB, 3 * MIB, 11);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all_at(&header, 0).unwrap();
    }
    // What a guessing reader sees.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2", "-U"])
        .arg(&raw)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains(secret.to_str().unwrap()), "{info}");
    Evil {
        _dir: tmp,
        dir,
        secret,
        secret_marker,
        raw,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_secret(e: &Evil, dst: &Path) {
    let bytes = std::fs::read(dst).unwrap();
    assert!(
        !contains(&bytes, &e.secret_marker),
        "{} holds the host's secret",
        dst.display()
    );
}

fn assert_refused(e: &Evil, out: &Output, took: Duration) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "not refused:\n{stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?} to refuse");
    for part in [
        e.raw.to_str().unwrap(),
        e.secret.to_str().unwrap(),
        "backing file",
        "--format raw",
    ] {
        assert!(stderr.contains(part), "{part:?} not in:\n{stderr}");
    }
}

#[test]
fn a_guessed_qcow2_header_naming_a_backing_file_is_refused_quickly() {
    if !have_qemu() {
        eprintln!("skipped: needs qemu-img and qemu-nbd");
        return;
    }
    let e = evil_disk();
    let dst = e.dir.join("dst.raw");
    let (s, d) = (e.raw.to_str().unwrap(), dst.to_str().unwrap());

    let t = Instant::now();
    let out = ferry_run(&["disk", "sync", s, d]);
    assert_refused(&e, &out, t.elapsed());
    assert!(!dst.exists(), "nothing may be written for a refused source");

    // `send` opens its source the same way (and is refused before any connection).
    let pki_dir = e.dir.join("pki");
    pki(&pki_dir);
    let port = free_port();
    let t = Instant::now();
    let out = run_bounded(send_cmd(&e.raw, &pki_dir, port, &[]));
    assert_refused(&e, &out, t.elapsed());

    // A format Ferry does not know (or a QEMU protocol posing as one) is no way around.
    let out = ferry_run(&["disk", "sync", "--format", "file", s, d]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("raw"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stated_raw_is_copied_as_the_bytes_it_is_and_stays_raw_in_a_delta() {
    if !have_qemu() {
        eprintln!("skipped: needs qemu-img and qemu-nbd");
        return;
    }
    let e = evil_disk();
    let dst = e.dir.join("dst.raw");
    let (s, d) = (e.raw.to_str().unwrap(), dst.to_str().unwrap());

    // (b) Full sync with --format raw: the raw bytes, header and all; no secret.
    let full = json(&ferry_ok(&[
        "disk", "sync", "--json", "--format", "raw", s, d,
    ]));
    assert_eq!(full["full"], true, "{full}");
    assert_eq!(full["disk_size"], 8 * MIB, "{full}");
    assert!(
        same_file(&e.raw, &dst),
        "the copy differs from the raw source"
    );
    assert_no_secret(&e, &dst);

    // (c) A delta into the existing raw target, which now starts with a qcow2 header
    // naming the secret: the commit keeps it raw instead of guessing from its header.
    fill_random(&e.raw, 6 * MIB, MIB / 2, 12);
    let delta = json(&ferry_ok(&[
        "disk", "sync", "--json", "--format", "raw", s, d,
    ]));
    assert_eq!(delta["full"], false, "{delta}");
    assert_eq!(delta["generation"], 2, "{delta}");
    assert!(delta["chunks_changed"].as_u64().unwrap() > 0, "{delta}");
    assert!(
        same_file(&e.raw, &dst),
        "the delta left the target unlike its source"
    );
    assert_no_secret(&e, &dst);

    // And a target Ferry has no record of (its sidecar gone), header and all, is read and
    // indexed as the raw file its name says; the old spelling of the option still works.
    std::fs::remove_dir_all(sidecar(&dst)).unwrap();
    fill_random(&e.raw, 7 * MIB, MIB / 4, 13);
    let again = json(&ferry_ok(&[
        "disk",
        "sync",
        "--json",
        "--src-format",
        "raw",
        s,
        d,
    ]));
    assert!(same_file(&e.raw, &dst), "the re-indexed target differs");
    assert_no_secret(&e, &dst);
    // Only what changed moved: the existing target was indexed as the raw bytes it
    // holds, so the header chunk and everything else unchanged matched.
    assert!(
        again["bytes_written"].as_u64().unwrap() <= MIB / 2,
        "{again}"
    );
    assert!(again["chunks_changed"].as_u64().unwrap() <= 8, "{again}");
}
