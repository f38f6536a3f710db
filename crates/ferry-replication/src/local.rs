//! Both ends in one process (`ferry disk sync SRC DST`): the receiver and the sender talk
//! through TLS over in-memory pipes, with a throwaway CA — the very protocol code of a
//! sync between two machines, mutual TLS included.

use std::path::Path;
use std::sync::Arc;

use ferry_disk::Disk;
use ferry_pki::Identity;

use crate::receiver::Receiver;
use crate::report::{Progress, SyncReport};
use crate::sender::{send, SendOptions};
use crate::transport::Endpoint;
use crate::SyncError;

/// Syncs `disk` into the raw image at `dst`.
pub async fn sync_local<D: Disk + Clone + 'static>(
    disk: &D,
    dst: &Path,
    opts: &SendOptions,
    progress: Arc<Progress>,
) -> Result<SyncReport, SyncError> {
    // Fail before any work when the target cannot be opened (and finish a commit a crash
    // interrupted, so the sync starts from a clean state).
    let dst_path = dst.to_path_buf();
    tokio::task::spawn_blocking(move || crate::target::Target::open(&dst_path)).await??;
    let identity = Identity::ephemeral(&["localhost".to_string()])
        .map_err(|e| SyncError::Config(e.to_string()))?;
    let receiver = Receiver::new(dst.to_path_buf());
    let endpoint = Endpoint::in_process(receiver, &identity)?;
    let mut report = send(disk, &endpoint, opts, progress).await?;
    report.target = dst.display().to_string();
    Ok(report)
}
