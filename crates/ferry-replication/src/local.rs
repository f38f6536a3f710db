//! Both ends in one process (`ferry disk sync SRC DST`): the receiver and the sender talk
//! over in-memory pipes — the very protocol code of a sync between two machines (framing,
//! digests verified on arrival, acknowledgements, resume), without the TLS layer that
//! only a network needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_disk::Disk;

use crate::receiver::Receiver;
use crate::report::{Progress, SyncReport};
use crate::sender::{send, SendOptions};
use crate::transport::Endpoint;
use crate::SyncError;

/// Longest wait, after a failed sync, for the receiver to record what it stored.
const IDLE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A receiver for one target in this process.
pub struct LocalTarget {
    dst: PathBuf,
    receiver: Arc<Receiver>,
    endpoint: Endpoint,
}

impl LocalTarget {
    /// Makes the in-process endpoint. Touches nothing on disk.
    pub async fn prepare(dst: &Path) -> Result<Self, SyncError> {
        let receiver = Receiver::new(dst.to_path_buf());
        let endpoint = Endpoint::in_process(Arc::clone(&receiver));
        Ok(Self {
            dst: dst.to_path_buf(),
            receiver,
            endpoint,
        })
    }

    /// Begins the sync's session on the target while the source is still being opened
    /// (see [`Receiver::begin_early`]).
    pub async fn begin_early(&self, chunk_size: u32, source: &str) {
        self.receiver.begin_early(chunk_size, source).await;
    }

    /// Syncs `disk` into the target.
    pub async fn sync<D: Disk + Clone + 'static>(
        &self,
        disk: &D,
        opts: &SendOptions,
        progress: Arc<Progress>,
    ) -> Result<SyncReport, SyncError> {
        // Fail before any work when the target cannot be opened (and finish a commit a
        // crash interrupted, so the sync starts from a clean state).
        let dst_path = self.dst.clone();
        tokio::task::spawn_blocking(move || crate::target::Target::open(&dst_path)).await??;
        let mut report = match send(disk, &self.endpoint, opts, progress).await {
            Ok(r) => r,
            Err(e) => {
                // The receiver records what it stored once it sees the sender go: wait
                // for that, or the process could end first and the next sync start over.
                let _ = tokio::time::timeout(IDLE_WAIT, self.receiver.idle()).await;
                return Err(e);
            }
        };
        report.target = self.dst.display().to_string();
        Ok(report)
    }
}

/// Syncs `disk` into the raw image at `dst`.
pub async fn sync_local<D: Disk + Clone + 'static>(
    disk: &D,
    dst: &Path,
    opts: &SendOptions,
    progress: Arc<Progress>,
) -> Result<SyncReport, SyncError> {
    LocalTarget::prepare(dst)
        .await?
        .sync(disk, opts, progress)
        .await
}
