//! The transmission phase: a pipelined client sharing one connection.
//!
//! Requests are written under a tokio mutex; a background task reads replies and
//! hands each one, by cookie, to the oneshot channel of the request that is
//! waiting for it. Structured READ replies arrive as several OFFSET_DATA /
//! OFFSET_HOLE chunks that the reader assembles before handing the data over.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;
use tracing::{debug, trace, warn};

use crate::handshake::{negotiate, ExportInfo};
use crate::proto::*;
use crate::uri::{NbdAddr, NbdTarget};
use crate::NbdError;

/// Options for [`NbdClient::connect`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Meta contexts to negotiate, e.g. `base:allocation`, `qemu:dirty-bitmap:bm0`.
    pub meta_contexts: Vec<String>,
}

/// One extent of a block status answer; `flags` mean what the context says
/// ([`STATE_HOLE`], [`STATE_ZERO`] for `base:allocation`, [`STATE_DIRTY`] for dirty bitmaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// `base:allocation`: the extent is not allocated (reads may still return data from a backing file).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent was written while the bitmap was enabled.
pub const STATE_DIRTY: u32 = 1;

/// Largest piece we put in one request even if the server allows more, so that one
/// request never pins an unbounded buffer.
const MAX_PIECE: u32 = 32 * 1024 * 1024;
/// Requests of one call kept in flight at once when a call is split into pieces.
const PIPELINE_WINDOW: usize = 8;
/// A structured chunk other than data is small; bound what we allocate for it.
/// Block status for a 2 GiB request at 512-byte granularity is 32 MiB of extents.
const MAX_CHUNK: u32 = 64 * 1024 * 1024;
/// Largest range asked in one block status request: 2 GiB keeps within u32 and
/// stays aligned to any power-of-two minimum block size.
const MAX_STATUS_LEN: u64 = 1 << 31;

/// How long disconnect waits for the server to close its end after NBD_CMD_DISC.
const DISCONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A connection to one NBD export. Cheap to clone; clones share the connection and
/// may issue requests concurrently (they are pipelined).
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = &self.inner.info;
        f.debug_struct("NbdClient")
            .field("size", &info.size)
            .field("flags", &format_args!("{:#x}", info.flags))
            .field("structured", &info.structured)
            .field("contexts", &info.contexts)
            .finish_non_exhaustive()
    }
}

struct Inner {
    info: ExportInfo,
    writer: Mutex<BoxWrite>,
    conn: Arc<ConnState>,
    next_cookie: AtomicU64,
    reader: StdMutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader task only holds the connection state, not Inner, so the last
        // client going away is what stops it.
        if let Some(task) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// State shared between requesters and the reader task.
#[derive(Default)]
struct ConnState {
    table: StdMutex<Table>,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<u64, Waiter>,
    /// Set once no new request may be sent; the text says why.
    closed: Option<String>,
}

impl ConnState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the table inconsistent in a
        // way that matters more than losing the connection, so ignore poisoning.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuse new requests and fail every waiting one with (a copy of) `cause`.
    fn close(&self, cause: NbdError) {
        let waiters: Vec<Waiter> = {
            let mut t = self.lock();
            if t.closed.is_none() {
                t.closed = Some(match &cause {
                    NbdError::Disconnected(reason) => reason.clone(),
                    other => other.to_string(),
                });
            }
            t.waiting.drain().map(|(_, w)| w).collect()
        };
        for w in waiters {
            let _ = w.tx.send(Err(duplicate(&cause)));
        }
    }
}

/// NbdError is not Clone (io::Error is not); make an equivalent error of the same
/// kind for each request a connection failure affects.
fn duplicate(e: &NbdError) -> NbdError {
    match e {
        NbdError::Protocol(m) => NbdError::Protocol(m.clone()),
        NbdError::Io(io) => NbdError::Io(std::io::Error::new(io.kind(), io.to_string())),
        NbdError::Disconnected(m) => NbdError::Disconnected(m.clone()),
        other => NbdError::Disconnected(other.to_string()),
    }
}

/// What the reader accumulates for one request until its last chunk.
enum Accum {
    Plain,
    Read {
        data: Vec<u8>,
        covered: u64,
    },
    Status {
        context_id: u32,
        extents: Option<Vec<(u32, u32)>>,
    },
}

enum ReplyValue {
    Done,
    Data(Vec<u8>),
    Extents(Vec<(u32, u32)>),
}

struct Waiter {
    command: u16,
    offset: u64,
    len: u32,
    accum: Accum,
    /// First error chunk the server sent; reported once the reply is done.
    error: Option<NbdError>,
    tx: oneshot::Sender<Result<ReplyValue, NbdError>>,
}

impl Waiter {
    fn finish(self) {
        let result = match self.error {
            Some(e) => Err(e),
            None => match self.accum {
                Accum::Plain => Ok(ReplyValue::Done),
                Accum::Read { data, covered } if covered == u64::from(self.len) => {
                    Ok(ReplyValue::Data(data))
                }
                Accum::Read { covered, .. } => Err(NbdError::Protocol(format!(
                    "read reply at offset {} covered {covered} of {} bytes",
                    self.offset, self.len
                ))),
                Accum::Status {
                    extents: Some(e), ..
                } => Ok(ReplyValue::Extents(e)),
                Accum::Status {
                    context_id,
                    extents: None,
                } => Err(NbdError::Protocol(format!(
                    "block status reply has no extents for context id {context_id}"
                ))),
            },
        };
        // The caller may have given up (timeout); nothing to do then.
        let _ = self.tx.send(result);
    }
}

/// Removes a registered request if the caller is cancelled before it was sent, and
/// kills the connection if the caller is cancelled halfway through writing it (the
/// server would read the next request from the middle of this one).
struct SendGuard<'a> {
    conn: &'a ConnState,
    cookie: u64,
    stage: Stage,
}

#[derive(PartialEq)]
enum Stage {
    Registered,
    Writing,
    Sent,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        match self.stage {
            Stage::Registered => {
                self.conn.lock().waiting.remove(&self.cookie);
            }
            Stage::Writing => {
                warn!("request cancelled while being written; closing the NBD connection");
                self.conn.close(NbdError::Disconnected(
                    "a request was cancelled halfway through being sent".into(),
                ));
            }
            Stage::Sent => {}
        }
    }
}

impl NbdClient {
    /// Connect to `target`, negotiate, and start the reply reader.
    pub async fn connect(target: &NbdTarget, opts: ConnectOptions) -> Result<NbdClient, NbdError> {
        let connect_err = |source| NbdError::Connect {
            addr: target.addr.to_string(),
            source,
        };
        match &target.addr {
            NbdAddr::Tcp { host, port } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect_err)?;
                // Request headers and payloads go out in separate writes; Nagle would
                // hold the payload back waiting for an ACK.
                stream.set_nodelay(true)?;
                Self::connect_stream(stream, &target.export, opts).await
            }
            NbdAddr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect_err)?;
                Self::connect_stream(stream, &target.export, opts).await
            }
        }
    }

    /// Negotiate `export` over an already open stream (e.g. a TLS stream or a test pipe).
    pub async fn connect_stream<S>(
        mut stream: S,
        export: &str,
        opts: ConnectOptions,
    ) -> Result<NbdClient, NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let info = negotiate(&mut stream, export, &opts.meta_contexts).await?;
        let (r, w) = tokio::io::split(stream);
        let conn = Arc::new(ConnState::default());
        let reader = tokio::spawn(reader_task(
            BufReader::with_capacity(256 * 1024, Box::new(r) as BoxRead),
            conn.clone(),
        ));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                info,
                writer: Mutex::new(Box::new(w)),
                conn,
                next_cookie: AtomicU64::new(1),
                reader: StdMutex::new(Some(reader)),
            }),
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    pub fn read_only(&self) -> bool {
        self.flag(TFLAG_READ_ONLY)
    }

    /// Whether the server says several connections to this export see each other's writes.
    pub fn can_multi_conn(&self) -> bool {
        self.flag(TFLAG_CAN_MULTI_CONN)
    }

    /// Whether `context` was requested and the server agreed to it.
    pub fn supports(&self, context: &str) -> bool {
        self.inner.info.contexts.contains_key(context)
    }

    pub fn min_block_size(&self) -> u32 {
        self.inner.info.min_block
    }

    pub fn preferred_block_size(&self) -> u32 {
        self.inner.info.preferred_block
    }

    pub fn max_block_size(&self) -> u32 {
        self.inner.info.max_block
    }

    /// Whether the server sends structured replies (needed for block status).
    pub fn structured_replies(&self) -> bool {
        self.inner.info.structured
    }

    fn flag(&self, f: u16) -> bool {
        let flags = self.inner.info.flags;
        flags & TFLAG_HAS_FLAGS != 0 && flags & f != 0
    }

    /// Reads ask for one unfragmented reply where the server allows it: qemu-nbd
    /// otherwise looks up the allocation of every range it reads, to send holes as
    /// such, which costs it more than the zeros it saves on the socket (Ferry reads
    /// only what the allocation map calls data, and hashes zeros cheaply).
    fn read_flags(&self) -> u16 {
        if self.inner.info.structured && self.flag(TFLAG_SEND_DF) {
            CMD_FLAG_DF
        } else {
            0
        }
    }

    fn piece_size(&self) -> u32 {
        self.inner.info.max_block.min(MAX_PIECE)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(NbdError::OutOfRange { offset, len, size }),
        }
    }

    /// Read `buf.len()` bytes at `offset`. Holes read as zeroes.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range(offset, buf.len() as u64)?;
        let piece = self.piece_size() as usize;
        let mut in_flight = VecDeque::new();
        let mut pos = offset;
        for chunk in buf.chunks_mut(piece) {
            if in_flight.len() >= PIPELINE_WINDOW {
                let (dst, rx) = in_flight.pop_front().expect("window is not empty");
                copy_read(dst, rx).await?;
            }
            let len = chunk.len() as u32;
            let accum = Accum::Read {
                data: vec![0; chunk.len()],
                covered: 0,
            };
            let rx = self
                .submit(CMD_READ, self.read_flags(), pos, len, &[], accum)
                .await?;
            in_flight.push_back((chunk, rx));
            pos += u64::from(len);
        }
        for (dst, rx) in in_flight {
            copy_read(dst, rx).await?;
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` into `buf` (whatever it held is replaced) and hand
    /// it back. The reply is read straight into `buf`: no second buffer and no copy, and
    /// a caller that passes the same buffers again reuses memory that is already mapped
    /// (fresh memory costs a page fault per 4 KiB, more than the copy would).
    pub async fn read_into(
        &self,
        offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, NbdError> {
        self.check_range(offset, len as u64)?;
        // A reused buffer is not cleared first: the reply must cover every byte (the
        // reader checks), so zeroing it would only cost a pass over the memory.
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        if len > self.piece_size() as usize || len == 0 {
            self.read(offset, &mut buf).await?;
            return Ok(buf);
        }
        let accum = Accum::Read {
            data: buf,
            covered: 0,
        };
        let rx = self
            .submit(CMD_READ, self.read_flags(), offset, len as u32, &[], accum)
            .await?;
        match await_reply(rx).await? {
            ReplyValue::Data(data) => Ok(data),
            _ => unreachable!("read waiters only get data"),
        }
    }

    /// Write `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let piece = self.piece_size() as usize;
        let mut in_flight = VecDeque::new();
        let mut pos = offset;
        for chunk in data.chunks(piece) {
            if in_flight.len() >= PIPELINE_WINDOW {
                wait_done(in_flight.pop_front().expect("window is not empty")).await?;
            }
            let len = chunk.len() as u32;
            in_flight.push_back(
                self.submit(CMD_WRITE, 0, pos, len, chunk, Accum::Plain)
                    .await?,
            );
            pos += u64::from(len);
        }
        for rx in in_flight {
            wait_done(rx).await?;
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeroes. With `may_trim` false the server
    /// must keep the range allocated (NBD_CMD_FLAG_NO_HOLE). Servers without
    /// WRITE_ZEROES get ordinary writes of zeroes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if !self.flag(TFLAG_SEND_WRITE_ZEROES) {
            debug!("server lacks NBD_CMD_WRITE_ZEROES; writing zeroes instead");
            let zeroes = vec![0u8; len.min(u64::from(self.piece_size())) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
                self.write(pos, &zeroes[..n]).await?;
                pos += n as u64;
            }
            return Ok(());
        }
        let flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        self.ranged_command(CMD_WRITE_ZEROES, flags, offset, len)
            .await
    }

    /// Tell the server `[offset, offset+len)` is no longer needed (contents become unspecified).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if !self.flag(TFLAG_SEND_TRIM) {
            return Err(NbdError::Unsupported(
                "the server does not accept NBD_CMD_TRIM".into(),
            ));
        }
        self.ranged_command(CMD_TRIM, 0, offset, len).await
    }

    /// Make completed writes durable. A server that does not advertise flush has
    /// nothing to flush, so this is then a no-op.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.flag(TFLAG_SEND_FLUSH) {
            trace!("server does not advertise NBD_CMD_FLUSH; nothing to do");
            return Ok(());
        }
        let rx = self.submit(CMD_FLUSH, 0, 0, 0, &[], Accum::Plain).await?;
        wait_done(rx).await
    }

    /// Extents of `context` covering `[offset, offset+len)` as far as the server
    /// answered; contiguous, in order, clipped to the asked range. The server may
    /// describe less than asked: call again from the end of the last extent.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let context_id = *self
            .inner
            .info
            .contexts
            .get(context)
            .ok_or_else(|| NbdError::UnknownContext(context.to_string()))?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let ask = len.min(MAX_STATUS_LEN) as u32;
        let accum = Accum::Status {
            context_id,
            extents: None,
        };
        let rx = self
            .submit(CMD_BLOCK_STATUS, 0, offset, ask, &[], accum)
            .await?;
        let descriptors = match await_reply(rx).await? {
            ReplyValue::Extents(e) => e,
            _ => unreachable!("block status waiters only get extents"),
        };
        let end = offset + len;
        let mut pos = offset;
        let mut out = Vec::with_capacity(descriptors.len());
        for (length, flags) in descriptors {
            if pos >= end {
                break;
            }
            let length = u64::from(length).min(end - pos);
            out.push(Extent {
                offset: pos,
                length,
                flags,
            });
            pos += length;
        }
        Ok(out)
    }

    /// Extents of `context` covering all of `[offset, offset+len)`, asking again
    /// where the server answered for less, with neighbours of equal flags merged.
    pub async fn block_status_all(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let end = offset.checked_add(len).ok_or(NbdError::OutOfRange {
            offset,
            len,
            size: self.size(),
        })?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let extents = self.block_status(context, pos, end - pos).await?;
            if extents.is_empty() {
                // Cannot happen with a conforming server (extents are never empty).
                return Err(NbdError::Protocol(format!("no extents at offset {pos}")));
            }
            for e in extents {
                pos = e.offset + e.length;
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.length += e.length,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Send NBD_CMD_DISC and close the connection. Further requests on any clone
    /// fail with [`NbdError::Disconnected`]. Calling it twice is harmless.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        {
            let mut t = self.inner.conn.lock();
            if t.closed.is_some() {
                return Ok(());
            }
            t.closed = Some("the client disconnected".into());
        }
        {
            let mut w = self.inner.writer.lock().await;
            let header = encode_request(0, CMD_DISC, 0, 0, 0);
            w.write_all(&header).await?;
            w.flush().await?;
            w.shutdown().await?;
        }
        // The server answers DISC by closing the socket; the reader then fails any
        // request still waiting and ends.
        let task = self
            .inner
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut task) = task {
            // Bounded so that a server that never closes cannot keep the reader (and
            // its socket) alive after the caller has moved on.
            if tokio::time::timeout(DISCONNECT_GRACE, &mut task)
                .await
                .is_err()
            {
                debug!("server did not close the connection after NBD_CMD_DISC");
                task.abort();
            }
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        if self.read_only() {
            Err(NbdError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// A payload-less command over a range that may need several requests.
    async fn ranged_command(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        let piece = u64::from(self.piece_size());
        let mut in_flight = VecDeque::new();
        let mut pos = offset;
        while pos < offset + len {
            if in_flight.len() >= PIPELINE_WINDOW {
                wait_done(in_flight.pop_front().expect("window is not empty")).await?;
            }
            let n = (offset + len - pos).min(piece) as u32;
            in_flight.push_back(
                self.submit(command, flags, pos, n, &[], Accum::Plain)
                    .await?,
            );
            pos += u64::from(n);
        }
        for rx in in_flight {
            wait_done(rx).await?;
        }
        Ok(())
    }

    /// Register a waiter for a new cookie and send the request.
    async fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        accum: Accum,
    ) -> Result<oneshot::Receiver<Result<ReplyValue, NbdError>>, NbdError> {
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.inner.conn.lock();
            if let Some(reason) = &t.closed {
                return Err(NbdError::Disconnected(reason.clone()));
            }
            t.waiting.insert(
                cookie,
                Waiter {
                    command,
                    offset,
                    len,
                    accum,
                    error: None,
                    tx,
                },
            );
        }
        let mut guard = SendGuard {
            conn: &self.inner.conn,
            cookie,
            stage: Stage::Registered,
        };
        let header = encode_request(flags, command, cookie, offset, len);
        let mut w = self.inner.writer.lock().await;
        // Closed while we waited for the writer (e.g. disconnect): don't send.
        if let Some(reason) = self.inner.conn.lock().closed.clone() {
            return Err(NbdError::Disconnected(reason));
        }
        guard.stage = Stage::Writing;
        trace!(
            command = command_name(command),
            cookie,
            offset,
            len,
            "sending request"
        );
        let sent = async {
            w.write_all(&header).await?;
            if !payload.is_empty() {
                w.write_all(payload).await?;
            }
            w.flush().await
        }
        .await;
        match sent {
            Ok(()) => {
                guard.stage = Stage::Sent;
                Ok(rx)
            }
            Err(e) => {
                guard.stage = Stage::Sent;
                self.inner.conn.close(NbdError::Disconnected(format!(
                    "sending a request failed: {e}"
                )));
                Err(NbdError::Io(e))
            }
        }
    }
}

async fn await_reply(
    rx: oneshot::Receiver<Result<ReplyValue, NbdError>>,
) -> Result<ReplyValue, NbdError> {
    rx.await
        .map_err(|_| NbdError::Disconnected("the reply reader stopped".into()))?
}

async fn wait_done(rx: oneshot::Receiver<Result<ReplyValue, NbdError>>) -> Result<(), NbdError> {
    await_reply(rx).await.map(|_| ())
}

async fn copy_read(
    dst: &mut [u8],
    rx: oneshot::Receiver<Result<ReplyValue, NbdError>>,
) -> Result<(), NbdError> {
    match await_reply(rx).await? {
        ReplyValue::Data(data) => {
            dst.copy_from_slice(&data);
            Ok(())
        }
        _ => unreachable!("read waiters only get data"),
    }
}

/// How the reader loop ended.
enum ReaderEnd {
    /// The server closed the connection between replies.
    Eof,
    Failed(NbdError),
}

impl From<NbdError> for ReaderEnd {
    fn from(e: NbdError) -> Self {
        ReaderEnd::Failed(e)
    }
}

impl From<std::io::Error> for ReaderEnd {
    fn from(e: std::io::Error) -> Self {
        ReaderEnd::Failed(mid_reply_io(e))
    }
}

fn mid_reply_io(e: std::io::Error) -> NbdError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        NbdError::Protocol("the server closed the connection in the middle of a reply".into())
    } else {
        NbdError::Io(e)
    }
}

async fn reader_task<R: AsyncRead + Unpin>(mut r: R, conn: Arc<ConnState>) {
    let end = loop {
        if let Err(end) = read_reply(&mut r, &conn).await {
            break end;
        }
    };
    match end {
        ReaderEnd::Eof => {
            let t = conn.lock();
            let quiet = t.closed.is_some() && t.waiting.is_empty();
            drop(t);
            if quiet {
                debug!("NBD connection closed");
            } else {
                warn!("the NBD server closed the connection");
            }
            conn.close(NbdError::Disconnected(
                "the server closed the connection".into(),
            ));
        }
        ReaderEnd::Failed(e) => {
            warn!(error = %e, "NBD connection failed");
            conn.close(e);
        }
    }
}

fn take_waiter(conn: &ConnState, cookie: u64) -> Result<Waiter, NbdError> {
    conn.lock().waiting.remove(&cookie).ok_or_else(|| {
        NbdError::Protocol(format!(
            "reply for cookie {cookie:#x}, which no request is waiting for"
        ))
    })
}

/// Read one simple reply or one structured chunk and deliver it.
async fn read_reply<R: AsyncRead + Unpin>(r: &mut R, conn: &ConnState) -> Result<(), ReaderEnd> {
    let mut magic = [0u8; 4];
    match r.read_exact(&mut magic).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReaderEnd::Eof),
        Err(e) => return Err(ReaderEnd::Failed(NbdError::Io(e))),
    }
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => read_simple(r, conn).await,
        STRUCTURED_REPLY_MAGIC => read_chunk(r, conn).await,
        other => Err(NbdError::Protocol(format!(
            "bad reply magic {other:#010x} (expected simple {SIMPLE_REPLY_MAGIC:#010x} or structured {STRUCTURED_REPLY_MAGIC:#010x})"
        ))
        .into()),
    }
}

async fn read_simple<R: AsyncRead + Unpin>(r: &mut R, conn: &ConnState) -> Result<(), ReaderEnd> {
    let mut rest = [0u8; SIMPLE_REPLY_REST];
    r.read_exact(&mut rest).await?;
    let errno = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes"));
    let cookie = u64::from_be_bytes(rest[4..12].try_into().expect("8 bytes"));
    let mut w = take_waiter(conn, cookie)?;
    trace!(cookie, errno, "simple reply");
    if errno != 0 {
        // No payload follows an error, even for READ.
        w.error = Some(NbdError::Server {
            command: command_name(w.command),
            errno,
            message: String::new(),
        });
        w.finish();
        return Ok(());
    }
    match &mut w.accum {
        Accum::Plain => {}
        Accum::Read { data, covered } => {
            if let Err(e) = r.read_exact(data).await {
                let e = mid_reply_io(e);
                let _ = w.tx.send(Err(duplicate(&e)));
                return Err(e.into());
            }
            *covered = data.len() as u64;
        }
        Accum::Status { .. } => {
            let e = NbdError::Protocol(
                "simple reply to NBD_CMD_BLOCK_STATUS (needs a structured reply)".into(),
            );
            let _ = w.tx.send(Err(duplicate(&e)));
            return Err(e.into());
        }
    }
    w.finish();
    Ok(())
}

async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R, conn: &ConnState) -> Result<(), ReaderEnd> {
    let mut rest = [0u8; STRUCTURED_REPLY_REST];
    r.read_exact(&mut rest).await?;
    let flags = u16::from_be_bytes(rest[0..2].try_into().expect("2 bytes"));
    let kind = u16::from_be_bytes(rest[2..4].try_into().expect("2 bytes"));
    let cookie = u64::from_be_bytes(rest[4..12].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(rest[12..16].try_into().expect("4 bytes"));
    trace!(cookie, flags, kind, len, "structured chunk");
    let mut w = take_waiter(conn, cookie)?;
    match handle_chunk(r, &mut w, kind, len).await {
        Ok(()) => {}
        Err(e) => {
            // Give the request itself the precise error; the rest learn it from close().
            let _ = w.tx.send(Err(duplicate(&e)));
            return Err(e.into());
        }
    }
    if flags & REPLY_FLAG_DONE != 0 {
        w.finish();
    } else {
        let mut t = conn.lock();
        if let Some(reason) = &t.closed {
            let _ = w.tx.send(Err(NbdError::Disconnected(reason.clone())));
        } else {
            t.waiting.insert(cookie, w);
        }
    }
    Ok(())
}

/// Check that `[chunk_offset, +n)` is inside the request and return its index in the buffer.
fn chunk_range(
    w: &Waiter,
    what: &str,
    chunk_offset: u64,
    n: u64,
) -> Result<std::ops::Range<usize>, NbdError> {
    let start = chunk_offset.checked_sub(w.offset);
    match start {
        Some(start)
            if start
                .checked_add(n)
                .is_some_and(|end| end <= u64::from(w.len)) =>
        {
            Ok(start as usize..(start + n) as usize)
        }
        _ => Err(NbdError::Protocol(format!(
            "{what} chunk [{chunk_offset}, +{n}) is outside the request [{}, +{}]",
            w.offset, w.len
        ))),
    }
}

async fn read_small<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
    what: &str,
) -> Result<Vec<u8>, NbdError> {
    if len > MAX_CHUNK {
        return Err(NbdError::Protocol(format!(
            "{what} chunk of {len} bytes is larger than the {MAX_CHUNK} we accept"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(mid_reply_io)?;
    Ok(buf)
}

async fn handle_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    w: &mut Waiter,
    kind: u16,
    len: u32,
) -> Result<(), NbdError> {
    let command = command_name(w.command);
    match kind {
        REPLY_TYPE_NONE => {
            if len != 0 {
                return Err(NbdError::Protocol(format!(
                    "NBD_REPLY_TYPE_NONE with {len} bytes of payload"
                )));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            if !matches!(w.accum, Accum::Read { .. }) {
                return Err(NbdError::Protocol(format!(
                    "data chunk in the reply to {command}"
                )));
            }
            if len < 8 {
                return Err(NbdError::Protocol(format!(
                    "data chunk of {len} bytes has no room for its offset"
                )));
            }
            let chunk_offset = r.read_u64().await.map_err(mid_reply_io)?;
            let n = u64::from(len - 8);
            let range = chunk_range(w, "data", chunk_offset, n)?;
            let Accum::Read { data, covered } = &mut w.accum else {
                unreachable!()
            };
            r.read_exact(&mut data[range]).await.map_err(mid_reply_io)?;
            *covered += n;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if !matches!(w.accum, Accum::Read { .. }) {
                return Err(NbdError::Protocol(format!(
                    "hole chunk in the reply to {command}"
                )));
            }
            if len != 12 {
                return Err(NbdError::Protocol(format!(
                    "hole chunk of {len} bytes (expected 12)"
                )));
            }
            let chunk_offset = r.read_u64().await.map_err(mid_reply_io)?;
            let n = u64::from(r.read_u32().await.map_err(mid_reply_io)?);
            let range = chunk_range(w, "hole", chunk_offset, n)?;
            let Accum::Read { data, covered } = &mut w.accum else {
                unreachable!()
            };
            data[range].fill(0);
            *covered += n;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let Accum::Status {
                context_id,
                extents,
            } = &mut w.accum
            else {
                return Err(NbdError::Protocol(format!(
                    "block status chunk in the reply to {command}"
                )));
            };
            if len < 12 || (len - 4) % 8 != 0 {
                return Err(NbdError::Protocol(format!(
                    "block status chunk of {len} bytes is not a context id plus whole extents"
                )));
            }
            let body = read_small(r, len, "block status").await?;
            let id = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
            if id != *context_id {
                // We negotiated several contexts; the server answers for each of them.
                return Ok(());
            }
            if extents.is_some() {
                return Err(NbdError::Protocol(format!(
                    "two block status chunks for context id {id}"
                )));
            }
            let mut list = Vec::with_capacity((body.len() - 4) / 8);
            for d in body[4..].chunks_exact(8) {
                let length = u32::from_be_bytes(d[0..4].try_into().expect("4 bytes"));
                let flags = u32::from_be_bytes(d[4..8].try_into().expect("4 bytes"));
                if length == 0 {
                    return Err(NbdError::Protocol("block status extent of length 0".into()));
                }
                list.push((length, flags));
            }
            *extents = Some(list);
        }
        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
            if len < 6 {
                return Err(NbdError::Protocol(format!(
                    "error chunk of {len} bytes is too short"
                )));
            }
            let body = read_small(r, len, "error").await?;
            let errno = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
            let msg_len = usize::from(u16::from_be_bytes([body[4], body[5]]));
            let extra = match k {
                REPLY_TYPE_ERROR => 0,
                REPLY_TYPE_ERROR_OFFSET => 8,
                // Unknown error types still start with errno and message.
                _ => body.len().saturating_sub(6 + msg_len),
            };
            if 6 + msg_len + extra != body.len() {
                return Err(NbdError::Protocol(format!(
                    "error chunk of {len} bytes does not match its message length {msg_len}"
                )));
            }
            let mut message = String::from_utf8_lossy(&body[6..6 + msg_len]).into_owned();
            if k == REPLY_TYPE_ERROR_OFFSET {
                let at = u64::from_be_bytes(body[6 + msg_len..].try_into().expect("8 bytes"));
                message = if message.is_empty() {
                    format!("at offset {at}")
                } else {
                    format!("{message} (at offset {at})")
                };
            }
            if errno == 0 {
                return Err(NbdError::Protocol(format!(
                    "error chunk with error number 0: {message}"
                )));
            }
            if w.error.is_none() {
                w.error = Some(NbdError::Server {
                    command,
                    errno,
                    message,
                });
            }
        }
        other => {
            return Err(NbdError::Protocol(format!(
                "unknown structured reply type {other} in the reply to {command}"
            )))
        }
    }
    Ok(())
}
