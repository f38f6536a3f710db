//! Starting `qemu-nbd` on a private unix socket.
//!
//! The caller always states the image's format: a guest controls every byte of its
//! disks, and a format probed from them (by qemu-nbd, or by `qemu-img info` first) lets a
//! guest that wrote a qcow2 header into its raw disk make QEMU open a backing file of
//! this host. Recognising a user's image file, with the checks that takes, is
//! `ferry_disk::open`'s job, not this launcher's.

use std::path::Path;

use tokio::process::Command;

use crate::server::{socket_dir, ServerProcess};
use crate::uri::NbdTarget;
use crate::NbdError;

/// How to export an image with qemu-nbd.
#[derive(Debug, Clone)]
pub struct QemuNbdOptions {
    /// Image format passed as `--format`: stated by the caller, never probed.
    pub format: String,
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

impl QemuNbdOptions {
    /// A read-write export of an image of `format`, the other options at their defaults.
    pub fn new(format: impl Into<String>) -> Self {
        QemuNbdOptions {
            format: format.into(),
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
        let format = opts.format.clone();
        if format.is_empty() || format.starts_with('-') {
            return Err(NbdError::Launch(format!(
                "no image format stated for {}: the caller must name it (raw, qcow2, ...)",
                image.display()
            )));
        }
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
