//! Both ends in one process (`ferry disk sync SRC DST`): a receiver on a loopback port
//! with a throwaway CA, and the sender talking to it — the very code path of a sync
//! between two machines, mutual TLS included.

use std::path::Path;
use std::sync::Arc;

use ferry_disk::Disk;
use ferry_pki::Identity;
use tokio::net::TcpListener;

use crate::receiver::Receiver;
use crate::report::{Progress, SyncReport};
use crate::sender::{send, SendOptions};
use crate::transport::{acceptor, Endpoint};
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
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| SyncError::Config(format!("cannot listen on loopback: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| SyncError::Config(e.to_string()))?;
    let receiver = Receiver::new(dst.to_path_buf());
    let server = tokio::spawn(Arc::clone(&receiver).serve(listener, acceptor(&identity)?));
    let endpoint = Endpoint::new(&addr.to_string(), Some("localhost"), &identity)?;
    let result = send(disk, &endpoint, opts, progress).await;
    server.abort();
    let mut report = result?;
    report.target = dst.display().to_string();
    Ok(report)
}
