//! The receiving end: accepts mutual-TLS connections for one target disk, verifies every
//! chunk against its digest before writing it, checkpoints, and commits.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::chunk::{self, Digest, Geometry, ZERO};
use crate::proto::{self, Control, Frame, ProtoError, KIND_CONTROL, KIND_DATA, KIND_ZERO};
use crate::target::{CommitInfo, Session, Target};
use crate::SyncError;

/// A committed sync, as seen by the receiver.
#[derive(Debug, Clone)]
pub struct Received {
    pub commit: CommitInfo,
    pub bytes_written: u64,
}

/// The sync in progress: its session and the connections working on it.
struct Active {
    id: String,
    session: Arc<Session>,
    cancel: watch::Sender<bool>,
    conns: watch::Sender<usize>,
}

impl Active {
    async fn cancel_and_drain(&self) {
        self.cancel.send_replace(true);
        let mut rx = self.conns.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|n| *n == 0)).await;
    }
}

/// Serves syncs into one target disk.
pub struct Receiver {
    dst: PathBuf,
    /// For a volume written in place: where its sidecar lives.
    device_state: Option<PathBuf>,
    active: Mutex<Option<Arc<Active>>>,
    committed: watch::Sender<Option<Received>>,
    /// Sync sessions still running, their last checkpoint included.
    sessions: watch::Sender<usize>,
    /// A session begun ahead of its sender's hello (see [`Receiver::begin_early`]).
    early: Mutex<Option<Session>>,
}

impl Receiver {
    pub fn new(dst: PathBuf) -> Arc<Self> {
        Self::serving(dst, None)
    }

    /// Serves syncs into an existing volume, written in place (see
    /// [`Target::open_device`]), its sidecar in `state_dir`.
    pub fn device(dev: PathBuf, state_dir: PathBuf) -> Arc<Self> {
        Self::serving(dev, Some(state_dir))
    }

    fn serving(dst: PathBuf, device_state: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            dst,
            device_state,
            active: Mutex::new(None),
            committed: watch::Sender::new(None),
            sessions: watch::Sender::new(0),
            early: Mutex::new(None),
        })
    }

    /// Notified after each commit.
    pub fn commits(&self) -> watch::Receiver<Option<Received>> {
        self.committed.subscribe()
    }

    /// Begins the session that a sync of a disk the size of the target's last
    /// generation will use, before its sender says hello: in one process, this work
    /// overlaps the opening of the source (starting qemu-nbd, say). A sync of another
    /// size or chunk size sets it aside and begins its own. Nothing is begun for a
    /// target that holds no generation, and failures are left for the sync to meet.
    pub async fn begin_early(self: &Arc<Self>, chunk_size: u32, source: &str) {
        let (dst, state, source) = (
            self.dst.clone(),
            self.device_state.clone(),
            source.to_string(),
        );
        let begun = tokio::task::spawn_blocking(move || {
            let target = open_target(&dst, state.as_deref())?;
            match target.committed_geometry() {
                Some(g) if g.chunk_size == chunk_size => target.begin(g, &source).map(Some),
                _ => Ok(None),
            }
        })
        .await;
        match begun {
            Ok(Ok(session)) => *self.early.lock().unwrap() = session,
            Ok(Err(e)) => tracing::debug!("no session begun early: {e}"),
            Err(e) => tracing::debug!("no session begun early: {e}"),
        }
    }

    /// Returns once no sync session runs here any more: what a failed one received is
    /// then recorded for the next attempt to resume from.
    pub async fn idle(&self) {
        let _ = self.sessions.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Accepts connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, acceptor: TlsAcceptor) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tcp.set_nodelay(true).ok();
            crate::transport::detect_dead_peer(&tcp);
            let acceptor = acceptor.clone();
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(%peer, "refused a connection: TLS handshake failed: {e}");
                        return;
                    }
                };
                if let Err(e) = this.handle(tls).await {
                    tracing::warn!(%peer, "connection ended with an error: {e}");
                }
            });
        }
    }

    /// Runs one connection (control or data) to its end.
    pub async fn handle<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        self: Arc<Self>,
        stream: S,
    ) -> Result<(), SyncError> {
        let (r, w) = tokio::io::split(stream);
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut w = BufWriter::with_capacity(64 << 10, w);
        let result = match proto::expect_control(&mut r).await? {
            Control::Hello {
                protocol,
                disk_size,
                chunk_size,
                source,
                mode,
                compress,
            } => {
                if protocol != proto::PROTOCOL_VERSION {
                    Err(SyncError::Config(format!(
                        "the sender speaks protocol {protocol}, this receiver {}: run the same Ferry version on both ends",
                        proto::PROTOCOL_VERSION
                    )))
                } else if let Err(e) = chunk::check_chunk_size(chunk_size) {
                    Err(SyncError::Config(e))
                } else {
                    tracing::info!(%source, ?mode, disk_size, "sync starting");
                    let geometry = Geometry::new(disk_size, chunk_size);
                    self.control(&mut r, &mut w, geometry, source, compress)
                        .await
                }
            }
            Control::Join { session } => self.data(&mut r, &mut w, &session).await,
            other => Err(ProtoError::Violation(format!(
                "a connection must start with hello or join, not {other:?}"
            ))
            .into()),
        };
        if let Err(e) = &result {
            // Best effort: tell the peer why before closing.
            let _ = proto::write_control(
                &mut w,
                &Control::Error {
                    message: e.to_string(),
                    retryable: e.is_retryable(),
                },
            )
            .await;
            let _ = w.shutdown().await;
        }
        result
    }

    async fn control<R, W>(
        self: &Arc<Self>,
        r: &mut R,
        w: &mut W,
        geometry: Geometry,
        source: String,
        compress: bool,
    ) -> Result<(), SyncError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let _running = Counted::new(&self.sessions);
        // A new sync supersedes one whose sender went away.
        let previous = self.active.lock().unwrap().take();
        if let Some(old) = previous {
            tracing::info!("superseding sync session {}", old.id);
            old.cancel_and_drain().await;
            let s = Arc::clone(&old.session);
            tokio::task::spawn_blocking(move || s.checkpoint()).await??;
        }
        let early = self.early.lock().unwrap().take();
        let session = match early {
            Some(s) if s.geometry() == geometry => s,
            early => {
                // Set aside first: its files are what the new session replaces.
                drop(early);
                let dst = self.dst.clone();
                let state = self.device_state.clone();
                let src = source.clone();
                tokio::task::spawn_blocking(move || {
                    open_target(&dst, state.as_deref())?.begin(geometry, &src)
                })
                .await??
            }
        };
        let active = Arc::new(Active {
            id: uuid::Uuid::new_v4().to_string(),
            session: Arc::new(session),
            cancel: watch::Sender::new(false),
            conns: watch::Sender::new(0),
        });
        *self.active.lock().unwrap() = Some(Arc::clone(&active));
        if active.session.resumed() {
            tracing::info!("resuming the interrupted sync");
        }
        proto::write_control(
            w,
            &Control::HelloOk {
                session: active.id.clone(),
                generation: active.session.base_generation(),
                resumed: active.session.resumed(),
            },
        )
        .await?;
        let result = self.control_loop(r, w, &active, compress).await;
        // However the control connection ended, the data connections end with it, and
        // what they stored becomes durable for the next attempt.
        if result.is_err() {
            let mut slot = self.active.lock().unwrap();
            if slot.as_ref().is_some_and(|a| a.id == active.id) {
                *slot = None;
            }
        }
        active.cancel_and_drain().await;
        let s = Arc::clone(&active.session);
        let _ = tokio::task::spawn_blocking(move || s.checkpoint()).await;
        result
    }

    async fn control_loop<R, W>(
        self: &Arc<Self>,
        r: &mut R,
        w: &mut W,
        active: &Arc<Active>,
        compress: bool,
    ) -> Result<(), SyncError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut cancelled = active.cancel.subscribe();
        loop {
            let frame = tokio::select! {
                f = proto::read_frame(r) => f,
                _ = until_cancelled(&mut cancelled) => {
                    return Err(SyncError::Interrupted("superseded by a newer sync of the same target".into()));
                }
            };
            let msg = match frame {
                Ok(f) => f.control()?,
                Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(SyncError::Interrupted("the sender went away".into()))
                }
                Err(e) => return Err(e.into()),
            };
            match msg {
                Control::GetIndex { known } => {
                    if known.is_some_and(|k| active.session.base_is(k.generation, &k.digest)) {
                        // The sender has this very index already: a large disk's index
                        // is gigabytes of digests that would otherwise travel again.
                        tracing::debug!("the sender holds the target's index");
                        proto::write_control(
                            w,
                            &Control::IndexEnd {
                                entries: active.session.index().chunk_count(),
                                unchanged: true,
                            },
                        )
                        .await?;
                    } else {
                        self.send_index(w, &active.session, compress).await?
                    }
                }
                Control::Commit { entries_digest } => {
                    let mut conns = active.conns.subscribe();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), conns.wait_for(|n| *n == 0))
                            .await;
                    let expected = parse_hex(&entries_digest)?;
                    let s = Arc::clone(&active.session);
                    let commit = tokio::task::spawn_blocking(move || s.commit(&expected)).await??;
                    let bytes_written = active.session.bytes_written();
                    *self.active.lock().unwrap() = None;
                    tracing::info!(
                        generation = commit.generation,
                        chunks = commit.chunks_applied,
                        "sync committed"
                    );
                    proto::write_control(
                        w,
                        &Control::Committed {
                            generation: commit.generation,
                            bytes_written,
                            chunks_applied: commit.chunks_applied,
                        },
                    )
                    .await?;
                    self.committed.send_replace(Some(Received {
                        commit,
                        bytes_written,
                    }));
                    return Ok(());
                }
                other => {
                    return Err(ProtoError::Violation(format!(
                        "unexpected {other:?} on the control connection"
                    ))
                    .into())
                }
            }
        }
    }

    async fn send_index<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        session: &Arc<Session>,
        compress: bool,
    ) -> Result<(), SyncError> {
        const WINDOW: u64 = 32 * 1024; // entries: 1 MiB frames
        let count = session.index().chunk_count();
        let mut first = 0;
        // One buffer for all windows: each process starts with no memory mapped, and
        // fresh memory costs a page fault per 4 KiB.
        let mut raw = Vec::new();
        while first < count {
            let n = WINDOW.min(count - first);
            let s = Arc::clone(session);
            raw = tokio::task::spawn_blocking(move || {
                s.index().read_raw_into(first, n, &mut raw).map(|()| raw)
            })
            .await??;
            proto::write_index(w, &raw, compress).await?;
            first += n;
        }
        proto::write_control(
            w,
            &Control::IndexEnd {
                entries: count,
                unchanged: false,
            },
        )
        .await?;
        Ok(())
    }

    async fn data<R, W>(self: &Arc<Self>, r: &mut R, w: &mut W, id: &str) -> Result<(), SyncError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let active = self
            .active
            .lock()
            .unwrap()
            .clone()
            .filter(|a| a.id == id && !*a.cancel.borrow())
            .ok_or_else(|| {
                SyncError::Interrupted(format!(
                    "no sync session {id} here (it ended or was superseded): start the sync again"
                ))
            })?;
        let _joined = Counted::new(&active.conns);
        proto::write_control(w, &Control::JoinOk).await?;

        let mut cancelled = active.cancel.subscribe();
        let mut batch: Vec<Frame> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut chunks = 0u64;
        // Frame buffers go round: memory already mapped costs nothing, fresh memory a
        // page fault per 4 KiB. About a batch's worth per connection.
        let mut buffers: Vec<Vec<u8>> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = proto::read_frame_into(r, buffers.pop().unwrap_or_default()) => f?,
                _ = until_cancelled(&mut cancelled) => {
                    store(&active.session, std::mem::take(&mut batch)).await?;
                    return Err(SyncError::Interrupted("superseded by a newer sync of the same target".into()));
                }
            };
            match frame.kind {
                KIND_DATA | KIND_ZERO => {
                    batch_bytes += frame.payload.len();
                    batch.push(frame);
                    chunks += 1;
                    if batch_bytes >= 1 << 20 {
                        buffers = store(&active.session, std::mem::take(&mut batch)).await?;
                        batch_bytes = 0;
                    }
                }
                KIND_CONTROL => match frame.control()? {
                    Control::End => {
                        // Stored, not yet checkpointed: the commit (or, if the sender goes
                        // away first, the end of the session) checkpoints once for all
                        // connections, instead of each paying two flushes of its own.
                        store(&active.session, std::mem::take(&mut batch)).await?;
                        proto::write_control(w, &Control::EndOk { chunks }).await?;
                        return Ok(());
                    }
                    other => {
                        return Err(ProtoError::Violation(format!(
                            "unexpected {other:?} on a data connection"
                        ))
                        .into())
                    }
                },
                k => return Err(ProtoError::Violation(format!("unknown frame kind {k}")).into()),
            }
        }
    }
}

/// Counts itself in a counter others wait on, for as long as it lives.
struct Counted<'a>(&'a watch::Sender<usize>);

impl<'a> Counted<'a> {
    fn new(counter: &'a watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The target a receiver writes: a raw image, or a volume with its sidecar in `state`.
fn open_target(dst: &Path, state: Option<&Path>) -> Result<Target, crate::target::TargetError> {
    match state {
        Some(state) => Target::open_device(dst, state),
        None => Target::open(dst),
    }
}

/// Verifies and stores a batch of chunk frames (off the async threads: hashing and
/// decompression are CPU work). Nothing of a batch is stored unless all of it verifies.
/// Hands the frames' buffers back for the next ones.
async fn store(session: &Arc<Session>, batch: Vec<Frame>) -> Result<Vec<Vec<u8>>, SyncError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let s = Arc::clone(session);
    tokio::task::spawn_blocking(move || {
        let verified = batch
            .iter()
            .map(|f| verify(&s, f))
            .collect::<Result<Vec<_>, _>>()?;
        let chunks: Vec<(u64, Digest, Option<&[u8]>)> = verified
            .iter()
            .map(|v| (v.chunk, v.digest, v.stored()))
            .collect();
        s.put_many(&chunks)?;
        drop(chunks);
        drop(verified);
        Ok(batch.into_iter().map(|f| f.payload).collect())
    })
    .await?
}

/// A chunk whose bytes hash to the digest sent with it.
struct Verified<'a> {
    chunk: u64,
    digest: Digest,
    bytes: Cow<'a, [u8]>,
}

impl Verified<'_> {
    /// The bytes to store (none for a chunk that is all zeros).
    fn stored(&self) -> Option<&[u8]> {
        (self.digest != ZERO).then_some(&self.bytes[..])
    }
}

fn verify<'a>(session: &Session, frame: &'a Frame) -> Result<Verified<'a>, SyncError> {
    let geometry = session.geometry();
    if frame.kind == KIND_ZERO {
        return Ok(Verified {
            chunk: frame.zero_chunk()?,
            digest: ZERO,
            bytes: Cow::Borrowed(&[]),
        });
    }
    let d = frame.data()?;
    if d.chunk >= geometry.chunk_count() {
        return Err(ProtoError::Violation(format!(
            "chunk {} is past the end of the disk",
            d.chunk
        ))
        .into());
    }
    let (offset, len) = geometry.chunk(d.chunk);
    if d.raw_len as usize != len {
        return Err(SyncError::Verification {
            chunk: d.chunk,
            offset,
            reason: format!("{} bytes announced, the chunk has {len}", d.raw_len),
        });
    }
    let bytes = if frame.flags & proto::FLAG_COMPRESSED != 0 {
        Cow::Owned(crate::compress::decompress(d.bytes, len).map_err(|e| {
            SyncError::Verification {
                chunk: d.chunk,
                offset,
                reason: format!("does not decompress ({e})"),
            }
        })?)
    } else {
        Cow::Borrowed(d.bytes)
    };
    if bytes.len() != len || chunk::digest(&bytes) != d.digest {
        return Err(SyncError::Verification {
            chunk: d.chunk,
            offset,
            reason: "its bytes do not match the digest sent with it".into(),
        });
    }
    Ok(Verified {
        chunk: d.chunk,
        digest: d.digest,
        bytes,
    })
}

fn parse_hex(s: &str) -> Result<chunk::Digest, SyncError> {
    let bad = || ProtoError::Violation(format!("{s:?} is not a digest"));
    if s.len() != 64 {
        return Err(bad().into());
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(d)
}

/// Resolves once the session is cancelled (without holding the watch's lock afterwards).
async fn until_cancelled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}
