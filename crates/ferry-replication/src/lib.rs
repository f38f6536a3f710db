//! Ferry's data plane: make a target disk equal to a point in time of a source disk,
//! again and again, moving as few bytes as possible, and never leave a broken target.
//!
//! - [`chunk`]: fixed-size chunks named by BLAKE3 digests; zero chunks are special.
//! - [`index`]: one index file per target generation (header + digest array).
//! - [`sender`]: change detection (dirty bitmap, or hash compare against the target's
//!   index) and parallel streaming.
//! - [`receiver`] / [`target`]: verification, checkpoints, and crash-safe commits.
//! - [`local`]: both ends in one process, over in-memory pipes instead of TLS.
//!
//! This crate knows disks, chunks and generations — not workloads, migrations or
//! platforms.

pub mod chunk;
mod compress;
mod digest_memo;
mod direct;
pub mod index;
mod index_cache;
mod journal;
pub mod local;
mod pipe;
pub mod proto;
pub mod receiver;
pub mod report;
pub mod sender;
mod sink;
pub mod target;
pub mod transport;
mod vectored;

pub use local::{sync_local, LocalTarget};
pub use proto::Mode;
pub use receiver::Receiver;
pub use report::{Phases, Progress, SyncReport};
pub use sender::{send, SendOptions};
pub use transport::{acceptor, Dialer, Endpoint};

/// What to do about a write the target's storage refused, appended to the error: a full
/// file system is the one a user meets most, at the worst time.
pub(crate) fn what_to_do(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            ": the target's file system is full; free space on it (or sync to another one) and run the sync again, which resumes from the chunks already received"
        }
        Some(libc::EDQUOT) => {
            ": the disk quota on the target's file system is used up; raise it (or sync elsewhere) and run the sync again, which resumes from the chunks already received"
        }
        Some(libc::EROFS) => ": the target's file system is mounted read-only",
        _ => "",
    }
}

/// Everything a sync can fail with. Each message names what went wrong and, where there
/// is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Disk(#[from] ferry_disk::DiskError),
    #[error("target: {0}")]
    Target(#[from] target::TargetError),
    #[error(transparent)]
    Index(#[from] index::IndexError),
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    #[error("cannot reach the receiver at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("chunk {chunk} (offset {offset}) rejected: {reason} (corrupted in transit?); nothing of it was written")]
    Verification {
        chunk: u64,
        offset: u64,
        reason: String,
    },
    /// The sync stopped part-way (superseded, a peer gone, data damaged on the way); a
    /// new attempt resumes it.
    #[error("{0}")]
    Interrupted(String),
    #[error("internal task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<std::io::Error> for SyncError {
    fn from(e: std::io::Error) -> Self {
        SyncError::Proto(proto::ProtoError::Io(e))
    }
}

impl SyncError {
    /// Interruptions worth resuming after: lost connections, chunks damaged on the way
    /// (the next attempt sends them again), and whatever the receiver says it would
    /// accept on a new attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Connect { .. }
            | SyncError::Proto(proto::ProtoError::Io(_))
            | SyncError::Verification { .. }
            | SyncError::Interrupted(_)
            | SyncError::Target(target::TargetError::Incomplete { .. }) => true,
            SyncError::Proto(proto::ProtoError::Peer { retryable, .. }) => *retryable,
            _ => false,
        }
    }
}
