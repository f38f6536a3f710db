//! Row → domain conversions.

use crate::{Result, StoreError, TokenRecord};
use ferry_model::*;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt("encoding", e))
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

pub fn uuid(r: &AnyRow, col: &str) -> Result<Uuid> {
    let s: String = r.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| corrupt(col, e))
}

fn opt_uuid(r: &AnyRow, col: &str) -> Result<Option<Uuid>> {
    let s: Option<String> = r.try_get(col)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|e| corrupt(col, e)))
        .transpose()
}

fn kind<T>(r: &AnyRow, col: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    let s: String = r.try_get(col)?;
    parse(&s).ok_or_else(|| corrupt(col, format!("unknown value '{s}'")))
}

pub fn token(r: &AnyRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: uuid(r, "id")?,
        name: r.try_get("name")?,
        admin: r.try_get::<i64, _>("admin")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

pub fn credential(r: &AnyRow) -> Result<Credential> {
    Ok(Credential {
        id: uuid(r, "id")?,
        name: r.try_get("name")?,
        kind: kind(r, "kind", CredentialKind::parse)?,
        username: r.try_get("username")?,
        created_at: r.try_get("created_at")?,
    })
}

pub fn source(r: &AnyRow) -> Result<Source> {
    Ok(Source {
        id: uuid(r, "id")?,
        name: r.try_get("name")?,
        kind: kind(r, "kind", SourceKind::parse)?,
        endpoint: r.try_get("endpoint")?,
        credential_id: opt_uuid(r, "credential_id")?,
        config: from_json(&r.try_get::<String, _>("config")?, "source config")?,
        created_at: r.try_get("created_at")?,
    })
}

pub fn target(r: &AnyRow) -> Result<Target> {
    Ok(Target {
        id: uuid(r, "id")?,
        name: r.try_get("name")?,
        kind: kind(r, "kind", TargetKind::parse)?,
        endpoint: r.try_get("endpoint")?,
        credential_id: opt_uuid(r, "credential_id")?,
        config: from_json(&r.try_get::<String, _>("config")?, "target config")?,
        created_at: r.try_get("created_at")?,
    })
}

pub fn group(r: &AnyRow) -> Result<MoveGroup> {
    Ok(MoveGroup {
        id: uuid(r, "id")?,
        name: r.try_get("name")?,
        target_date: r.try_get("target_date")?,
        concurrency: r.try_get::<i64, _>("concurrency")? as u32,
        cutover_window: r.try_get("cutover_window")?,
        cutover_requested: r.try_get::<i64, _>("cutover_requested")? != 0,
        created_at: r.try_get("created_at")?,
    })
}

pub fn workload(r: &AnyRow) -> Result<Workload> {
    let mut w: Workload = from_json(&r.try_get::<String, _>("data")?, "workload")?;
    // The indexed columns are authoritative.
    w.move_group_id = opt_uuid(r, "move_group_id")?;
    w.group_order = r.try_get::<i64, _>("group_order")? as i32;
    Ok(w)
}

pub fn profile(r: &AnyRow) -> Result<Profile> {
    Ok(Profile {
        id: uuid(r, "id")?,
        spec: from_json(&r.try_get::<String, _>("spec")?, "profile")?,
        created_at: r.try_get("created_at")?,
    })
}

pub fn migration(r: &AnyRow) -> Result<Migration> {
    Ok(Migration {
        id: uuid(r, "id")?,
        workload_id: uuid(r, "workload_id")?,
        workload_name: r.try_get("workload_name")?,
        profile_id: uuid(r, "profile_id")?,
        target_id: uuid(r, "target_id")?,
        status: from_json(&r.try_get::<String, _>("status")?, "migration status")?,
        schedule: from_json(&r.try_get::<String, _>("schedule")?, "migration schedule")?,
        next_sync_at: r.try_get("next_sync_at")?,
        last_error: r.try_get("last_error")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub fn sync_run(r: &AnyRow) -> Result<SyncRun> {
    Ok(SyncRun {
        id: uuid(r, "id")?,
        migration_id: uuid(r, "migration_id")?,
        kind: kind(r, "kind", SyncKind::parse)?,
        generation: r.try_get::<i64, _>("generation")? as u32,
        bytes_total: r.try_get::<i64, _>("bytes_total")? as u64,
        bytes_sent: r.try_get::<i64, _>("bytes_sent")? as u64,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

pub fn event(r: &AnyRow) -> Result<Event> {
    let step: Option<String> = r.try_get("step")?;
    Ok(Event {
        id: r.try_get("id")?,
        migration_id: opt_uuid(r, "migration_id")?,
        kind: r.try_get("kind")?,
        step: step.as_deref().and_then(Step::parse),
        job_id: opt_uuid(r, "job_id")?,
        message: r.try_get("message")?,
        data: from_json(&r.try_get::<String, _>("data")?, "event data")?,
        at: r.try_get("at")?,
    })
}

pub fn log_line(r: &AnyRow) -> Result<LogLine> {
    Ok(LogLine {
        id: r.try_get("id")?,
        migration_id: opt_uuid(r, "migration_id")?,
        origin: r.try_get("origin")?,
        level: r.try_get("level")?,
        message: r.try_get("message")?,
        at: r.try_get("at")?,
    })
}
