//! Inventory, placement and history: the nouns of a migration project.
//!
//! Times are Unix milliseconds (UTC). Ids are UUIDs except event and log ids, which are
//! monotonically increasing integers (cursors for streaming).

use crate::cron::CronSchedule;
use crate::state::{State, Status, Step};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

macro_rules! kind_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str { match self { $($name::$variant => $s),+ } }
            pub fn parse(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|k| k.as_str() == s)
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

kind_enum!(
    /// Where workloads come from.
    SourceKind { Vsphere => "vsphere", Kvm => "kvm", Agent => "agent", DiskImage => "disk_image" }
);
kind_enum!(
    /// Where workloads go.
    TargetKind { Vme => "vme", Libvirt => "libvirt", LocalDir => "local_dir", Local => "local" }
);
kind_enum!(
    /// An image file's format, as its owner states it. A guest controls every byte of its
    /// disk, so a disk's format is never read from its contents.
    DiskFormat { Raw => "raw", Qcow2 => "qcow2", Qed => "qed", Vmdk => "vmdk", Vhdx => "vhdx", Vpc => "vpc", Vdi => "vdi" }
);
kind_enum!(
    /// What kind of secret a credential holds.
    CredentialKind { Password => "password", PrivateKey => "private_key", Token => "token" }
);
kind_enum!(
    /// How changed blocks are found for a delta sync.
    SyncMethod { Auto => "auto", HashCompare => "hash_compare", DirtyBitmap => "dirty_bitmap", Cbt => "cbt" }
);
kind_enum!(
    /// Whether a workload's disks are converted to boot on the target's KVM virtio
    /// devices before a test or production boot: `auto` converts a guest that does not
    /// already run on virtio and boots one that cannot be converted with emulated
    /// devices (with a warning); `required` refuses to boot without conversion; `none`
    /// boots the synced disks as they are.
    ConversionMode { Auto => "auto", Required => "required", None => "none" }
);
kind_enum!(
    /// When delta syncs run without being asked.
    ScheduleMode { Manual => "manual", Cron => "cron", Continuous => "continuous" }
);
kind_enum!(
    /// A sync run's kind.
    SyncKind { Full => "full", Delta => "delta" }
);

/// A hypervisor, host or image store that workloads are read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Source {
    pub id: Uuid,
    pub name: String,
    pub kind: SourceKind,
    /// URL or host of the endpoint (vCenter, KVM host, agent); empty for disk images.
    pub endpoint: Option<String>,
    pub credential_id: Option<Uuid>,
    /// Kind-specific settings, e.g. `{"path": "/images"}` for disk images.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: serde_json::Value,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewSource {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    pub kind: SourceKind,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub credential_id: Option<Uuid>,
    #[serde(default = "empty_object")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: serde_json::Value,
}

/// A platform workloads are moved to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Target {
    pub id: Uuid,
    pub name: String,
    pub kind: TargetKind,
    pub endpoint: Option<String>,
    pub credential_id: Option<Uuid>,
    /// Kind-specific settings, e.g. `{"path": "/var/lib/ferry/target"}` for a local directory.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: serde_json::Value,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewTarget {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    pub kind: TargetKind,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub credential_id: Option<Uuid>,
    #[serde(default = "empty_object")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub config: serde_json::Value,
}

/// Changes to a source or a target: the fields given replace the stored ones. A new
/// endpoint needs its credential in the same change: a stored credential is never sent
/// to another host unasked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The credential the adapter logs in with (e.g. the service account that
    /// `ferry target setup-iam` made).
    #[serde(default)]
    pub credential_id: Option<Uuid>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub config: Option<serde_json::Value>,
}

/// Changes to a target.
pub type TargetPatch = EndpointPatch;
/// Changes to a source.
pub type SourcePatch = EndpointPatch;

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// A stored secret's public face: the secret itself never leaves the store decrypted
/// except to an adapter that needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Credential {
    pub id: Uuid,
    pub name: String,
    pub kind: CredentialKind,
    pub username: Option<String>,
    pub created_at: i64,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewCredential {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    pub kind: CredentialKind,
    #[serde(default)]
    pub username: Option<String>,
    /// Write-only: stored encrypted, never returned.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub secret: String,
}

impl std::fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewCredential")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Disk {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    pub size_bytes: u64,
    /// Where the source reads it (an image path for disk-image sources).
    #[serde(default)]
    pub path: Option<String>,
    /// The image file's format (disk-image sources). Unset: recognised from the file's
    /// header, and refused when that header names another file (a backing file, data file
    /// or extent), as a guest's raw disk may; `raw` copies the file as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Nic {
    pub name: String,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub ips: Vec<String>,
}

/// A VM or host in the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Workload {
    pub id: Uuid,
    pub name: String,
    pub source_id: Option<Uuid>,
    pub os: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub services: Vec<String>,
    /// The devices the workload runs on at its source (`virtio`, `vmware`, `emulated`);
    /// none when discovery could not tell. Conversion in `auto` mode follows it.
    #[serde(default)]
    pub hardware: Option<String>,
    pub move_group_id: Option<Uuid>,
    /// Order within the move group's cutover (lower first).
    pub group_order: i32,
    pub credential_id: Option<Uuid>,
    pub agent: bool,
    pub domain: Option<String>,
    pub assigned_email: Option<String>,
    pub cloud_sizing: Option<String>,
    pub target_migration_date: Option<String>,
    pub tags: Vec<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewWorkload {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    #[serde(default)]
    pub source_id: Option<Uuid>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2147483647))]
    pub cpus: Option<u32>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub services: Vec<String>,
    /// The devices the workload runs on at its source (`virtio`, `vmware`, `emulated`).
    #[serde(default)]
    pub hardware: Option<String>,
    #[serde(default)]
    pub move_group_id: Option<Uuid>,
    #[serde(default)]
    pub group_order: i32,
    #[serde(default)]
    pub credential_id: Option<Uuid>,
    #[serde(default)]
    pub agent: bool,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub assigned_email: Option<String>,
    #[serde(default)]
    pub cloud_sizing: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(format = Date))]
    pub target_migration_date: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl NewWorkload {
    /// Every problem found, each naming its field.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = vec![];
        let mut bad = |field: String, message: String| errs.push(FieldError { field, message });
        if let Err(m) = validate_name(&self.name) {
            bad("name".into(), m);
        }
        if let Some(d) = &self.target_migration_date {
            if let Err(m) = validate_date(d) {
                bad("target_migration_date".into(), m);
            }
        }
        if self.cpus.is_some_and(|c| c == 0 || c > i32::MAX as u32) {
            bad("cpus".into(), "must be 1 or more".into());
        }
        if self
            .memory_mib
            .is_some_and(|m| m == 0 || m > i64::MAX as u64)
        {
            bad(
                "memory_mib".into(),
                "must be 1 or more (and fit in 63 bits)".into(),
            );
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(m) = validate_name(&d.name) {
                bad(format!("disks[{i}].name"), m);
            }
            if d.size_bytes > i64::MAX as u64 {
                bad(
                    format!("disks[{i}].size_bytes"),
                    "must fit in 63 bits".into(),
                );
            }
        }
        errs
    }
}

/// Changes to a workload; fields left out stay as they are. The name cannot change
/// (migrations and the audit trail refer to it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkloadPatch {
    #[serde(default)]
    pub source_id: Option<Uuid>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2147483647))]
    pub cpus: Option<u32>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub disks: Option<Vec<Disk>>,
    #[serde(default)]
    pub nics: Option<Vec<Nic>>,
    #[serde(default)]
    pub services: Option<Vec<String>>,
    #[serde(default)]
    pub move_group_id: Option<Uuid>,
    #[serde(default)]
    pub group_order: Option<i32>,
    #[serde(default)]
    pub credential_id: Option<Uuid>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

impl Workload {
    /// The workload with `patch` applied, validated like a new one.
    pub fn patched(&self, patch: &WorkloadPatch) -> Result<Workload, Vec<FieldError>> {
        let mut w = self.clone();
        macro_rules! set {
            ($f:ident) => {
                if let Some(v) = &patch.$f {
                    w.$f = v.clone().into();
                }
            };
        }
        set!(source_id);
        set!(os);
        set!(cpus);
        set!(memory_mib);
        set!(disks);
        set!(nics);
        set!(services);
        set!(move_group_id);
        set!(group_order);
        set!(credential_id);
        set!(tags);
        let check = NewWorkload {
            name: w.name.clone(),
            cpus: w.cpus,
            memory_mib: w.memory_mib,
            disks: w.disks.clone(),
            target_migration_date: w.target_migration_date.clone(),
            ..Default::default()
        };
        let errs = check.validate();
        if errs.is_empty() {
            Ok(w)
        } else {
            Err(errs)
        }
    }
}

/// A wave of workloads cut over together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MoveGroup {
    pub id: Uuid,
    pub name: String,
    /// `YYYY-MM-DD`.
    pub target_date: Option<String>,
    /// How many members cut over at once.
    pub concurrency: u32,
    /// Free text, e.g. `Sat 22:00-02:00 UTC`.
    pub cutover_window: Option<String>,
    /// A group cutover was asked for and is being worked through.
    pub cutover_requested: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewMoveGroup {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(format = Date))]
    pub target_date: Option<String>,
    #[serde(default = "one")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000))]
    pub concurrency: u32,
    #[serde(default)]
    pub cutover_window: Option<String>,
}

fn one() -> u32 {
    1
}

/// When delta syncs run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeltaSchedule {
    #[serde(default = "manual")]
    pub mode: ScheduleMode,
    /// For `cron`: five fields, UTC.
    #[serde(default)]
    pub cron: Option<String>,
    /// For `continuous`: the least time between the end of one delta and the next start.
    #[serde(default = "sixty")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 31_536_000))]
    pub min_interval_secs: u64,
}

/// The longest minimum interval between continuous deltas: a year.
pub const MAX_INTERVAL_SECS: u64 = 31_536_000;

fn manual() -> ScheduleMode {
    ScheduleMode::Manual
}
fn sixty() -> u64 {
    60
}

impl Default for DeltaSchedule {
    fn default() -> Self {
        DeltaSchedule {
            mode: ScheduleMode::Manual,
            cron: None,
            min_interval_secs: 60,
        }
    }
}

impl DeltaSchedule {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.mode == ScheduleMode::Cron && self.cron.is_none() {
            return Err(FieldError {
                field: "schedule.cron".into(),
                message: "mode 'cron' needs a cron expression, e.g. cron = \"0 */2 * * *\"".into(),
            });
        }
        if let Some(expr) = &self.cron {
            CronSchedule::parse(expr).map_err(|e| FieldError {
                field: "schedule.cron".into(),
                message: e.to_string(),
            })?;
        }
        if !(1..=MAX_INTERVAL_SECS).contains(&self.min_interval_secs) {
            return Err(FieldError {
                field: "schedule.min_interval_secs".into(),
                message: format!(
                    "must be 1-{MAX_INTERVAL_SECS} seconds (got {})",
                    self.min_interval_secs
                ),
            });
        }
        Ok(())
    }

    /// When the next delta is due after `now_ms` (or after a delta ended at `now_ms`).
    pub fn next_due(&self, now_ms: i64) -> Option<i64> {
        match self.mode {
            ScheduleMode::Manual => None,
            ScheduleMode::Continuous => Some(now_ms + self.min_interval_secs as i64 * 1000),
            ScheduleMode::Cron => self
                .cron
                .as_deref()
                .and_then(|c| CronSchedule::parse(c).ok())
                .and_then(|c| c.next_after(now_ms)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub datastore: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UatOptions {
    /// The isolated network the test instance boots in.
    #[serde(default)]
    pub network: Option<String>,
    /// Refuse cutover until a UAT passed.
    #[serde(default)]
    pub required: bool,
    /// The test instance's address per source NIC (by NIC name): `dhcp`, or an address
    /// in the migration network's range. A NIC not listed keeps its production address,
    /// which suits a migration network that mirrors production's addressing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: BTreeMap<String, String>,
}

impl UatOptions {
    /// The test instance's address for NIC `nic`: `Some(None)` for DHCP, `Some(Some(a))`
    /// for a given address, `None` when the profile says nothing (keep production's).
    pub fn address_of(&self, nic: &str) -> Option<Option<&str>> {
        self.addresses
            .get(nic)
            .map(|a| (!a.eq_ignore_ascii_case("dhcp")).then_some(a.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PostCutoverAction {
    /// `reip`, `dns` or `hook`.
    pub kind: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ValidationCheck {
    /// `boot`, `tcp`, `http`, `command` or `data`.
    pub kind: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub params: BTreeMap<String, String>,
}

pub const POST_CUTOVER_KINDS: &[&str] = &["reip", "dns", "hook"];
pub const CHECK_KINDS: &[&str] = &["boot", "tcp", "http", "command", "data"];

/// How a workload is migrated: placement, maps, sync method and schedule, UAT, cutover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
        )
    )]
    pub name: String,
    /// Target name or id.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"\S"))]
    pub target: String,
    #[serde(default)]
    pub placement: Placement,
    /// Source network → target network.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
    /// Source datastore/pool → target datastore/pool.
    #[serde(default)]
    pub storage_map: BTreeMap<String, String>,
    #[serde(default = "auto")]
    pub sync_method: SyncMethod,
    #[serde(default)]
    pub schedule: DeltaSchedule,
    #[serde(default)]
    pub uat: UatOptions,
    /// Source services stopped at cutover.
    #[serde(default)]
    pub services_to_stop: Vec<String>,
    #[serde(default)]
    pub post_cutover: Vec<PostCutoverAction>,
    #[serde(default)]
    pub validation: Vec<ValidationCheck>,
    /// Guest conversion before a test or production boot.
    #[serde(default = "conversion_auto")]
    pub conversion: ConversionMode,
}

fn conversion_auto() -> ConversionMode {
    ConversionMode::Auto
}

fn auto() -> SyncMethod {
    SyncMethod::Auto
}

/// A validation problem with the dotted path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl ProfileSpec {
    /// Every problem found, each naming its field.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = vec![];
        let mut bad = |field: String, message: String| errs.push(FieldError { field, message });
        if let Err(m) = validate_name(&self.name) {
            bad("name".into(), m);
        }
        if self.target.trim().is_empty() {
            bad("target".into(), "name or id of a target is required".into());
        }
        for (k, v) in &self.network_map {
            if k.trim().is_empty() || v.trim().is_empty() {
                bad(
                    format!("network_map.{k}"),
                    "source and target network names must not be empty".into(),
                );
            }
        }
        for (nic, a) in &self.uat.addresses {
            if !a.eq_ignore_ascii_case("dhcp") && a.parse::<std::net::IpAddr>().is_err() {
                bad(
                    format!("uat.addresses.{nic}"),
                    format!("'{a}' is neither an IP address nor dhcp"),
                );
            }
        }
        for (k, v) in &self.storage_map {
            if k.trim().is_empty() || v.trim().is_empty() {
                bad(
                    format!("storage_map.{k}"),
                    "source and target storage names must not be empty".into(),
                );
            }
        }
        if let Err(e) = self.schedule.validate() {
            bad(e.field, e.message);
        }
        for (i, a) in self.post_cutover.iter().enumerate() {
            if !POST_CUTOVER_KINDS.contains(&a.kind.as_str()) {
                bad(
                    format!("post_cutover[{i}].kind"),
                    format!(
                        "unknown action '{}': use one of {}",
                        a.kind,
                        POST_CUTOVER_KINDS.join(", ")
                    ),
                );
            }
        }
        for (i, c) in self.validation.iter().enumerate() {
            if !CHECK_KINDS.contains(&c.kind.as_str()) {
                bad(
                    format!("validation[{i}].kind"),
                    format!(
                        "unknown check '{}': use one of {}",
                        c.kind,
                        CHECK_KINDS.join(", ")
                    ),
                );
            }
        }
        errs
    }
}

/// Names are 1-128 printable characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > 128 {
        return Err("must be at most 128 characters".into());
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// `YYYY-MM-DD` with a real month and day.
pub fn validate_date(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split('-').collect();
    let ok = parts.len() == 3
        && parts[0].len() == 4
        && parts[1].len() == 2
        && parts[2].len() == 2
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(format!("'{s}' is not a date in the form YYYY-MM-DD"));
    }
    let y: i32 = parts[0].parse().unwrap_or(0);
    let m: u32 = parts[1].parse().unwrap_or(0);
    let d: u32 = parts[2].parse().unwrap_or(0);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(format!("'{s}' has no month {m}")),
    };
    if d == 0 || d > days {
        return Err(format!("'{s}' has no day {d} in month {m}"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Profile {
    pub id: Uuid,
    pub spec: ProfileSpec,
    pub created_at: i64,
}

/// One workload's migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Migration {
    pub id: Uuid,
    pub workload_id: Uuid,
    pub workload_name: String,
    pub profile_id: Uuid,
    pub target_id: Uuid,
    pub status: Status,
    pub schedule: DeltaSchedule,
    /// When the scheduler starts the next delta (Unix ms), if scheduled.
    pub next_sync_at: Option<i64>,
    pub last_error: Option<String>,
    /// Optimistic-concurrency version, bumped by every change.
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Migration {
    pub fn state(&self) -> State {
        self.status.state
    }
}

/// One full or delta sync run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SyncRun {
    pub id: Uuid,
    pub migration_id: Uuid,
    pub kind: SyncKind,
    pub generation: u32,
    pub bytes_total: u64,
    pub bytes_sent: u64,
    pub started_at: i64,
    pub finished_at: i64,
}

/// An audit record: what happened, to what, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Event {
    pub id: i64,
    pub migration_id: Option<Uuid>,
    /// e.g. `migration.created`, `command`, `step.started`, `step.completed`, `step.retry`,
    /// `step.failed`, `state.changed`.
    pub kind: String,
    pub step: Option<Step>,
    pub job_id: Option<Uuid>,
    pub message: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: serde_json::Value,
    pub at: i64,
}

/// An event to record (the store assigns id and time).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub migration_id: Option<Uuid>,
    pub kind: String,
    pub step: Option<Step>,
    pub job_id: Option<Uuid>,
    pub message: String,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(migration_id: Option<Uuid>, kind: &str, message: impl Into<String>) -> NewEvent {
        NewEvent {
            migration_id,
            kind: kind.to_string(),
            step: None,
            job_id: None,
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }
}

/// A log line collected from a worker, an agent or the appliance's own steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogLine {
    pub id: i64,
    pub migration_id: Option<Uuid>,
    pub origin: String,
    pub level: String,
    pub message: String,
    pub at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert!(validate_date("2026-02-28").is_ok());
        assert!(validate_date("2024-02-29").is_ok());
        assert!(validate_date("2026-02-29").is_err());
        assert!(validate_date("2026-13-01").is_err());
        assert!(validate_date("26-1-1").is_err());
    }

    #[test]
    fn profile_validation_names_fields() {
        let p = ProfileSpec {
            name: "".into(),
            target: "t".into(),
            placement: Default::default(),
            network_map: Default::default(),
            storage_map: Default::default(),
            sync_method: SyncMethod::Auto,
            conversion: ConversionMode::Auto,
            schedule: DeltaSchedule {
                mode: ScheduleMode::Cron,
                cron: Some("bad".into()),
                min_interval_secs: 60,
            },
            uat: Default::default(),
            services_to_stop: vec![],
            post_cutover: vec![PostCutoverAction {
                kind: "x".into(),
                params: Default::default(),
            }],
            validation: vec![],
        };
        let fields: Vec<String> = p.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            vec!["name", "schedule.cron", "post_cutover[0].kind"]
        );
    }

    #[test]
    fn continuous_schedule_waits_min_interval() {
        let s = DeltaSchedule {
            mode: ScheduleMode::Continuous,
            cron: None,
            min_interval_secs: 30,
        };
        assert_eq!(s.next_due(1000), Some(31_000));
        assert_eq!(DeltaSchedule::default().next_due(1000), None);
    }
}
