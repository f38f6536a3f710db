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
    /// Bytes of chunk frames put on the wire (after compression, before TLS).
    pub bytes_sent: u64,
    /// Bytes the receiver wrote for this sync.
    pub bytes_written: u64,
    /// Bytes of the target's index fetched to compare against.
    pub index_bytes: u64,
    pub streams: usize,
    pub compression: bool,
    pub duration_s: f64,
    /// Disk bytes examined per second, in MiB/s.
    pub throughput_mib_s: f64,
}
