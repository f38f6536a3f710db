//! A guest controls every byte of its disks: a raw disk whose first bytes are a qcow2
//! header naming a backing file on this host must never be opened as qcow2 (that would
//! copy the host's file into the target), neither as a source nor as a target.
//! With the real binary, qemu-img and qemu-nbd, and through a real appliance.

mod common;
mod cp;

use std::path::PathBuf;
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

/// Through the appliance: a disk-image source whose image is the hostile raw disk, into a
/// local-directory target. Unstated, its format is refused at once, as a permanent
/// failure naming the disk (no retries, nothing written); stated `raw` (with the CLI, as a
/// user adds the workload), the target holds exactly the raw bytes and no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_image_source_copies_a_hostile_raw_disk_as_bytes_or_refuses_it() {
    if !have_qemu() {
        eprintln!("skipped: needs qemu-img and qemu-nbd");
        return;
    }
    let e = evil_disk();
    let app = cp::Appliance::start(&e.dir.join("appliance"), &["--backoff-ms", "200"], None);
    let api = app.client();
    api.setup(&e.dir, false).await;
    let target_dir = e.dir.join("target");

    // Unstated: the migration fails within seconds, permanently, saying what to do.
    let raw = e.raw.to_str().unwrap();
    app.ok(&[
        "inventory",
        "add",
        "guessed",
        "--source",
        "images",
        "--disk",
        &format!("root={raw}"),
    ]);
    let t = Instant::now();
    app.ok(&["migration", "start", "guessed", "--profile", "default"]);
    api.wait_for("failed", 1, Duration::from_secs(60)).await;
    let failed = api.ok("/api/migrations?state=failed", None).await;
    let err = failed["items"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for part in [
        "root",
        "refusing to guess",
        "backing file",
        e.secret.to_str().unwrap(),
        "--disk-format raw",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "refused after {:?}",
        t.elapsed()
    );
    let id = failed["items"][0]["id"].as_str().unwrap().to_string();
    let failures = api
        .all_events()
        .await
        .into_iter()
        .filter(|ev| ev["kind"] == "step.failed" && ev["migration_id"] == id.as_str())
        .count();
    assert_eq!(failures, 1, "a refused format is not worth retrying");
    for f in files_under(&target_dir) {
        assert!(
            std::fs::metadata(&f).unwrap().len() < MIB,
            "{} was written",
            f.display()
        );
    }

    // Stated raw: the copy is the raw disk, header and all.
    app.ok(&[
        "inventory",
        "add",
        "stated",
        "--source",
        "images",
        "--disk",
        &format!("root={raw}"),
        "--disk-format",
        "raw",
    ]);
    let shown = app.ok(&["inventory", "show", "stated", "--json"]);
    assert!(
        shown.contains("\"format\": \"raw\"") || shown.contains("\"format\":\"raw\""),
        "{shown}"
    );
    app.ok(&["migration", "start", "stated", "--profile", "default"]);
    api.wait_for("synced", 1, Duration::from_secs(60)).await;
    let copies: Vec<PathBuf> = files_under(&target_dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|x| x == "img"))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(
        same_file(&e.raw, &copies[0]),
        "the copy differs from the raw source"
    );
    assert_no_secret(&e, &copies[0]);

    // A format that is none is refused by the API and the CLI, naming the choices.
    let out = app.ferry(&[
        "inventory",
        "add",
        "bad",
        "--source",
        "images",
        "--disk",
        &format!("root={raw}"),
        "--disk-format",
        "file",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("raw, qcow2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = api.ok("/api/sources/images", None).await;
    let (code, body) = api
        .post(
            "/api/workloads",
            serde_json::json!({"name": "bad", "source_id": src["id"], "disks": [{"name": "root", "size_bytes": 1, "path": raw, "format": "json"}]}),
        )
        .await;
    assert!((400..500).contains(&code), "HTTP {code}: {body}");
}
