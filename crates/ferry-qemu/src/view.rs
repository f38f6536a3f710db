//! A point-in-time view of a running VM's disk, exported read-only over NBD,
//! with the blocks changed since the previous view.
//!
//! How (seen working on QEMU 10, see testbed.md):
//! - Changes are tracked by persistent dirty bitmaps `ferry-<n>` on the disk's
//!   qcow2 format node (raw nodes cannot hold persistent bitmaps). Exactly one,
//!   the highest, is enabled (recording). So the chain is read from QEMU alone
//!   (`query-named-block-nodes`), and a restarted caller needs no saved state.
//! - In one `transaction` (atomic with respect to guest writes): the recording
//!   bitmap `ferry-k` is disabled, `ferry-k+1` is added, and a `blockdev-backup
//!   sync=none` job starts into a "fleece" qcow2 node backed by the disk: from then
//!   on, the old content of every block the guest overwrites is copied to the
//!   fleece first, so reading the fleece gives the disk as it was at the
//!   transaction.
//! - The fleece is exported with `block-export-add` (read-only) with `ferry-k`
//!   attached, so an NBD client reads `qemu:dirty-bitmap:ferry-k` for the delta.
//!   (QEMU refuses to export an enabled bitmap, hence the disable.)
//! - On success `ferry-k` is dropped; on failure it is merged into `ferry-k+1`, so
//!   the next delta still includes those blocks: nothing is ever lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::qga::{Qga, QgaError};
use crate::qmp::{BlockNode, DirtyBitmap, Qmp, QmpError};

/// Prefix of Ferry's bitmaps.
pub const BITMAP_PREFIX: &str = "ferry-";
/// QEMU node names and ids are at most 31 bytes.
const MAX_ID: usize = 31;

/// Errors of views.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("no block node named {node} in this VM")]
    NoSuchNode { node: String },
    #[error("node {node} is {driver}: persistent dirty bitmaps need a qcow2 node")]
    NotQcow2 { node: String, driver: String },
    #[error("node {node} has no recording ferry-* dirty bitmap: take a full view first")]
    NoBase { node: String },
    #[error("node {node} has leftovers of an earlier view ({what}): call cleanup_stale first")]
    Stale { node: String, what: String },
    #[error("node name {node:?} is too long for the view's node and job names (at most {max} characters)")]
    NodeNameTooLong { node: String, max: usize },
    #[error("cannot create the fleece image {}: {why}", path.display())]
    Fleece { path: PathBuf, why: String },
    #[error("freezing the guest file systems: {0}")]
    Freeze(#[source] QgaError),
    #[error("{what} did not finish within {secs}s")]
    Timeout { what: String, secs: u64 },
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// An open view. Call [`View::end`] when done with it (also after a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The disk's format node.
    pub node: String,
    /// `nbd+unix:///<export>?socket=<path>`.
    pub nbd_uri: String,
    pub export_name: String,
    pub socket_path: PathBuf,
    /// The bitmap to read for the delta (`qemu:dirty-bitmap:<bitmap>` on the
    /// export); `None` for a full view: read everything.
    pub bitmap: Option<String>,
    /// The bitmap now recording changes for the next view.
    pub recording: String,
    /// Virtual size of the disk.
    pub size: u64,
    pub fleece_node: String,
    pub fleece_path: PathBuf,
    pub job_id: String,
}

fn export_id(node: &str) -> String {
    format!("ferry-{node}")
}
fn fleece_node_name(node: &str) -> String {
    format!("ferry-fleece-{node}")
}
fn job_id(node: &str) -> String {
    format!("ferry-backup-{node}")
}

/// `ferry-<n>` → n.
fn bitmap_number(name: &str) -> Option<u64> {
    let n = name.strip_prefix(BITMAP_PREFIX)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Ferry's bitmaps on `node`, lowest number first.
pub async fn ferry_bitmaps(qmp: &mut Qmp, node: &str) -> Result<Vec<DirtyBitmap>, ViewError> {
    let nodes = qmp.query_named_block_nodes().await?;
    let n = find_node(&nodes, node)?;
    Ok(sorted_ferry_bitmaps(n))
}

fn sorted_ferry_bitmaps(n: &BlockNode) -> Vec<DirtyBitmap> {
    let mut v: Vec<DirtyBitmap> = n
        .dirty_bitmaps
        .iter()
        .filter(|b| bitmap_number(&b.name).is_some())
        .cloned()
        .collect();
    v.sort_by_key(|b| bitmap_number(&b.name));
    v
}

fn find_node<'a>(nodes: &'a [BlockNode], node: &str) -> Result<&'a BlockNode, ViewError> {
    nodes
        .iter()
        .find(|n| n.node_name == node)
        .ok_or_else(|| ViewError::NoSuchNode { node: node.into() })
}

fn is_not_found(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc, .. } => {
            class == "DeviceNotFound"
                || desc.contains("not found")
                || desc.contains("Failed to find")
                || desc.contains("Cannot find")
                || desc.contains("No job with id")
                || desc.contains("not exist")
        }
        _ => false,
    }
}

/// Open a point-in-time view of `node` (see the module documentation).
///
/// `incremental`: export the blocks changed since the previous view in
/// `bitmap`; otherwise a full view (earlier ferry bitmaps are dropped and a new
/// chain starts). `scratch_dir` holds the fleece image (it only grows by what the
/// guest overwrites while the view is open). `socket_path` is the NBD server's
/// Unix socket: one per VM, since QEMU runs one NBD server. With `freeze`, the
/// guest's file systems are frozen just around the transaction (and thawed even
/// if it fails).
pub async fn begin(
    qmp: &mut Qmp,
    node: &str,
    scratch_dir: &Path,
    socket_path: &Path,
    incremental: bool,
    freeze: Option<&mut Qga>,
) -> Result<View, ViewError> {
    if fleece_node_name(node).len() + "-file".len() > MAX_ID {
        return Err(ViewError::NodeNameTooLong {
            node: node.into(),
            max: MAX_ID - "ferry-fleece--file".len(),
        });
    }
    let nodes = qmp.query_named_block_nodes().await?;
    let disk = find_node(&nodes, node)?;
    if disk.driver != "qcow2" {
        return Err(ViewError::NotQcow2 {
            node: node.into(),
            driver: disk.driver.clone(),
        });
    }
    let size = disk.virtual_size;
    let fleece_node = fleece_node_name(node);
    if nodes.iter().any(|n| n.node_name == fleece_node) {
        return Err(ViewError::Stale {
            node: node.into(),
            what: format!("fleece node {fleece_node}"),
        });
    }
    let exports = qmp.execute("query-block-exports", Value::Null).await?;
    if exports
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["id"] == json!(export_id(node))))
    {
        return Err(ViewError::Stale {
            node: node.into(),
            what: format!("export {}", export_id(node)),
        });
    }
    let bitmaps = sorted_ferry_bitmaps(disk);
    let disabled: Vec<&str> = bitmaps
        .iter()
        .filter(|b| !b.recording)
        .map(|b| b.name.as_str())
        .collect();
    if !disabled.is_empty() {
        return Err(ViewError::Stale {
            node: node.into(),
            what: format!("disabled bitmaps {}", disabled.join(", ")),
        });
    }
    let next = bitmaps
        .last()
        .and_then(|b| bitmap_number(&b.name))
        .map_or(1, |n| n + 1);
    let recording = format!("{BITMAP_PREFIX}{next}");
    let read_bitmap = if incremental {
        match bitmaps.last() {
            Some(b) => Some(b.name.clone()),
            None => return Err(ViewError::NoBase { node: node.into() }),
        }
    } else {
        None
    };

    // The fleece image: empty qcow2 of the disk's size; the backing is set to the
    // live disk node at blockdev-add.
    std::fs::create_dir_all(scratch_dir).map_err(|e| ViewError::Fleece {
        path: scratch_dir.into(),
        why: e.to_string(),
    })?;
    let fleece_path = scratch_dir.join(format!("fleece-{node}-{next}.qcow2"));
    let _ = std::fs::remove_file(&fleece_path);
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&fleece_path)
        .arg(size.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // Creating an empty qcow2 writes a few KiB: a minute means the storage is stuck.
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .map_err(|_| ViewError::Fleece {
            path: fleece_path.clone(),
            why: "qemu-img create did not finish within 60 s".into(),
        })?
        .map_err(|e| ViewError::Fleece {
            path: fleece_path.clone(),
            why: format!("cannot run qemu-img: {e}"),
        })?;
    if !out.status.success() {
        return Err(ViewError::Fleece {
            path: fleece_path,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }

    let view = View {
        node: node.into(),
        nbd_uri: format!(
            "nbd+unix:///{}?socket={}",
            export_id(node),
            socket_path.display()
        ),
        export_name: export_id(node),
        socket_path: socket_path.into(),
        bitmap: read_bitmap,
        recording,
        size,
        fleece_node,
        fleece_path,
        job_id: job_id(node),
    };
    match open(qmp, &view, &bitmaps, freeze).await {
        Ok(()) => {
            info!(node, uri = %view.nbd_uri, bitmap = ?view.bitmap, recording = %view.recording, "view opened");
            Ok(view)
        }
        Err(e) => {
            warn!(node, error = %e, "opening the view failed: undoing");
            if let Err(e2) = view.clone().end(qmp, false).await {
                warn!(node, error = %e2, "undoing a failed view also failed: call cleanup_stale");
            }
            Err(e)
        }
    }
}

async fn open(
    qmp: &mut Qmp,
    v: &View,
    bitmaps: &[DirtyBitmap],
    freeze: Option<&mut Qga>,
) -> Result<(), ViewError> {
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "qcow2",
            "node-name": v.fleece_node,
            // A named file child, so cleanup_stale can find the image file name.
            "file": {"driver": "file", "filename": v.fleece_path.to_string_lossy(),
                     "node-name": format!("{}-file", v.fleece_node)},
            "backing": v.node,
            "discard": "unmap",
        }),
    )
    .await?;
    let mut actions = Vec::new();
    match &v.bitmap {
        Some(old) => actions.push(json!({"type": "block-dirty-bitmap-disable",
                                          "data": {"node": v.node, "name": old}})),
        None => {
            // A full view starts a new chain: older bitmaps mean nothing any more.
            for b in bitmaps {
                actions.push(json!({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": v.node, "name": b.name}}));
            }
        }
    }
    actions.push(json!({"type": "block-dirty-bitmap-add",
                        "data": {"node": v.node, "name": v.recording, "persistent": true}}));
    actions.push(json!({"type": "blockdev-backup",
                        "data": {"job-id": v.job_id, "device": v.node,
                                 "target": v.fleece_node, "sync": "none"}}));
    let tx = json!({ "actions": actions });
    match freeze {
        Some(qga) => {
            let frozen = qga.fsfreeze_freeze().await.map_err(ViewError::Freeze)?;
            debug!(node = %v.node, frozen, "guest file systems frozen");
            let r = qmp.execute("transaction", tx).await;
            // Thaw whatever happened: a frozen guest is an outage.
            let thawed = qga.fsfreeze_thaw().await;
            r?;
            thawed.map_err(ViewError::Freeze)?;
        }
        None => {
            qmp.execute("transaction", tx).await?;
        }
    }
    match qmp
        .execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": v.socket_path.to_string_lossy()}}}),
        )
        .await
    {
        Ok(_) => {}
        Err(e)
            if e.command_desc()
                .is_some_and(|d| d.contains("already running")) =>
        {
            debug!("NBD server already running")
        }
        Err(e) => return Err(e.into()),
    }
    let mut export = json!({
        "type": "nbd",
        "id": v.export_name,
        "node-name": v.fleece_node,
        "name": v.export_name,
        "writable": false,
    });
    if let Some(b) = &v.bitmap {
        export["bitmaps"] = json!([{ "node": v.node, "name": b }]);
    }
    qmp.execute("block-export-add", export).await?;
    Ok(())
}

impl View {
    /// Close the view: remove the export, stop the backup job, delete the fleece.
    /// `success`: the reader took everything; drop the bitmap it read. Otherwise
    /// merge that bitmap into the recording one so the next delta includes it
    /// (after a failed full view the new chain is dropped: the next view must be
    /// full again).
    pub async fn end(self, qmp: &mut Qmp, success: bool) -> Result<(), ViewError> {
        teardown(qmp, &self.export_name, &self.job_id, &self.fleece_node).await?;
        remove_file(&self.fleece_path);
        let present: Vec<String> = ferry_bitmaps(qmp, &self.node)
            .await?
            .into_iter()
            .map(|b| b.name)
            .collect();
        let has = |n: &str| present.iter().any(|p| p == n);
        let mut actions = Vec::new();
        match (&self.bitmap, success) {
            (Some(old), true) if has(old) => {
                actions.push(json!({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": self.node, "name": old}}));
            }
            (Some(old), false) if has(old) => {
                if has(&self.recording) {
                    actions.push(json!({"type": "block-dirty-bitmap-merge",
                        "data": {"node": self.node, "target": self.recording, "bitmaps": [old]}}));
                    actions.push(json!({"type": "block-dirty-bitmap-remove",
                                        "data": {"node": self.node, "name": old}}));
                } else {
                    // The transaction never ran: the old bitmap is simply re-enabled.
                    actions.push(json!({"type": "block-dirty-bitmap-enable",
                                        "data": {"node": self.node, "name": old}}));
                }
            }
            (None, false) if has(&self.recording) => {
                actions.push(json!({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": self.node, "name": self.recording}}));
            }
            _ => {}
        }
        if !actions.is_empty() {
            qmp.execute("transaction", json!({ "actions": actions }))
                .await?;
        }
        stop_nbd_server_if_idle(qmp).await?;
        info!(node = %self.node, success, "view closed");
        Ok(())
    }
}

/// What [`cleanup_stale`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub removed_export: bool,
    pub cancelled_job: bool,
    pub removed_fleece: Option<String>,
    /// Disabled bitmaps merged into the recording one (and removed).
    pub merged_bitmaps: Vec<String>,
    /// The bitmap recording after the cleanup, if any.
    pub recording: Option<String>,
}

impl CleanupReport {
    pub fn changed(&self) -> bool {
        self.removed_export
            || self.cancelled_job
            || self.removed_fleece.is_some()
            || !self.merged_bitmaps.is_empty()
    }
}

/// Repair what a caller that died with a view open left behind on `node`: the
/// export, the backup job and the fleece (node and file) go; disabled ferry
/// bitmaps are merged into the recording one (so the next delta includes them).
/// Idempotent; cheap when there is nothing to do.
pub async fn cleanup_stale(qmp: &mut Qmp, node: &str) -> Result<CleanupReport, ViewError> {
    let mut report = CleanupReport::default();
    let nodes = qmp.query_named_block_nodes().await?;
    find_node(&nodes, node)?;
    let fleece = fleece_node_name(node);
    let fleece_file = nodes
        .iter()
        .find(|n| n.node_name == format!("{fleece}-file"))
        .map(|n| n.file.clone());
    let exports = qmp.execute("query-block-exports", Value::Null).await?;
    report.removed_export = exports
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["id"] == json!(export_id(node))));
    let jobs = qmp.execute("query-block-jobs", Value::Null).await?;
    report.cancelled_job = jobs
        .as_array()
        .is_some_and(|a| a.iter().any(|j| j["device"] == json!(job_id(node))));
    teardown(qmp, &export_id(node), &job_id(node), &fleece).await?;
    if let Some(f) = fleece_file {
        remove_file(Path::new(&f));
        report.removed_fleece = Some(f);
    }

    let bitmaps = ferry_bitmaps(qmp, node).await?;
    if !bitmaps.is_empty() {
        // The target is the newest recording bitmap, or else the newest one.
        let target = bitmaps
            .iter()
            .rev()
            .find(|b| b.recording)
            .unwrap_or_else(|| bitmaps.last().expect("not empty"))
            .clone();
        let others: Vec<&DirtyBitmap> = bitmaps.iter().filter(|b| b.name != target.name).collect();
        let mut actions = Vec::new();
        if !target.recording {
            actions.push(json!({"type": "block-dirty-bitmap-enable",
                                "data": {"node": node, "name": target.name}}));
        }
        if !others.is_empty() {
            let names: Vec<&str> = others.iter().map(|b| b.name.as_str()).collect();
            actions.push(json!({"type": "block-dirty-bitmap-merge",
                "data": {"node": node, "target": target.name, "bitmaps": names}}));
            for b in &others {
                actions.push(json!({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": node, "name": b.name}}));
            }
            report.merged_bitmaps = names.iter().map(|s| s.to_string()).collect();
        }
        if !actions.is_empty() {
            qmp.execute("transaction", json!({ "actions": actions }))
                .await?;
        }
        report.recording = Some(target.name);
    }
    stop_nbd_server_if_idle(qmp).await?;
    if report.changed() {
        info!(node, ?report, "cleaned up an earlier view");
    }
    Ok(report)
}

/// Remove export, job and fleece node; each step tolerates "not there".
async fn teardown(qmp: &mut Qmp, export: &str, job: &str, fleece: &str) -> Result<(), ViewError> {
    match qmp
        .execute("block-export-del", json!({"id": export, "mode": "hard"}))
        .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + TEARDOWN_TIMEOUT;
    loop {
        let v = qmp.execute("query-block-exports", Value::Null).await?;
        if !v
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["id"] == json!(export)))
        {
            break;
        }
        check_deadline(deadline, "the removal of the NBD export")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match qmp
        .execute("block-job-cancel", json!({"device": job, "force": true}))
        .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + TEARDOWN_TIMEOUT;
    loop {
        let v = qmp.execute("query-jobs", Value::Null).await?;
        let mine = v.as_array().and_then(|a| {
            a.iter()
                .find(|j| j["id"] == json!(job))
                .map(|j| j["status"].as_str().unwrap_or("").to_string())
        });
        match mine.as_deref() {
            None => break,
            // A job left waiting to be dismissed (auto-dismiss off) is done.
            Some("concluded") => {
                let _ = qmp.execute("job-dismiss", json!({ "id": job })).await;
            }
            Some(_) => {}
        }
        check_deadline(deadline, "the end of the backup job")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in [fleece.to_string(), format!("{fleece}-file")] {
        match qmp.execute("blockdev-del", json!({ "node-name": n })).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

fn check_deadline(deadline: Instant, what: &str) -> Result<(), ViewError> {
    if Instant::now() >= deadline {
        return Err(ViewError::Timeout {
            what: what.into(),
            secs: TEARDOWN_TIMEOUT.as_secs(),
        });
    }
    Ok(())
}

async fn stop_nbd_server_if_idle(qmp: &mut Qmp) -> Result<(), ViewError> {
    let v = qmp.execute("query-block-exports", Value::Null).await?;
    if v.as_array().is_some_and(|a| a.is_empty()) {
        match qmp.execute("nbd-server-stop", Value::Null).await {
            Ok(_) => debug!("NBD server stopped"),
            // Not running: fine.
            Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn remove_file(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %p.display(), error = %e, "cannot remove the fleece image"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_numbers() {
        assert_eq!(bitmap_number("ferry-1"), Some(1));
        assert_eq!(bitmap_number("ferry-12"), Some(12));
        assert_eq!(bitmap_number("ferry-"), None);
        assert_eq!(bitmap_number("ferry-x"), None);
        assert_eq!(bitmap_number("other-1"), None);
    }

    #[test]
    fn bitmaps_sort_numerically() {
        let b = |name: &str| DirtyBitmap {
            name: name.into(),
            recording: false,
            persistent: true,
            busy: false,
            granularity: 65536,
            count: 0,
        };
        let n = BlockNode {
            node_name: "disk0".into(),
            driver: "qcow2".into(),
            file: "/d".into(),
            virtual_size: 1,
            dirty_bitmaps: vec![b("ferry-10"), b("x"), b("ferry-9")],
        };
        let names: Vec<String> = sorted_ferry_bitmaps(&n)
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, ["ferry-9", "ferry-10"]);
    }
}
