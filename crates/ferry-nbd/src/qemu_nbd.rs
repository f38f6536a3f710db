//! Starting `qemu-nbd` on a private unix socket, and probing image formats with `qemu-img`.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use crate::server::{socket_dir, ServerProcess};
use crate::uri::NbdTarget;
use crate::NbdError;

/// How to export an image with qemu-nbd.
#[derive(Debug, Clone)]
pub struct QemuNbdOptions {
    /// Image format passed as `-f`; `None` detects it with `qemu-img info`.
    /// Ferry never lets qemu-nbd probe by itself.
    pub format: Option<String>,
    pub read_only: bool,
    /// Persistent dirty bitmap to expose (`-B NAME`, as `qemu:dirty-bitmap:NAME`).
    pub bitmap: Option<String>,
    /// Number of clients that may connect at once (`-e`).
    pub shared: u32,
    /// `--cache=MODE` (none, writeback, writethrough, directsync, unsafe).
    pub cache: Option<String>,
    /// `--discard=unmap`: pass trims through to the image.
    pub discard_unmap: bool,
    /// `--aio=MODE` (threads, io_uring, native). `None`: io_uring where the kernel and
    /// QEMU offer it, else QEMU's default. With threads, an export serving scattered
    /// reads spends much of its time starting worker threads and handing each request
    /// to one.
    pub aio: Option<String>,
}

impl Default for QemuNbdOptions {
    fn default() -> Self {
        QemuNbdOptions {
            format: None,
            read_only: false,
            bitmap: None,
            shared: 8,
            cache: None,
            discard_unmap: false,
            aio: None,
        }
    }
}

/// A qemu-nbd started by Ferry on a private unix socket; stopped (SIGTERM, then
/// SIGKILL if it lingers) and waited for on drop.
#[derive(Debug)]
pub struct QemuNbd {
    process: ServerProcess,
}

impl QemuNbd {
    /// Export `image` and wait (up to 10 s) until the socket accepts connections.
    pub async fn start(image: &Path, opts: QemuNbdOptions) -> Result<QemuNbd, NbdError> {
        let format = match &opts.format {
            Some(f) => f.clone(),
            None => detect_format(image).await?,
        };
        if opts.aio.is_some() {
            return Self::spawn(image, &format, &opts, opts.aio.as_deref()).await;
        }
        match Self::spawn(image, &format, &opts, Some("io_uring")).await {
            // Only a refusal of io_uring itself is worth a second start ("failed to init
            // linux io_uring ring", "not supported in this build", "Invalid aio mode"):
            // anything else (a damaged image, a missing file) would fail again, slower.
            Err(e) if refuses_io_uring(&e.to_string()) => {
                tracing::debug!("qemu-nbd without io_uring: {e}");
                Self::spawn(image, &format, &opts, None).await
            }
            other => other,
        }
    }

    async fn spawn(
        image: &Path,
        format: &str,
        opts: &QemuNbdOptions,
        aio: Option<&str>,
    ) -> Result<QemuNbd, NbdError> {
        let dir = socket_dir("qemu-nbd")?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--persistent")
            .arg("--socket")
            .arg(&dir.1)
            .arg("--format")
            .arg(format)
            .arg(format!("--shared={}", opts.shared));
        if let Some(aio) = aio {
            cmd.arg(format!("--aio={aio}"));
        }
        if opts.read_only {
            cmd.arg("--read-only");
        }
        if let Some(bitmap) = &opts.bitmap {
            cmd.arg("--bitmap").arg(bitmap);
        }
        if let Some(cache) = &opts.cache {
            cmd.arg(format!("--cache={cache}"));
        }
        if opts.discard_unmap {
            cmd.arg("--discard=unmap");
        }
        // "--" so an image path starting with '-' is not taken for an option.
        cmd.arg("--").arg(image);
        let process = ServerProcess::spawn(
            "qemu-nbd",
            cmd,
            dir,
            &format!("{} ({format})", image.display()),
            opts.read_only,
        )
        .await?;
        Ok(QemuNbd { process })
    }

    /// The `nbd+unix` target of the export (export name is empty).
    pub fn target(&self) -> NbdTarget {
        self.process.target()
    }

    /// Process id of qemu-nbd while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Path of the unix socket.
    pub fn socket(&self) -> &Path {
        self.process.socket()
    }

    /// Stop qemu-nbd (SIGTERM so it flushes, SIGKILL after a grace period) and wait for it.
    pub async fn stop(self) -> Result<(), NbdError> {
        self.process.stop().await
    }
}

/// The format of `image` as `qemu-img info` sees it ("raw", "qcow2", "vmdk", ...).
pub async fn detect_format(image: &Path) -> Result<String, NbdError> {
    // -U: a running VM or export may hold the image lock; reading its header is safe.
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "--"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| NbdError::Launch(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(NbdError::Launch(format!(
            "qemu-img info {} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| NbdError::Launch(format!("cannot parse qemu-img info output: {e}")))?;
    info.get("format")
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            NbdError::Launch(format!(
                "qemu-img info {} reported no format",
                image.display()
            ))
        })
}

/// Whether qemu-nbd's failure to start was about `--aio=io_uring` rather than the image.
fn refuses_io_uring(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("io_uring") || e.contains("aio mode") || e.contains("aio=")
}

#[cfg(test)]
mod tests {
    use super::refuses_io_uring;

    #[test]
    fn only_an_io_uring_refusal_is_retried_without_it() {
        for refusal in [
            "qemu-nbd: failed to init linux io_uring ring: Operation not permitted",
            "qemu-nbd: aio=io_uring was specified, but is not supported in this build.",
            "qemu-nbd: Invalid aio mode 'io_uring'",
        ] {
            assert!(refuses_io_uring(refusal), "{refusal}");
        }
        assert!(!refuses_io_uring(
            "qemu-nbd: Failed to blk_new_open '/tmp/bad.qcow2': qcow2: Compression type incompatible feature bit must not be set"
        ));
        assert!(!refuses_io_uring(
            "qemu-nbd: Failed to blk_new_open 'x.raw': Could not open 'x.raw': No such file or directory"
        ));
    }
}
