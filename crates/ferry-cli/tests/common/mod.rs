//! Helpers for tests that run the real `ferry` binary.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_LOG", "info");
    // What Ferry keeps between syncs (indexes, digest memos) stays out of the user's
    // cache; a test that looks at it sets its own.
    c.env(
        "XDG_CACHE_HOME",
        std::env::temp_dir().join("ferry-test-cache"),
    );
    c
}

/// Runs ferry with `args`, asserting success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    succeed(ferry().args(args))
}

/// Runs `cmd`, asserting success; returns stdout.
pub fn succeed(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn run(args: &[&str]) -> Output {
    ferry().args(args).output().unwrap()
}

pub fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Fills `len` bytes at `offset` with pseudo-random data (seeded, incompressible).
pub fn fill_random(path: &Path, offset: u64, len: u64, seed: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        for w in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            w.copy_from_slice(&b[..w.len()]);
        }
        f.write_all_at(&buf[..n], offset + pos).unwrap();
        pos += n as u64;
    }
}

pub fn sparse(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// Whether `path` reads as `size` zero bytes.
pub fn all_zero(path: &Path, size: u64) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg("-n")
        .arg(size.to_string())
        .arg(path)
        .arg("/dev/zero")
        .status()
        .unwrap()
        .success()
        && std::fs::metadata(path).unwrap().len() == size
}

pub fn sidecar(dst: &Path) -> PathBuf {
    let mut s = dst.as_os_str().to_owned();
    s.push(".ferry");
    PathBuf::from(s)
}

/// Non-zero entries of the pending index: chunks the receiver holds durably.
pub fn pending_chunks(dst: &Path) -> u64 {
    let idx = sidecar(dst).join("pending/index.idx");
    let Ok(bytes) = std::fs::read(&idx) else {
        return 0;
    };
    bytes[64..]
        .chunks_exact(32)
        .filter(|e| e.iter().any(|&b| b != 0))
        .count() as u64
}

/// Bytes allocated to the pending data file or journal (grows as chunks arrive).
pub fn pending_bytes(dst: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    ["pending/data", "pending/journal"]
        .iter()
        .map(|f| {
            std::fs::metadata(sidecar(dst).join(f))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        })
        .sum()
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A CA in `dir` with certificates `receiver` (for localhost) and `sender`.
pub fn pki(dir: &Path) {
    let d = dir.to_str().unwrap();
    ok(&["pki", "init", "--dir", d]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        d,
        "receiver",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
    ]);
    ok(&["pki", "issue", "--dir", d, "sender"]);
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `ferry disk receive`, killed on drop.
pub struct ReceiverProc {
    pub child: Child,
    pub port: u16,
}

impl ReceiverProc {
    pub fn start(dst: &Path, pki: &Path, port: u16, extra: &[&str]) -> Self {
        let mut cmd = ferry();
        cmd.args(["disk", "receive"])
            .arg(dst)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--pki-dir", pki.to_str().unwrap(), "--name", "receiver"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        wait_until("the receiver to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { child, port }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ReceiverProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn send_cmd(src: &Path, pki: &Path, port: u16, extra: &[&str]) -> Command {
    let mut cmd = ferry();
    cmd.args(["disk", "send", "--json"])
        .arg(src)
        .args(["--to", &format!("localhost:{port}")])
        .args(["--pki-dir", pki.to_str().unwrap(), "--name", "sender"])
        .args(extra);
    cmd
}

pub struct Evil {
    _dir: tempfile::TempDir,
    pub dir: PathBuf,
    /// The host file the header names as its backing file.
    pub secret: PathBuf,
    pub secret_marker: Vec<u8>,
    /// The raw disk: a qcow2 header naming `secret`, then guest data.
    pub raw: PathBuf,
}

/// A raw disk of 8 MiB whose first bytes are a real qcow2 header (with its tables) naming
/// a secret file of this host as the backing file: what a hostile guest writes.
pub fn evil_disk() -> Evil {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let secret = dir.join("appliance-secret.key");
    let secret_marker = b"FERRY-UNTRUSTED-FORMATS-TEST-SECRET-7f3c".to_vec();
    // As large as the image the header describes, so qemu would find a secret byte in
    // every cluster the overlay leaves unallocated.
    let mut content = Vec::with_capacity((1u64 << 20) as usize);
    while content.len() < (1u64 << 20) as usize {
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
    assert!(header.len() < (1u64 << 20) as usize);
    let raw = dir.join("evil.raw");
    sparse(&raw, 8 * (1u64 << 20));
    fill_random(&raw, 2 * (1u64 << 20), 3 * (1u64 << 20), 11);
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

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn assert_no_secret(e: &Evil, dst: &Path) {
    let bytes = std::fs::read(dst).unwrap();
    assert!(
        !contains(&bytes, &e.secret_marker),
        "{} holds the host's secret",
        dst.display()
    );
}

/// Files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Runs qemu-img; fails the test when it fails.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs one qemu-io command on an image of format `fmt`; fails the test when it fails.
pub fn qemu_io(fmt: &str, img: &std::path::Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
