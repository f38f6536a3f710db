//! The test guest: a small Debian image that the repository's recipe
//! (`scripts/testbed/build-guest-image.sh`) builds once and caches outside the
//! repository, keyed by the recipe. The quickstart migrates it; the tests boot it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the guest image recipe {0} is missing: run from Ferry's source tree or set FERRY_TESTBED_SCRIPT")]
    Missing(PathBuf),
    #[error("cannot run the guest image recipe {path}: {source}")]
    Run {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the guest image failed ({status}); `bash scripts/install-deps.sh` installs what it needs: {messages}")]
    Failed { status: String, messages: String },
}

/// Which test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// The virtio guest: ext4 on the whole disk, booted with the host's kernel.
    Virtio,
    /// A guest installed on VMware hardware (PVSCSI, VMXNET3, open-vm-tools, a host-only
    /// initramfs without virtio drivers, GRUB, a static address): it boots on KVM only
    /// once converted.
    Vmware,
}

impl Guest {
    fn env(self) -> &'static str {
        match self {
            Guest::Virtio => "FERRY_TESTBED_SCRIPT",
            Guest::Vmware => "FERRY_TESTBED_VMWARE_SCRIPT",
        }
    }
    fn script(self) -> &'static str {
        match self {
            Guest::Virtio => "build-guest-image.sh",
            Guest::Vmware => "build-vmware-guest.sh",
        }
    }
}

/// The recipe: `$FERRY_TESTBED_SCRIPT` (or `…_VMWARE_SCRIPT`), else the one in this
/// source tree.
fn recipe(guest: Guest) -> PathBuf {
    std::env::var_os(guest.env())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../scripts/testbed")
                .join(guest.script())
        })
}

/// Runs the recipe (quick when its cache is current) and returns the directory that
/// holds the image. With `show_progress` the recipe's messages go to this process's
/// stderr as they come; otherwise they are kept for the error.
pub fn guest_image(show_progress: bool) -> Result<PathBuf, TestbedError> {
    image(Guest::Virtio, show_progress)
}

/// Like [`image`], with the recipe's messages written to `log` instead of a terminal;
/// `on_line` sees its newest line as it changes (a progress line for people). A failure
/// names the log and ends with its last lines.
pub fn image_logged(
    guest: Guest,
    log: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<PathBuf, TestbedError> {
    let path = recipe(guest);
    if !path.exists() {
        return Err(TestbedError::Missing(path));
    }
    let run = |source| TestbedError::Run {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::create(log).map_err(run)?;
    let mut child = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .spawn()
        .map_err(run)?;
    // The recipe prints one line on stdout (the directory); read it on a thread of its own.
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = stdout.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut s);
        }
        s
    });
    let mut last = String::new();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(run)? {
            break st;
        }
        if let Some(line) = last_line(log).filter(|l| *l != last) {
            on_line(&line);
            last = line;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let stdout = reader.join().unwrap_or_default();
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(TestbedError::Failed {
            status: status.to_string(),
            messages: format!(
                "its messages are in {}; the last ones:\n{}",
                log.display(),
                tail.join("\n")
            ),
        });
    }
    Ok(PathBuf::from(stdout.lines().last().unwrap_or("").trim()))
}

/// The last non-empty line of a file, if any.
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// Like [`guest_image`], for either test guest.
pub fn image(guest: Guest, show_progress: bool) -> Result<PathBuf, TestbedError> {
    let path = recipe(guest);
    if !path.exists() {
        return Err(TestbedError::Missing(path));
    }
    let out = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(if show_progress {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .output()
        .map_err(|source| TestbedError::Run {
            path: path.clone(),
            source,
        })?;
    if !out.status.success() {
        let messages = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(TestbedError::Failed {
            status: out.status.to_string(),
            messages: if messages.is_empty() {
                "see the messages above".into()
            } else {
                messages
            },
        });
    }
    // The recipe's last line of output names the directory.
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim(),
    ))
}
