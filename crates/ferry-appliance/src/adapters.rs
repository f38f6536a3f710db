//! The adapters registered by default, and the simple ones that need nothing installed:
//! a disk-image source (image files on this machine) and a local-directory target
//! (disk copies only, no instances). The traits live in `ferry-adapter`.

use async_trait::async_trait;
use ferry_model::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use ferry_adapter::*;

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
        sources.insert(
            SourceKind::Kvm,
            Arc::new(ferry_source_kvm::KvmSource::default()),
        );
        sources.insert(
            SourceKind::Vsphere,
            Arc::new(ferry_source_vsphere::VsphereSource::default()),
        );
        let mut targets: HashMap<TargetKind, Arc<dyn TargetAdapter>> = HashMap::new();
        targets.insert(TargetKind::LocalDir, Arc::new(LocalDirTarget));
        targets.insert(TargetKind::Local, Arc::new(ferry_target_local::LocalTarget));
        targets.insert(TargetKind::Vme, Arc::new(ferry_target_vme::VmeTarget));
        Adapters {
            sources,
            targets,
            replicator: Arc::new(EngineReplicator::default()),
        }
    }
}

impl Adapters {
    /// The same, with the engine keeping what it learns between syncs under `dir`: each
    /// source's chunk digests (a hash-compare delta then hashes only what changed), and
    /// a remote target's index (a delta then does not fetch it again).
    pub fn keeping_state_in(mut self, dir: &Path) -> Self {
        self.replicator = Arc::new(EngineReplicator {
            digest_memo: Some(dir.join("digests")),
            index_cache: Some(dir.join("indexes")),
        });
        self
    }

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

    /// Why a source of `kind` cannot be used here, if it cannot: no adapter reads it.
    pub fn refuse_source_kind(&self, kind: SourceKind) -> Option<String> {
        if self.sources.contains_key(&kind) {
            return None;
        }
        let why = match kind {
            SourceKind::Agent => {
                " (OS-based migration through an agent is not available yet: read such a machine's disks as a disk_image source)"
            }
            _ => "",
        };
        Some(no_adapter(
            "sources",
            kind.as_str(),
            why,
            "reads",
            self.sources.keys().map(|k| k.as_str()),
        ))
    }

    /// Why a target of `kind` cannot be used here, if it cannot.
    pub fn refuse_target_kind(&self, kind: TargetKind) -> Option<String> {
        if self.targets.contains_key(&kind) {
            return None;
        }
        let why = match kind {
            TargetKind::Libvirt => {
                " (a KVM host is a target as 'local', QEMU run by this appliance, or through VM Essentials as 'vme')"
            }
            _ => "",
        };
        Some(no_adapter(
            "targets",
            kind.as_str(),
            why,
            "writes",
            self.targets.keys().map(|k| k.as_str()),
        ))
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

/// The refusal of a kind no adapter of this build runs, with the kinds it does run.
fn no_adapter<'a>(
    what: &str,
    kind: &str,
    why: &str,
    verb: &str,
    have: impl Iterator<Item = &'a str>,
) -> String {
    let mut have: Vec<&str> = have.collect();
    have.sort();
    format!(
        "this appliance has no adapter for {what} of kind '{kind}'{why}; the kinds it {verb}: {}",
        have.join(", ")
    )
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
        let disks = self.open_disks(ctx, true).await?;
        if disks.is_empty() {
            return Err(AdapterError::permanent(format!(
                "workload '{}' lists no disks",
                ctx.workload.name
            )));
        }
        Ok(())
    }

    async fn open_disks(&self, ctx: &StepContext, _full: bool) -> AResult<Vec<SourceDisk>> {
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
                spec: path.display().to_string(),
                size_bytes: meta.len(),
                // As the workload states it; unset, `ferry_disk::open` recognises it and
                // refuses a header that names another file.
                format: d.format.map(|f| f.as_str().to_string()),
                dirty_bitmap: None,
                changed_areas: None,
            });
        }
        Ok(out)
    }

    async fn close_disks(&self, _: &StepContext, _: &[SourceDisk], _: bool) -> AResult<()> {
        Ok(())
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

    /// Where disk `name`'s copy lives.
    fn disk_path(ctx: &StepContext, name: &str) -> AResult<PathBuf> {
        Ok(Self::instance_dir(ctx)?.join(format!("{}.img", sanitize(name))))
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

    async fn disk_destination(
        &self,
        ctx: &StepContext,
        disk: &SourceDisk,
    ) -> AResult<DiskDestination> {
        Ok(DiskDestination::Local(Self::disk_path(ctx, &disk.name)?))
    }

    /// Its final validation always compares the copies with the source's disks.
    fn wants_source_disks(&self, _checks: &[ValidationCheck]) -> bool {
        true
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

    async fn post_cutover(
        &self,
        ctx: &StepContext,
        actions: &[PostCutoverAction],
    ) -> AResult<Vec<serde_json::Value>> {
        write_json(
            &Self::instance_dir(ctx)?.join("post-cutover.json"),
            serde_json::json!({"actions": actions}),
        )
        .await?;
        Ok(vec![])
    }

    async fn validate(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
        _checks: &[ValidationCheck],
        source_disks: &[SourceDisk],
    ) -> AResult<()> {
        if phase == CheckPhase::Uat {
            return Ok(());
        }
        let dir = Self::instance_dir(ctx)?;
        if tokio::fs::metadata(dir.join("instance.json"))
            .await
            .is_err()
        {
            return Err(AdapterError::permanent(
                "the target instance is not running",
            ));
        }
        // The source is off: each copy must hold its disk's bytes exactly, whatever the
        // source serves them as (an image file of some format, an NBD export).
        for d in source_disks {
            let dst = Self::disk_path(ctx, &d.name)?;
            ferry_adapter::verify::disk_matches_source(d, &dst, "raw").await?;
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

/// The replication engine in this process: chunked, verified, crash-safe syncs with the
/// target's last complete generation kept intact (`ferry_replication::sync_local`).
#[derive(Default)]
pub struct EngineReplicator {
    /// Where the digest memos of sources are kept (`None`: every chunk read is hashed).
    pub digest_memo: Option<PathBuf>,
    /// Where remote targets' indexes are kept (`None`: fetched on every sync). A local
    /// target's index is a file read away, and is never kept.
    pub index_cache: Option<PathBuf>,
}

#[async_trait]
impl Replicator for EngineReplicator {
    async fn sync(&self, src: &SourceDisk, dst: &DiskDestination) -> AResult<SyncStats> {
        self.sync_observed(src, dst, Arc::default()).await
    }

    async fn sync_observed(
        &self,
        src: &SourceDisk,
        dst: &DiskDestination,
        watched: Arc<ferry_adapter::SyncProgress>,
    ) -> AResult<SyncStats> {
        use ferry_replication::{Mode, Progress, SendOptions};
        if let Some(dir) = dst.local().and_then(Path::parent) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let disk = ferry_disk::open(
            &src.spec,
            &ferry_disk::OpenOptions {
                format: src.format.clone(),
                dirty_bitmap: src.dirty_bitmap.clone(),
                changed_areas: src.changed_areas.clone(),
            },
        )
        .await
        .map_err(|e| {
            let mut msg = format!("cannot open disk '{}': {e}", src.name);
            if matches!(e, ferry_disk::DiskError::GuessRefused { .. }) {
                // The CLI's wording names `disk sync`'s option; a workload states it so.
                msg.push_str(&format!(
                    ". For a workload's disk: ferry inventory set WORKLOAD --disk {}=PATH --disk-format raw (or \"format\" in the disk's API record)",
                    src.name
                ));
            }
            if e.is_permanent() {
                AdapterError::permanent(msg)
            } else {
                AdapterError::transient(msg)
            }
        })?;
        let opts = SendOptions {
            mode: if src.dirty_bitmap.is_some() || src.changed_areas.is_some() {
                Mode::DirtyBitmap
            } else {
                Mode::HashCompare
            },
            // Both ends in this process: compressing would only cost CPU.
            compress: dst.local().is_none(),
            streams: 2,
            digest_memo: self.digest_memo.clone(),
            index_cache: self.index_cache.clone().filter(|_| dst.local().is_none()),
            ..SendOptions::default()
        };
        let progress = Arc::new(Progress::default());
        // Copies the engine's counters to what watchers see, twice a second.
        let copier = {
            let (p, w) = (Arc::clone(&progress), Arc::clone(&watched));
            tokio::spawn(async move {
                loop {
                    w.scanned
                        .store(Progress::get(&p.scanned), Ordering::Relaxed);
                    w.total.store(Progress::get(&p.total), Ordering::Relaxed);
                    w.sent
                        .store(Progress::get(&p.bytes_sent), Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            })
        };
        let r = match dst {
            DiskDestination::Local(path) => {
                ferry_replication::sync_local(&disk, path, &opts, progress).await
            }
            DiskDestination::Remote(to) => match remote_endpoint(to) {
                Ok(endpoint) => ferry_replication::send(&disk, &endpoint, &opts, progress).await,
                Err(e) => Err(e),
            },
        };
        copier.abort();
        let r = r.map_err(|e| AdapterError {
            retryable: e.is_retryable(),
            message: format!("sync of disk '{}' failed: {e}", src.name),
        })?;
        Ok(SyncStats {
            bytes_total: r.disk_size,
            bytes_read: r.bytes_read,
            bytes_sent: r.bytes_sent,
            chunks_changed: r.chunks_changed,
            duration_ms: (r.duration_s * 1000.0) as u64,
        })
    }
}

/// The endpoint of a receiver on another machine, with this appliance's certificate.
fn remote_endpoint(
    to: &ferry_adapter::RemoteReceiver,
) -> Result<ferry_replication::Endpoint, ferry_replication::SyncError> {
    let identity = ferry_pki::Identity::from_files(&to.cert, &to.key, &to.ca)
        .map_err(|e| ferry_replication::SyncError::Config(e.to_string()))?;
    let endpoint = ferry_replication::Endpoint::new(&to.addr, Some(&to.server_name), &identity)?;
    Ok(match &to.netns {
        None => endpoint,
        Some(ns) => {
            let ns = ns.clone();
            endpoint.with_dialer(Arc::new(move |addr: String| {
                let ns = ns.clone();
                Box::pin(async move {
                    let addr: std::net::SocketAddr = addr
                        .parse()
                        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
                    let s =
                        ferry_net::tcp_connect_async(&ns, addr, std::time::Duration::from_secs(10))
                            .await
                            .map_err(std::io::Error::other)?;
                    s.set_nonblocking(true)?;
                    tokio::net::TcpStream::from_std(s)
                })
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    /// A workload may state exactly the formats `ferry_disk::open` accepts.
    #[test]
    fn workload_disk_formats_are_the_ones_disks_open_as() {
        let model: Vec<&str> = ferry_model::DiskFormat::ALL
            .iter()
            .map(|f| f.as_str())
            .collect();
        assert_eq!(model, ferry_disk::FORMATS);
    }
}
