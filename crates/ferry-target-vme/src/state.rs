//! What this target deployed for a migration, kept in its work directory: written right
//! after the manager confirms an instance, so a retried step finds it instead of making a
//! second one.

use ferry_adapter::{AResult, StepContext};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The UAT instance on the migration network.
    Test,
    Production,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deployed {
    pub instance_id: i64,
    /// The virtual image it was made from (image mode); 0 for the delta-mode instance,
    /// which is the migration's own and outlives UAT and rollback.
    pub image_id: i64,
}

fn path(ctx: &StepContext, role: Role) -> PathBuf {
    ctx.work_dir.join("vme").join(match role {
        Role::Test => "test-instance.json",
        Role::Production => "production-instance.json",
    })
}

/// The instance's name in the manager: the workload's, marked for a test instance.
pub fn instance_name(ctx: &StepContext, role: Role) -> String {
    match role {
        Role::Production => ctx.workload.name.clone(),
        Role::Test => format!("{}-ferry-uat", ctx.workload.name),
    }
}

pub fn load(ctx: &StepContext, role: Role) -> Option<Deployed> {
    read_json(&path(ctx, role))
}

/// A record written by [`write_atomic`]; `None` when there is none (or it is unreadable:
/// then what it recorded is made again).
pub fn read_json<T: serde::de::DeserializeOwned>(p: &std::path::Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

pub fn save(ctx: &StepContext, role: Role, d: &Deployed) -> AResult<()> {
    write_atomic(
        &path(ctx, role),
        &serde_json::to_vec(d).expect("serialisable"),
    )
}

/// Writes `bytes` to `p` through a temporary file, fsync and rename: a crash leaves the
/// old record or the new one, never half of one.
pub fn write_atomic(p: &std::path::Path, bytes: &[u8]) -> AResult<()> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, p)?;
    Ok(())
}

pub fn clear(ctx: &StepContext, role: Role) -> AResult<()> {
    match std::fs::remove_file(path(ctx, role)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
