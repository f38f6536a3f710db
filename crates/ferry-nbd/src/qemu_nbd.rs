//! Starting `qemu-nbd` on a private unix socket, and probing image formats with `qemu-img`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::proto;
use crate::uri::{NbdAddr, NbdTarget};
use crate::NbdError;

/// How long `start` waits for the socket to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// For how long after the start `start` polls the socket every millisecond (then every
/// 20 ms).
const FAST_POLL_FOR: Duration = Duration::from_millis(500);
/// How long a stop waits after SIGTERM before SIGKILL. qemu-nbd flushes and
/// stores persistent bitmaps on SIGTERM; killing it outright can leave a qcow2
/// bitmap marked in-use (and then unusable).
const STOP_GRACE: Duration = Duration::from_secs(10);

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
        }
    }
}

/// A qemu-nbd started by Ferry on a private unix socket; stopped (SIGTERM, then
/// SIGKILL if it lingers) and waited for on drop.
pub struct QemuNbd {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    // Holds the socket and the log; removed when this value goes away.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for QemuNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuNbd")
            .field("pid", &self.child.as_ref().and_then(|c| c.id()))
            .field("socket", &self.socket)
            .finish()
    }
}

impl QemuNbd {
    /// Export `image` and wait (up to 10 s) until the socket accepts connections.
    pub async fn start(image: &Path, opts: QemuNbdOptions) -> Result<QemuNbd, NbdError> {
        let format = match &opts.format {
            Some(f) => f.clone(),
            None => detect_format(image).await?,
        };
        let dir = tempfile::Builder::new()
            .prefix("ferry-qemu-nbd-")
            .tempdir()
            .map_err(|e| NbdError::Launch(format!("cannot create a socket directory: {e}")))?;
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("qemu-nbd.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| NbdError::Launch(format!("cannot create {}: {e}", log.display())))?;

        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--persistent")
            .arg("--socket")
            .arg(&socket)
            .arg("--format")
            .arg(&format)
            .arg(format!("--shared={}", opts.shared));
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
        // stderr goes to a file rather than a pipe: nobody drains a pipe while the
        // export runs, and a full pipe would stall qemu-nbd.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        debug!(?cmd, "starting qemu-nbd");
        let child = cmd
            .spawn()
            .map_err(|e| NbdError::Launch(format!("cannot run qemu-nbd: {e}")))?;
        let mut nbd = QemuNbd {
            child: Some(child),
            socket,
            log,
            _dir: dir,
        };
        nbd.wait_ready(image).await?;
        debug!(socket = %nbd.socket.display(), image = %image.display(), format, "qemu-nbd ready");
        Ok(nbd)
    }

    async fn wait_ready(&mut self, image: &Path) -> Result<(), NbdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child present until stop");
            if let Some(status) = child.try_wait()? {
                return Err(NbdError::Launch(format!(
                    "qemu-nbd for {} exited with {status}: {}",
                    image.display(),
                    self.stderr()
                )));
            }
            if probe(&self.socket).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let err = NbdError::Launch(format!(
                    "qemu-nbd for {} did not accept connections within {:?}: {}",
                    image.display(),
                    START_TIMEOUT,
                    self.stderr()
                ));
                self.kill_and_wait_blocking();
                return Err(err);
            }
            // qemu-nbd is usually up within 10-30 ms: look often at first, so a short
            // sync does not spend most of a poll interval waiting for nothing.
            let started = deadline - START_TIMEOUT;
            let pause = if started.elapsed() < FAST_POLL_FOR {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(20)
            };
            tokio::time::sleep(pause).await;
        }
    }

    fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            "(no output)".to_string()
        } else {
            text.to_string()
        }
    }

    /// The `nbd+unix` target of the export (export name is empty).
    pub fn target(&self) -> NbdTarget {
        NbdTarget {
            addr: NbdAddr::Unix(self.socket.clone()),
            export: String::new(),
        }
    }

    /// Process id of qemu-nbd while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Path of the unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stop qemu-nbd (SIGTERM so it flushes, SIGKILL after a grace period) and wait for it.
    pub async fn stop(mut self) -> Result<(), NbdError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            // SAFETY: plain kill(2) on our own child, which we have not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let status = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                warn!("qemu-nbd ignored SIGTERM; killing it");
                child.kill().await?;
                child.wait().await?
            }
        };
        debug!(%status, "qemu-nbd stopped");
        // Killed by our SIGTERM is the normal way for it to end.
        if status.success() || status.code().is_none() {
            Ok(())
        } else {
            Err(NbdError::Launch(format!(
                "qemu-nbd exited with {status}: {}",
                self.stderr()
            )))
        }
    }

    /// Drop cannot await, so this blocks the thread briefly (normally milliseconds).
    fn kill_and_wait_blocking(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SAFETY: as in stop().
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    warn!("qemu-nbd ignored SIGTERM; killing it");
                    let _ = child.start_kill();
                    let wait_until = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < wait_until {
                        if !matches!(child.try_wait(), Ok(None)) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return;
                }
                // qemu-nbd usually exits within a few milliseconds of SIGTERM: look
                // often, so a short-lived export does not cost a long poll interval.
                Ok(None) => std::thread::sleep(Duration::from_micros(500)),
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill_and_wait_blocking();
    }
}

/// Whether an NBD server behind `socket` is serving: it greets us and accepts
/// NBD_OPT_ABORT. A connect alone is not enough: qemu-nbd listens before it opens
/// the image, and may still exit because the image (or bitmap) cannot be opened.
async fn probe(socket: &Path) -> bool {
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await?;
        if greeting[0..8] != proto::NBDMAGIC.to_be_bytes() {
            return Ok::<bool, std::io::Error>(false);
        }
        s.write_all(&proto::CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes())
            .await?;
        s.write_all(&proto::encode_option(proto::OPT_ABORT, &[]))
            .await?;
        // Wait for the server's answer (or its close) so that it does not log a
        // client that vanished mid-handshake.
        let mut reply = [0u8; 20];
        let _ = s.read_exact(&mut reply).await;
        Ok(true)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
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
