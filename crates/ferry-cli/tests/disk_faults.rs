//! Fault tests of the replication engine, with real processes: SIGKILL of the sender and
//! of the receiver in the middle of a 1 GiB sync, bytes corrupted between them, a
//! sender with a certificate from another CA, and private keys opened with the wrong
//! passphrase.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const GIB: u64 = 1 << 30;

/// A temporary directory with paths for a source, a target, and a CA issued in it.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, pki_dir) = (
        dir.path().join("src.raw"),
        dir.path().join("dst.raw"),
        dir.path().join("pki"),
    );
    pki(&pki_dir);
    (dir, src, dst, pki_dir)
}
const CHUNK: u64 = 64 << 10;

#[test]
fn sender_killed_mid_delta_resumes_and_target_stays_at_last_generation() {
    let (_dir, src, dst, pki_dir) = setup();
    // Generation 1: an empty disk.
    sparse(&src, GIB);
    ok(&["disk", "sync", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert!(all_zero(&dst, GIB));
    // Generation 2: 1 GiB of new data, sent by a sender that dies half-way.
    fill_random(&src, 0, GIB, 7);
    let rx = ReceiverProc::start(&dst, &pki_dir, free_port(), &[]);
    let mut sender = send_cmd(
        &src,
        &pki_dir,
        rx.port,
        &["--max-rate", "256M", "--streams", "2"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_until(
        "40% of the delta to arrive",
        Duration::from_secs(60),
        || pending_bytes(&dst) > GIB * 2 / 5,
    );
    sender.kill().unwrap();
    sender.wait().unwrap();
    // The receiver notices, makes what it got durable; the target is still generation 1.
    std::thread::sleep(Duration::from_millis(300));
    let held = pending_chunks(&dst) * CHUNK;
    assert!(held > GIB / 4, "only {held} bytes held after the kill");
    assert!(
        all_zero(&dst, GIB),
        "the committed target changed before the commit"
    );

    let out = send_cmd(&src, &pki_dir, rx.port, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["generation"], 2);
    assert_eq!(report["resumed"], true);
    let resent = report["bytes_sent"].as_u64().unwrap() + held;
    assert!(
        resent as f64 <= 1.1 * GIB as f64,
        "sent {resent} bytes in all for a 1 GiB delta (more than 10% extra)"
    );
    assert!(same_file(&src, &dst));
}

#[test]
fn receiver_killed_mid_full_sync_resumes_and_target_never_half_exists() {
    let (_dir, src, dst, pki_dir) = setup();
    fill_random(&src, 0, GIB, 11);
    let port = free_port();
    let mut rx = ReceiverProc::start(&dst, &pki_dir, port, &[]);
    let sender = send_cmd(
        &src,
        &pki_dir,
        port,
        &["--max-rate", "256M", "--retries", "5"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until("40% of the sync to arrive", Duration::from_secs(60), || {
        pending_bytes(&dst) > GIB * 2 / 5
    });
    rx.kill();
    assert!(
        !dst.exists(),
        "a half-written target must not appear at its path"
    );
    let held = pending_chunks(&dst) * CHUNK;
    assert!(held > GIB / 5, "only {held} bytes durable after the kill");
    let _rx = ReceiverProc::start(&dst, &pki_dir, port, &[]);
    let out = sender.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["generation"], 1);
    let resent = report["bytes_sent"].as_u64().unwrap() + held;
    assert!(
        resent as f64 <= 1.1 * GIB as f64,
        "sent {resent} bytes in all for 1 GiB (more than 10% extra)"
    );
    assert!(same_file(&src, &dst));
}

/// Forwards connections to `to`, flipping one byte of the client's stream after 2 MiB on
/// the first connection that gets that far.
fn corrupting_proxy(to: u16) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let armed = Arc::new(AtomicBool::new(true));
    let a = Arc::clone(&armed);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let server = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let (mut c_r, mut s_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_r, mut c_w) = (server, client);
            let armed = Arc::clone(&a);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut total = 0usize;
                loop {
                    let n = match c_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if total + n > 2 << 20
                        && total <= 2 << 20
                        && armed.swap(false, Ordering::SeqCst)
                    {
                        let at = (2 << 20) - total;
                        buf[at.min(n - 1)] ^= 0x40;
                    }
                    total += n;
                    if s_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_w.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_r, &mut c_w);
                let _ = c_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, armed)
}

#[test]
fn bytes_corrupted_in_transit_are_rejected_and_the_sync_recovers() {
    let (_dir, src, dst, pki_dir) = setup();
    fill_random(&src, 0, 64 << 20, 3);
    let rx = ReceiverProc::start(&dst, &pki_dir, free_port(), &[]);
    let (proxy, armed) = corrupting_proxy(rx.port);

    // Without retries: a clear error, and nothing corrupt anywhere.
    let out = send_cmd(&src, &pki_dir, proxy, &["--retries", "0", "--streams", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        !armed.load(Ordering::SeqCst),
        "the proxy never corrupted anything"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupted in transit"), "unclear error: {err}");
    assert!(!dst.exists());
    assert_pending_chunks_are_intact(&dst);

    // With retries (the default), the same corruption is survived.
    armed.store(true, Ordering::SeqCst);
    succeed(&mut send_cmd(&src, &pki_dir, proxy, &["--streams", "1"]));
    assert!(!armed.load(Ordering::SeqCst));
    assert!(same_file(&src, &dst));
}

/// Every chunk the pending index claims is in the pending data file with that digest.
fn assert_pending_chunks_are_intact(dst: &Path) {
    let side = sidecar(dst);
    let Ok(idx) = std::fs::read(side.join("pending/index.idx")) else {
        return;
    };
    let data = std::fs::read(side.join("pending/data")).unwrap();
    for (n, e) in idx[64..].chunks_exact(32).enumerate() {
        if e.iter().all(|&b| b == 0) {
            continue;
        }
        let off = n * CHUNK as usize;
        let chunk = &data[off..(off + CHUNK as usize).min(data.len())];
        assert_eq!(
            blake3::hash(chunk).as_bytes(),
            e,
            "chunk {n} is corrupt on the target"
        );
    }
}

#[test]
fn a_sender_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    pki(&ours);
    pki(&theirs);
    fill_random(&src, 0, 1 << 20, 5);
    let rx = ReceiverProc::start(&dst, &ours, free_port(), &[]);
    // Trusts our receiver, but presents a certificate from another CA.
    let out = ferry()
        .args(["disk", "send", "--retries", "0"])
        .arg(&src)
        .args(["--to", &format!("localhost:{}", rx.port)])
        .arg("--cert")
        .arg(theirs.join("sender.pem"))
        .arg("--key")
        .arg(theirs.join("sender.key"))
        .arg("--ca")
        .arg(ours.join("ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "unclear error: {err}");
    assert!(!dst.exists());
    // And a receiver from another CA is not trusted by our sender.
    let out = send_cmd(&src, &theirs, rx.port, &["--retries", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS handshake failed"));
}

/// Between machines the sender keeps the target's index from one sync to the next: a
/// delta then does not fetch it again. A kept index that does not describe the target
/// (here: an older generation's, under the current one's name) never makes a wrong
/// target: the commit compares both ends' indexes, and the retry fetches the real one.
#[test]
fn a_delta_between_machines_reuses_the_kept_index_and_survives_a_wrong_one() {
    let (dir, src, dst, pki_dir) = setup();
    let cache = dir.path().join("cache");
    sparse(&src, 64 << 20);
    fill_random(&src, 0, 8 << 20, 1);
    let rx = ReceiverProc::start(&dst, &pki_dir, free_port(), &[]);
    let send = || {
        json(&succeed(
            send_cmd(&src, &pki_dir, rx.port, &[]).env("XDG_CACHE_HOME", &cache),
        ))
    };
    let full = send();
    assert_eq!(full["full"], true);
    assert!(full["index_bytes"].as_u64().unwrap() > 0);
    let kept: Vec<PathBuf> = std::fs::read_dir(cache.join("ferry/indexes"))
        .unwrap()
        .map(|e| e.unwrap().path().join("index.idx"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let first_generation = std::fs::read(&kept[0]).unwrap();

    let at = 1u64 << 20;
    let mut before = vec![0u8; 64 << 10];
    std::fs::File::open(&src)
        .unwrap()
        .read_exact_at(&mut before, at)
        .unwrap();
    fill_random(&src, at, 64 << 10, 2);
    let delta = send();
    assert_eq!(
        delta["index_bytes"], 0,
        "the index travelled again: {delta}"
    );
    assert_eq!(delta["chunks_changed"], 1);
    assert_eq!(delta["resumed"], false);
    assert!(same_file(&src, &dst));

    // The first generation's index where the second's is expected, and the source back
    // as it was then: by that index nothing changed, but the target holds the second
    // generation's chunk.
    std::fs::write(&kept[0], &first_generation).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&before, at)
        .unwrap();
    let caught = send();
    assert_eq!(caught["resumed"], true, "no retry: {caught}");
    assert!(same_file(&src, &dst));

    // The next delta has a sound kept index again.
    fill_random(&src, 5 << 20, 64 << 10, 4);
    let next = send();
    assert_eq!(next["index_bytes"], 0);
    assert!(same_file(&src, &dst));
}

/// `ferry pki` writes private keys encrypted (standard encrypted PKCS#8, which openssl
/// opens with the passphrase), and an end given the wrong passphrase says what is wrong
/// instead of failing in the TLS handshake.
#[test]
fn private_keys_are_encrypted_and_a_wrong_passphrase_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let d = pki_dir.to_str().unwrap();
    let with = |pass: &str, args: &[&str]| {
        ferry()
            .env("FERRY_PKI_PASSPHRASE", pass)
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["pki", "init", "--dir", d][..],
        &["pki", "issue", "--dir", d, "receiver", "--san", "localhost"][..],
    ] {
        let out = with("right passphrase", args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("encrypted with the passphrase in $FERRY_PKI_PASSPHRASE"),
            "{said}"
        );
        assert!(
            !said.contains("right passphrase"),
            "the passphrase was printed: {said}"
        );
    }
    for key in ["ca.key", "receiver.key"] {
        let text = std::fs::read_to_string(pki_dir.join(key)).unwrap();
        assert!(
            text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
            "{key}: {text}"
        );
        let pass_file = dir.path().join("pass");
        std::fs::write(&pass_file, "right passphrase").unwrap();
        if let Ok(out) = std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-passin"])
            .arg(format!("file:{}", pass_file.display()))
            .arg("-in")
            .arg(pki_dir.join(key))
            .output()
        {
            assert!(
                out.status.success(),
                "openssl cannot open {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let dst = dir.path().join("dst.raw");
    let out = with(
        "guess-7f3a9c",
        &[
            "disk",
            "receive",
            "--pki-dir",
            d,
            "--name",
            "receiver",
            "--listen",
            "127.0.0.1:0",
            dst.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot decrypt the private key")
            && err.contains("receiver.key")
            && err.contains("FERRY_PKI_PASSPHRASE"),
        "unclear error: {err}"
    );
    assert!(
        !err.contains("guess-7f3a9c"),
        "the passphrase was printed: {err}"
    );
    assert!(!dst.exists());
}

/// The qemu-nbd a sync starts for an image dies with it, even when the sync is killed
/// outright: an orphan would keep the image locked, and the next sync would fail on it.
#[test]
fn a_killed_sync_leaves_no_qemu_nbd_behind() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    fill_random(&raw, 0, 64 << 20, 5);
    let qcow = dir.path().join("src.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut sync = ferry()
        .args(["disk", "sync", "--max-rate", "4M"])
        .arg(&qcow)
        .arg(dir.path().join("dst.raw"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let parent = sync.id();
    let mut server = None;
    wait_until(
        "the sync to start qemu-nbd",
        Duration::from_secs(20),
        || {
            server = children(parent)
                .into_iter()
                .find(|&p| comm(p) == "qemu-nbd");
            server.is_some()
        },
    );
    let server = server.unwrap();
    sync.kill().unwrap();
    sync.wait().unwrap();
    wait_until(
        "the orphaned qemu-nbd to exit",
        Duration::from_secs(10),
        || {
            // Gone, or a zombie waiting for whoever adopted it.
            std::fs::read_to_string(format!("/proc/{server}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        },
    );
    // And the image is free again: a new sync of it runs to the end.
    let again = dir.path().join("again.raw");
    ok(&[
        "disk",
        "sync",
        qcow.to_str().unwrap(),
        again.to_str().unwrap(),
    ]);
}

/// Process ids whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit(')').next()?.split_whitespace().nth(1)?.to_string();
                    rest.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}
