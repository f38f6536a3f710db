//! What a sync did, and live progress while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::proto::Mode;

/// Counters shared with whoever displays progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the disk examined so far (read, known zero, or known unchanged).
    pub scanned: AtomicU64,
    /// Size of the disk: the total for `scanned`.
    pub total: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Bytes of data hashed with BLAKE3 (the rest of what was read was zeros, or
    /// known by the digest memo).
    pub bytes_hashed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub chunks_changed: AtomicU64,
    pub chunks_zeroed: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The summary of one completed sync (what `ferry disk sync --json` prints).
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub source: String,
    pub target: String,
    pub mode: Mode,
    /// The target generation this sync committed.
    pub generation: u64,
    /// The first generation of this target (a full copy), or a delta.
    pub full: bool,
    /// Continued an interrupted sync instead of starting over.
    pub resumed: bool,
    pub disk_size: u64,
    pub chunk_size: u32,
    pub chunks_total: u64,
    pub chunks_changed: u64,
    pub chunks_zeroed: u64,
    pub bytes_scanned: u64,
    pub bytes_read: u64,
    /// Of `bytes_read`: data hashed with BLAKE3. Zeros are not hashed, and a delta
    /// hashes only the chunks whose fingerprint changed since the last sync (see
    /// `--no-digest-memo`).
    pub bytes_hashed: u64,
    /// Bytes of chunk frames put on the wire (after compression, before TLS).
    pub bytes_sent: u64,
    /// Bytes the receiver wrote for this sync.
    pub bytes_written: u64,
    /// Bytes of the target's index fetched to compare against.
    pub index_bytes: u64,
    pub streams: usize,
    pub compression: bool,
    pub duration_s: f64,
    /// Where `duration_s` went.
    pub phases: Phases,
    /// Disk bytes examined per second, in MiB/s.
    pub throughput_mib_s: f64,
}

/// The parts of a sync, one after another, in seconds: they add up to its duration.
/// (The final delta of a cutover is the downtime: this says which part to look at.)
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Phases {
    /// Connecting, and the receiver opening the target and its session.
    pub open_s: f64,
    /// Reading, comparing and sending the changed chunks until the receiver has stored
    /// them all. The target's index arrives during this phase.
    pub transfer_s: f64,
    /// Of `transfer_s`: until the whole index of the target had arrived.
    pub index_s: f64,
    /// Making the new generation durable and putting it in place: the last checkpoint,
    /// the copy into the target and its flush.
    pub commit_s: f64,
}
