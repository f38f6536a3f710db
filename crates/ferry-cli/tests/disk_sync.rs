//! `ferry disk sync` end to end, with the real binary, qemu-img and qemu-nbd.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn full_then_delta_with_json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    sparse(&src, 256 * MIB);
    fill_random(&src, 10 * MIB, 20 * MIB, 1);
    let s = src.to_str().unwrap();
    let d = dst.to_str().unwrap();

    let full = json(&ok(&["disk", "sync", "--json", s, d]));
    assert!(same_file(&src, &dst));
    assert_eq!(full["full"], true);
    assert_eq!(full["generation"], 1);
    // Holes are neither read nor sent.
    assert!(full["bytes_read"].as_u64().unwrap() < 40 * MIB, "{full}");
    assert!(full["bytes_sent"].as_u64().unwrap() < 22 * MIB, "{full}");
    for key in ["bytes_read", "bytes_sent", "chunks_changed", "duration_s"] {
        assert!(full.get(key).is_some(), "--json lacks {key}");
    }
    // The phases add up to the duration; the index arrives during the transfer.
    let phase = |k: &str| full["phases"][k].as_f64().unwrap_or(-1.0);
    let parts = phase("open_s") + phase("transfer_s") + phase("commit_s");
    let duration = full["duration_s"].as_f64().unwrap();
    assert!((parts - duration).abs() < 1e-3, "{full}");
    assert!(
        (0.0..=phase("transfer_s")).contains(&phase("index_s")),
        "{full}"
    );

    // Nothing changed: nothing sent.
    let same = json(&ok(&["disk", "sync", "--json", s, d]));
    assert_eq!(same["chunks_changed"], 0);
    assert_eq!(same["generation"], 2);

    // Scattered changes, one of them back to zeros.
    fill_random(&src, 100 * MIB, MIB, 2);
    fill_random(&src, 200 * MIB + 4096, 4096, 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .map(|f| {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0; MIB as usize], 12 * MIB).unwrap()
        })
        .unwrap();
    let delta = json(&ok(&["disk", "sync", "--json", s, d]));
    assert!(same_file(&src, &dst));
    assert_eq!(delta["full"], false);
    // 16 chunks + 1 chunk + 16 zeroed chunks.
    assert_eq!(delta["chunks_changed"], 33, "{delta}");
    assert_eq!(delta["chunks_zeroed"], 16, "{delta}");
    let changed = 17 * 64 * 1024;
    assert!(
        delta["bytes_sent"].as_u64().unwrap() as f64 <= 1.1 * changed as f64,
        "{delta}"
    );
}

/// A hash-compare delta reads all the data but hashes with BLAKE3 only the chunks whose
/// fingerprint changed since the last sync. A damaged memo (each entry's digest altered,
/// its fingerprint intact: the case that would otherwise hide a change) costs only the
/// time it saved, and `--no-digest-memo` hashes everything.
#[test]
fn a_delta_hashes_only_what_changed_and_a_damaged_memo_costs_only_time() {
    const KIB64: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    sparse(&src, 64 * MIB);
    fill_random(&src, 0, 16 * MIB, 1);
    let sync = |extra: &[&str]| {
        let r = json(&succeed(
            ferry()
                .env("XDG_CACHE_HOME", &cache)
                .args(["disk", "sync", "--json"])
                .args(extra)
                .arg(&src)
                .arg(&dst),
        ));
        assert!(same_file(&src, &dst), "{r}");
        r
    };
    let hashed = |r: &serde_json::Value| r["bytes_hashed"].as_u64().unwrap();

    let full = sync(&[]);
    assert_eq!(hashed(&full), 16 * MIB, "{full}");
    let memos: Vec<_> = std::fs::read_dir(cache.join("ferry/digests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(memos.len(), 1, "{memos:?}");
    let memo = &memos[0];
    let mode = std::fs::metadata(memo).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);

    fill_random(&src, 4 * MIB, KIB64, 2);
    let delta = sync(&[]);
    assert_eq!(delta["chunks_changed"], 1, "{delta}");
    assert_eq!(hashed(&delta), KIB64, "{delta}");
    assert!(delta["bytes_read"].as_u64().unwrap() >= 16 * MIB, "{delta}");

    // One byte of every entry's digest altered.
    let mut bytes = std::fs::read(memo).unwrap();
    for entry in bytes[64..].chunks_exact_mut(64) {
        entry[20] ^= 0x5a;
    }
    std::fs::write(memo, &bytes).unwrap();
    fill_random(&src, 8 * MIB, KIB64, 3);
    let damaged = sync(&[]);
    assert_eq!(damaged["chunks_changed"], 1, "{damaged}");
    assert_eq!(hashed(&damaged), 16 * MIB, "{damaged}");

    // Sound again.
    fill_random(&src, 12 * MIB, KIB64, 4);
    let next = sync(&[]);
    assert_eq!(hashed(&next), KIB64, "{next}");

    let without = sync(&["--no-digest-memo"]);
    assert_eq!(without["chunks_changed"], 0, "{without}");
    assert_eq!(hashed(&without), 16 * MIB, "{without}");
}

#[test]
fn qcow2_and_vmdk_sources_through_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["qcow2", "vmdk"] {
        let img = dir.path().join(format!("src.{fmt}"));
        let dst = dir.path().join(format!("dst-{fmt}.raw"));
        let reference = dir.path().join(format!("ref-{fmt}.raw"));
        qemu_img(&["create", "-q", "-f", fmt, img.to_str().unwrap(), "64M"]);
        qemu_io(fmt, &img, "write -P 0xab 1M 3M");
        qemu_io(fmt, &img, "write -P 0x17 40M 64k");
        let r = json(&ok(&[
            "disk",
            "sync",
            "--json",
            img.to_str().unwrap(),
            dst.to_str().unwrap(),
        ]));
        qemu_img(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            img.to_str().unwrap(),
            reference.to_str().unwrap(),
        ]);
        assert!(same_file(&reference, &dst), "{fmt} copy differs");
        // Unallocated clusters are not read.
        assert!(r["bytes_read"].as_u64().unwrap() <= 8 * MIB, "{fmt}: {r}");
    }
}

#[test]
fn dirty_bitmap_deltas_over_five_generations() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.qcow2");
    let dst = dir.path().join("dst.raw");
    let reference = dir.path().join("ref.raw");
    let (i, d) = (img.to_str().unwrap(), dst.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", i, "128M"]);
    qemu_io("qcow2", &img, "write -P 0x11 0 8M");
    ok(&["disk", "sync", i, d]);
    for generation in 2..=6u32 {
        // A fresh bitmap per generation, as a source worker rotates them.
        let _ = Command::new("qemu-img")
            .args(["bitmap", "--remove", i, "bm"])
            .output();
        qemu_img(&["bitmap", "--add", i, "bm"]);
        let off = generation as u64 * 7 * MIB;
        qemu_io("qcow2", &img, &format!("write -P {generation} {off} 192k"));
        qemu_io(
            "qcow2",
            &img,
            &format!("write -z {} 64k", (generation as u64 - 2) * MIB),
        );
        qemu_img(&["bitmap", "--disable", i, "bm"]);
        let r = json(&ok(&[
            "disk",
            "sync",
            "--json",
            "--dirty-bitmap",
            "bm",
            i,
            d,
        ]));
        assert_eq!(r["mode"], "dirty-bitmap");
        assert_eq!(r["generation"], generation as u64);
        // Only what the bitmap marks is read: 3 + 1 chunks.
        assert_eq!(r["bytes_read"].as_u64().unwrap(), 4 * 64 * 1024, "{r}");
        let _ = std::fs::remove_file(&reference);
        qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            i,
            reference.to_str().unwrap(),
        ]);
        assert!(
            same_file(&reference, &dst),
            "generation {generation} differs"
        );
    }
}

#[test]
fn a_disk_that_grew_or_shrank_between_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    fill_random(&src, 0, 8 * MIB, 21);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    ok(&["disk", "sync", s, d]);
    // The target's session is begun for 8 MiB before the source is looked at: a disk
    // of another size sets it aside.
    fill_random(&src, 8 * MIB, 4 * MIB + 4096, 22);
    let grown = json(&ok(&["disk", "sync", "--json", s, d]));
    assert!(same_file(&src, &dst));
    assert_eq!(grown["resumed"], false, "{grown}");
    assert_eq!(grown["chunks_changed"], 65, "{grown}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(6 * MIB)
        .unwrap();
    ok(&["disk", "sync", s, d]);
    assert!(same_file(&src, &dst));
    // The same size again: the session begun early is the one used.
    fill_random(&src, MIB, 64 * 1024, 23);
    let same = json(&ok(&["disk", "sync", "--json", s, d]));
    assert!(same_file(&src, &dst));
    assert_eq!(same["resumed"], false, "{same}");
    assert_eq!(same["chunks_changed"], 1, "{same}");
}

#[test]
fn bad_input_gets_clear_errors_and_no_target() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.raw");
    let d = dst.to_str().unwrap();

    let out = run(&["disk", "sync", "/nonexistent/disk.raw", d]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/disk.raw") && err.contains("No such file"),
        "{err}"
    );
    assert!(!dst.exists());

    let raw = dir.path().join("src.raw");
    sparse(&raw, MIB);
    let out = run(&[
        "disk",
        "sync",
        "--dirty-bitmap",
        "bm",
        raw.to_str().unwrap(),
        d,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("raw image carries no dirty bitmap"));

    let out = run(&[
        "disk",
        "sync",
        "--chunk-size",
        "3000",
        raw.to_str().unwrap(),
        d,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));

    let out = run(&[
        "disk",
        "sync",
        raw.to_str().unwrap(),
        "/nonexistent-dir/dst.raw",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir"));

    let out = run(&["disk", "sync", "nbd+unix:///x?socket=/nonexistent.sock", d]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.sock"));
}

#[test]
fn a_target_changed_behind_ferrys_back_is_indexed_again() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    sparse(&src, 32 * MIB);
    fill_random(&src, 0, 4 * MIB, 9);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    ok(&["disk", "sync", s, d]);
    // Someone writes into the target (a test boot, say) and damages the index.
    fill_random(&dst, 20 * MIB, MIB, 10);
    let side = sidecar(&dst);
    let idx = std::fs::read_dir(&side)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "idx"))
        .unwrap();
    std::fs::write(&idx, b"garbage").unwrap();
    let r = json(&ok(&["disk", "sync", "--json", s, d]));
    assert!(same_file(&src, &dst));
    assert_eq!(r["chunks_changed"], 16, "{r}");

    // An existing file Ferry never wrote is adopted: only differences move.
    let other = dir.path().join("other.raw");
    std::fs::copy(&src, &other).unwrap();
    fill_random(&src, 30 * MIB, 64 * 1024, 11);
    let r = json(&ok(&["disk", "sync", "--json", s, other.to_str().unwrap()]));
    assert!(same_file(&src, &other));
    assert_eq!(r["chunks_changed"], 1, "{r}");
}

#[test]
fn quickstart_runs_to_a_verified_copy() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&[
        "quickstart",
        "--disk-only",
        "--size",
        "256M",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.contains("is identical to the source"), "{out}");
    assert!(
        out.trim_end().lines().last().unwrap().starts_with("delta:"),
        "{out}"
    );
}

#[test]
fn qcow2_targets_full_delta_and_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.qcow2");
    sparse(&src, 64 * MIB);
    fill_random(&src, 2 * MIB, 6 * MIB, 21);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let compare = |img: &std::path::Path| {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2", s])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    ok(&["disk", "sync", s, d]);
    compare(&dst);
    let info = Command::new("qemu-img").args(["info", d]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("file format: qcow2"));

    // A delta with a chunk that became zero goes through qemu-nbd into the image.
    fill_random(&src, 40 * MIB, 128 * 1024, 22);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .map(|f| std::os::unix::fs::FileExt::write_all_at(&f, &vec![0; 65536], 3 * MIB).unwrap())
        .unwrap();
    let r = json(&ok(&["disk", "sync", "--json", s, d]));
    assert_eq!(r["chunks_changed"], 3, "{r}");
    assert_eq!(r["chunks_zeroed"], 1, "{r}");
    compare(&dst);
    let check = Command::new("qemu-img")
        .args(["check", d])
        .output()
        .unwrap();
    assert!(check.status.success());

    // An existing qcow2 Ferry never wrote is indexed, then only differences move.
    let other = dir.path().join("other.qcow2");
    std::fs::copy(&dst, &other).unwrap();
    fill_random(&src, 50 * MIB, 65536, 23);
    let r = json(&ok(&["disk", "sync", "--json", s, other.to_str().unwrap()]));
    assert_eq!(r["chunks_changed"], 1, "{r}");
    compare(&other);
}

/// A small file system of its own (tmpfs), unmounted when dropped. Needs root.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs needs root");
        Self { dir }
    }

    fn grow(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_target_file_system_fails_clearly_and_the_next_sync_resumes() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src.raw");
    fill_random(&src, 0, 24 * MIB, 7);
    let fs = SmallFs::new("12M");
    let dst = fs.dir.path().join("dst.raw");
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());

    let out = run(&["disk", "sync", s, d]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("file system is full") && err.contains(d),
        "{err}"
    );
    assert!(!dst.exists(), "a target that does not fit must not appear");

    // With room again, the sync picks up what was received and completes.
    fs.grow("64M");
    let out = json(&ok(&["disk", "sync", "--json", s, d]));
    assert_eq!(out["resumed"], true, "{out}");
    // What was stored before the disk filled up is not sent again.
    assert!(
        out["chunks_changed"].as_u64() < out["chunks_total"].as_u64(),
        "{out}"
    );
    assert!(same_file(&src, &dst));
}
