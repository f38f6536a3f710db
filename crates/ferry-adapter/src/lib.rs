//! The contracts between the orchestrator and the platforms it drives.
//!
//! A source or target adapter knows its platform's API and hands the data plane disks; it
//! does not know the state machine, the store or other platforms. The orchestrator decides
//! which call a step makes. Adding a platform means implementing [`SourceAdapter`] or
//! [`TargetAdapter`] in a crate of its own and registering it with the appliance.

pub mod checks;
pub mod verify;

use async_trait::async_trait;
use ferry_model::{
    Migration, NewWorkload, PostCutoverAction, Profile, Source, Target, ValidationCheck, Workload,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// The same error with what was being done in front of it.
    pub fn context(self, what: impl std::fmt::Display) -> AdapterError {
        AdapterError {
            message: format!("{what}: {}", self.message),
            retryable: self.retryable,
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
    /// Facts recorded by earlier steps of this migration's cutover (see [`CutoverFacts`]).
    pub facts: CutoverFacts,
    /// Credentials named by the profile's `*_credential` parameters, decrypted for this
    /// step only (keyed by the parameter's value).
    pub secrets: Secrets,
}

impl StepContext {
    /// A context outside the engine's state machine (tools and tests driving an adapter
    /// directly): migration `migration` of `workload` from `source`, to a local directory
    /// target named `t`, with the default profile.
    pub fn standalone(
        source: Option<Source>,
        workload: Workload,
        work_dir: PathBuf,
        migration: uuid::Uuid,
    ) -> StepContext {
        let now = 0;
        StepContext {
            migration: Migration {
                id: migration,
                workload_id: workload.id,
                workload_name: workload.name.clone(),
                profile_id: uuid::Uuid::new_v4(),
                target_id: uuid::Uuid::new_v4(),
                status: ferry_model::Status::new(false),
                schedule: Default::default(),
                next_sync_at: None,
                last_error: None,
                version: 0,
                created_at: now,
                updated_at: now,
            },
            workload,
            profile: Profile {
                id: uuid::Uuid::new_v4(),
                spec: serde_json::from_value(serde_json::json!({"name": "p", "target": "t"}))
                    .expect("the minimal profile is valid"),
                created_at: now,
            },
            source,
            target: Target {
                id: uuid::Uuid::new_v4(),
                name: "t".into(),
                kind: ferry_model::TargetKind::LocalDir,
                endpoint: None,
                credential_id: None,
                config: serde_json::json!({}),
                created_at: now,
            },
            work_dir,
            facts: Default::default(),
            secrets: Default::default(),
        }
    }
}

/// Where [`StepContext::secrets`] holds the target's own credential (its `credential_id`):
/// the account the target adapter logs in with.
pub const TARGET_USERNAME: &str = "target:username";
pub const TARGET_PASSWORD: &str = "target:password";
/// The same for the source's credential (e.g. the vCenter account).
pub const SOURCE_USERNAME: &str = "source:username";
pub const SOURCE_PASSWORD: &str = "source:password";
/// A guest account on the source's workloads (the source's `config.guest_credential_id`),
/// for guest operations such as stopping services.
pub const GUEST_USERNAME: &str = "source:guest:username";
pub const GUEST_PASSWORD: &str = "source:guest:password";

/// Decrypted secrets; never printed.
#[derive(Clone, Default)]
pub struct Secrets(pub std::collections::BTreeMap<String, String>);

impl Secrets {
    pub fn get(&self, reference: &str) -> Option<&str> {
        self.0.get(reference).map(String::as_str)
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

/// What the cutover learned on the source that later steps check on the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutoverFacts {
    /// Output of each `data` check's `capture` command on the source once its services
    /// stopped, by check index in the profile.
    #[serde(default)]
    pub captured: std::collections::BTreeMap<usize, String>,
    /// What post-cutover actions replaced, so a rollback can put it back.
    #[serde(default)]
    pub undo: Vec<serde_json::Value>,
}

/// A disk the source hands to the data plane for one sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDisk {
    pub name: String,
    /// What `ferry_disk::open` reads: an image path or an `nbd://` / `nbd+unix://` URI.
    pub spec: String,
    pub size_bytes: u64,
    /// Image format when `spec` is a path and the format must not be guessed.
    pub format: Option<String>,
    /// The dirty bitmap holding every change since the target's last complete sync, when
    /// the platform tracks changes; `None` means "compare hashes".
    pub dirty_bitmap: Option<String>,
    /// The areas `(offset, length)` changed since the target's last complete sync, when
    /// the platform lists them itself (VMware CBT) rather than through a bitmap.
    pub changed_areas: Option<Vec<(u64, u64)>>,
}

/// Where the data plane writes a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDestination {
    /// An image file on this appliance, written by a receiver in this process.
    Local(PathBuf),
    /// A `ferry` receiver elsewhere (a target worker booted on the target instance),
    /// reached over mutual TLS.
    Remote(RemoteReceiver),
}

/// A receiver on another machine and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReceiver {
    /// `host:port`.
    pub addr: String,
    /// The name its certificate carries.
    pub server_name: String,
    /// This end's certificate and key, and the CA both certificates come from.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Connect from inside this network namespace (labs where the appliance is not
    /// routed to the target's network).
    pub netns: Option<String>,
}

impl DiskDestination {
    /// The local image path, for code that only handles local targets.
    pub fn local(&self) -> Option<&std::path::Path> {
        match self {
            DiskDestination::Local(p) => Some(p),
            DiskDestination::Remote(_) => None,
        }
    }
}

/// Figures of one sync run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStats {
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub chunks_changed: u64,
    pub duration_ms: u64,
}

impl SyncStats {
    pub fn add(&mut self, o: &SyncStats) {
        self.bytes_total += o.bytes_total;
        self.bytes_read += o.bytes_read;
        self.bytes_sent += o.bytes_sent;
        self.chunks_changed += o.chunks_changed;
        self.duration_ms += o.duration_ms;
    }
}

/// When validation checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckPhase {
    /// Against the test instance in the isolated migration network.
    Uat,
    /// Against the production instance after cutover.
    Final,
}

#[async_trait]
pub trait SourceAdapter: Send + Sync {
    /// Applies a fix that pre-flight offers (e.g. `enable-cbt`) to the named workloads;
    /// a line per workload saying what was done.
    async fn fix(
        &self,
        source: &Source,
        _secrets: &Secrets,
        fix: &str,
        _workloads: &[String],
    ) -> AResult<Vec<String>> {
        Err(AdapterError::permanent(format!(
            "source '{}' (kind {}) offers no fix '{fix}'",
            source.name, source.kind
        )))
    }

    /// The workloads this source holds now, for the inventory (`source_id` set).
    /// `secrets` holds the source's own credential ([`SOURCE_USERNAME`], [`SOURCE_PASSWORD`]).
    async fn discover(&self, source: &Source, _secrets: &Secrets) -> AResult<Vec<NewWorkload>> {
        Err(AdapterError::permanent(format!(
            "source '{}' ({}) cannot discover its workloads: add them by hand or import a CSV",
            source.name, source.kind
        )))
    }
    async fn preflight(&self, ctx: &StepContext) -> AResult<()>;
    /// Consistent point-in-time views of the workload's disks for one sync. `full` says no
    /// earlier sync exists to take a delta against.
    async fn open_disks(&self, ctx: &StepContext, full: bool) -> AResult<Vec<SourceDisk>>;
    /// Releases the views, always, also after a failed sync: `committed` says whether the
    /// target committed them (when not, the changes they carried must stay tracked).
    async fn close_disks(
        &self,
        ctx: &StepContext,
        disks: &[SourceDisk],
        committed: bool,
    ) -> AResult<()>;
    async fn stop_services(&self, ctx: &StepContext, services: &[String]) -> AResult<()>;
    /// Runs a shell command in the source guest and returns its standard output.
    async fn guest_command(&self, ctx: &StepContext, command: &str) -> AResult<String> {
        let _ = command;
        Err(AdapterError::permanent(format!(
            "source '{}' cannot run commands in its guests",
            ctx.source.as_ref().map(|s| s.name.as_str()).unwrap_or("-")
        )))
    }
    async fn shutdown(&self, ctx: &StepContext) -> AResult<()>;
    /// Undo `stop_services` and `shutdown` (rollback).
    async fn restart(&self, ctx: &StepContext) -> AResult<()>;
}

#[async_trait]
pub trait TargetAdapter: Send + Sync {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()>;
    /// Gets the target ready to receive one sync of `disks` (e.g. boots a target worker on
    /// the instance); called before any [`TargetAdapter::disk_destination`] of that sync.
    async fn begin_sync(&self, ctx: &StepContext, disks: &[SourceDisk]) -> AResult<()> {
        let _ = (ctx, disks);
        Ok(())
    }
    /// Ends what `begin_sync` began, always, also after a failed sync: `committed` says
    /// whether every disk committed (when not, the target is put back to its last
    /// complete generation).
    async fn end_sync(&self, ctx: &StepContext, committed: bool) -> AResult<()> {
        let _ = (ctx, committed);
        Ok(())
    }
    /// Where the data plane writes a disk.
    async fn disk_destination(
        &self,
        ctx: &StepContext,
        disk: &SourceDisk,
    ) -> AResult<DiskDestination>;
    /// Makes the disks the next boot of `phase` (a test instance, or production at
    /// cutover) starts from: converted for KVM when the profile's `conversion` asks for
    /// it, always into an overlay, never into the synced generation. Called just before
    /// [`TargetAdapter::start_test_instance`] / [`TargetAdapter::start_production`]
    /// in the same step; a retried step must find a finished preparation and not redo
    /// it. `None`: nothing to prepare.
    async fn prepare_boot(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
    ) -> AResult<Option<BootPrep>> {
        let _ = (ctx, phase);
        Ok(None)
    }
    /// Boots a test instance from the last complete sync in the isolated network.
    async fn start_test_instance(&self, ctx: &StepContext) -> AResult<()>;
    async fn stop_test_instance(&self, ctx: &StepContext) -> AResult<()>;
    async fn start_production(&self, ctx: &StepContext) -> AResult<()>;
    /// Runs the post-cutover actions; returns what a rollback needs to undo them.
    async fn post_cutover(
        &self,
        ctx: &StepContext,
        actions: &[PostCutoverAction],
    ) -> AResult<Vec<serde_json::Value>>;
    /// Whether final validation needs the source's disks (quiescent by then): by default
    /// when a `data` check compares disks rather than a captured value.
    fn wants_source_disks(&self, checks: &[ValidationCheck]) -> bool {
        checks
            .iter()
            .any(|c| c.kind == "data" && !c.params.contains_key("capture"))
    }
    /// Runs the profile's validation checks against the test or production instance.
    /// `source_disks` serve data-consistency checks that compare disks.
    async fn validate(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
        checks: &[ValidationCheck],
        source_disks: &[SourceDisk],
    ) -> AResult<()>;
    /// Stops the production instance and undoes post-cutover actions (rollback); the
    /// synced disks stay so the migration can be tried again.
    async fn remove(&self, ctx: &StepContext) -> AResult<()>;
}

/// What [`TargetAdapter::prepare_boot`] did, for the migration's events and the
/// downtime breakdown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootPrep {
    /// One line for people: "converted Debian GNU/Linux 12 … in 95.2 s".
    pub summary: String,
    /// Whether the guest was converted (false: it boots as it was synced).
    pub converted: bool,
    /// Time spent, this attempt (0 when an earlier attempt had finished it).
    pub ms: u64,
    /// What was found and changed (inspection, NICs pinned, virt-v2v's lines).
    pub data: serde_json::Value,
    /// Things the user must know (a fallback to emulated devices, a NIC name guessed).
    pub warnings: Vec<String>,
}

/// How far a running disk sync is, for whoever watches (the dashboard).
#[derive(Debug, Default)]
pub struct SyncProgress {
    /// Bytes of the disk examined so far, of `total`.
    pub scanned: std::sync::atomic::AtomicU64,
    pub total: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
}

/// The data plane: the only place disk bytes are copied.
#[async_trait]
pub trait Replicator: Send + Sync {
    async fn sync(&self, src: &SourceDisk, dst: &DiskDestination) -> AResult<SyncStats>;

    /// Like [`Replicator::sync`], keeping `progress` current while it runs.
    async fn sync_observed(
        &self,
        src: &SourceDisk,
        dst: &DiskDestination,
        progress: std::sync::Arc<SyncProgress>,
    ) -> AResult<SyncStats> {
        let _ = progress;
        self.sync(src, dst).await
    }
}
