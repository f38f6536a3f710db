//! A QMP (QEMU Machine Protocol) client over QEMU's Unix socket.
//!
//! One command is in flight at a time (`&mut self`); every command carries an `id`
//! so that a late answer to a command that timed out is recognised and dropped
//! instead of being taken for the answer to the next one. Asynchronous events that
//! arrive between answers are buffered for [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

/// How long a command may take before [`QmpError::Timeout`]. Block commands on a
/// busy host can take seconds; nothing we send should take a minute.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A QMP message larger than this is a broken peer, not a real answer.
const MAX_LINE: usize = 64 * 1024 * 1024;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path} within {secs}s: {source} (is QEMU running?)")]
    Connect {
        path: PathBuf,
        secs: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on the QMP socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU closed the QMP socket {path} (has QEMU exited?)")]
    Closed { path: PathBuf },
    #[error("QMP protocol error on {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    /// QEMU refused a command: `class` is QMP's error class (e.g. `GenericError`,
    /// `DeviceNotFound`, `CommandNotFound`), `desc` its human-readable description.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("no answer from QEMU on {path} within {secs}s while waiting for {what}")]
    Timeout {
        path: PathBuf,
        what: String,
        secs: u64,
    },
    /// A human monitor command answered with an error text.
    #[error("HMP command {command:?} failed: {output}")]
    Hmp { command: String, output: String },
}

impl QmpError {
    /// The QMP error description if QEMU refused a command, for callers that must
    /// tell "already exists"/"not found" from real failures.
    pub fn command_desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// An asynchronous QMP event (`SHUTDOWN`, `BLOCK_JOB_CANCELLED`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    pub timestamp: (i64, i64),
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `prelaunch`, `shutdown`, ...
    pub status: String,
}

/// One block device of `query-block`, reduced to what Ferry uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// BlockBackend name; empty for disks attached with `-blockdev` + `-device drive=node`.
    pub device: String,
    /// The qdev path of the guest device, if any.
    pub qdev: Option<String>,
    /// Root node name of the medium (the format node), if a medium is inserted.
    pub node_name: Option<String>,
    /// Image file name.
    pub file: Option<String>,
    /// Format driver of the root node (`qcow2`, `raw`, ...).
    pub format: Option<String>,
    pub virtual_size: Option<u64>,
    pub read_only: bool,
}

/// One named node of `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    pub node_name: String,
    pub driver: String,
    pub file: String,
    pub virtual_size: u64,
    pub dirty_bitmaps: Vec<DirtyBitmap>,
}

/// A dirty bitmap as QEMU lists it on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub name: String,
    /// Enabled: it records writes.
    pub recording: bool,
    pub persistent: bool,
    /// In use by an operation (an export, a job); cannot be changed meanwhile.
    pub busy: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
}

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    version: String,
    command_timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("buffered_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

enum Message {
    Event(QmpEvent),
    Reply { id: Option<Value>, body: Value },
}

impl Qmp {
    /// Connect to `path`, retrying until the socket appears and accepts (QEMU creates
    /// it during start-up, so a caller that just launched QEMU races with it), read
    /// the greeting and leave negotiation mode with `qmp_capabilities`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    trace!(path = %path.display(), error = %e, "QMP socket not ready yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        secs: timeout.as_secs(),
                        source,
                    })
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            next_id: 1,
            version: String::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let greeting = match tokio::time::timeout(left, qmp.read_value()).await {
            Ok(v) => v?,
            Err(_) => return Err(qmp.timeout_error("the QMP greeting", left)),
        };
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .ok_or_else(|| qmp.protocol(format!("expected a QMP greeting, got {greeting}")))?;
        let q = &v["qemu"];
        qmp.version = format!(
            "{}.{}.{}",
            q["major"].as_u64().unwrap_or(0),
            q["minor"].as_u64().unwrap_or(0),
            q["micro"].as_u64().unwrap_or(0)
        );
        qmp.execute("qmp_capabilities", Value::Null).await?;
        debug!(path = %path.display(), version = %qmp.version, "QMP connected");
        Ok(qmp)
    }

    /// QEMU's version from the greeting, e.g. `10.0.2`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The socket this session is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Change how long [`Qmp::execute`] waits for an answer.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Run a command. `args` may be `Value::Null` (or an empty object) for none.
    /// Returns the `return` member; QEMU's refusal becomes [`QmpError::Command`].
    pub async fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        let id = format!("ferry-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        match args {
            Value::Null => {}
            Value::Object(ref o) if o.is_empty() => {}
            a => msg["arguments"] = a,
        }
        debug!(command, args = %msg.get("arguments").unwrap_or(&serde_json::Value::Null), "QMP execute");
        let mut line = serde_json::to_vec(&msg).expect("a JSON value serialises");
        line.push(b'\n');
        self.writer.write_all(&line).await.map_err(|e| self.io(e))?;
        let timeout = self.command_timeout;
        let answer = tokio::time::timeout(timeout, async {
            loop {
                match self.read_message().await? {
                    Message::Event(ev) => self.buffer_event(ev),
                    Message::Reply { id: got, body } => {
                        if got.as_ref().and_then(Value::as_str) == Some(id.as_str()) {
                            return Ok(body);
                        }
                        // The answer to an earlier command that timed out.
                        warn!(?got, expected = %id, "dropping a stale QMP answer");
                    }
                }
            }
        })
        .await;
        let body = match answer {
            Ok(r) => r?,
            Err(_) => return Err(self.timeout_error(&format!("the answer to {command}"), timeout)),
        };
        if let Some(err) = body.get("error") {
            let class = err["class"].as_str().unwrap_or("unknown").to_string();
            let desc = err["desc"].as_str().unwrap_or("").to_string();
            debug!(command, %class, %desc, "QMP command refused");
            return Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            });
        }
        Ok(body.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Wait for the next event called `name` (buffered ones first; they are
    /// consumed). Other events keep being buffered.
    pub async fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.name == name) {
            return Ok(self.events.remove(i).expect("index is valid"));
        }
        let r = tokio::time::timeout(timeout, async {
            loop {
                match self.read_message().await? {
                    Message::Event(ev) if ev.name == name => return Ok(ev),
                    Message::Event(ev) => self.buffer_event(ev),
                    Message::Reply { id, .. } => {
                        warn!(
                            ?id,
                            "dropping a stale QMP answer while waiting for an event"
                        )
                    }
                }
            }
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => Err(self.timeout_error(&format!("event {name}"), timeout)),
        }
    }

    /// Take all events buffered so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// `query-name`: the VM's `-name`, if it has one.
    pub async fn query_name(&mut self) -> Result<Option<String>, QmpError> {
        let v = self.execute("query-name", Value::Null).await?;
        Ok(v.get("name").and_then(Value::as_str).map(str::to_string))
    }

    /// `query-status`.
    pub async fn query_status(&mut self) -> Result<VmStatus, QmpError> {
        let v = self.execute("query-status", Value::Null).await?;
        Ok(VmStatus {
            running: v["running"].as_bool().unwrap_or(false),
            status: v["status"].as_str().unwrap_or("").to_string(),
        })
    }

    /// `query-block`: the block devices the guest sees.
    pub async fn query_block(&mut self) -> Result<Vec<BlockInfo>, QmpError> {
        let v = self.execute("query-block", Value::Null).await?;
        Ok(parse_query_block(&v))
    }

    /// `query-named-block-nodes` (flat): every node, with its dirty bitmaps.
    pub async fn query_named_block_nodes(&mut self) -> Result<Vec<BlockNode>, QmpError> {
        let v = self
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await?;
        Ok(parse_named_block_nodes(&v))
    }

    /// `system_powerdown`: press the ACPI power button (the guest decides).
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", Value::Null)
            .await
            .map(drop)
    }

    /// `quit`: QEMU exits at once, without the guest's consent. QEMU may close
    /// the socket before answering; that counts as success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", Value::Null).await {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(QmpError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::BrokenPipe
                    || source.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `human-monitor-command`: run an HMP command line and return its output.
    pub async fn human_monitor_command(&mut self, command_line: &str) -> Result<String, QmpError> {
        let v = self
            .execute(
                "human-monitor-command",
                json!({ "command-line": command_line }),
            )
            .await?;
        Ok(v.as_str().unwrap_or("").to_string())
    }

    /// Run a `qemu-io` command (e.g. `write -P 0xab 0 64k`) through the guest
    /// device's own block backend, as if the guest had issued it. `qdev_id` is the
    /// device's block backend path, e.g. `disk0-dev/virtio-backend` for a
    /// virtio-blk-pci device with `id=disk0-dev` (a node name would conflict with
    /// the write permission the device holds). Any output is an error: qemu-io
    /// prints its statistics on QEMU's stdout, and only failures come back here.
    pub async fn qemu_io(&mut self, qdev_id: &str, command: &str) -> Result<(), QmpError> {
        let line = format!("qemu-io -d {qdev_id} \"{command}\"");
        let out = self.human_monitor_command(&line).await?;
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(QmpError::Hmp {
                command: line,
                output: out.trim().to_string(),
            })
        }
    }

    fn buffer_event(&mut self, ev: QmpEvent) {
        trace!(event = %ev.name, data = %ev.data, "QMP event");
        // Bound the buffer: nobody waits for events this old.
        if self.events.len() >= 4096 {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    async fn read_message(&mut self) -> Result<Message, QmpError> {
        let v = self.read_value().await?;
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let ts = &v["timestamp"];
            return Ok(Message::Event(QmpEvent {
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
                timestamp: (
                    ts["seconds"].as_i64().unwrap_or(0),
                    ts["microseconds"].as_i64().unwrap_or(0),
                ),
            }));
        }
        if v.get("return").is_some() || v.get("error").is_some() {
            return Ok(Message::Reply {
                id: v.get("id").cloned(),
                body: v,
            });
        }
        Err(self.protocol(format!("unexpected message {v}")))
    }

    async fn read_value(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(QmpError::Closed {
                    path: self.path.clone(),
                });
            }
            let t = line.trim();
            if t.is_empty() {
                continue;
            }
            trace!(line = t, "QMP <-");
            return serde_json::from_str(t)
                .map_err(|e| self.protocol(format!("invalid JSON ({e}): {t}")));
        }
    }

    fn io(&self, source: std::io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            what,
        }
    }

    fn timeout_error(&self, what: &str, d: Duration) -> QmpError {
        QmpError::Timeout {
            path: self.path.clone(),
            what: what.to_string(),
            secs: d.as_secs(),
        }
    }
}

fn parse_query_block(v: &Value) -> Vec<BlockInfo> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let ins = b.get("inserted");
            let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
            BlockInfo {
                device: b["device"].as_str().unwrap_or("").to_string(),
                qdev: s(b.get("qdev")),
                node_name: s(ins.and_then(|i| i.get("node-name"))),
                file: s(ins.and_then(|i| i.get("file"))),
                format: s(ins.and_then(|i| i.get("drv"))),
                virtual_size: ins
                    .and_then(|i| i.get("image"))
                    .and_then(|i| i.get("virtual-size"))
                    .and_then(Value::as_u64),
                read_only: ins
                    .and_then(|i| i.get("ro"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }
        })
        .collect()
}

fn parse_named_block_nodes(v: &Value) -> Vec<BlockNode> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|n| BlockNode {
            node_name: n["node-name"].as_str().unwrap_or("").to_string(),
            driver: n["drv"].as_str().unwrap_or("").to_string(),
            file: n["file"].as_str().unwrap_or("").to_string(),
            virtual_size: n["image"]["virtual-size"].as_u64().unwrap_or(0),
            dirty_bitmaps: n
                .get("dirty-bitmaps")
                .and_then(Value::as_array)
                .map(|bs| {
                    bs.iter()
                        // Bitmaps internal to a job (e.g. copy-before-write) have no name.
                        .filter_map(|b| {
                            Some(DirtyBitmap {
                                name: b.get("name")?.as_str()?.to_string(),
                                recording: b["recording"].as_bool().unwrap_or(false),
                                persistent: b["persistent"].as_bool().unwrap_or(false),
                                busy: b["busy"].as_bool().unwrap_or(false),
                                granularity: b["granularity"].as_u64().unwrap_or(0),
                                count: b["count"].as_u64().unwrap_or(0),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_query_block_of_a_blockdev_disk() {
        let v = json!([
            {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend", "locked": false,
             "inserted": {"node-name": "disk0", "drv": "qcow2", "ro": false,
                          "file": "/tmp/d.qcow2", "image": {"virtual-size": 67108864}}},
            {"device": "ide2-cd0", "removable": true}
        ]);
        let b = parse_query_block(&v);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].node_name.as_deref(), Some("disk0"));
        assert_eq!(b[0].format.as_deref(), Some("qcow2"));
        assert_eq!(b[0].virtual_size, Some(64 << 20));
        assert_eq!(b[1].device, "ide2-cd0");
        assert_eq!(b[1].node_name, None);
    }

    #[test]
    fn named_nodes_skip_anonymous_bitmaps() {
        let v = json!([{"node-name": "disk0", "drv": "qcow2", "file": "/d", "image": {"virtual-size": 1},
            "dirty-bitmaps": [{"recording": false, "busy": false, "persistent": false, "granularity": 65536, "count": 0},
                              {"name": "ferry-2", "recording": true, "busy": false, "persistent": true, "granularity": 65536, "count": 65536}]}]);
        let n = parse_named_block_nodes(&v);
        assert_eq!(n[0].dirty_bitmaps.len(), 1);
        assert_eq!(n[0].dirty_bitmaps[0].name, "ferry-2");
        assert!(n[0].dirty_bitmaps[0].recording);
    }

    #[tokio::test]
    async fn connect_times_out_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Qmp::connect(&dir.path().join("none.sock"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("is QEMU running"), "{e}");
    }
}
