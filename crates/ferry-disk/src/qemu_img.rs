//! Running `qemu-img` with a deadline, and reading from `qemu-img info` which other files
//! an image names (backing files, external data files, extents): the files QEMU would
//! read when it opens the image as that format.
//!
//! Every caller states the image's format (`-f`); nothing here lets QEMU probe one.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `qemu-img info` may take: it reads a header and a few tables.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(30);

/// Failures of a `qemu-img` run, each saying which command it was.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("cannot run qemu-img (install qemu-utils): {0}")]
    Launch(std::io::Error),
    #[error("`qemu-img {command}` did not finish within {} s and was stopped (is the image on storage that does not answer?)", .timeout.as_secs())]
    TimedOut { command: String, timeout: Duration },
    #[error("`qemu-img {command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot read what `qemu-img {command}` printed: {reason}")]
    Output { command: String, reason: String },
}

fn command_line(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn checked(command: String, out: Output) -> Result<Output, QemuImgError> {
    if out.status.success() {
        return Ok(out);
    }
    Err(QemuImgError::Failed {
        command,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs `qemu-img ARGS`, killed when it takes longer than `timeout`; a non-zero exit is
/// an error carrying what qemu-img printed on stderr.
pub async fn run<I, S>(args: I, timeout: Duration) -> Result<Output, QemuImgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = command_line(&args);
    let out = run_any(args, timeout).await?;
    checked(command, out)
}

/// [`run`] that hands back any exit status (for commands whose status is an answer).
async fn run_any(args: Vec<OsString>, timeout: Duration) -> Result<Output, QemuImgError> {
    let command = command_line(&args);
    let child = tokio::process::Command::new("qemu-img")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A run that times out is dropped with its future: the process goes with it.
        .kill_on_drop(true)
        .spawn()
        .map_err(QemuImgError::Launch)?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.map_err(QemuImgError::Launch),
        Err(_) => Err(QemuImgError::TimedOut { command, timeout }),
    }
}

/// [`run`] for callers on a blocking thread (no async runtime needed).
pub fn run_blocking<I, S>(args: I, timeout: Duration) -> Result<Output, QemuImgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = command_line(&args);
    let mut child = std::process::Command::new("qemu-img")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(QemuImgError::Launch)?;
    // Both pipes are drained on threads of their own, so a chatty qemu-img never blocks
    // on a full pipe while this thread waits for it to exit.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuImgError::Launch(e));
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(QemuImgError::TimedOut { command, timeout });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    checked(command, out)
}

/// What `qemu-img info --output=json -f FORMAT` says of an image.
pub async fn info(image: &Path, format: &str) -> Result<serde_json::Value, QemuImgError> {
    // -U: a running VM or export may hold the image's lock; reading its header is safe.
    // info opens the image without its backing file or data file.
    let mut args: Vec<OsString> = ["info", "--output=json", "-U", "-f", format, "--"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(image.as_os_str().to_owned());
    let command = command_line(&args);
    let out = run(args, INFO_TIMEOUT).await?;
    serde_json::from_slice(&out.stdout).map_err(|e| QemuImgError::Output {
        command,
        reason: e.to_string(),
    })
}

/// One side of a [`compare`]: what QEMU opens (an image path or an `nbd://` /
/// `nbd+unix://` URI) and its format, stated.
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    pub spec: &'a str,
    pub format: &'a str,
}

impl Image<'_> {
    /// The name qemu-img is given: a relative path gets `./`, so that no part of a file
    /// name is read as a protocol prefix (`json:`, `nbd:`).
    fn name(&self) -> OsString {
        let is_uri = self.spec.starts_with("nbd://") || self.spec.starts_with("nbd+unix://");
        if is_uri || self.spec.starts_with('/') {
            OsString::from(self.spec)
        } else {
            OsString::from(format!("./{}", self.spec))
        }
    }
}

/// How long a [`compare`] of two disks of `size` bytes may take: both are read whole.
pub fn compare_timeout(size: u64) -> Duration {
    Duration::from_secs(120 + 30 * size.div_ceil(1 << 30))
}

/// Whether two disks hold the same bytes (`qemu-img compare`, formats stated, areas past
/// the shorter one's end must read as zeros): `None` when they do, else the first
/// offset that differs (`Some(None)` when qemu-img did not say where).
pub async fn compare(
    a: Image<'_>,
    b: Image<'_>,
    timeout: Duration,
) -> Result<Option<Option<u64>>, QemuImgError> {
    // -U: the synced disk may back a running instance's overlay; reading it is safe.
    let mut args: Vec<OsString> = ["compare", "-U", "-f", a.format, "-F", b.format, "--"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(a.name());
    args.push(b.name());
    let command = command_line(&args);
    let out = run_any(args, timeout).await?;
    match out.status.code() {
        Some(0) => Ok(None),
        // 1: the images differ; qemu-img says where on stdout.
        Some(1) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let at = text.split("offset ").nth(1).and_then(|t| {
                t.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()
            });
            Ok(Some(at))
        }
        _ => Err(checked(command.clone(), out)
            .err()
            .unwrap_or(QemuImgError::Output {
                command,
                reason: "it exited with no status".into(),
            })),
    }
}

/// What kind of other file an image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceKind {
    Backing,
    DataFile,
    Extent,
    /// Another child node QEMU opened for the image (its name, e.g. `extents.0`).
    Child(String),
}

impl std::fmt::Display for ReferenceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReferenceKind::Backing => f.write_str("backing file"),
            ReferenceKind::DataFile => f.write_str("external data file"),
            ReferenceKind::Extent => f.write_str("extent file"),
            ReferenceKind::Child(name) => write!(f, "{name} file"),
        }
    }
}

/// A file other than the image itself that opening the image would read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub kind: ReferenceKind,
    pub name: String,
}

/// The files other than `image` itself that the image described by `info` (the output
/// of [`info`]) names: empty only for a self-contained image.
pub fn references(info: &serde_json::Value, image: &Path) -> Vec<Reference> {
    let mut out: Vec<Reference> = Vec::new();
    let mut add = |kind: ReferenceKind, name: &str| {
        if !out.iter().any(|r| r.name == name) {
            out.push(Reference {
                kind,
                name: name.to_string(),
            });
        }
    };
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(name) = info.get(key).and_then(|v| v.as_str()) {
            add(ReferenceKind::Backing, name);
        }
    }
    let data = info.pointer("/format-specific/data");
    if let Some(name) = data
        .and_then(|d| d.get("data-file"))
        .and_then(|v| v.as_str())
    {
        add(ReferenceKind::DataFile, name);
    }
    let extents = data
        .and_then(|d| d.get("extents"))
        .and_then(|v| v.as_array());
    for name in extents
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("filename").and_then(|v| v.as_str()))
    {
        if !is_same_file(name, image) {
            add(ReferenceKind::Extent, name);
        }
    }
    let children = info.get("children").and_then(|v| v.as_array());
    for child in children.into_iter().flatten() {
        let name = child.get("name").and_then(|v| v.as_str()).unwrap_or("?");
        if name == "file" {
            continue;
        }
        let file = child
            .pointer("/info/filename")
            .and_then(|v| v.as_str())
            .unwrap_or(name);
        if !is_same_file(file, image) {
            add(ReferenceKind::Child(name.to_string()), file);
        }
    }
    out
}

/// Whether `name` (as qemu-img printed it) is `image` itself.
fn is_same_file(name: &str, image: &Path) -> bool {
    if Path::new(name) == image {
        return true;
    }
    match (std::fs::canonicalize(name), std::fs::canonicalize(image)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_self_contained_image_names_nothing() {
        let info = json!({
            "format": "qcow2",
            "filename": "/img/a.qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}},
            "children": [{"name": "file", "info": {"filename": "/img/a.qcow2"}}],
        });
        assert!(references(&info, Path::new("/img/a.qcow2")).is_empty());
        // A sparse vmdk's one extent is the file itself.
        let vmdk = json!({
            "format": "vmdk",
            "format-specific": {"type": "vmdk", "data": {"extents": [{"filename": "/img/s.vmdk"}]}},
            "children": [{"name": "file", "info": {"filename": "/img/s.vmdk"}}],
        });
        assert!(references(&vmdk, Path::new("/img/s.vmdk")).is_empty());
    }

    #[test]
    fn backing_data_and_extent_files_are_found() {
        let info = json!({
            "format": "qcow2",
            "backing-filename": "/etc/shadow",
            "full-backing-filename": "/etc/shadow",
            "format-specific": {"type": "qcow2", "data": {"data-file": "/root/key"}},
        });
        let r = references(&info, Path::new("/img/evil.raw"));
        assert_eq!(
            r,
            vec![
                Reference {
                    kind: ReferenceKind::Backing,
                    name: "/etc/shadow".into()
                },
                Reference {
                    kind: ReferenceKind::DataFile,
                    name: "/root/key".into()
                },
            ]
        );
        let vmdk = json!({
            "format": "vmdk",
            "format-specific": {"type": "vmdk", "data": {"extents": [{"filename": "/etc/passwd"}]}},
            "children": [
                {"name": "extents.0", "info": {"filename": "/etc/passwd"}},
                {"name": "file", "info": {"filename": "/img/d.vmdk"}},
            ],
        });
        let r = references(&vmdk, Path::new("/img/d.vmdk"));
        assert_eq!(
            r,
            vec![Reference {
                kind: ReferenceKind::Extent,
                name: "/etc/passwd".into()
            }]
        );
        assert_eq!(r[0].kind.to_string(), "extent file");
    }

    fn have_qemu_img() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn a_run_past_its_deadline_is_stopped() {
        if !have_qemu_img() {
            eprintln!("skipped: no qemu-img");
            return;
        }
        // Opening a FIFO nobody writes blocks qemu-img for good.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let args = |p: &Path| -> Vec<OsString> {
            vec![
                "info".into(),
                "-f".into(),
                "raw".into(),
                "--".into(),
                p.into(),
            ]
        };
        let t = Instant::now();
        let err = run_blocking(args(&fifo), Duration::from_millis(500)).unwrap_err();
        assert!(matches!(err, QemuImgError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Instant::now();
        let err = rt
            .block_on(run(args(&fifo), Duration::from_millis(500)))
            .unwrap_err();
        assert!(matches!(err, QemuImgError::TimedOut { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_failed_run_says_what_it_ran() {
        if !have_qemu_img() {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let err = run_blocking(["nonsense-subcommand"], Duration::from_secs(20)).unwrap_err();
        assert!(matches!(err, QemuImgError::Failed { .. }), "{err}");
        assert!(err.to_string().contains("nonsense-subcommand"), "{err}");
    }

    #[test]
    fn compare_finds_the_first_difference_across_formats() {
        if !have_qemu_img() {
            eprintln!("skipped: no qemu-img");
            return;
        }
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"the source's bytes", 1 << 20).unwrap();
        let qcow2 = dir.path().join("b.qcow2");
        run_blocking(
            [
                "convert".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                raw.as_os_str(),
                qcow2.as_os_str(),
            ],
            Duration::from_secs(30),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (a, b) = (raw.to_str().unwrap(), qcow2.to_str().unwrap());
        let cmp = |fa: &'static str, fb: &'static str| {
            rt.block_on(compare(
                Image {
                    spec: a,
                    format: fa,
                },
                Image {
                    spec: b,
                    format: fb,
                },
                compare_timeout(4 << 20),
            ))
        };
        assert_eq!(cmp("raw", "qcow2").unwrap(), None);
        // The qcow2 file read as raw bytes is not the disk it holds.
        assert!(cmp("raw", "raw").unwrap().is_some());
        f.write_all_at(b"X", (3 << 20) + 5).unwrap();
        assert_eq!(cmp("raw", "qcow2").unwrap(), Some(Some(3 << 20)));
        let missing = rt
            .block_on(compare(
                Image {
                    spec: "no/such.raw",
                    format: "raw",
                },
                Image {
                    spec: b,
                    format: "qcow2",
                },
                Duration::from_secs(30),
            ))
            .unwrap_err();
        assert!(missing.to_string().contains("./no/such.raw"), "{missing}");
    }
}
