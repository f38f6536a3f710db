//! The traits steps call, and the simple real adapters that need nothing installed:
//! a disk-image source (image files on this machine) and a local-directory target.
//!
//! Source and target adapters know their platform, not the state machine: the
//! orchestrator decides which call a step makes. Adding a platform means implementing
//! `SourceAdapter` or `TargetAdapter` and registering it in `Adapters`.

use async_trait::async_trait;
use ferry_model::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A step's failure: `retryable` ones are tried again with backoff.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AdapterError {
    pub message: String,
    pub retryable: bool,
}

impl AdapterError {
    pub fn permanent(message: impl Into<String>) -> AdapterError {
        AdapterError {
            message: message.into(),
            retryable: false,
        }
    }
    pub fn transient(message: impl Into<String>) -> AdapterError {
        AdapterError {
            message: message.into(),
            retryable: true,
        }
    }
}

impl From<std::io::Error> for AdapterError {
    fn from(e: std::io::Error) -> Self {
        AdapterError::transient(e.to_string())
    }
}

pub type AResult<T> = Result<T, AdapterError>;

/// Everything a step may need to know about its migration.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub migration: Migration,
    pub workload: Workload,
    pub profile: Profile,
    pub source: Option<Source>,
    pub target: Target,
    /// Scratch space private to this migration on this appliance.
    pub work_dir: PathBuf,
}

/// A disk the source can hand to the replication engine.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// Figures of one sync run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncStats {
    pub bytes_total: u64,
    pub bytes_sent: u64,
}

#[async_trait]
pub trait SourceAdapter: Send + Sync {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()>;
    /// The disks to copy, at a consistent point in time.
    async fn disks(&self, ctx: &StepContext) -> AResult<Vec<SourceDisk>>;
    async fn stop_services(&self, ctx: &StepContext, services: &[String]) -> AResult<()>;
    async fn shutdown(&self, ctx: &StepContext) -> AResult<()>;
    /// Undo `stop_services` and `shutdown` (rollback).
    async fn restart(&self, ctx: &StepContext) -> AResult<()>;
}

#[async_trait]
pub trait TargetAdapter: Send + Sync {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()>;
    /// Where the replication engine writes a disk.
    async fn disk_destination(&self, ctx: &StepContext, disk: &SourceDisk) -> AResult<PathBuf>;
    async fn start_test_instance(&self, ctx: &StepContext) -> AResult<()>;
    async fn stop_test_instance(&self, ctx: &StepContext) -> AResult<()>;
    async fn start_production(&self, ctx: &StepContext) -> AResult<()>;
    async fn post_cutover(&self, ctx: &StepContext, actions: &[PostCutoverAction]) -> AResult<()>;
    /// Validation checks against the instance; `source_disks` for data-consistency checks.
    async fn validate(&self, ctx: &StepContext, source_disks: &[SourceDisk]) -> AResult<()>;
    /// Remove everything created on the target (rollback).
    async fn remove(&self, ctx: &StepContext) -> AResult<()>;
}

/// The data plane: the only place disk bytes are copied.
#[async_trait]
pub trait Replicator: Send + Sync {
    async fn sync(&self, src: &Path, dst: &Path, full: bool) -> AResult<SyncStats>;
}

/// In-guest operations (agent, guest agent or SSH); unused by the simple adapters.
#[async_trait]
pub trait GuestAdapter: Send + Sync {
    async fn stop_services(&self, ctx: &StepContext, services: &[String]) -> AResult<()>;
    async fn run_check(&self, ctx: &StepContext, check: &ValidationCheck) -> AResult<()>;
}

/// The adapters the orchestrator uses, by platform kind.
#[derive(Clone)]
pub struct Adapters {
    pub sources: HashMap<SourceKind, Arc<dyn SourceAdapter>>,
    pub targets: HashMap<TargetKind, Arc<dyn TargetAdapter>>,
    pub replicator: Arc<dyn Replicator>,
}

impl Default for Adapters {
    fn default() -> Self {
        let mut sources: HashMap<SourceKind, Arc<dyn SourceAdapter>> = HashMap::new();
        sources.insert(SourceKind::DiskImage, Arc::new(DiskImageSource));
        let mut targets: HashMap<TargetKind, Arc<dyn TargetAdapter>> = HashMap::new();
        targets.insert(TargetKind::LocalDir, Arc::new(LocalDirTarget));
        Adapters {
            sources,
            targets,
            replicator: Arc::new(LocalCopy),
        }
    }
}

impl Adapters {
    pub fn source(&self, ctx: &StepContext) -> AResult<Arc<dyn SourceAdapter>> {
        let src = ctx.source.as_ref().ok_or_else(|| {
            AdapterError::permanent(format!(
                "workload '{}' has no source: set its source_id",
                ctx.workload.name
            ))
        })?;
        self.sources.get(&src.kind).cloned().ok_or_else(|| {
            AdapterError::permanent(format!(
                "no adapter for source kind '{}' in this build",
                src.kind
            ))
        })
    }

    pub fn target(&self, ctx: &StepContext) -> AResult<Arc<dyn TargetAdapter>> {
        self.targets.get(&ctx.target.kind).cloned().ok_or_else(|| {
            AdapterError::permanent(format!(
                "no adapter for target kind '{}' in this build",
                ctx.target.kind
            ))
        })
    }
}

fn config_path(config: &serde_json::Value, what: &str) -> AResult<Option<PathBuf>> {
    match config.get("path") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(PathBuf::from(s))),
        Some(_) => Err(AdapterError::permanent(format!(
            "{what} config 'path' must be a string"
        ))),
    }
}

async fn write_json(path: &Path, v: serde_json::Value) -> AResult<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::write(path, serde_json::to_vec_pretty(&v).unwrap_or_default()).await?;
    Ok(())
}

/// Disk images on this machine. A workload's disks name their image `path` (absolute, or
/// relative to the source's `config.path`). Stopping services and shutting down are
/// recorded in the migration's work directory (`source-state.json`).
pub struct DiskImageSource;

#[async_trait]
impl SourceAdapter for DiskImageSource {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        let disks = self.disks(ctx).await?;
        if disks.is_empty() {
            return Err(AdapterError::permanent(format!(
                "workload '{}' lists no disks",
                ctx.workload.name
            )));
        }
        Ok(())
    }

    async fn disks(&self, ctx: &StepContext) -> AResult<Vec<SourceDisk>> {
        let base = config_path(
            &ctx.source
                .as_ref()
                .map(|s| s.config.clone())
                .unwrap_or_default(),
            "source",
        )?;
        let mut out = vec![];
        for d in &ctx.workload.disks {
            let p = d.path.as_ref().ok_or_else(|| {
                AdapterError::permanent(format!(
                    "disk '{}' of workload '{}' has no image path",
                    d.name, ctx.workload.name
                ))
            })?;
            let mut path = PathBuf::from(p);
            if path.is_relative() {
                if let Some(b) = &base {
                    path = b.join(path);
                }
            }
            let meta = tokio::fs::metadata(&path).await.map_err(|e| {
                AdapterError::permanent(format!(
                    "disk image {} is not readable: {e}",
                    path.display()
                ))
            })?;
            out.push(SourceDisk {
                name: d.name.clone(),
                path,
                size_bytes: meta.len(),
            });
        }
        Ok(out)
    }

    async fn stop_services(&self, ctx: &StepContext, services: &[String]) -> AResult<()> {
        write_json(
            &ctx.work_dir.join("source-state.json"),
            serde_json::json!({"services_stopped": services, "shut_down": false}),
        )
        .await
    }

    async fn shutdown(&self, ctx: &StepContext) -> AResult<()> {
        write_json(
            &ctx.work_dir.join("source-state.json"),
            serde_json::json!({"services_stopped": true, "shut_down": true}),
        )
        .await
    }

    async fn restart(&self, ctx: &StepContext) -> AResult<()> {
        write_json(
            &ctx.work_dir.join("source-state.json"),
            serde_json::json!({"services_stopped": false, "shut_down": false}),
        )
        .await
    }
}

/// A directory on this machine: one sub-directory per migration holding the disk copies
/// and the instance's descriptor (`instance.json`; `test-instance.json` during UAT).
pub struct LocalDirTarget;

impl LocalDirTarget {
    fn instance_dir(ctx: &StepContext) -> AResult<PathBuf> {
        let root = config_path(&ctx.target.config, "target")?.ok_or_else(|| {
            AdapterError::permanent(format!(
                "local_dir target '{}' needs config.path (a directory)",
                ctx.target.name
            ))
        })?;
        Ok(root.join(format!(
            "{}-{}",
            sanitize(&ctx.workload.name),
            ctx.migration.id.simple()
        )))
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[async_trait]
impl TargetAdapter for LocalDirTarget {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        let dir = Self::instance_dir(ctx)?;
        tokio::fs::create_dir_all(&dir).await.map_err(|e| {
            AdapterError::permanent(format!(
                "target directory {} is not writable: {e}",
                dir.display()
            ))
        })?;
        Ok(())
    }

    async fn disk_destination(&self, ctx: &StepContext, disk: &SourceDisk) -> AResult<PathBuf> {
        Ok(Self::instance_dir(ctx)?.join(format!("{}.img", sanitize(&disk.name))))
    }

    async fn start_test_instance(&self, ctx: &StepContext) -> AResult<()> {
        write_json(
            &Self::instance_dir(ctx)?.join("test-instance.json"),
            serde_json::json!({"network": ctx.profile.spec.uat.network, "running": true}),
        )
        .await
    }

    async fn stop_test_instance(&self, ctx: &StepContext) -> AResult<()> {
        match tokio::fs::remove_file(Self::instance_dir(ctx)?.join("test-instance.json")).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn start_production(&self, ctx: &StepContext) -> AResult<()> {
        write_json(
            &Self::instance_dir(ctx)?.join("instance.json"),
            serde_json::json!({
                "workload": ctx.workload.name,
                "network_map": ctx.profile.spec.network_map,
                "placement": ctx.profile.spec.placement,
                "running": true,
            }),
        )
        .await
    }

    async fn post_cutover(&self, ctx: &StepContext, actions: &[PostCutoverAction]) -> AResult<()> {
        write_json(
            &Self::instance_dir(ctx)?.join("post-cutover.json"),
            serde_json::json!({"actions": actions}),
        )
        .await
    }

    async fn validate(&self, ctx: &StepContext, source_disks: &[SourceDisk]) -> AResult<()> {
        let dir = Self::instance_dir(ctx)?;
        if tokio::fs::metadata(dir.join("instance.json"))
            .await
            .is_err()
        {
            return Err(AdapterError::permanent(
                "the target instance is not running",
            ));
        }
        for d in source_disks {
            let dst = self.disk_destination(ctx, d).await?;
            let (a, b) = (d.path.clone(), dst.clone());
            let same = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                Ok(digest(&a)? == digest(&b)?)
            })
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))??;
            if !same {
                return Err(AdapterError::permanent(format!(
                    "data check failed: disk '{}' on the target differs from the source",
                    d.name
                )));
            }
        }
        Ok(())
    }

    async fn remove(&self, ctx: &StepContext) -> AResult<()> {
        match tokio::fs::remove_dir_all(Self::instance_dir(ctx)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

fn digest(p: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_vec())
}

/// Copies a file chunk by chunk, writing only chunks that differ (a delta), or into a
/// new file renamed into place when whole (a full sync keeps the old copy until done).
pub struct LocalCopy;

const CHUNK: usize = 1 << 20;

#[async_trait]
impl Replicator for LocalCopy {
    async fn sync(&self, src: &Path, dst: &Path, full: bool) -> AResult<SyncStats> {
        let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
        tokio::task::spawn_blocking(move || copy_changed(&src, &dst, full))
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?
            .map_err(AdapterError::from)
    }
}

fn copy_changed(src: &Path, dst: &Path, full: bool) -> std::io::Result<SyncStats> {
    use std::io::{Read, Seek, SeekFrom, Write};
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let write_to = if full || !dst.exists() {
        dst.with_extension("partial")
    } else {
        dst.to_path_buf()
    };
    if write_to != dst {
        let _ = std::fs::remove_file(&write_to);
    }
    let mut s = std::fs::File::open(src)?;
    let mut d = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&write_to)?;
    let size = s.metadata()?.len();
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut stats = SyncStats {
        bytes_total: size,
        bytes_sent: 0,
    };
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        s.read_exact(&mut a[..n])?;
        d.seek(SeekFrom::Start(off))?;
        let mut got = 0;
        while got < n {
            let r = d.read(&mut b[got..n])?;
            if r == 0 {
                break;
            }
            got += r;
        }
        if got < n || a[..n] != b[..n] {
            if a[..n].iter().all(|x| *x == 0) && got == 0 {
                // Zero chunk past the end: leave a hole.
            } else {
                d.seek(SeekFrom::Start(off))?;
                d.write_all(&a[..n])?;
                stats.bytes_sent += n as u64;
            }
        }
        off += n as u64;
    }
    d.set_len(size)?;
    d.sync_all()?;
    if write_to != dst {
        std::fs::rename(&write_to, dst)?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_copies_only_changed_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("s.img"), dir.path().join("d.img"));
        let mut data = vec![7u8; 3 * CHUNK + 100];
        std::fs::write(&src, &data).unwrap();
        let full = copy_changed(&src, &dst, true).unwrap();
        assert_eq!(full.bytes_sent, data.len() as u64);
        data[CHUNK + 5] = 9;
        std::fs::write(&src, &data).unwrap();
        let delta = copy_changed(&src, &dst, false).unwrap();
        assert_eq!(delta.bytes_sent, CHUNK as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        let none = copy_changed(&src, &dst, false).unwrap();
        assert_eq!(none.bytes_sent, 0);
    }
}
