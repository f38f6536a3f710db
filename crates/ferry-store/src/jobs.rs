//! The durable job queue: one row per step; claimed with a lease that the worker keeps
//! alive with heartbeats; fenced by a per-claim token so a worker that lost its lease can
//! never complete the job.

use crate::{now_ms, rows, Backend, NewJob, Result, Store, StoreError};
use ferry_model::Step;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "done" => JobStatus::Done,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub migration_id: Uuid,
    pub step: Step,
    pub status: JobStatus,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_at: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub last_error: Option<String>,
}

/// A job this worker holds; `token` fences every later write about it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub job: Job,
    pub token: Uuid,
}

const JOB_COLS: &str =
    "id, migration_id, step, status, attempts, max_attempts, run_at, lease_owner, lease_expires_at, last_error";

fn job(r: &AnyRow) -> Result<Job> {
    let step: String = r.try_get("step")?;
    let status: String = r.try_get("status")?;
    Ok(Job {
        id: rows::uuid(r, "id")?,
        migration_id: rows::uuid(r, "migration_id")?,
        step: Step::parse(&step).ok_or_else(|| StoreError::Corrupt(format!("job step {step}")))?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("job status {status}")))?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        run_at: r.try_get("run_at")?,
        lease_owner: r.try_get("lease_owner")?,
        lease_expires_at: r.try_get("lease_expires_at")?,
        last_error: r.try_get("last_error")?,
    })
}

pub(crate) async fn enqueue_tx(
    tx: &mut Transaction<'static, Any>,
    migration_id: Uuid,
    j: &NewJob,
    now: i64,
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO jobs (id, migration_id, step, status, attempts, max_attempts, run_at, created_at, updated_at) VALUES ($1, $2, $3, 'queued', 0, $4, $5, $6, $7)")
        .bind(id.to_string())
        .bind(migration_id.to_string())
        .bind(j.step.as_str())
        .bind(j.max_attempts)
        .bind(j.run_at)
        .bind(now)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(id)
}

async fn job_event(
    tx: &mut Transaction<'static, Any>,
    j: &Job,
    kind: &str,
    message: String,
    data: serde_json::Value,
    now: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO events (migration_id, kind, step, job_id, message, data, at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(j.migration_id.to_string())
        .bind(kind)
        .bind(j.step.as_str())
        .bind(j.id.to_string())
        .bind(message)
        .bind(data.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// Claims the next due job (queued and due, or running with an expired lease) for
    /// `owner`, for `lease_ms`. Records a `step.started` event in the same transaction.
    pub async fn claim_job(&self, owner: &str, lease_ms: i64) -> Result<Option<ClaimedJob>> {
        let token = Uuid::new_v4();
        let mut w = self.write().await?;
        let now = now_ms();
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET status = 'running', lease_owner = $1, lease_token = $2, lease_expires_at = $3, attempts = attempts + 1, updated_at = $4 \
             WHERE id = (SELECT id FROM jobs WHERE (status = 'queued' AND run_at <= $4) OR (status = 'running' AND lease_expires_at < $4) ORDER BY run_at LIMIT 1{lock}) \
             RETURNING {JOB_COLS}"
        );
        let row = sqlx::query(&sql)
            .bind(owner)
            .bind(token.to_string())
            .bind(now + lease_ms)
            .bind(now)
            .fetch_optional(&mut *w.tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let j = job(&row)?;
        job_event(
            &mut w.tx,
            &j,
            "step.started",
            format!(
                "step {} started (attempt {}) on {owner}",
                j.step, j.attempts
            ),
            serde_json::json!({"attempt": j.attempts, "owner": owner}),
            now,
        )
        .await?;
        w.commit().await?;
        Ok(Some(ClaimedJob { job: j, token }))
    }

    /// Extends the lease; `false` when it was lost (cancelled or taken over).
    pub async fn heartbeat(&self, c: &ClaimedJob, lease_ms: i64) -> Result<bool> {
        let mut w = self.write().await?;
        let now = now_ms();
        let n = sqlx::query("UPDATE jobs SET lease_expires_at = $1, updated_at = $2 WHERE id = $3 AND lease_token = $4 AND status = 'running'")
            .bind(now + lease_ms)
            .bind(now)
            .bind(c.job.id.to_string())
            .bind(c.token.to_string())
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    /// Puts a failed attempt back in the queue to run at `run_at`.
    pub async fn retry_job_later(&self, c: &ClaimedJob, run_at: i64, error: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let now = now_ms();
        let n = sqlx::query("UPDATE jobs SET status = 'queued', run_at = $1, last_error = $2, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $3 WHERE id = $4 AND lease_token = $5 AND status = 'running'")
            .bind(run_at)
            .bind(error)
            .bind(now)
            .bind(c.job.id.to_string())
            .bind(c.token.to_string())
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        if n == 1 {
            job_event(
                &mut w.tx,
                &c.job,
                "step.retry",
                format!(
                    "step {} attempt {} failed, retrying in {} ms: {error}",
                    c.job.step,
                    c.job.attempts,
                    run_at - now
                ),
                serde_json::json!({"attempt": c.job.attempts, "run_at": run_at, "error": error}),
                now,
            )
            .await?;
        }
        w.commit().await?;
        Ok(n == 1)
    }

    /// After a restart: jobs this owner held go back to the queue at once.
    pub async fn release_owned(&self, owner: &str) -> Result<u64> {
        let mut w = self.write().await?;
        let n = sqlx::query("UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $1 WHERE status = 'running' AND lease_owner = $2")
            .bind(now_ms())
            .bind(owner)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.commit().await?;
        Ok(n)
    }

    pub async fn get_job(&self, id: Uuid) -> Result<Job> {
        let row = sqlx::query(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .ok_or(StoreError::NotFound {
                what: "job",
                id: id.to_string(),
            })?;
        job(&row)
    }

    pub async fn list_jobs(&self, migration_id: Uuid) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE migration_id = $1 ORDER BY created_at"
        ))
        .bind(migration_id.to_string())
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(job).collect()
    }

    /// Takes or renews the named lease for `owner` (e.g. the scheduler, so that one
    /// appliance at a time runs it); `false` while another owner holds it.
    pub async fn try_lease(&self, name: &str, owner: &str, ttl_ms: i64) -> Result<bool> {
        let mut w = self.write().await?;
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO leases (name, owner, expires_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(owner)
        .bind(now + ttl_ms)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        let got = inserted == 1
            || sqlx::query(
                "UPDATE leases SET owner = $1, expires_at = $2 WHERE name = $3 AND (owner = $4 OR expires_at < $5)",
            )
            .bind(owner)
            .bind(now + ttl_ms)
            .bind(name)
            .bind(owner)
            .bind(now)
            .execute(&mut *w.tx)
            .await?
            .rows_affected()
                == 1;
        w.commit().await?;
        Ok(got)
    }

    /// Jobs not finished yet (queued or running).
    pub async fn count_open_jobs(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")
                .fetch_one(self.pool())
                .await?
                .get::<i64, _>(0),
        )
    }

    /// The earliest `run_at` of a queued job, to sleep until then.
    pub async fn next_job_due(&self) -> Result<Option<i64>> {
        Ok(
            sqlx::query("SELECT MIN(run_at) FROM jobs WHERE status = 'queued'")
                .fetch_one(self.pool())
                .await?
                .try_get::<Option<i64>, _>(0)?,
        )
    }
}
