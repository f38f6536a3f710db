//! The sending end: finds changed chunks (dirty bitmap, or hash compare against the
//! target's index), and streams them over several mutual-TLS connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_disk::{Disk, ExtentKind};
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Mutex};

use crate::chunk::{self, Geometry, ZERO};
use crate::digest_memo::DigestMemo;
use crate::index::IndexFile;
use crate::index_cache::IndexCache;
use crate::proto::{self, Control, Mode, ProtoError, KIND_CONTROL, KIND_INDEX};
use crate::report::{Phases, Progress, SyncReport};
use crate::transport::{Conn, Endpoint};
use crate::SyncError;

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub chunk_size: u32,
    /// Parallel data connections.
    pub streams: usize,
    /// zstd on the wire for chunks that compress.
    pub compress: bool,
    pub mode: Mode,
    /// Where the target's index is kept while comparing (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// Attempts after an interruption (each resumes where the last stopped).
    pub retries: u32,
    /// Bandwidth limit over all streams, in bytes of frames per second.
    pub max_rate: Option<u64>,
    /// Where the target's index is kept between syncs, so that the receiver need not
    /// send it again (see [`crate::index_cache`]); `None`: fetched every time.
    pub index_cache: Option<PathBuf>,
    /// Where each source's chunk fingerprints and digests are kept between syncs, so
    /// that a hash-compare delta hashes with BLAKE3 only the chunks that changed (see
    /// [`crate::digest_memo`]); `None`: every chunk read is hashed.
    pub digest_memo: Option<PathBuf>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            chunk_size: chunk::DEFAULT_CHUNK_SIZE,
            streams: 4,
            compress: true,
            mode: Mode::HashCompare,
            work_dir: None,
            retries: 3,
            max_rate: None,
            index_cache: None,
            digest_memo: None,
        }
    }
}

/// Disk bytes per unit of work: big enough to amortise a read and a thread hop, small
/// enough to spread over the streams and bound memory (streams x 2 units in flight).
const UNIT_BYTES: u64 = 1 << 20;
/// Bytes a disk that [`Disk::reads_block`] is read at a time, on the thread that hashes
/// them: few enough that they are still in the core's cache when they are hashed. A
/// hash-compare delta reads gigabytes to find a few changed chunks; with a MiB at a time
/// it took a tenth longer, with 4 MiB a quarter.
const PIECE_BYTES: u64 = 256 << 10;
/// Disk bytes whose extents are asked for at once.
const PLAN_WINDOW: u64 = 1 << 30;

/// A run of chunks and what to do with them.
#[derive(Debug, Clone)]
struct Unit {
    /// Runs of chunks (first, count). Scattered changes are batched into one unit, so a
    /// dirty bitmap of thousands of lone chunks does not cost a round trip each.
    runs: Vec<(u64, u64)>,
    /// Read and hash (otherwise: known to read as zeros).
    read: bool,
}

/// Sends `disk` to the receiver at `endpoint`, resuming after interruptions up to
/// `opts.retries` times.
pub async fn send<D: Disk + Clone + 'static>(
    disk: &D,
    endpoint: &Endpoint,
    opts: &SendOptions,
    progress: Arc<Progress>,
) -> Result<SyncReport, SyncError> {
    let mut attempt = 0;
    loop {
        match send_once(disk, endpoint, opts, Arc::clone(&progress), attempt > 0)
            .await
            .map_err(explain)
        {
            Ok(r) => return Ok(r),
            Err(e) if e.is_retryable() && attempt < opts.retries => {
                attempt += 1;
                let wait = Duration::from_millis(500 << attempt.min(4));
                tracing::warn!(
                    "sync interrupted: {e}; resuming in {:.1} s (attempt {} of {})",
                    wait.as_secs_f64(),
                    attempt + 1,
                    opts.retries + 1
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn send_once<D: Disk + Clone + 'static>(
    disk: &D,
    endpoint: &Endpoint,
    opts: &SendOptions,
    progress: Arc<Progress>,
    retry: bool,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    chunk::check_chunk_size(opts.chunk_size).map_err(SyncError::Config)?;
    if opts.mode == Mode::DirtyBitmap && !disk.tracks_changes() {
        return Err(SyncError::Config(format!(
            "{}: no dirty bitmap to read changes from",
            disk.name()
        )));
    }
    let geometry = Geometry::new(disk.size(), opts.chunk_size);
    // Counters start over on each attempt; the report describes the attempt that won.
    for c in [
        &progress.scanned,
        &progress.bytes_read,
        &progress.bytes_hashed,
        &progress.bytes_sent,
        &progress.chunks_changed,
        &progress.chunks_zeroed,
    ] {
        c.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    progress
        .total
        .store(geometry.disk_size, std::sync::atomic::Ordering::Relaxed);

    // The data connections' TLS handshakes run while the control connection sets the
    // session up and fetches the index; they join the session once it exists.
    let mut connecting = Connecting(
        (0..opts.streams.max(1))
            .map(|_| {
                let endpoint = endpoint.clone();
                tokio::spawn(async move { endpoint.connect().await })
            })
            .collect(),
    );
    let control = endpoint.connect().await?;
    let (r, w) = tokio::io::split(control);
    let mut r = BufReader::with_capacity(1 << 20, r);
    let mut w = BufWriter::new(w);
    proto::write_control(
        &mut w,
        &Control::Hello {
            protocol: proto::PROTOCOL_VERSION,
            disk_size: geometry.disk_size,
            chunk_size: geometry.chunk_size,
            source: disk.name().to_string(),
            mode: opts.mode,
            compress: opts.compress,
        },
    )
    .await?;
    let (session, base_generation, resumed) = match proto::expect_control(&mut r).await? {
        Control::HelloOk {
            session,
            generation,
            resumed,
        } => (session, generation, resumed),
        other => return Err(unexpected(other)),
    };
    let opened = started.elapsed();
    if opts.mode == Mode::DirtyBitmap && base_generation == 0 && !resumed {
        tracing::info!("the target holds no generation yet: the dirty bitmap only narrows what is read, the first sync still copies every changed chunk it marks");
    }

    // The target's index, as it will be once what it already received is applied: the
    // copy kept from the last sync when it is still the target's base, else fetched.
    let cache = opts
        .index_cache
        .as_ref()
        .map(|root| IndexCache::new(root, disk.name(), endpoint.addr()));
    let taken = match &cache {
        Some(c) if base_generation > 0 && !resumed => c.take(base_generation, geometry),
        _ => None,
    };
    let mut _work = None;
    let (local, known) = match taken {
        Some((idx, known)) => (Arc::new(idx), Some(known)),
        None => {
            let work_err = |e: std::io::Error| {
                SyncError::Config(format!("cannot create a work directory: {e}"))
            };
            let path = match &cache {
                Some(c) => c.work_path().map_err(work_err)?.to_path_buf(),
                None => {
                    let dir = match &opts.work_dir {
                        Some(d) => tempfile::tempdir_in(d),
                        None => tempfile::tempdir(),
                    }
                    .map_err(work_err)?;
                    _work.insert(dir).path().join("target.idx")
                }
            };
            let idx = IndexFile::create(&path, geometry, base_generation + 1)?;
            (Arc::new(idx), None)
        }
    };
    tracing::debug!(elapsed = ?started.elapsed(), "session open");

    // Plan → units → streams. Planning needs only the source, so it starts while the
    // index arrives; units wait in the queue until the streams (which compare against
    // the index) take them.
    let (tx, rx) = mpsc::channel::<Unit>(opts.streams.max(1) * 4);
    let rx = Arc::new(Mutex::new(rx));
    let planner = {
        let disk = disk.clone();
        let progress = Arc::clone(&progress);
        let mode = opts.mode;
        tokio::spawn(async move { plan(&disk, geometry, mode, tx, &progress).await })
    };
    let mut planner = AbortOnDrop(planner);
    // The streams start reading at once too; each waits for the index only before it
    // compares what it read (reading is the slow part when the source is not cached).
    let (index_ready, index_wait) = watch::channel(0u64);
    let limiter = opts.max_rate.map(|r| Arc::new(RateLimit::new(r)));
    // A dirty bitmap names the chunks that changed already: nothing to skip hashing.
    let memo = match (&opts.digest_memo, opts.mode) {
        (Some(root), Mode::HashCompare) => {
            DigestMemo::open(root, disk.name(), geometry.chunk_size).map(Arc::new)
        }
        _ => None,
    };
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..opts.streams.max(1) {
        let s = Stream {
            disk: disk.clone(),
            geometry,
            local: Arc::clone(&local),
            memo: memo.clone(),
            index_ready: index_wait.clone(),
            progress: Arc::clone(&progress),
            compress: opts.compress,
            limiter: limiter.clone(),
            spare: Mutex::new(Spare::default()),
        };
        let conn = connecting.0.pop().expect("one connection per stream");
        let rx = Arc::clone(&rx);
        let session = session.clone();
        streams.spawn(async move {
            let conn = conn.await??;
            s.run(conn, &session, rx).await
        });
    }
    let reused = known.is_some();
    proto::write_control(&mut w, &Control::GetIndex { known }).await?;
    let index_bytes = receive_index(&mut r, &local, &index_ready, reused).await?;
    let indexed = started.elapsed();
    tracing::debug!(elapsed = ?indexed, index_bytes, "target index received");
    let mut first_error = None;
    while let Some(res) = streams.join_next().await {
        let res = res.map_err(SyncError::from).and_then(|r| r);
        if let Err(e) = res {
            if first_error.is_none() {
                first_error = Some(e);
                streams.abort_all();
                planner.0.abort();
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    (&mut planner.0).await??;
    let transferred = started.elapsed();
    tracing::debug!(elapsed = ?transferred, "all chunks sent and stored");

    let digest = {
        let local = Arc::clone(&local);
        tokio::task::spawn_blocking(move || local.entries_digest()).await??
    };
    proto::write_control(
        &mut w,
        &Control::Commit {
            entries_digest: proto::hex(&digest),
        },
    )
    .await?;
    let (generation, bytes_written) = match proto::expect_control(&mut r).await? {
        Control::Committed {
            generation,
            bytes_written,
            ..
        } => (generation, bytes_written),
        other => return Err(unexpected(other)),
    };
    let _ = w.shutdown().await;
    if let Some(c) = &cache {
        c.keep(generation, geometry, &digest);
    }
    tracing::debug!(elapsed = ?started.elapsed(), "committed");
    let duration = started.elapsed().as_secs_f64();
    let phases = Phases {
        open_s: opened.as_secs_f64(),
        transfer_s: (transferred - opened).as_secs_f64(),
        index_s: (indexed - opened).as_secs_f64(),
        commit_s: duration - transferred.as_secs_f64(),
    };
    let g = |c: &std::sync::atomic::AtomicU64| Progress::get(c);
    Ok(SyncReport {
        source: disk.name().to_string(),
        target: endpoint.addr().to_string(),
        mode: opts.mode,
        generation,
        full: base_generation == 0 && !resumed,
        resumed: resumed || retry,
        disk_size: geometry.disk_size,
        chunk_size: geometry.chunk_size,
        chunks_total: geometry.chunk_count(),
        chunks_changed: g(&progress.chunks_changed),
        chunks_zeroed: g(&progress.chunks_zeroed),
        bytes_scanned: g(&progress.scanned),
        bytes_read: g(&progress.bytes_read),
        bytes_hashed: g(&progress.bytes_hashed),
        bytes_sent: g(&progress.bytes_sent),
        bytes_written,
        index_bytes,
        streams: opts.streams,
        compression: opts.compress,
        duration_s: duration,
        phases,
        throughput_mib_s: g(&progress.scanned) as f64 / (1 << 20) as f64 / duration.max(1e-9),
    })
}

/// A task that is aborted when this goes away (an early return of the sync).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Data connections being set up ahead of their session; the ones a failed sync never
/// used are abandoned (aborted) with it.
struct Connecting(Vec<tokio::task::JoinHandle<Result<Conn, SyncError>>>);

impl Drop for Connecting {
    fn drop(&mut self) {
        for c in &self.0 {
            c.abort();
        }
    }
}

fn unexpected(msg: Control) -> SyncError {
    ProtoError::Violation(format!("unexpected {msg:?} from the receiver")).into()
}

/// Receives the target's index into `local`, publishing how many entries are in. With
/// `reused`, `local` is the sender's kept copy: the receiver either confirms it (no
/// entries sent) or sends its own, which then overwrites every window.
async fn receive_index<R: AsyncRead + Unpin>(
    r: &mut R,
    local: &Arc<IndexFile>,
    received: &watch::Sender<u64>,
    reused: bool,
) -> Result<u64, SyncError> {
    let mut next = 0u64;
    // Frame buffers go round (fresh memory costs a page fault per 4 KiB).
    let mut spare = Vec::new();
    loop {
        let frame = proto::read_frame_into(r, std::mem::take(&mut spare)).await?;
        match frame.kind {
            KIND_INDEX => {
                let entries = frame.index_entries()?;
                let n = entries.len() as u64 / 32;
                // The local copy starts sparse (all zero): zero windows need no write, which
                // keeps a first sync of a huge, mostly empty disk from writing its index.
                if !reused && chunk::is_zero(&entries) {
                    spare = entries;
                } else {
                    let l = Arc::clone(local);
                    let first = next;
                    spare = tokio::task::spawn_blocking(move || {
                        l.write_raw(first, &entries).map(|()| entries)
                    })
                    .await??;
                }
                next += n;
                let _ = received.send(next);
            }
            KIND_CONTROL => match frame.control()? {
                Control::IndexEnd {
                    entries,
                    unchanged: true,
                } if reused && next == 0 && entries == local.chunk_count() => {
                    tracing::debug!("the target's index is the one kept from the last sync");
                    let _ = received.send(entries);
                    return Ok(0);
                }
                Control::IndexEnd {
                    entries,
                    unchanged: false,
                } if entries == next && entries == local.chunk_count() => return Ok(next * 32),
                Control::IndexEnd { entries, .. } => {
                    return Err(ProtoError::Violation(format!(
                        "the receiver's index has {entries} entries ({next} received), the disk {} chunks",
                        local.chunk_count()
                    ))
                    .into())
                }
                other => return Err(unexpected(other)),
            },
            k => return Err(ProtoError::Violation(format!("unexpected frame kind {k}")).into()),
        }
    }
}

/// Walks the disk's extent map (or its dirty bitmap) and hands out units of work.
async fn plan<D: Disk>(
    disk: &D,
    geometry: Geometry,
    mode: Mode,
    tx: mpsc::Sender<Unit>,
    progress: &Progress,
) -> Result<(), SyncError> {
    let cs = geometry.chunk_size as u64;
    let unit_chunks = (UNIT_BYTES / cs).max(1);
    let mut window = 0u64;
    while window < geometry.disk_size {
        let end = (window + PLAN_WINDOW).min(geometry.disk_size);
        let chunks = geometry.chunks_overlapping(window, end - window);
        // Per chunk of the window: 0 = skip (unchanged), 1 = zero, 2 = read.
        let mut class = vec![
            if mode == Mode::DirtyBitmap { 0u8 } else { 1u8 };
            (chunks.end - chunks.start) as usize
        ];
        let mut pos = window;
        while pos < end {
            let extents = match mode {
                Mode::HashCompare => disk.extents(pos, end - pos).await?,
                Mode::DirtyBitmap => disk
                    .changed_extents(pos, end - pos)
                    .await?
                    .unwrap_or_default(),
            };
            let Some(last) = extents.last() else {
                return Err(SyncError::Config(format!(
                    "{}: the disk did not describe the range from byte {pos}",
                    disk.name()
                )));
            };
            let reached = last.end().min(end);
            for e in extents
                .iter()
                .filter(|e| matches!(e.kind, ExtentKind::Data | ExtentKind::Dirty))
            {
                let e_end = e.end().min(end);
                if e_end <= e.offset {
                    continue;
                }
                for c in geometry.chunks_overlapping(e.offset, e_end - e.offset) {
                    class[(c - chunks.start) as usize] = 2;
                }
            }
            if reached <= pos {
                return Err(SyncError::Config(format!(
                    "{}: the disk's extent map made no progress at byte {pos}",
                    disk.name()
                )));
            }
            pos = reached;
        }
        // Runs of the same class, at most one unit long; runs to read are batched.
        let mut batch: Vec<(u64, u64)> = Vec::new();
        let mut batched = 0u64;
        let mut i = 0usize;
        while i < class.len() {
            let k = class[i];
            let mut j = i + 1;
            let max = if k == 2 {
                unit_chunks as usize
            } else {
                64 * unit_chunks as usize
            };
            while j < class.len() && class[j] == k && j - i < max {
                j += 1;
            }
            let first = chunks.start + i as u64;
            let count = (j - i) as u64;
            i = j;
            let unit = match k {
                0 => {
                    Progress::add(&progress.scanned, geometry.run(first, count).1);
                    continue;
                }
                1 => Unit {
                    runs: vec![(first, count)],
                    read: false,
                },
                _ => {
                    batch.push((first, count));
                    batched += count;
                    if batched < unit_chunks {
                        continue;
                    }
                    batched = 0;
                    Unit {
                        runs: std::mem::take(&mut batch),
                        read: true,
                    }
                }
            };
            if tx.send(unit).await.is_err() {
                return Ok(()); // the streams stopped; their error is reported
            }
        }
        if !batch.is_empty()
            && tx
                .send(Unit {
                    runs: batch,
                    read: true,
                })
                .await
                .is_err()
        {
            return Ok(());
        }
        window = end;
    }
    Ok(())
}

/// One data connection and the work it takes from the shared queue.
struct Stream<D> {
    disk: D,
    geometry: Geometry,
    local: Arc<IndexFile>,
    memo: Option<Arc<DigestMemo>>,
    /// How many of the target's index entries `local` holds: the index arrives in
    /// windows, in disk order, and a unit is compared as soon as its window is in.
    index_ready: watch::Receiver<u64>,
    progress: Arc<Progress>,
    compress: bool,
    limiter: Option<Arc<RateLimit>>,
    /// The last unit's buffers, for the next one.
    spare: Mutex<Spare>,
}

/// Buffers a stream hands from one unit to the next: memory that is already mapped
/// costs nothing, fresh memory a page fault per 4 KiB (as much as a copy of it).
#[derive(Default)]
struct Spare {
    reads: Vec<Vec<u8>>,
    frames: Vec<u8>,
}

/// A bandwidth limit shared by all streams: each write waits until the average rate since
/// the start is back under the limit.
struct RateLimit {
    rate: u64,
    start: Instant,
    sent: std::sync::Mutex<u64>,
}

impl RateLimit {
    fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            start: Instant::now(),
            sent: std::sync::Mutex::new(0),
        }
    }

    async fn take(&self, n: u64) {
        let due = {
            let mut sent = self.sent.lock().unwrap();
            *sent += n;
            Duration::from_secs_f64(*sent as f64 / self.rate as f64)
        };
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

impl<D: Disk + Clone + 'static> Stream<D> {
    async fn run(
        &self,
        conn: Conn,
        session: &str,
        rx: Arc<Mutex<mpsc::Receiver<Unit>>>,
    ) -> Result<(), SyncError> {
        let (r, w) = tokio::io::split(conn);
        let mut r = BufReader::new(r);
        let mut w = BufWriter::with_capacity(256 << 10, w);
        proto::write_control(
            &mut w,
            &Control::Join {
                session: session.to_string(),
            },
        )
        .await?;
        match proto::expect_control(&mut r).await? {
            Control::JoinOk => {}
            other => return Err(unexpected(other)),
        }
        let result = async {
            loop {
                let unit = rx.lock().await.recv().await;
                let Some(unit) = unit else { break };
                let frames = self.process(unit).await?;
                if !frames.is_empty() {
                    if let Some(l) = &self.limiter {
                        l.take(frames.len() as u64).await;
                    }
                    w.write_all(&frames).await?;
                    Progress::add(&self.progress.bytes_sent, frames.len() as u64);
                }
                self.spare.lock().await.frames = frames;
            }
            proto::write_control(&mut w, &Control::End).await?;
            Ok::<_, SyncError>(())
        }
        .await;
        let result = match result {
            Ok(()) => match proto::expect_control(&mut r).await {
                Ok(Control::EndOk { .. }) => Ok(()),
                Ok(other) => Err(unexpected(other)),
                Err(e) => Err(e.into()),
            },
            // A write that failed because the receiver hung up: its reason is the better
            // error to report.
            Err(e) => match tokio::time::timeout(Duration::from_secs(2), proto::read_frame(&mut r))
                .await
            {
                Ok(Ok(f)) if f.kind == KIND_CONTROL => match f.control() {
                    Err(peer) => Err(peer.into()),
                    Ok(_) => Err(e),
                },
                // A TLS alert says more than the broken pipe it caused.
                Ok(Err(read)) if read.to_string().contains("alert") => Err(read.into()),
                _ => Err(e),
            },
        };
        result.map_err(explain)
    }

    /// Reads a unit, finds its changed chunks and encodes their frames.
    async fn process(&self, unit: Unit) -> Result<Vec<u8>, SyncError> {
        let g = self.geometry;
        // Byte range of each run.
        let spans: Vec<(u64, u64)> = unit
            .runs
            .iter()
            .map(|&(first, count)| g.run(first, count))
            .collect();
        let total: u64 = spans.iter().map(|s| s.1).sum();
        let (mut pool, mut frames) = {
            let mut spare = self.spare.lock().await;
            (
                std::mem::take(&mut spare.reads),
                std::mem::take(&mut spare.frames),
            )
        };
        // A disk read with blocking calls is read on the thread that hashes: one hop per
        // unit instead of two (a scan of a whole disk makes thousands).
        let read_there = unit.read && self.disk.reads_block();
        let data: Option<Vec<Vec<u8>>> = if unit.read && !read_there {
            // All runs at once: over NBD the requests are pipelined on the connection.
            let bufs = futures::future::try_join_all(spans.iter().map(|&(start, len)| {
                let buf = pool.pop().unwrap_or_default();
                self.disk.read_into(start, len as usize, buf)
            }))
            .await?;
            Progress::add(&self.progress.bytes_read, total);
            Some(bufs)
        } else {
            None
        };
        let needed = unit.runs.iter().map(|&(first, count)| first + count).max();
        if self
            .index_ready
            .clone()
            .wait_for(|&received| Some(received) >= needed)
            .await
            .is_err()
        {
            return Err(SyncError::Interrupted(
                "the target's index did not arrive".into(),
            ));
        }
        let local = Arc::clone(&self.local);
        let compress = self.compress;
        let runs = unit.runs;
        let disk = read_there.then(|| self.disk.clone());
        let memo = self.memo.clone();
        let progress = Arc::clone(&self.progress);
        let (frames, changed, zeroed, bufs, pool) = tokio::task::spawn_blocking(move || {
            frames.clear();
            // At most the unit's bytes and a header per chunk, reserved at once: grown by
            // doubling, the buffer would be mapped afresh (and faulted in) several times
            // over before it reached a unit's size.
            if unit.read {
                frames.reserve((total + total / 512) as usize + 4096);
            }
            let cs = u64::from(g.chunk_size);
            // Read here, a piece at a time, each hashed while it is still in the cache.
            let piece_chunks = (PIECE_BYTES / cs).max(1);
            let mut piece_buf = Vec::new();
            if disk.is_some() {
                piece_buf = pool.pop().unwrap_or_default();
            }
            let mut changed = Vec::new();
            let mut zeroed = 0u64;
            let mut hashed = 0u64;
            let mut packed = Vec::new();
            for (r, &(first, count)) in runs.iter().enumerate() {
                let before = local.read(first, count)?;
                // The memo only saves work: when it cannot be read or written, every
                // chunk is hashed and the sync goes on.
                let mut remembered = memo.as_ref().and_then(|m| {
                    m.read(first, count)
                        .map_err(|e| tracing::debug!(memo = %m.path().display(), "digest memo not read: {e}"))
                        .ok()
                });
                let mut learned = false;
                let (start, _) = g.chunk(first);
                let step = if disk.is_some() { piece_chunks } else { count };
                let mut i = 0;
                while i < count {
                    let n = step.min(count - i);
                    let (p_start, p_len) = g.run(first + i, n);
                    let p_len = p_len as usize;
                    let piece: Option<&[u8]> = match (&data, &disk) {
                        (Some(d), _) => {
                            let at = (p_start - start) as usize;
                            Some(&d[r][at..at + p_len])
                        }
                        (None, Some(disk)) => {
                            let buf = std::mem::take(&mut piece_buf);
                            piece_buf = disk.read_blocking(p_start, p_len, buf)?;
                            Some(&piece_buf[..])
                        }
                        (None, None) => None,
                    };
                    for k in i..i + n {
                        let c = first + k;
                        let (off, len) = g.chunk(c);
                        let at = (off - p_start) as usize;
                        let bytes = piece.map(|p| &p[at..at + len]);
                        let digest = match (bytes, &memo, remembered.as_mut()) {
                            (Some(b), Some(m), Some(entries)) => {
                                let (d, new) = m.digest(c, &mut entries[k as usize], b);
                                learned |= new;
                                hashed += if new { b.len() as u64 } else { 0 };
                                d
                            }
                            (Some(b), _, _) => {
                                let d = chunk::digest(b);
                                hashed += if d != ZERO { b.len() as u64 } else { 0 };
                                d
                            }
                            (None, _, _) => ZERO,
                        };
                        if digest == before[k as usize] {
                            continue;
                        }
                        changed.push((c, digest));
                        match bytes {
                            Some(b) if digest != ZERO => {
                                let compressed = compress
                                    && crate::compress::compress_if_worth_it(b, &mut packed);
                                let payload = if compressed { &packed[..] } else { b };
                                proto::encode_data(
                                    &mut frames,
                                    c,
                                    &digest,
                                    len as u32,
                                    payload,
                                    compressed,
                                );
                            }
                            _ => {
                                proto::encode_zero(&mut frames, c);
                                zeroed += 1;
                            }
                        }
                    }
                    i += n;
                }
                if let (true, Some(m), Some(entries)) = (learned, &memo, &remembered) {
                    if let Err(e) = m.write(first, entries) {
                        tracing::debug!(memo = %m.path().display(), "digest memo not written: {e}");
                    }
                }
            }
            if disk.is_some() {
                Progress::add(&progress.bytes_read, total);
                pool.push(piece_buf);
            }
            let n = changed.len() as u64;
            local.set_many(&mut changed)?;
            Progress::add(&progress.bytes_hashed, hashed);
            Ok::<_, SyncError>((frames, n, zeroed, data, pool))
        })
        .await??;
        let mut pool = pool;
        if let Some(bufs) = bufs {
            pool.extend(bufs);
        }
        // Keep about a unit's worth: memory per stream stays bounded whatever the mix of
        // large and small runs.
        let mut kept = 0;
        pool.retain(|b| {
            kept += b.capacity() as u64;
            kept <= 2 * UNIT_BYTES
        });
        self.spare.lock().await.reads = pool;
        Progress::add(&self.progress.chunks_changed, changed);
        Progress::add(&self.progress.chunks_zeroed, zeroed);
        Progress::add(&self.progress.scanned, total);
        Ok(frames)
    }
}

/// Turns TLS alerts into what they mean for a sync.
fn explain(e: SyncError) -> SyncError {
    let text = e.to_string();
    if text.contains("BadRecordMac") {
        SyncError::Interrupted(format!(
            "data was rejected: corrupted in transit (TLS record authentication failed: {text}); nothing corrupt was written, and the next attempt sends it again"
        ))
    } else if [
        "certificate",
        "UnknownCA",
        "BadCertificate",
        "DecryptError",
        "CertificateUnknown",
    ]
    .iter()
    .any(|m| text.contains(m))
    {
        SyncError::Config(format!(
            "the receiver refused this sender's certificate ({text}): both ends need certificates from the same Ferry CA"
        ))
    } else {
        e
    }
}
