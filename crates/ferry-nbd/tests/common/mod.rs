//! Helpers shared by the tests that run the real qemu-img / qemu-io / qemu-nbd.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_nbd::{ConnectOptions, NbdClient, QemuNbd, QemuNbdOptions};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create -f FMT PATH SIZE` in `dir`.
pub fn create_image(dir: &Path, name: &str, format: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            format,
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    path
}

/// Run qemu-io commands (e.g. `write -P 0xab 1M 64k`) on an image.
pub fn qemu_io(path: &Path, format: &str, commands: &[String]) {
    let mut args = vec!["-f".to_string(), format.to_string()];
    for c in commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path.to_str().unwrap().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args);
}

/// A qemu-io command filling `[offset, offset+len)` with `pattern`, mirrored into `expected`.
pub fn pattern_write(expected: &mut [u8], offset: u64, len: u64, pattern: u8) -> String {
    expected[offset as usize..(offset + len) as usize].fill(pattern);
    format!("write -P {pattern:#x} {offset} {len}")
}

pub async fn export(image: &Path, format: &str, read_only: bool) -> QemuNbd {
    QemuNbd::start(
        image,
        QemuNbdOptions {
            read_only,
            ..QemuNbdOptions::new(format)
        },
    )
    .await
    .expect("start qemu-nbd")
}

pub async fn connect(nbd: &QemuNbd, contexts: &[&str]) -> NbdClient {
    NbdClient::connect(
        &nbd.target(),
        ConnectOptions {
            meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        },
    )
    .await
    .expect("connect to qemu-nbd")
}

/// Ask for block status until the whole range is described, merging neighbours
/// with the same flags (servers may split extents as they like).
pub async fn full_map(
    client: &NbdClient,
    context: &str,
    offset: u64,
    len: u64,
) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let extents = client
            .block_status(context, pos, offset + len - pos)
            .await
            .expect("block status");
        assert!(!extents.is_empty(), "no extents at {pos}");
        for e in extents {
            assert_eq!(e.offset, pos, "extents must be contiguous");
            match out.last_mut() {
                Some(last) if last.2 == e.flags => last.1 += e.length,
                _ => out.push((e.offset, e.length, e.flags)),
            }
            pos += e.length;
        }
    }
    out
}

/// Bytes that differ at every position, to catch misplaced chunks.
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}
