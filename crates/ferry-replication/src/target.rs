//! The receiving side's disk: a raw image `DST` and its sidecar directory `DST.ferry/`.
//!
//! Invariant: **the path DST exists only while it holds a complete, verified generation.**
//! Everything in flight lives in the sidecar:
//!
//! ```text
//! DST.ferry/state.json      last committed generation, geometry, DST's size and mtime
//! DST.ferry/gen-N.idx       chunk index of generation N (what DST holds)
//! DST.ferry/pending/        the sync in progress (resumable after any crash):
//!     session.json          its base generation and geometry; written at the start
//!                           (as session.json.new) and put in place by the first
//!                           checkpoint, so a sync that never reached one is not resumed
//!     data                  first generation: the new disk itself, chunks at their
//!                           own offsets (sparse); it becomes DST at the commit
//!     journal               later generations: received chunks, appended
//!     index.idx             index of "DST with the received chunks applied"
//!     COMMIT                present once the sync is whole and verified: from then on
//!                           the commit is finished by whoever opens the target next
//! DST.ferry/applying        DST while a commit copies chunks into it
//! DST.ferry/journal.spare   the last committed delta's journal (at most 1 GiB of it),
//!                           which the next delta writes over (see `journal`)
//! ```
//!
//! A received chunk's index entry is written only after its data is on stable storage,
//! so after a crash `pending/index.idx` never claims a chunk that is not there.
//!
//! A *device* target ([`Target::open_device`]) is a volume that already exists at its
//! size (a block device a target worker writes, or a file standing in for one) with its
//! sidecar in a state directory elsewhere. Chunks go straight to their place on the
//! volume, and a commit only records the new index: keeping the previous generation
//! intact while a sync runs is the platform's job there (an instance snapshot taken
//! before each sync and reverted when one fails), since a volume cannot be renamed into
//! place. The sidecar lives on the same snapshotted storage, so a revert rolls both back
//! together. The first sync zeroes the volume, so chunks that are zero need no bytes.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::chunk::{self, Digest, Geometry, ZERO};
use crate::direct::DirectWriter;
use crate::index::{sync_dir, write_atomic, IndexError, IndexFile};
use crate::journal::Journal;
use crate::sink::{self, Format, Sink};
use crate::vectored::pwritev_all;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{path}: {source}{}", crate::what_to_do(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{0}")]
    State(String),
    #[error("the sync is incomplete: the target's index does not match the sender's ({missing}); the received chunks are kept and the next sync resumes from them")]
    Incomplete { missing: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TargetError + '_ {
    move |source| TargetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    generation: u64,
    chunk_size: u32,
    disk_size: u64,
    dst_size: u64,
    dst_mtime_ns: i128,
    source: String,
    /// Entries digest of the generation's index, as its sender computed it and the commit
    /// checked (absent after a recovery or for a target indexed from its contents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index_digest: Option<String>,
    /// The format Ferry keeps DST in ("raw", "qcow2"), as it decided when it made DST;
    /// absent in a state written before Ferry recorded it (then DST's name decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SessionInfo {
    base_generation: u64,
    /// Whether a committed index exists for the base (false: DST does not exist yet).
    has_base: bool,
    chunk_size: u32,
    disk_size: u64,
    source: String,
}

/// A target disk with its sidecar.
pub struct Target {
    dst: PathBuf,
    sidecar: PathBuf,
    /// Written in place (see the module documentation).
    device: bool,
}

impl Target {
    /// Opens the target at `dst`, finishing a commit that a crash interrupted.
    pub fn open(dst: &Path) -> Result<Self, TargetError> {
        let name = dst
            .file_name()
            .ok_or_else(|| TargetError::State(format!("{}: not a file path", dst.display())))?;
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(TargetError::State(format!(
                "{}: the directory {} does not exist (create it first)",
                dst.display(),
                parent.display()
            )));
        }
        let mut side = name.to_os_string();
        side.push(".ferry");
        let sidecar = dst.with_file_name(side);
        std::fs::create_dir_all(&sidecar).map_err(io(&sidecar))?;
        let t = Self {
            dst: std::path::absolute(dst).map_err(io(dst))?,
            sidecar: std::path::absolute(&sidecar).map_err(io(&sidecar))?,
            device: false,
        };
        t.recover()
    }

    /// Opens an existing volume written in place, with its sidecar in `state_dir`.
    pub fn open_device(dev: &Path, state_dir: &Path) -> Result<Self, TargetError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(io(dev))?;
        std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let t = Self {
            dst: std::path::absolute(dev).map_err(io(dev))?,
            sidecar: std::path::absolute(state_dir).map_err(io(state_dir))?,
            device: true,
        };
        t.recover()
    }

    fn recover(self) -> Result<Self, TargetError> {
        if self.pending_dir().join("COMMIT").exists() {
            tracing::warn!(target = %self.dst.display(), "finishing a commit interrupted by a crash");
            self.finish_commit(None, None)?;
        }
        Ok(self)
    }

    /// The size of a device target (a block device's `len()` is 0).
    fn device_size(&self) -> Result<u64, TargetError> {
        use std::io::Seek;
        File::open(&self.dst)
            .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
            .map_err(io(&self.dst))
    }

    pub fn dst(&self) -> &Path {
        &self.dst
    }

    fn pending_dir(&self) -> PathBuf {
        self.sidecar.join("pending")
    }

    fn applying(&self) -> PathBuf {
        self.sidecar.join("applying")
    }

    fn spare_journal(&self) -> PathBuf {
        self.sidecar.join("journal.spare")
    }

    /// The index of the generation before the last, kept for the next sync to copy the
    /// committed index over (see [`IndexFile::copy_to`]).
    fn spare_index(&self) -> PathBuf {
        self.sidecar.join("index.spare")
    }

    /// Keeps a committed delta's journal for the next delta to write over (see
    /// `journal`), cut to [`SPARE_JOURNAL_MAX`] so a large delta does not hold its space
    /// for good. Best effort: without it, the next delta starts a new journal.
    fn keep_journal(&self, journal: &Path) {
        let kept = File::options().write(true).open(journal).and_then(|f| {
            if f.metadata()?.len() > SPARE_JOURNAL_MAX {
                f.set_len(SPARE_JOURNAL_MAX)?;
            }
            std::fs::rename(journal, self.spare_journal())
        });
        if let Err(e) = kept {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!("journal not kept for the next delta: {e}");
            }
        }
    }

    fn index_path(&self, generation: u64) -> PathBuf {
        self.sidecar.join(format!("gen-{generation}.idx"))
    }

    fn load_state(&self) -> Option<State> {
        let text = std::fs::read(self.sidecar.join("state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The format DST is kept in: a device is written as it is (raw); a file keeps the
    /// format recorded when Ferry made it, or else the one its name says
    /// ([`Format::for_name`]). Never what DST's bytes look like: a raw target holds a
    /// guest's bytes, which may start with any header the guest wrote.
    fn format(&self) -> Result<Format, TargetError> {
        if self.device {
            return Ok(Format::Raw);
        }
        match self.load_state().and_then(|s| s.format) {
            Some(name) => Format::parse(&name).ok_or_else(|| {
                TargetError::State(format!(
                    "{}: the sidecar records the format {name:?}, which this Ferry does not write (raw or qcow2 only)",
                    self.dst.display()
                ))
            }),
            None => Ok(Format::for_name(&self.dst)),
        }
    }

    /// The geometry of the last committed generation, if there is one.
    pub fn committed_geometry(&self) -> Option<Geometry> {
        self.load_state()
            .map(|s| Geometry::new(s.disk_size, s.chunk_size))
    }

    /// The committed index that truly describes DST, or `None` when DST does not exist,
    /// with its entries digest (hex) when the commit recorded one. A DST changed behind
    /// Ferry's back (other size or mtime), or one Ferry never wrote, is read and indexed
    /// again: correct first, fast when possible.
    fn committed_index(
        &self,
        chunk_size: u32,
    ) -> Result<(Option<IndexFile>, Option<String>), TargetError> {
        let state = self.load_state();
        let same_file = if self.device {
            // Nothing recorded: a volume Ferry has not written yet (it is zeroed first).
            // A volume's size and times say nothing of its contents: the platform's
            // snapshots keep it and its sidecar in step.
            if state.is_none() {
                return Ok((None, None));
            }
            true
        } else {
            let meta = match std::fs::metadata(&self.dst) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None)),
                Err(e) => return Err(io(&self.dst)(e)),
            };
            state
                .as_ref()
                .is_none_or(|s| s.dst_size == meta.len() && s.dst_mtime_ns == mtime_ns(&meta))
        };
        // A state from before Ferry recorded the format: that Ferry took an existing
        // DST's format from its header, so its index may describe DST read as another
        // format than its name now says. The header decides nothing; it only makes Ferry
        // read DST again, as what its name says.
        let format_unrecorded = !self.device
            && state.as_ref().is_some_and(|s| s.format.is_none())
            && ferry_disk::sniff_format(&self.dst)
                .is_ok_and(|h| h != Format::for_name(&self.dst).name());
        if let Some(state) = &state {
            if format_unrecorded {
                tracing::warn!(
                    target = %self.dst.display(),
                    "an older Ferry may have kept this target in another format; indexing it again as {}",
                    Format::for_name(&self.dst).name()
                );
            } else if same_file && state.chunk_size == chunk_size {
                match IndexFile::open(&self.index_path(state.generation)) {
                    Ok(idx) => return Ok((Some(idx), state.index_digest.clone())),
                    Err(e) => tracing::warn!("{e}; indexing the target again"),
                }
            } else if !same_file {
                tracing::warn!(
                    target = %self.dst.display(),
                    "the target changed since Ferry last wrote it; indexing it again"
                );
            }
        }
        let generation = state.map(|s| s.generation).unwrap_or(0);
        let idx = self.index_existing(chunk_size, generation)?;
        Ok((Some(idx), None))
    }

    /// Reads and hashes DST (skipping holes) into `gen-N.idx`, and records it as
    /// generation N.
    fn index_existing(&self, chunk_size: u32, generation: u64) -> Result<IndexFile, TargetError> {
        use ferry_disk::Disk;
        let state = |e: String| TargetError::State(e);
        let format = self.format()?;
        if !self.device && self.load_state().is_none() {
            // Only a hint for the user: what the header says decides nothing.
            let header = ferry_disk::sniff_format(&self.dst).ok();
            if header.as_deref().is_some_and(|h| h != format.name()) {
                tracing::warn!(
                    target = %self.dst.display(),
                    header = header.as_deref().unwrap_or_default(),
                    format = format.name(),
                    "the existing target's header does not match the format its name says; Ferry reads and writes it as {} (name a qcow2 target *.qcow2)",
                    format.name()
                );
            }
        }
        let disk = sink::open_for_reading(&self.dst, format).map_err(state)?;
        let rt = tokio::runtime::Handle::current();
        let geometry = Geometry::new(disk.size(), chunk_size);
        let path = self.index_path(generation);
        let idx = IndexFile::create(&path, geometry, generation)?;
        let mut entries = Vec::new();
        let mut pos = 0;
        while pos < geometry.disk_size {
            let extents = rt
                .block_on(disk.extents(pos, geometry.disk_size - pos))
                .map_err(|e| state(e.to_string()))?;
            let Some(reached) = extents.last().map(|e| e.end()) else {
                break;
            };
            for e in extents
                .iter()
                .filter(|e| e.kind == ferry_disk::ExtentKind::Data)
            {
                for n in geometry.chunks_overlapping(e.offset, e.length) {
                    let (off, len) = geometry.chunk(n);
                    let buf = rt
                        .block_on(disk.read_at(off, len))
                        .map_err(|e| state(e.to_string()))?;
                    entries.push((n, chunk::digest(&buf)));
                    if entries.len() >= 4096 {
                        idx.set_many(&mut entries)?;
                        entries.clear();
                    }
                }
            }
            pos = reached.max(pos + 1);
        }
        idx.set_many(&mut entries)?;
        idx.sync()?;
        self.write_state(generation, geometry, "(existing target)", None)?;
        Ok(idx)
    }

    fn write_state(
        &self,
        generation: u64,
        geometry: Geometry,
        source: &str,
        index_digest: Option<&Digest>,
    ) -> Result<(), TargetError> {
        let (dst_size, dst_mtime_ns) = if self.device {
            (self.device_size()?, 0)
        } else {
            let meta = std::fs::metadata(&self.dst).map_err(io(&self.dst))?;
            (meta.len(), mtime_ns(&meta))
        };
        let state = State {
            generation,
            chunk_size: geometry.chunk_size,
            disk_size: geometry.disk_size,
            dst_size,
            dst_mtime_ns,
            source: source.to_string(),
            index_digest: index_digest.map(crate::proto::hex),
            format: Some(self.format()?.name().to_string()),
        };
        let path = self.sidecar.join("state.json");
        write_atomic(&path, &serde_json::to_vec_pretty(&state).unwrap()).map_err(io(&path))
    }

    /// Starts a sync towards a disk of `geometry`, or resumes the interrupted one when it
    /// has the same base and geometry.
    pub fn begin(&self, geometry: Geometry, source: &str) -> Result<Session, TargetError> {
        if self.device {
            let size = self.device_size()?;
            if size < geometry.disk_size {
                return Err(TargetError::State(format!(
                    "the volume {} holds {size} bytes, less than the {}-byte disk: give it at least the disk's size",
                    self.dst.display(),
                    geometry.disk_size
                )));
            }
        }
        let (committed, base_digest) = self.committed_index(geometry.chunk_size)?;
        let base_generation = committed.as_ref().map(|i| i.generation()).unwrap_or(0);
        let info = SessionInfo {
            base_generation,
            has_base: committed.is_some(),
            chunk_size: geometry.chunk_size,
            disk_size: geometry.disk_size,
            source: source.to_string(),
        };
        let pending = self.pending_dir();
        let info_path = pending.join("session.json");
        let previous: Option<SessionInfo> = std::fs::read(&info_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let resumed = previous.as_ref().is_some_and(|p| {
            p.base_generation == info.base_generation
                && p.has_base == info.has_base
                && p.chunk_size == info.chunk_size
                && p.disk_size == info.disk_size
        }) && IndexFile::open(&pending.join("index.idx")).is_ok();
        let mut index_writeback = None;
        if !resumed {
            if pending.exists() {
                if previous.is_some() {
                    tracing::info!("discarding an interrupted sync of another base or size");
                }
                std::fs::remove_dir_all(&pending).map_err(io(&pending))?;
            }
            std::fs::create_dir_all(&pending).map_err(io(&pending))?;
            if committed.is_none() && self.device {
                let dev = OpenOptions::new()
                    .write(true)
                    .open(&self.dst)
                    .map_err(io(&self.dst))?;
                // All of it: a volume larger than the disk reads as zeros past its end.
                punch_zero(&dev, 0, self.device_size()?).map_err(io(&self.dst))?;
                dev.sync_all().map_err(io(&self.dst))?;
            } else if committed.is_none() {
                let data = File::create(pending.join("data")).map_err(io(&pending))?;
                data.set_len(geometry.disk_size).map_err(io(&pending))?;
            }
            // Neither is flushed here: the first checkpoint flushes the index, then puts
            // session.json in place, which makes the session resumable. Until then a
            // crash only discards it. Written now, session.json takes its space while
            // there is some (a sync that fills the disk still leaves a resumable one).
            let idx_path = pending.join("index.idx");
            match &committed {
                Some(c) => {
                    // Its contents do not matter: all of it is written over. Until the
                    // first checkpoint, a crash discards the whole pending directory.
                    let _ = std::fs::rename(self.spare_index(), &idx_path);
                    let copy = c.copy_to(&idx_path, geometry, base_generation + 1)?;
                    copy.reserve()?;
                    // A copied index is all dirty pages (128 MiB at 256 GiB): written
                    // back while the sync runs, they are not left for the checkpoint
                    // before the commit, on the critical path.
                    index_writeback = crate::sink::Writeback::new(copy.file()).ok();
                    if let Some(w) = &index_writeback {
                        w.kick();
                    }
                }
                None => IndexFile::create(&idx_path, geometry, base_generation + 1)?.reserve()?,
            }
            let draft = pending.join("session.json.new");
            std::fs::write(&draft, serde_json::to_vec_pretty(&info).unwrap())
                .map_err(io(&draft))?;
        }
        let store = if self.device {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.dst)
                .map_err(io(&self.dst))?;
            Store::Image {
                file,
                direct: DirectWriter::open(&self.dst),
                path: self.dst.clone(),
            }
        } else if committed.is_some() {
            let path = pending.join("journal");
            // A resumed session continues its own journal; a new one takes over the last
            // commit's.
            let journal = if !resumed && std::fs::rename(self.spare_journal(), &path).is_ok() {
                Journal::reuse(&path, geometry.chunk_size)
            } else {
                Journal::open(&path, geometry.chunk_size)
            };
            Store::Journal(journal.map_err(io(&path))?)
        } else {
            let path = pending.join("data");
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            Store::Image {
                file,
                direct: DirectWriter::open(&path),
                path,
            }
        };
        let index = IndexFile::open(&pending.join("index.idx"))?;
        // Direct writes leave nothing in the page cache to write back.
        let writeback = match &store {
            Store::Image {
                direct: Some(_), ..
            } => None,
            Store::Image { file, .. } => crate::sink::Writeback::new(file).ok(),
            Store::Journal(j) => crate::sink::Writeback::new(j.file()).ok(),
        };
        Ok(Session {
            target: Target {
                dst: self.dst.clone(),
                sidecar: self.sidecar.clone(),
                device: self.device,
            },
            geometry,
            base_generation,
            resumed,
            store,
            index,
            unrecorded: Mutex::new(Vec::new()),
            unrecorded_bytes: AtomicU64::new(0),
            checkpoint_bytes: checkpoint_interval(geometry.disk_size),
            checkpoint_lock: Mutex::new(()),
            bytes_written: AtomicU64::new(0),
            written: Written::default(),
            writeback,
            _index_writeback: index_writeback,
            unrecorded_session: AtomicBool::new(!resumed),
            base_digest,
        })
    }

    /// Completes a decided commit. Idempotent: safe to run again after a crash at any
    /// point inside it. `written`: where the finishing session put the chunks it received
    /// (none when a crash is being recovered from); the rest is found in the journal.
    fn finish_commit(
        &self,
        written: Option<&Written>,
        index_digest: Option<&Digest>,
    ) -> Result<CommitInfo, TargetError> {
        let t = std::time::Instant::now();
        let pending = self.pending_dir();
        let info: SessionInfo = serde_json::from_slice(
            &std::fs::read(pending.join("session.json")).map_err(io(&pending))?,
        )
        .map_err(|e| TargetError::State(format!("pending/session.json: {e}")))?;
        let geometry = Geometry::new(info.disk_size, info.chunk_size);
        let generation = info.base_generation + 1;
        let applying = self.applying();
        let new_index_path = pending.join("index.idx");
        let committed_path = self.index_path(generation);
        let mut applied = 0;
        // Whether `applying` was just fsynced here (a second fsync would only cost time).
        let mut synced = false;
        // Each step checks what is already done, so a crash anywhere in here is finished
        // by running this again.
        if new_index_path.exists() {
            let new_index = IndexFile::open(&new_index_path)?;
            if self.device {
                // The chunks are in place already (made durable by the last checkpoint).
                applied = new_index.chunk_count();
            } else if !info.has_base {
                // First generation: the pending data file *is* the new disk (converted,
                // when the target is to be qcow2).
                let data = pending.join("data");
                if data.exists() {
                    match self.format()? {
                        Format::Raw => std::fs::rename(&data, &applying),
                        Format::Qcow2 => sink::raw_to_qcow2(&data, &applying, geometry.disk_size),
                    }
                    .map_err(io(&applying))?;
                }
                applied = new_index.chunk_count();
            } else {
                // `applying` is DST on its way: the same format.
                let format = self.format()?;
                if !applying.exists() {
                    std::fs::rename(&self.dst, &applying).map_err(io(&self.dst))?;
                }
                let base = IndexFile::open(&self.index_path(info.base_generation))?;
                let journal = Journal::open(&pending.join("journal"), geometry.chunk_size)
                    .map_err(io(&pending))?;
                let sink =
                    Sink::open(&applying, format, geometry.disk_size).map_err(io(&applying))?;
                applied = apply(
                    &base, &new_index, &journal, written, &sink, &applying, geometry,
                )?;
                tracing::debug!(elapsed = ?t.elapsed(), applied, "commit: chunks applied");
                // A raw file's flush below is the fsync; through qemu-nbd, one more from
                // here costs little and does not depend on what qemu-nbd flushes.
                synced = matches!(sink, Sink::File(_));
                // Flushes what the copy left dirty (most of it is already on its way).
                // The journal's pages stay cached: the next delta writes over them.
                sink.finish().map_err(io(&applying))?;
                tracing::debug!(elapsed = ?t.elapsed(), "commit: target flushed");
            }
            if applying.exists() {
                if !synced {
                    File::open(&applying)
                        .and_then(|f| f.sync_all())
                        .map_err(io(&applying))?;
                }
                std::fs::rename(&applying, &self.dst).map_err(io(&self.dst))?;
                sync_dir(self.dst.parent().unwrap_or(Path::new("/"))).map_err(io(&self.dst))?;
            }
            drop(new_index);
            // Made durable with the state below, by the same flush of the sidecar. A crash
            // before it finds the commit decided and runs this again.
            std::fs::rename(&new_index_path, &committed_path).map_err(io(&committed_path))?;
        }
        self.write_state(generation, geometry, &info.source, index_digest)?;
        self.keep_journal(&pending.join("journal"));
        std::fs::remove_dir_all(&pending).map_err(io(&pending))?;
        if info.has_base && info.base_generation != generation {
            let old = self.index_path(info.base_generation);
            if std::fs::rename(&old, self.spare_index()).is_err() {
                let _ = std::fs::remove_file(&old);
            }
        }
        tracing::debug!(elapsed = ?t.elapsed(), "commit: finished");
        Ok(CommitInfo {
            generation,
            chunks_applied: applied,
        })
    }
}

/// Brings the target from `base` to `new`: every changed chunk gets its new contents
/// (copied straight from the record this session wrote, or else from a journal record
/// that hashes to it), and chunks that became zero are punched out. Idempotent.
///
/// Both indexes are walked in windows side by side; only chunks that changed are looked
/// at, and the journal is scanned only for those this session did not write itself.
fn apply(
    base: &IndexFile,
    new: &IndexFile,
    journal: &Journal,
    written: Option<&Written>,
    target: &Sink,
    target_path: &Path,
    geometry: Geometry,
) -> Result<u64, TargetError> {
    let target_err = |source| IndexError::Io {
        path: target_path.to_path_buf(),
        source,
    };
    let count = geometry.chunk_count();
    // Changed chunks whose bytes must still come from the journal: one bit per chunk,
    // 4 MiB at 2 TiB.
    let mut needed = vec![0u64; count.div_ceil(64) as usize];
    let mut missing = 0u64;
    let mut applied = 0u64;
    let mut copies = Vec::new();
    let written = written.map(|w| w.records.lock().unwrap());
    new.for_each_window(|first, raw| {
        let n = raw.len() as u64 / 32;
        let before = if first < base.chunk_count() {
            base.read(first, n)?
        } else {
            Vec::new()
        };
        for i in 0..n {
            let c = first + i;
            let want: Digest = raw[(i * 32) as usize..(i * 32 + 32) as usize]
                .try_into()
                .unwrap();
            if want == before.get(i as usize).copied().unwrap_or(ZERO) {
                continue;
            }
            let (off, len) = geometry.chunk(c);
            if want == ZERO {
                target.zero(off, len as u64).map_err(target_err)?;
                applied += 1;
                continue;
            }
            match written.as_ref().and_then(|w| w.get(&c)) {
                Some(&(slot, digest)) if digest == want => {
                    copies.push(Copy {
                        from: journal.data_offset(slot),
                        to: off,
                        len,
                    });
                    applied += 1;
                }
                _ => {
                    needed[(c / 64) as usize] |= 1 << (c % 64);
                    missing += 1;
                }
            }
        }
        Ok(())
    })?;
    drop(written);
    let t = std::time::Instant::now();
    copy_chunks(journal.file(), target, &copies).map_err(target_err)?;
    tracing::debug!(elapsed = ?t.elapsed(), chunks = copies.len(), "commit: chunks copied");
    if missing > 0 {
        let is_needed = |c: u64| c < count && needed[(c / 64) as usize] & (1 << (c % 64)) != 0;
        let mut from_journal = Vec::new();
        journal
            .scan_some(
                |c, _| is_needed(c),
                |r| {
                    let c = r.chunk;
                    // A chunk sent twice has several records: the one the new index
                    // names is the one that counts.
                    if !is_needed(c) || new.get(c).map_err(std::io::Error::other)? != r.digest {
                        return Ok(());
                    }
                    let (off, len) = geometry.chunk(c);
                    if r.bytes.len() != len {
                        return Ok(());
                    }
                    target.write(off, &r.bytes)?;
                    from_journal.push(c);
                    Ok(())
                },
            )
            .map_err(io(journal.path()))?;
        for c in from_journal {
            if needed[(c / 64) as usize] & (1 << (c % 64)) != 0 {
                needed[(c / 64) as usize] &= !(1 << (c % 64));
                missing -= 1;
                applied += 1;
            }
        }
    }
    if missing > 0 {
        return Err(TargetError::State(format!(
            "{missing} changed chunks are not in the journal {}: the pending sync is damaged; remove {} and sync again",
            journal.path().display(),
            journal.path().parent().unwrap_or(Path::new(".")).display()
        )));
    }
    Ok(applied)
}

/// A chunk this session wrote into the journal, to copy into the target.
struct Copy {
    from: u64,
    to: u64,
    len: usize,
}

/// Copies chunks from the journal into the target, each read and then written by the
/// same thread while its bytes are still in that core's cache. Writeback is started as
/// the copy goes on, so the final flush finds little left to write.
///
/// Each chunk is written whole from memory. `copy_file_range` would splice a record's
/// bytes, which start 64 bytes into a journal page, across in page pieces: every target
/// page written in two parts must first be read from the disk unless it is cached. (A
/// chunk-sized direct write would skip the page cache, but into holes those go one at a
/// time and take longer.)
fn copy_chunks(journal: &File, target: &Sink, copies: &[Copy]) -> std::io::Result<()> {
    let writeback = target.writeback();
    let mut buf = Vec::new();
    let mut copied = 0u64;
    for c in copies {
        buf.resize(c.len, 0);
        journal.read_exact_at(&mut buf, c.from)?;
        target.write(c.to, &buf)?;
        copied += c.len as u64;
        if copied >= WRITEBACK_BYTES {
            copied = 0;
            if let Some(w) = &writeback {
                w.kick();
            }
        }
    }
    Ok(())
}

/// Makes a range read as zeros: freeing its space where the filesystem or device can (a
/// thin volume then stays thin), else as unwritten extents, else by writing zeros.
pub(crate) fn punch_zero(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    for mode in [
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    ] {
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    // In pieces: a whole volume is zeroed this way when nothing else works.
    let zeros = vec![0u8; len.min(4 << 20) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// What a commit did.
#[derive(Debug, Clone, Copy)]
pub struct CommitInfo {
    pub generation: u64,
    pub chunks_applied: u64,
}

/// A sync in progress on the receiving side. Shared by all connections of the sync.
pub struct Session {
    target: Target,
    geometry: Geometry,
    base_generation: u64,
    resumed: bool,
    store: Store,
    index: IndexFile,
    /// Chunks written but whose index entries wait for the next checkpoint.
    unrecorded: Mutex<Vec<(u64, Digest)>>,
    unrecorded_bytes: AtomicU64,
    /// Received bytes between two checkpoints.
    checkpoint_bytes: u64,
    checkpoint_lock: Mutex<()>,
    bytes_written: AtomicU64,
    /// Journal records appended by this session (later generations only).
    written: Written,
    /// Writes back what was stored, from a thread of its own.
    writeback: Option<crate::sink::Writeback>,
    /// Writes back the index this session copied (kicked once, when it was copied).
    _index_writeback: Option<crate::sink::Writeback>,
    /// `pending/session.json` is still `session.json.new`, until the first checkpoint
    /// (read and written under `checkpoint_lock`).
    unrecorded_session: AtomicBool,
    /// Entries digest (hex) of the committed index this session started from, when known.
    base_digest: Option<String>,
}

/// Most of a committed delta's journal kept for the next delta (see `keep_journal`).
const SPARE_JOURNAL_MAX: u64 = 1 << 30;

/// Most journal records a session remembers the place of (48 bytes each: 16 MiB, about
/// 20 GiB of 64 KiB chunks). Beyond that the commit finds the rest by scanning the
/// journal, as after a crash. A bound, so memory never grows with the delta.
const MAX_WRITTEN: usize = 350_000;

/// Where this session appended each chunk it received, verified, in the journal. The
/// commit copies exactly those records into the target, without scanning the journal or
/// hashing them again: they are the very bytes that were verified on arrival (and made
/// durable before the commit was decided). Records of an earlier, interrupted attempt
/// are not here; they are found by a scan that trusts only records whose bytes hash to
/// their digest.
#[derive(Default)]
pub(crate) struct Written {
    records: Mutex<std::collections::HashMap<u64, (u64, Digest)>>,
}

/// Where received chunks go.
enum Store {
    /// First generation: the new disk itself, written directly where the file system
    /// allows it.
    Image {
        file: File,
        direct: Option<DirectWriter>,
        path: PathBuf,
    },
    /// Later generations: appended, copied in at the commit.
    Journal(Journal),
}

/// Start writeback after this many received bytes.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// Checkpoint after every 1/32 of the disk received, within these bounds: a receiver
/// crash costs at most about 3% of the disk in re-sent data, and a checkpoint (two
/// flushes) comes no more often than the disk can take them without slowing the sync.
const CHECKPOINT_MIN: u64 = 32 << 20;
const CHECKPOINT_MAX: u64 = 256 << 20;

fn checkpoint_interval(disk_size: u64) -> u64 {
    (disk_size / 32).clamp(CHECKPOINT_MIN, CHECKPOINT_MAX)
}

impl Session {
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn base_generation(&self) -> u64 {
        self.base_generation
    }

    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Whether this sync starts from the committed generation `generation` whose index
    /// has the entries digest `digest` (hex), untouched: a sender holding that index
    /// needs none of it sent.
    pub fn base_is(&self, generation: u64, digest: &str) -> bool {
        !self.resumed
            && generation == self.base_generation
            && self.base_digest.as_deref() == Some(digest)
    }

    /// The index of what the target holds once this sync's received chunks are applied:
    /// what the sender compares against.
    pub fn index(&self) -> &IndexFile {
        &self.index
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Stores a verified chunk (or, with `None`, a chunk that is now all zeros).
    #[cfg(test)]
    pub fn put(&self, chunk: u64, digest: Digest, bytes: Option<&[u8]>) -> Result<(), TargetError> {
        self.put_many(&[(chunk, digest, bytes)])
    }

    /// Stores a batch of verified chunks (`None`: a chunk that is now all zeros). A batch
    /// costs a write per run of neighbouring chunks (one in all into the journal), not
    /// one per chunk.
    pub fn put_many(&self, chunks: &[(u64, Digest, Option<&[u8]>)]) -> Result<(), TargetError> {
        let mut stored = 0u64;
        let mut total = 0u64;
        for &(chunk, _, bytes) in chunks {
            if chunk >= self.geometry.chunk_count() {
                return Err(TargetError::State(format!(
                    "chunk {chunk} is past the end of the disk ({} chunks)",
                    self.geometry.chunk_count()
                )));
            }
            let (_, len) = self.geometry.chunk(chunk);
            if let Some(b) = bytes {
                if b.len() != len {
                    return Err(TargetError::State(format!(
                        "chunk {chunk} has {} bytes, expected {len}",
                        b.len()
                    )));
                }
                stored += len as u64;
            }
            total += len as u64;
        }
        match &self.store {
            Store::Image { file, direct, path } => self
                .write_in_place(file, direct.as_ref(), chunks)
                .map_err(io(path))?,
            Store::Journal(j) => {
                // A chunk that became zero needs no bytes: the commit punches it out.
                let records: Vec<(u64, Digest, &[u8])> = chunks
                    .iter()
                    .filter_map(|&(c, d, b)| b.map(|b| (c, d, b)))
                    .collect();
                if !records.is_empty() {
                    let first = j.append_many(&records).map_err(io(j.path()))?;
                    let mut written = self.written.records.lock().unwrap();
                    for (slot, &(chunk, digest, _)) in (first..).zip(&records) {
                        if written.len() < MAX_WRITTEN || written.contains_key(&chunk) {
                            written.insert(chunk, (slot, digest));
                        }
                    }
                }
            }
        }
        if stored > 0 {
            let before = self.bytes_written.fetch_add(stored, Ordering::Relaxed);
            // Start writing back every few MiB without waiting, so the disk works while
            // the network does, and checkpoints find little left to flush. (With lots of
            // memory the kernel would otherwise hold gigabytes dirty until the commit.)
            if (before + stored) / WRITEBACK_BYTES != before / WRITEBACK_BYTES {
                if let Some(w) = &self.writeback {
                    w.kick();
                }
            }
        }
        self.unrecorded
            .lock()
            .unwrap()
            .extend(chunks.iter().map(|&(c, d, _)| (c, d)));
        let pending = self.unrecorded_bytes.fetch_add(total, Ordering::Relaxed) + total;
        if pending >= self.checkpoint_bytes {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Writes chunks at their own offsets: each run of neighbouring chunks with bytes in
    /// one call, chunks that became zero punched out.
    fn write_in_place(
        &self,
        file: &File,
        direct: Option<&DirectWriter>,
        chunks: &[(u64, Digest, Option<&[u8]>)],
    ) -> std::io::Result<()> {
        let mut i = 0;
        while i < chunks.len() {
            let (first, _, bytes) = chunks[i];
            let (off, len) = self.geometry.chunk(first);
            if bytes.is_none() {
                punch_zero(file, off, len as u64)?;
                i += 1;
                continue;
            }
            let mut run = vec![IoSlice::new(bytes.unwrap_or_default())];
            let mut j = i + 1;
            while j < chunks.len() && chunks[j].0 == first + (j - i) as u64 && chunks[j].2.is_some()
            {
                run.push(IoSlice::new(chunks[j].2.unwrap_or_default()));
                j += 1;
            }
            let written = match direct {
                Some(d) => d.write(&run, off)?,
                None => false,
            };
            if !written {
                pwritev_all(file, &mut run, off)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Makes every chunk stored so far durable and records it in the pending index. The
    /// first one also makes the session resumable: with the index flushed, it puts
    /// `pending/session.json` in place.
    pub fn checkpoint(&self) -> Result<(), TargetError> {
        let _one_at_a_time = self.checkpoint_lock.lock().unwrap();
        let mut entries = std::mem::take(&mut *self.unrecorded.lock().unwrap());
        self.unrecorded_bytes.store(0, Ordering::Relaxed);
        let unrecorded_session = self.unrecorded_session.load(Ordering::Relaxed);
        if entries.is_empty() && !unrecorded_session {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let mut flushed = std::time::Duration::ZERO;
        if !entries.is_empty() {
            // Data first, then the entries that claim it.
            match &self.store {
                Store::Image { file, path, .. } => file.sync_data().map_err(io(path))?,
                Store::Journal(j) => j.sync().map_err(io(j.path()))?,
            }
            flushed = t.elapsed();
            self.index.set_many(&mut entries)?;
        }
        self.index.sync()?;
        if unrecorded_session {
            let pending = self.target.pending_dir();
            let draft = pending.join("session.json.new");
            File::open(&draft)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::rename(&draft, pending.join("session.json")))
                .and_then(|()| sync_dir(&pending))
                .map_err(io(&draft))?;
            self.unrecorded_session.store(false, Ordering::Relaxed);
        }
        tracing::debug!(chunks = entries.len(), ?flushed, elapsed = ?t.elapsed(), "checkpoint");
        Ok(())
    }

    /// Commits the sync if the pending index equals the sender's (`expected`, the digest
    /// over all entries); otherwise keeps everything for a resume.
    pub fn commit(&self, expected: &Digest) -> Result<CommitInfo, TargetError> {
        self.decide(expected)?;
        self.target
            .finish_commit(Some(&self.written), Some(expected))
    }

    /// Decides the commit: everything received is durable and recorded, the index is
    /// the sender's, and the decision is on disk. From here on, whoever opens the target
    /// next finishes the commit if this process does not.
    fn decide(&self, expected: &Digest) -> Result<(), TargetError> {
        let t = std::time::Instant::now();
        self.checkpoint()?;
        tracing::debug!(elapsed = ?t.elapsed(), "commit: checkpoint");
        let actual = self.index.entries_digest()?;
        tracing::debug!(elapsed = ?t.elapsed(), "commit: index digest");
        if &actual != expected {
            return Err(TargetError::Incomplete {
                missing: format!(
                    "target {} != sender {}",
                    &crate::proto::hex(&actual)[..16],
                    &crate::proto::hex(expected)[..16]
                ),
            });
        }
        // The decision is the file's existence (what it would say is in session.json):
        // one flush of the directory makes it durable.
        let pending = self.target.pending_dir();
        let commit = pending.join("COMMIT");
        File::create(&commit).map_err(io(&commit))?;
        sync_dir(&pending).map_err(io(&pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_of(byte: u8) -> Vec<u8> {
        vec![byte; 4096]
    }

    /// Syncs `chunks` (chunk number, fill byte) into the target; with `crash`, stops right
    /// after the commit is decided, as a receiver killed there would.
    fn sync(dst: &Path, chunks: &[(u64, u8)], crash: bool) {
        let session = Target::open(dst)
            .unwrap()
            .begin(Geometry::new(16 * 4096, 4096), "test")
            .unwrap();
        for &(c, b) in chunks {
            let bytes = chunk_of(b);
            session.put(c, chunk::digest(&bytes), Some(&bytes)).unwrap();
        }
        session.checkpoint().unwrap();
        let expected = session.index().entries_digest().unwrap();
        if crash {
            session.decide(&expected).unwrap();
        } else {
            session.commit(&expected).unwrap();
        }
    }

    #[test]
    fn a_commit_decided_before_a_crash_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        sync(&dst, &[(0, 1), (3, 2), (15, 3)], false);
        sync(&dst, &[(3, 7), (9, 8)], true);
        assert!(
            dst.with_file_name("disk.raw.ferry/pending/COMMIT").exists(),
            "the decision is on disk"
        );
        // The next open finishes the commit, from the journal alone.
        let target = Target::open(&dst).unwrap();
        assert!(!target.pending_dir().exists());
        let state = target.load_state().unwrap();
        assert_eq!(state.generation, 2);
        let disk = std::fs::read(&dst).unwrap();
        assert_eq!(disk.len(), 16 * 4096);
        for (c, want) in [(0, 1u8), (3, 7), (9, 8), (15, 3), (5, 0)] {
            let at = c * 4096;
            assert!(
                disk[at..at + 4096].iter().all(|&b| b == want),
                "chunk {c} should be all {want}"
            );
        }
        let idx = IndexFile::open(&target.index_path(2)).unwrap();
        assert_eq!(idx.get(9).unwrap(), chunk::digest(&chunk_of(8)));
    }

    #[test]
    fn a_delta_writes_over_the_last_deltas_journal() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let spare = dir.path().join("disk.raw.ferry/journal.spare");
        sync(&dst, &[(0, 1), (3, 2), (15, 3)], false);
        assert!(!spare.exists(), "a first generation has no journal");
        sync(&dst, &[(3, 7), (9, 8), (10, 9)], false);
        let three_records = std::fs::metadata(&spare).unwrap().len();
        // One record, over the first of the three kept; the other two are stale and
        // must not be applied, even by a commit that has to scan the journal (a crash).
        sync(&dst, &[(9, 4)], true);
        assert!(!spare.exists(), "taken over by the pending sync");
        let journal = dst.with_file_name("disk.raw.ferry/pending/journal");
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), three_records);
        let target = Target::open(&dst).unwrap();
        assert_eq!(target.load_state().unwrap().generation, 3);
        assert!(spare.exists(), "kept again for the next delta");
        // The generation before the last keeps its index file for the next copy, and
        // only the committed generation's index is left under its own name.
        let sidecar = dir.path().join("disk.raw.ferry");
        assert!(sidecar.join("index.spare").exists());
        assert!(sidecar.join("gen-3.idx").exists());
        assert!(!sidecar.join("gen-2.idx").exists() && !sidecar.join("gen-1.idx").exists());
        let disk = std::fs::read(&dst).unwrap();
        for (c, want) in [(0, 1u8), (3, 7), (9, 4), (10, 9), (15, 3), (5, 0)] {
            let at = c * 4096;
            assert!(
                disk[at..at + 4096].iter().all(|&b| b == want),
                "chunk {c} should be all {want}"
            );
        }
    }

    /// A chunk that starts like a qcow2 image naming a backing file, as a guest may
    /// write at the start of its raw disk.
    fn qcow2_header_chunk() -> Vec<u8> {
        let mut c = chunk_of(0x5a);
        c[..4].copy_from_slice(b"QFI\xfb");
        c[4..8].copy_from_slice(&3u32.to_be_bytes());
        c
    }

    /// A first sync into `dst` (16 chunks of 4 KiB) whose chunk 0 is a qcow2 header, the
    /// rest zeros; returns that chunk.
    fn committed_with_qcow2_header(dst: &Path) -> Vec<u8> {
        let header = qcow2_header_chunk();
        let session = Target::open(dst)
            .unwrap()
            .begin(Geometry::new(16 * 4096, 4096), "test")
            .unwrap();
        session
            .put(0, chunk::digest(&header), Some(&header))
            .unwrap();
        session.checkpoint().unwrap();
        let expected = session.index().entries_digest().unwrap();
        session.commit(&expected).unwrap();
        header
    }

    #[test]
    fn a_raw_target_that_starts_with_a_qcow2_header_stays_raw() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let header = committed_with_qcow2_header(&dst);
        assert_eq!(ferry_disk::sniff_format(&dst).unwrap(), "qcow2");
        let target = Target::open(&dst).unwrap();
        assert_eq!(target.load_state().unwrap().format.as_deref(), Some("raw"));
        assert_eq!(target.format().unwrap(), Format::Raw);
        // A delta, and a crash after its commit was decided: both the commit and the
        // recovery that finishes it keep DST raw (a qcow2 commit would need qemu-img and
        // fail on this file, or worse).
        sync(&dst, &[(3, 7)], true);
        let target = Target::open(&dst).unwrap();
        assert_eq!(target.load_state().unwrap().generation, 2);
        let disk = std::fs::read(&dst).unwrap();
        assert_eq!(disk.len(), 16 * 4096);
        assert_eq!(&disk[..4096], &header[..]);
        assert!(disk[3 * 4096..4 * 4096].iter().all(|&b| b == 7));
        assert!(disk[4096..3 * 4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_existing_target_is_indexed_in_the_format_its_name_says() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.img");
        let mut bytes = vec![0u8; 16 * 4096];
        bytes[..4096].copy_from_slice(&qcow2_header_chunk());
        bytes[5 * 4096..6 * 4096].fill(9);
        std::fs::write(&dst, &bytes).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let d = dst.clone();
        let idx = rt
            .block_on(rt.spawn_blocking(move || {
                let target = Target::open(&d).unwrap();
                assert_eq!(target.format().unwrap(), Format::Raw);
                target.index_existing(4096, 0).unwrap()
            }))
            .unwrap();
        // Indexed as the raw bytes it holds, not as a qcow2 image.
        assert_eq!(idx.get(0).unwrap(), chunk::digest(&bytes[..4096]));
        assert_eq!(
            idx.get(5).unwrap(),
            chunk::digest(&bytes[5 * 4096..6 * 4096])
        );
        let state = Target::open(&dst).unwrap().load_state().unwrap();
        assert_eq!(state.format.as_deref(), Some("raw"));
        assert_eq!(
            std::fs::read(&dst).unwrap(),
            bytes,
            "indexing writes nothing"
        );
    }

    #[test]
    fn a_target_of_an_older_ferry_that_looks_like_another_format_is_indexed_again() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.img");
        let header = committed_with_qcow2_header(&dst);
        // As an older Ferry wrote it: no format, and an index that is not DST's raw bytes
        // (it read DST as qcow2).
        let target = Target::open(&dst).unwrap();
        let mut state = target.load_state().unwrap();
        state.format = None;
        std::fs::write(
            target.sidecar.join("state.json"),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        let idx = IndexFile::open(&target.index_path(1)).unwrap();
        idx.set_many(&mut [(0, chunk::digest(&chunk_of(1)))])
            .unwrap();
        idx.sync().unwrap();
        drop(idx);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let idx = rt
            .block_on(rt.spawn_blocking(move || {
                let (idx, _) = target.committed_index(4096).unwrap();
                idx.unwrap()
            }))
            .unwrap();
        assert_eq!(
            idx.get(0).unwrap(),
            chunk::digest(&header),
            "read again, raw"
        );
        let state = Target::open(&dst).unwrap().load_state().unwrap();
        assert_eq!(state.format.as_deref(), Some("raw"));
    }

    #[test]
    fn the_recorded_format_decides_and_an_unknown_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.qcow2");
        let target = Target::open(&dst).unwrap();
        // Nothing recorded: the name decides.
        assert_eq!(target.format().unwrap(), Format::Qcow2);
        let state = |format: &str| {
            serde_json::json!({
                "generation": 1, "chunk_size": 4096, "disk_size": 4096, "dst_size": 4096,
                "dst_mtime_ns": 0, "source": "test", "format": format,
            })
            .to_string()
        };
        std::fs::write(target.sidecar.join("state.json"), state("raw")).unwrap();
        assert_eq!(target.format().unwrap(), Format::Raw);
        std::fs::write(target.sidecar.join("state.json"), state("vmdk")).unwrap();
        let err = target.format().unwrap_err().to_string();
        assert!(
            err.contains("\"vmdk\"") && err.contains("raw or qcow2"),
            "{err}"
        );
    }
}
