//! An NBD server process Ferry starts on a private unix socket (qemu-nbd, nbdkit): its
//! start-up wait, its log, and its stop (SIGTERM, then SIGKILL if it lingers).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::proto;
use crate::uri::{NbdAddr, NbdTarget};
use crate::NbdError;

/// How long a start waits for the socket to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// For how long after the start the socket is polled every millisecond (then every
/// 20 ms).
const FAST_POLL_FOR: Duration = Duration::from_millis(500);
/// How long a stop waits after SIGTERM before SIGKILL. qemu-nbd flushes and stores
/// persistent bitmaps on SIGTERM; killing it outright can leave a qcow2 bitmap marked
/// in-use (and then unusable).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running server: the child, its socket and log in a private directory.
pub(crate) struct ServerProcess {
    /// "qemu-nbd", "nbdkit": for messages.
    program: &'static str,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    // Holds the socket and the log; removed when this value goes away.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.program)
            .field("pid", &self.pid())
            .field("socket", &self.socket)
            .finish()
    }
}

/// A private directory for a server's socket and log.
pub(crate) fn socket_dir(program: &str) -> Result<(tempfile::TempDir, PathBuf, PathBuf), NbdError> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("ferry-{program}-"))
        .tempdir()
        .map_err(|e| NbdError::Launch(format!("cannot create a socket directory: {e}")))?;
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join(format!("{program}.log"));
    Ok((dir, socket, log))
}

/// A request to the spawner thread.
type SpawnJob = (
    Command,
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<std::io::Result<Child>>,
);

/// Starts `cmd` so that it is sent `signal` if Ferry dies (SIGKILL, a crash) before it
/// stops the server itself: an orphaned qemu-nbd would keep its image locked, and the
/// next sync of that disk would fail on the lock.
///
/// The parent-death signal fires when the *thread* that started the child ends, not the
/// process; tokio's blocking threads come and go, so children are started from one thread
/// that lives as long as the process.
async fn spawn_dying_with_us(mut cmd: Command, signal: libc::c_int) -> std::io::Result<Child> {
    type Spawner = Result<std::sync::mpsc::Sender<SpawnJob>, String>;
    static SPAWNER: std::sync::OnceLock<Spawner> = std::sync::OnceLock::new();
    // SAFETY: getpid is async-signal-safe and has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Ferry died between the fork and the prctl: the signal will never come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("ferry-spawner".into())
            .spawn(move || {
                for (mut cmd, rt, reply) in rx {
                    let _in_runtime = rt.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| tx)
            .map_err(|e| e.to_string())
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| std::io::Error::other(format!("cannot start the spawner thread: {e}")))?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = (cmd, tokio::runtime::Handle::current(), reply);
    spawner
        .send(job)
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
}

impl ServerProcess {
    /// Runs `cmd` (already told to listen on `socket`) with its stderr in `log`, and
    /// waits until it serves. `what` names the export in messages.
    ///
    /// Should Ferry die, a server that exports for writing gets SIGTERM, to flush what it
    /// holds; one that only reads gets SIGKILL, since it has nothing to lose: qemu-nbd
    /// forgets a SIGTERM that comes while it starts up, and would be left running.
    pub(crate) async fn spawn(
        program: &'static str,
        mut cmd: Command,
        (dir, socket, log): (tempfile::TempDir, PathBuf, PathBuf),
        what: &str,
        read_only: bool,
    ) -> Result<ServerProcess, NbdError> {
        let log_file = std::fs::File::create(&log)
            .map_err(|e| NbdError::Launch(format!("cannot create {}: {e}", log.display())))?;
        // stderr goes to a file rather than a pipe: nobody drains a pipe while the
        // export runs, and a full pipe would stall the server.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        debug!(program, what, "starting an NBD server");
        let signal = if read_only {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        let child = spawn_dying_with_us(cmd, signal)
            .await
            .map_err(|e| NbdError::Launch(format!("cannot run {program}: {e}")))?;
        let mut p = ServerProcess {
            program,
            child: Some(child),
            socket,
            log,
            _dir: dir,
        };
        p.wait_ready(what).await?;
        debug!(program, socket = %p.socket.display(), what, "NBD server ready");
        Ok(p)
    }

    async fn wait_ready(&mut self, what: &str) -> Result<(), NbdError> {
        let program = self.program;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child present until stop");
            if let Some(status) = child.try_wait()? {
                return Err(NbdError::Launch(format!(
                    "{program} for {what} exited with {status}: {}",
                    self.stderr()
                )));
            }
            if probe(&self.socket).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let err = NbdError::Launch(format!(
                    "{program} for {what} did not accept connections within {START_TIMEOUT:?}: {}",
                    self.stderr()
                ));
                self.kill_and_wait_blocking();
                return Err(err);
            }
            // Servers are usually up within 10-30 ms: look often at first, so a short
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

    /// What the server wrote on stderr.
    pub(crate) fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            "(no output)".to_string()
        } else {
            text.to_string()
        }
    }

    pub(crate) fn target(&self) -> NbdTarget {
        NbdTarget {
            addr: NbdAddr::Unix(self.socket.clone()),
            export: String::new(),
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// SIGTERM so it flushes, SIGKILL after a grace period; waits for it.
    pub(crate) async fn stop(mut self) -> Result<(), NbdError> {
        let program = self.program;
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
                warn!(program, "ignored SIGTERM; killing it");
                child.kill().await?;
                child.wait().await?
            }
        };
        debug!(program, %status, "NBD server stopped");
        // Killed by our SIGTERM is the normal way for it to end.
        if status.success() || status.code().is_none() {
            Ok(())
        } else {
            Err(NbdError::Launch(format!(
                "{program} exited with {status}: {}",
                self.stderr()
            )))
        }
    }

    /// Drop cannot await, so this blocks the thread briefly (normally milliseconds).
    fn kill_and_wait_blocking(&mut self) {
        let program = self.program;
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
                    warn!(program, "ignored SIGTERM; killing it");
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
                // Servers usually exit within a few milliseconds of SIGTERM: look
                // often, so a short-lived export does not cost a long poll interval.
                Ok(None) => std::thread::sleep(Duration::from_micros(500)),
            }
        }
    }
}

impl Drop for ServerProcess {
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
