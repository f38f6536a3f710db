//! A client for the QEMU guest agent (qemu-ga) over the host end of its
//! virtio-serial channel (a Unix socket QEMU listens on).
//!
//! The channel is a byte pipe that outlives our connections: QEMU accepts a
//! connection whether or not the agent runs in the guest, a command nobody answers
//! just hangs, and bytes of an earlier conversation may still be in flight. So
//! every conversation starts with `guest-sync-delimited`: we send 0xFF (which makes
//! the agent drop any half-parsed input), then a sync with a fresh random id; the
//! agent answers with 0xFF followed by `{"return": id}`, and everything before that
//! sentinel is discarded. Until that succeeds the agent counts as not answering.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tracing::{debug, trace};

/// How long one sync attempt waits before sending another (the agent may still be
/// starting in the guest).
const SYNC_ATTEMPT: Duration = Duration::from_secs(2);
/// Default answer timeout of ordinary agent commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// guest-file-read chunk.
const FILE_CHUNK: u64 = 1 << 20;
/// Largest file [`Qga::file_read`] reads (the agent sends base64 in one JSON line).
const FILE_MAX: usize = 64 << 20;
const MAX_LINE: u64 = 128 << 20;

/// Errors of the guest agent client.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("the QEMU guest agent in {vm} does not answer on {} within {secs}s: is qemu-guest-agent installed and running in the guest?", sock.display())]
    NotAnswering {
        vm: String,
        sock: PathBuf,
        secs: u64,
    },
    #[error("I/O error on the guest agent socket {} of {vm}: {source}", sock.display())]
    Io {
        vm: String,
        sock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent protocol error in {vm}: {what}")]
    Protocol { vm: String, what: String },
    #[error("guest agent command {command} failed in {vm}: {class}: {desc}")]
    Command {
        vm: String,
        command: String,
        class: String,
        desc: String,
    },
    #[error("guest agent command {command} in {vm} got no answer within {secs}s")]
    Timeout {
        vm: String,
        command: String,
        secs: u64,
    },
    #[error("{path} in {vm} did not finish within {secs}s (guest pid {pid})")]
    ExecTimeout {
        vm: String,
        path: String,
        pid: i64,
        secs: u64,
    },
    #[error("reading {path} from {vm}: the file is larger than {max} bytes")]
    FileTooLarge {
        vm: String,
        path: String,
        max: usize,
    },
}

/// What [`Qga::exec`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit status; -1 when the process was killed by a signal.
    pub exit_code: i32,
    /// The signal that killed the process, if one did.
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent truncated the captured output (it keeps at most 16 MiB).
    pub truncated: bool,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == 0 && self.signal.is_none()
    }
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// `guest-shutdown` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    Powerdown,
    Reboot,
    Halt,
}

impl ShutdownMode {
    fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Powerdown => "powerdown",
            ShutdownMode::Reboot => "reboot",
            ShutdownMode::Halt => "halt",
        }
    }
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

/// A synchronised session with a guest agent.
pub struct Qga {
    vm: String,
    sock: PathBuf,
    conn: Option<Conn>,
    /// The previous command did not complete: its answer may still arrive.
    needs_sync: bool,
    connect_timeout: Duration,
    /// When libvirt owns the agent's channel: `(connection URI, domain)`, and every
    /// command goes through `virsh qemu-agent-command` (libvirt synchronises itself).
    libvirt: Option<(String, String)>,
}

impl std::fmt::Debug for Qga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qga")
            .field("vm", &self.vm)
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

impl Qga {
    /// Connect to the agent of `vm` (its name is only for messages) on `sock` and
    /// synchronise, retrying until `timeout`: the socket may not exist yet and the
    /// agent may not be up yet in a booting guest.
    pub async fn connect(vm: &str, sock: &Path, timeout: Duration) -> Result<Qga, QgaError> {
        let mut q = Qga {
            vm: vm.to_string(),
            sock: sock.to_path_buf(),
            conn: None,
            needs_sync: true,
            connect_timeout: timeout,
            libvirt: None,
        };
        q.sync(timeout).await?;
        Ok(q)
    }

    /// The agent of libvirt domain `domain` on connection `uri`, reached through
    /// `virsh qemu-agent-command` (libvirt holds the channel's socket). Waits until the
    /// agent answers a ping, up to `timeout`.
    pub async fn connect_libvirt(
        uri: &str,
        domain: &str,
        timeout: Duration,
    ) -> Result<Qga, QgaError> {
        let mut q = Qga {
            vm: domain.to_string(),
            sock: PathBuf::from(format!("libvirt:{uri}")),
            conn: None,
            needs_sync: false,
            connect_timeout: timeout,
            libvirt: Some((uri.to_string(), domain.to_string())),
        };
        q.sync(timeout).await?;
        Ok(q)
    }

    /// The VM name this client reports in errors.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Re-synchronise (reconnecting if needed) within `timeout`.
    pub async fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = if self.libvirt.is_some() {
                self.virsh_command("guest-ping", Value::Null, SYNC_ATTEMPT)
                    .await
                    .map(drop)
            } else {
                self.sync_once(deadline).await
            };
            match attempt {
                Ok(()) => {
                    self.needs_sync = false;
                    debug!(vm = %self.vm, sock = %self.sock.display(), "guest agent synchronised");
                    return Ok(());
                }
                Err(e) => {
                    trace!(vm = %self.vm, error = %e, "guest agent sync attempt failed");
                    if matches!(e, QgaError::Io { .. }) {
                        self.conn = None;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(QgaError::NotAnswering {
                    vm: self.vm.clone(),
                    sock: self.sock.clone(),
                    secs: timeout.as_secs().max(1),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sync_once(&mut self, deadline: Instant) -> Result<(), QgaError> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.sock)
                .await
                .map_err(|e| self.io(e))?;
            let (r, w) = s.into_split();
            self.conn = Some(Conn {
                reader: BufReader::new(r),
                writer: w,
            });
        }
        let id: u64 = random_id();
        let msg = format!(
            "{}\n",
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
        );
        let mut bytes = vec![0xFFu8];
        bytes.extend_from_slice(msg.as_bytes());
        let vm = self.vm.clone();
        let sock = self.sock.clone();
        let conn = self.conn.as_mut().expect("connected above");
        let io = |source| QgaError::Io {
            vm: vm.clone(),
            sock: sock.clone(),
            source,
        };
        conn.writer.write_all(&bytes).await.map_err(io)?;
        let attempt_end = deadline.min(Instant::now() + SYNC_ATTEMPT);
        let r = tokio::time::timeout_at(attempt_end, async {
            loop {
                // Discard everything up to the sentinel (stale answers, garbage).
                let mut skipped = Vec::new();
                let n = conn
                    .reader
                    .read_until(0xFF, &mut skipped)
                    .await
                    .map_err(io)?;
                if n == 0 {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                if skipped.last() != Some(&0xFF) {
                    continue;
                }
                let line = read_line(&mut conn.reader).await.map_err(io)?;
                let Some(line) = line else {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                };
                match parse_sync_answer(&line) {
                    Some(got) if got == id => return Ok(()),
                    // A sentinel of an earlier sync: keep looking for ours.
                    _ => continue,
                }
            }
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => Err(QgaError::Timeout {
                vm: self.vm.clone(),
                command: "guest-sync-delimited".into(),
                secs: SYNC_ATTEMPT.as_secs(),
            }),
        }
    }

    /// Run an agent command and return its `return` member.
    pub async fn execute(&mut self, command: &str, args: Value) -> Result<Value, QgaError> {
        self.execute_timeout(command, args, COMMAND_TIMEOUT).await
    }

    async fn execute_timeout(
        &mut self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        if self.libvirt.is_some() {
            return self.virsh_command(command, args, timeout).await;
        }
        if self.needs_sync || self.conn.is_none() {
            self.sync(self.connect_timeout).await?;
        }
        let mut msg = json!({ "execute": command });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        debug!(vm = %self.vm, command, "guest agent execute");
        let line = format!("{msg}\n");
        // Until the answer is read, a stale answer may follow: sync before the next command.
        self.needs_sync = true;
        let vm = self.vm.clone();
        let sock = self.sock.clone();
        let io = |source| QgaError::Io {
            vm: vm.clone(),
            sock: sock.clone(),
            source,
        };
        let conn = self.conn.as_mut().expect("synced above");
        if let Err(e) = conn.writer.write_all(line.as_bytes()).await {
            self.conn = None;
            return Err(io(e));
        }
        let r = tokio::time::timeout(timeout, async {
            loop {
                match read_line(&mut conn.reader).await {
                    Ok(Some(l)) if l.trim().is_empty() => continue,
                    Ok(Some(l)) => return Ok(l),
                    Ok(None) => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
                    Err(e) => return Err(io(e)),
                }
            }
        })
        .await;
        let line = match r {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(e);
            }
            Err(_) => {
                return Err(QgaError::Timeout {
                    vm: self.vm.clone(),
                    command: command.into(),
                    secs: timeout.as_secs(),
                })
            }
        };
        self.needs_sync = false;
        let v: Value = serde_json::from_str(line.trim()).map_err(|e| QgaError::Protocol {
            vm: self.vm.clone(),
            what: format!("invalid JSON ({e}): {}", line.trim()),
        })?;
        if let Some(err) = v.get("error") {
            return Err(QgaError::Command {
                vm: self.vm.clone(),
                command: command.into(),
                class: err["class"].as_str().unwrap_or("unknown").into(),
                desc: err["desc"].as_str().unwrap_or("").into(),
            });
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    async fn virsh_command(
        &mut self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let (uri, domain) = self.libvirt.clone().expect("libvirt channel");
        let mut msg = json!({ "execute": command });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        debug!(vm = %self.vm, command, "guest agent execute (libvirt)");
        let secs = timeout.as_secs().max(1);
        let out = tokio::process::Command::new("virsh")
            .args(["-q", "-c", &uri, "qemu-agent-command", &domain])
            .arg(msg.to_string())
            .args(["--timeout", &secs.to_string()])
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(timeout + Duration::from_secs(5), out).await {
            Ok(r) => r.map_err(|e| self.io(e))?,
            Err(_) => {
                return Err(QgaError::Timeout {
                    vm: self.vm.clone(),
                    command: command.into(),
                    secs,
                })
            }
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " ");
            // libvirt reports a silent agent as an error of its own.
            if err.contains("not responding")
                || err.contains("not connected")
                || err.contains("not configured")
            {
                return Err(QgaError::NotAnswering {
                    vm: self.vm.clone(),
                    sock: self.sock.clone(),
                    secs,
                });
            }
            if err.contains("timed out") || err.contains("timeout") {
                return Err(QgaError::Timeout {
                    vm: self.vm.clone(),
                    command: command.into(),
                    secs,
                });
            }
            return Err(QgaError::Command {
                vm: self.vm.clone(),
                command: command.into(),
                class: "virsh".into(),
                desc: err,
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(text.trim()).map_err(|e| QgaError::Protocol {
            vm: self.vm.clone(),
            what: format!(
                "invalid JSON from virsh qemu-agent-command ({e}): {}",
                text.trim()
            ),
        })?;
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `guest-ping`.
    pub async fn ping(&mut self) -> Result<(), QgaError> {
        self.execute("guest-ping", Value::Null).await.map(drop)
    }

    /// Run `command` with the guest's `/bin/sh -c`, its output captured.
    pub async fn shell(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<ExecResult, QgaError> {
        self.exec("/bin/sh", &["-c", command], true, timeout).await
    }

    /// Run `path args...` in the guest with `guest-exec` and poll `guest-exec-status`
    /// until it exits or `timeout` passes.
    pub async fn exec(
        &mut self,
        path: &str,
        args: &[&str],
        capture_output: bool,
        timeout: Duration,
    ) -> Result<ExecResult, QgaError> {
        let v = self
            .execute(
                "guest-exec",
                json!({"path": path, "arg": args, "capture-output": capture_output}),
            )
            .await?;
        let pid = v["pid"].as_i64().ok_or_else(|| QgaError::Protocol {
            vm: self.vm.clone(),
            what: format!("guest-exec answered without a pid: {v}"),
        })?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let s = self
                .execute("guest-exec-status", json!({ "pid": pid }))
                .await?;
            if s["exited"].as_bool() == Some(true) {
                return self.exec_result(&s);
            }
            if Instant::now() >= deadline {
                return Err(QgaError::ExecTimeout {
                    vm: self.vm.clone(),
                    path: path.into(),
                    pid,
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn exec_result(&self, s: &Value) -> Result<ExecResult, QgaError> {
        let decode = |key: &str| -> Result<Vec<u8>, QgaError> {
            match s.get(key).and_then(Value::as_str) {
                None => Ok(Vec::new()),
                Some(b) => self.b64(b),
            }
        };
        let signal = s.get("signal").and_then(Value::as_i64).map(|x| x as i32);
        Ok(ExecResult {
            exit_code: s
                .get("exitcode")
                .and_then(Value::as_i64)
                .map(|x| x as i32)
                .unwrap_or(-1),
            signal,
            stdout: decode("out-data")?,
            stderr: decode("err-data")?,
            truncated: s["out-truncated"].as_bool().unwrap_or(false)
                || s["err-truncated"].as_bool().unwrap_or(false),
        })
    }

    /// `guest-fsfreeze-freeze`: flush and freeze the guest's file systems; returns
    /// how many were frozen. Always pair with [`Qga::fsfreeze_thaw`].
    pub async fn fsfreeze_freeze(&mut self) -> Result<u64, QgaError> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-thaw`: returns how many file systems were thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u64, QgaError> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-status`: `thawed` or `frozen`.
    pub async fn fsfreeze_status(&mut self) -> Result<String, QgaError> {
        let v = self.execute("guest-fsfreeze-status", Value::Null).await?;
        Ok(v.as_str().unwrap_or("").to_string())
    }

    /// `guest-shutdown`. The agent does not answer a successful shutdown, so a
    /// missing answer (or a closed channel) within a few seconds counts as success.
    pub async fn shutdown(&mut self, mode: ShutdownMode) -> Result<(), QgaError> {
        match self
            .execute_timeout(
                "guest-shutdown",
                json!({ "mode": mode.as_str() }),
                Duration::from_secs(3),
            )
            .await
        {
            Ok(_) | Err(QgaError::Timeout { .. }) | Err(QgaError::Io { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Read a whole (small) file from the guest with guest-file-open/read/close.
    pub async fn file_read(&mut self, path: &str) -> Result<Vec<u8>, QgaError> {
        let h = self
            .execute("guest-file-open", json!({"path": path, "mode": "r"}))
            .await?;
        let handle = h.as_i64().ok_or_else(|| QgaError::Protocol {
            vm: self.vm.clone(),
            what: format!("guest-file-open answered {h}"),
        })?;
        let r = self.read_handle(path, handle).await;
        let closed = self
            .execute("guest-file-close", json!({ "handle": handle }))
            .await;
        let data = r?;
        closed?;
        Ok(data)
    }

    async fn read_handle(&mut self, path: &str, handle: i64) -> Result<Vec<u8>, QgaError> {
        let mut out = Vec::new();
        loop {
            let r = self
                .execute(
                    "guest-file-read",
                    json!({"handle": handle, "count": FILE_CHUNK}),
                )
                .await?;
            if let Some(b) = r.get("buf-b64").and_then(Value::as_str) {
                out.extend(self.b64(b)?);
            }
            if out.len() > FILE_MAX {
                return Err(QgaError::FileTooLarge {
                    vm: self.vm.clone(),
                    path: path.into(),
                    max: FILE_MAX,
                });
            }
            if r["eof"].as_bool().unwrap_or(true) || r["count"].as_u64() == Some(0) {
                return Ok(out);
            }
        }
    }

    fn b64(&self, s: &str) -> Result<Vec<u8>, QgaError> {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| QgaError::Protocol {
                vm: self.vm.clone(),
                what: format!("invalid base64 from the agent: {e}"),
            })
    }

    fn io(&self, source: std::io::Error) -> QgaError {
        QgaError::Io {
            vm: self.vm.clone(),
            sock: self.sock.clone(),
            source,
        }
    }
}

/// Read one newline-terminated line (bounded); `None` at end of stream.
async fn read_line(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// The id in a `guest-sync-delimited` answer (`{"return": id}`).
fn parse_sync_answer(line: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    v.get("return")?.as_u64()
}

/// A sync id unlikely to match a stale answer: time and pid mixed.
fn random_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // The agent's id is an int; keep it well inside i64.
    (t ^ (u64::from(std::process::id()) << 32)) & 0x3fff_ffff_ffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    #[test]
    fn sync_answers_parse() {
        assert_eq!(parse_sync_answer("{\"return\": 42}\n"), Some(42));
        assert_eq!(parse_sync_answer("{\"error\": {}}"), None);
        assert_eq!(parse_sync_answer("garbage"), None);
    }

    /// The framing around the sentinel, against a peer that talks the wire format
    /// byte for byte: stale bytes before 0xFF and a stale sync are skipped.
    #[tokio::test]
    async fn sync_skips_stale_bytes_before_the_sentinel() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut junk = Vec::new();
            r.read_until(0xFF, &mut junk).await.unwrap();
            let line = read_line(&mut r).await.unwrap().unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            w.write_all(b"{\"return\": {}}\n\xff{\"return\": 7}\n\xff")
                .await
                .unwrap();
            w.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            let line = read_line(&mut r).await.unwrap().unwrap();
            assert!(line.contains("guest-ping"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
        });
        let mut q = Qga::connect("vm1", &sock, Duration::from_secs(5))
            .await
            .unwrap();
        q.ping().await.unwrap();
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn silent_agent_is_reported_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        let e = Qga::connect("vm1", &sock, Duration::from_millis(300))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("the QEMU guest agent in vm1 does not answer on"),
            "{msg}"
        );
        assert!(msg.contains("is qemu-guest-agent installed and running in the guest?"));
    }
}
