//! The orchestrator (claims jobs with leases, runs steps through the adapters, retries
//! with backoff, honours cancellation) and the operations that change a migration.
//!
//! Every change goes through the pure state machine and is stored with its jobs and
//! events in one transaction (`Store::apply`); concurrent changes are detected by the
//! migration's version and retried.

use crate::adapters::{
    AdapterError, Adapters, CheckPhase, CutoverFacts, Secrets, StepContext, SyncStats,
};
use crate::error::ApiError;
use ferry_model::*;
use ferry_store::{Change, ClaimedJob, NewJob, Store, StoreError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::Instrument;
use uuid::Uuid;

/// Event kind holding the migration's [`CutoverFacts`] (the newest one counts).
pub const FACTS_EVENT: &str = "cutover.facts";
/// Event kind holding the downtime of a completed cutover, by phase.
pub const DOWNTIME_EVENT: &str = "cutover.downtime";

const CUTOVER_STEPS: [Step; 7] = [
    Step::StopServices,
    Step::FinalDelta,
    Step::ShutdownSource,
    Step::ShutdownDelta,
    Step::StartTarget,
    Step::PostCutover,
    Step::FinalValidation,
];

/// What a step hands back to be recorded with its completion.
#[derive(Debug, Default)]
struct StepOutput {
    sync: Option<SyncRun>,
    /// The UAT validation verdict (an error message when it failed).
    uat: Option<Result<(), String>>,
    facts: Option<CutoverFacts>,
    /// What preparing a boot did (a guest conversion), with the phase it was for.
    boot: Option<(CheckPhase, ferry_adapter::BootPrep)>,
}

/// Event kind of a boot's preparation (the guest's conversion); `data.ms` is its time.
pub const CONVERSION_EVENT: &str = "conversion";
/// Event kind of something a step did that its user must know about.
pub const WARNING_EVENT: &str = "warning";

/// Tuning of the orchestrator.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Identifies this appliance as a lease owner (stable across restarts).
    pub owner: String,
    pub lease_ms: i64,
    pub workers: usize,
    pub max_attempts: i64,
    pub backoff_base_ms: i64,
    pub backoff_max_ms: i64,
    /// Extra time each step takes (simulated work, for tests and demos).
    pub step_delay_ms: u64,
    pub poll_ms: u64,
    pub work_dir: PathBuf,
}

pub struct Engine {
    pub store: Store,
    /// Opens the credentials steps need (`*_credential` parameters of the profile).
    pub secrets: crate::secrets::SecretBox,
    pub adapters: Adapters,
    pub config: EngineConfig,
    pub wake: Notify,
    /// Syncs running in this process, by migration: what the dashboard shows live.
    pub running: std::sync::Mutex<HashMap<Uuid, RunningSync>>,
}

/// A sync in progress.
#[derive(Clone)]
pub struct RunningSync {
    pub started_ms: i64,
    /// The disk being copied (1-based) of how many, and its name.
    pub disk: usize,
    pub disks: usize,
    pub disk_name: String,
    pub progress: Arc<ferry_adapter::SyncProgress>,
    /// Bytes sent by the disks already done.
    pub sent_before: u64,
}

fn run_effects(c: &mut Change, effects: &[Effect], max_attempts: i64) {
    for e in effects {
        match e {
            Effect::Run(step) => c.enqueue.push(NewJob {
                step: *step,
                run_at: 0,
                max_attempts,
            }),
            Effect::CancelRunning => c.cancel_running = true,
        }
    }
}

fn state_event(m: &Migration, from: State, to: State, why: &str) -> NewEvent {
    let mut e = NewEvent::new(
        Some(m.id),
        "state.changed",
        format!("{from} → {to} ({why})"),
    );
    e.data = serde_json::json!({"from": from, "to": to});
    e
}

/// When the next scheduled delta is due, for a migration now at `status`.
fn next_sync(schedule: &DeltaSchedule, status: &Status, now: i64) -> Option<i64> {
    match status.state {
        State::Synced | State::Uat => schedule.next_due(now),
        _ => None,
    }
}

impl Engine {
    /// Applies an operator or scheduler command.
    pub async fn command(
        &self,
        id: Uuid,
        cmd: Command,
        actor: &str,
    ) -> Result<Migration, ApiError> {
        for _ in 0..10 {
            let m = self.store.get_migration(id).await?;
            let (status, effects) = transition(&m.status, Input::Command(cmd))?;
            let mut c = Change::new(&m, status.clone());
            run_effects(&mut c, &effects, self.config.max_attempts);
            let mut ev = NewEvent::new(Some(m.id), "command", format!("{cmd} by {actor}"));
            ev.data = serde_json::json!({"command": cmd, "actor": actor});
            c.events.push(ev);
            c.events
                .push(state_event(&m, m.status.state, status.state, cmd.as_str()));
            c.next_sync_at = Some(next_sync(&m.schedule, &status, ferry_store::now_ms()));
            if status.state != State::Failed {
                c.last_error = Some(None);
            }
            match self.store.apply(c).await {
                Ok(m) => {
                    self.wake.notify_waiters();
                    return Ok(m);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::conflict(format!(
            "migration {id} is changing too often to apply {cmd}; try again"
        )))
    }

    pub async fn set_schedule(
        &self,
        id: Uuid,
        schedule: DeltaSchedule,
    ) -> Result<Migration, ApiError> {
        schedule
            .validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        for _ in 0..10 {
            let m = self.store.get_migration(id).await?;
            let mut c = Change::new(&m, m.status.clone());
            c.next_sync_at = Some(next_sync(&schedule, &m.status, ferry_store::now_ms()));
            c.schedule = Some(schedule.clone());
            let mut ev = NewEvent::new(
                Some(m.id),
                "schedule.changed",
                format!("delta schedule: {}", schedule.mode),
            );
            ev.data = serde_json::to_value(&schedule).unwrap_or_default();
            c.events.push(ev);
            match self.store.apply(c).await {
                Ok(m) => return Ok(m),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::conflict(
            "migration is changing too often; try again",
        ))
    }

    /// Runs the orchestrator until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        match self.store.release_owned(&self.config.owner).await {
            Ok(n) if n > 0 => tracing::info!(jobs = n, "resuming steps interrupted by a restart"),
            Ok(_) => {}
            Err(e) => tracing::error!("cannot release interrupted jobs: {e}"),
        }
        let recorder = tokio::spawn(self.clone().record_warnings(crate::step_log::connect()));
        let slots = Arc::new(Semaphore::new(self.config.workers.max(1)));
        loop {
            if *shutdown.borrow() {
                break;
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.changed() => break,
            };
            match self
                .store
                .claim_job(&self.config.owner, self.config.lease_ms)
                .await
            {
                Ok(Some(job)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.run_job(job).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => drop(permit),
                Err(e) => {
                    drop(permit);
                    tracing::warn!("claiming a job failed: {e}");
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(self.config.poll_ms)) => {}
                _ = shutdown.changed() => {}
            }
        }
        recorder.abort();
    }

    /// Records each warning a step logged as a `warning` event and a log line of its
    /// migration, so that `ferry migration events|logs` and the dashboard show it.
    async fn record_warnings(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::step_log::StepWarning>,
    ) {
        while let Some(w) = rx.recv().await {
            let mut ev = NewEvent::new(Some(w.migration), WARNING_EVENT, w.message.clone());
            ev.step = w.step;
            let logged = self
                .store
                .insert_log(Some(w.migration), &self.config.owner, "warn", &w.message)
                .await;
            if let Err(e) = self.store.insert_event(&ev).await.and(logged) {
                eprintln!("recording a warning of migration {}: {e}", w.migration);
            }
        }
    }

    async fn context(&self, m: Migration) -> Result<StepContext, AdapterError> {
        let perm = |e: StoreError| AdapterError::transient(e.to_string());
        let workload = self
            .store
            .get_workload(&m.workload_id.to_string())
            .await
            .map_err(perm)?;
        let profile = self
            .store
            .get_profile(&m.profile_id.to_string())
            .await
            .map_err(perm)?;
        let target = self
            .store
            .get_target(&m.target_id.to_string())
            .await
            .map_err(perm)?;
        let source = match workload.source_id {
            Some(s) => Some(self.store.get_source(&s.to_string()).await.map_err(perm)?),
            None => None,
        };
        let work_dir = self.config.work_dir.join(m.id.to_string());
        let facts = self
            .store
            .latest_event(m.id, FACTS_EVENT)
            .await
            .map_err(perm)?
            .and_then(|e| serde_json::from_value(e.data).ok())
            .unwrap_or_default();
        let mut secrets = self.credentials_for(&profile).await?;
        self.endpoint_credential(
            &mut secrets,
            target.credential_id,
            &format!("target '{}'", target.name),
            (
                ferry_adapter::TARGET_USERNAME,
                ferry_adapter::TARGET_PASSWORD,
            ),
        )
        .await?;
        if let Some(s) = &source {
            self.endpoint_credential(
                &mut secrets,
                s.credential_id,
                &format!("source '{}'", s.name),
                (
                    ferry_adapter::SOURCE_USERNAME,
                    ferry_adapter::SOURCE_PASSWORD,
                ),
            )
            .await?;
            let guest = s
                .config
                .get("guest_credential_id")
                .and_then(|v| v.as_str())
                .map(|v| {
                    v.parse::<uuid::Uuid>().map_err(|_| {
                        AdapterError::permanent(format!(
                            "source '{}': config.guest_credential_id {v:?} is not a credential id",
                            s.name
                        ))
                    })
                })
                .transpose()?;
            self.endpoint_credential(
                &mut secrets,
                guest,
                &format!("source '{}' (guest account)", s.name),
                (ferry_adapter::GUEST_USERNAME, ferry_adapter::GUEST_PASSWORD),
            )
            .await?;
        }
        Ok(StepContext {
            migration: m,
            workload,
            profile,
            source,
            target,
            work_dir,
            facts,
            secrets,
        })
    }

    /// Decrypts a source's or target's own credential into `secrets` under `keys`
    /// (username, password).
    pub async fn endpoint_credential(
        &self,
        secrets: &mut Secrets,
        id: Option<uuid::Uuid>,
        whose: &str,
        keys: (&str, &str),
    ) -> Result<(), AdapterError> {
        let Some(id) = id else { return Ok(()) };
        let (cred, sealed) = self
            .store
            .credential_with_secret(&id.to_string())
            .await
            .map_err(|e| {
                AdapterError::permanent(format!("{whose} refers to credential {id}: {e}"))
            })?;
        let plain = self.secrets.open(&sealed).map_err(|e| {
            AdapterError::permanent(format!("credential {id} cannot be decrypted: {e}"))
        })?;
        secrets
            .0
            .insert(keys.0.into(), cred.username.unwrap_or_default());
        secrets.0.insert(keys.1.into(), plain);
        Ok(())
    }

    /// Decrypts the credentials the profile's actions and checks refer to by name or id.
    async fn credentials_for(&self, profile: &Profile) -> Result<Secrets, AdapterError> {
        let spec = &profile.spec;
        let refs: Vec<&String> = spec
            .post_cutover
            .iter()
            .flat_map(|a| a.params.iter())
            .chain(spec.validation.iter().flat_map(|c| c.params.iter()))
            .filter(|(k, _)| k.ends_with("_credential"))
            .map(|(_, v)| v)
            .collect();
        let mut out = Secrets::default();
        for r in refs {
            let sealed = match self.store.credential_secret_by_key(r).await {
                Ok(s) => s,
                Err(StoreError::NotFound { .. }) => {
                    return Err(AdapterError::permanent(format!(
                        "the profile refers to credential '{r}', which does not exist: create it first (POST /api/credentials)"
                    )))
                }
                Err(e) => return Err(AdapterError::transient(e.to_string())),
            };
            let plain = self.secrets.open(&sealed).map_err(|e| {
                AdapterError::permanent(format!("credential '{r}' cannot be decrypted: {e}"))
            })?;
            out.0.insert(r.clone(), plain);
        }
        Ok(out)
    }

    async fn run_job(self: Arc<Self>, c: ClaimedJob) {
        let started = Instant::now();
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let hb = {
            let me = self.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let every = Duration::from_millis((me.config.lease_ms / 3).max(50) as u64);
                loop {
                    tokio::time::sleep(every).await;
                    match me.store.heartbeat(&c, me.config.lease_ms).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = lost_tx.send(true);
                            break;
                        }
                        Err(e) => tracing::warn!("heartbeat failed: {e}"),
                    }
                }
            })
        };
        let outcome = tokio::select! {
            r = self.execute(&c).instrument(tracing::info_span!(
                crate::step_log::STEP_SPAN,
                migration = %c.job.migration_id,
                step = %c.job.step,
            )) => Some(r),
            _ = lost_rx.wait_for(|v| *v) => None,
        };
        hb.abort();
        match outcome {
            None => {
                tracing::info!(job = %c.job.id, step = %c.job.step, "step stopped: its job was cancelled or taken over")
            }
            Some(r) => {
                if let Err(e) = self.finish(&c, r, started.elapsed()).await {
                    tracing::warn!(job = %c.job.id, "recording the step's result failed: {e}");
                }
            }
        }
        self.wake.notify_waiters();
    }

    async fn execute(&self, c: &ClaimedJob) -> Result<StepOutput, AdapterError> {
        let m = self
            .store
            .get_migration(c.job.migration_id)
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?;
        let ctx = self.context(m).await?;
        tokio::fs::create_dir_all(&ctx.work_dir).await?;
        if self.config.step_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.config.step_delay_ms)).await;
        }
        let _ = self
            .store
            .insert_log(
                Some(ctx.migration.id),
                &self.config.owner,
                "info",
                &format!("running step {} (attempt {})", c.job.step, c.job.attempts),
            )
            .await;
        let source = || self.adapters.source(&ctx);
        let target = || self.adapters.target(&ctx);
        let checks = &ctx.profile.spec.validation;
        let mut out = StepOutput::default();
        match c.job.step {
            Step::Preflight => {
                source()?.preflight(&ctx).await?;
                target()?.preflight(&ctx).await?;
            }
            // The shutdown delta reads the disks of a source that is off: what its
            // shutdown wrote after the final delta reaches the target too.
            Step::FullSync | Step::DeltaSync | Step::FinalDelta | Step::ShutdownDelta => {
                let full = c.job.step == Step::FullSync;
                out.sync = Some(self.sync_disks(&ctx, full).await?);
            }
            Step::StartTestInstance => {
                out.boot = target()?
                    .prepare_boot(&ctx, CheckPhase::Uat)
                    .await
                    .map_err(|e| e.context("preparing the test instance's disks"))?
                    .map(|b| (CheckPhase::Uat, b));
                target()?.start_test_instance(&ctx).await?;
                // With checks in the profile the verdict is theirs, recorded whatever it
                // is (a failed check fails the UAT, not the step that booted the instance);
                // without, people test and give the verdict.
                if !checks.is_empty() {
                    let verdict = target()?.validate(&ctx, CheckPhase::Uat, checks, &[]).await;
                    out.uat = Some(verdict.map_err(|e| e.message));
                }
            }
            Step::StopTestInstance => target()?.stop_test_instance(&ctx).await?,
            Step::StopServices => {
                let mut services = ctx.profile.spec.services_to_stop.clone();
                services.extend(ctx.workload.services.iter().cloned());
                source()?.stop_services(&ctx, &services).await?;
                // What the target must hold once cut over (e.g. the last record the
                // source acknowledged), read now that nothing changes any more.
                let mut facts = CutoverFacts::default();
                for (i, check) in checks.iter().enumerate() {
                    if let Some(cmd) = check.params.get("capture") {
                        let v = source()?
                            .guest_command(&ctx, cmd)
                            .await
                            .map_err(|e| e.context(format!("capturing check {i} on the source")))?;
                        facts.captured.insert(i, v.trim().to_string());
                    }
                }
                out.facts = Some(facts);
            }
            Step::ShutdownSource => source()?.shutdown(&ctx).await?,
            Step::StartTarget => {
                out.boot = target()?
                    .prepare_boot(&ctx, CheckPhase::Final)
                    .await
                    .map_err(|e| e.context("preparing the production instance's disks"))?
                    .map(|b| (CheckPhase::Final, b));
                target()?.start_production(&ctx).await?;
            }
            Step::PostCutover => {
                let undo = target()?
                    .post_cutover(&ctx, &ctx.profile.spec.post_cutover)
                    .await?;
                let mut facts = ctx.facts.clone();
                facts.undo = undo;
                out.facts = Some(facts);
            }
            Step::FinalValidation => {
                if target()?.wants_source_disks(checks) {
                    let src = source()?;
                    let disks = src.open_disks(&ctx, false).await?;
                    let r = target()?
                        .validate(&ctx, CheckPhase::Final, checks, &disks)
                        .await;
                    src.close_disks(&ctx, &disks, false).await?;
                    r?;
                } else {
                    target()?
                        .validate(&ctx, CheckPhase::Final, checks, &[])
                        .await?;
                }
            }
            Step::Rollback => {
                target()?.remove(&ctx).await?;
                if let Ok(src) = source() {
                    src.restart(&ctx).await?;
                }
            }
        }
        Ok(out)
    }

    /// One sync of every disk: point-in-time views from the source, the data plane into
    /// the target, the views released whatever happened.
    async fn sync_disks(&self, ctx: &StepContext, full: bool) -> Result<SyncRun, AdapterError> {
        let source = self.adapters.source(ctx)?;
        let target = self.adapters.target(ctx)?;
        let started = ferry_store::now_ms();
        let disks = source.open_disks(ctx, full).await?;
        let mut total = SyncStats::default();
        let mut result = target.begin_sync(ctx, &disks).await;
        let began = result.is_ok();
        for (i, d) in disks.iter().enumerate() {
            if result.is_err() {
                break;
            }
            let progress = Arc::new(ferry_adapter::SyncProgress::default());
            if let Ok(mut r) = self.running.lock() {
                r.insert(
                    ctx.migration.id,
                    RunningSync {
                        started_ms: started,
                        disk: i + 1,
                        disks: disks.len(),
                        disk_name: d.name.clone(),
                        progress: Arc::clone(&progress),
                        sent_before: total.bytes_sent,
                    },
                );
            }
            let r = async {
                let dst = target.disk_destination(ctx, d).await?;
                self.adapters
                    .replicator
                    .sync_observed(d, &dst, progress)
                    .await
            }
            .await;
            match r {
                Ok(s) => total.add(&s),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Ok(mut r) = self.running.lock() {
            r.remove(&ctx.migration.id);
        }
        // The target first: a failed sync is rolled back there before the source forgets
        // anything.
        let ended = if began {
            target.end_sync(ctx, result.is_ok()).await
        } else {
            Ok(())
        };
        let committed = result.is_ok() && ended.is_ok();
        let closed = source.close_disks(ctx, &disks, committed).await;
        result?;
        ended?;
        closed?;
        Ok(SyncRun {
            id: Uuid::new_v4(),
            migration_id: ctx.migration.id,
            kind: if full {
                SyncKind::Full
            } else {
                SyncKind::Delta
            },
            generation: ctx.migration.status.generation + 1,
            bytes_total: total.bytes_total,
            bytes_sent: total.bytes_sent,
            started_at: started,
            finished_at: ferry_store::now_ms(),
        })
    }

    fn backoff_ms(&self, attempt: i64) -> i64 {
        let exp = self
            .config
            .backoff_base_ms
            .saturating_mul(1i64 << (attempt.clamp(1, 20) - 1));
        exp.min(self.config.backoff_max_ms)
    }

    async fn finish(
        &self,
        c: &ClaimedJob,
        result: Result<StepOutput, AdapterError>,
        took: Duration,
    ) -> Result<(), StoreError> {
        let step = c.job.step;
        if let Err(e) = &result {
            let _ = self
                .store
                .insert_log(
                    Some(c.job.migration_id),
                    &self.config.owner,
                    "error",
                    &format!("step {step} attempt {} failed: {e}", c.job.attempts),
                )
                .await;
            if e.retryable && c.job.attempts < c.job.max_attempts {
                let at = ferry_store::now_ms() + self.backoff_ms(c.job.attempts);
                self.store.retry_job_later(c, at, &e.message).await?;
                return Ok(());
            }
        }
        for _ in 0..10 {
            let m = self.store.get_migration(c.job.migration_id).await?;
            let input = match &result {
                Ok(_) => Input::StepSucceeded(step),
                Err(_) => Input::StepFailed(step),
            };
            let (status, effects) = match transition(&m.status, input) {
                Ok(t) => t,
                Err(refusal) => {
                    tracing::info!(job = %c.job.id, "step result no longer applies: {refusal}");
                    return Ok(());
                }
            };
            let mut ch = Change::new(&m, status.clone());
            ch.complete_job = Some((c.job.id, c.token));
            run_effects(&mut ch, &effects, self.config.max_attempts);
            let now = ferry_store::now_ms();
            ch.next_sync_at = Some(next_sync(&m.schedule, &status, now));
            match &result {
                Ok(out) => {
                    let mut ev = NewEvent::new(
                        Some(m.id),
                        "step.completed",
                        format!("step {step} completed in {} ms", took.as_millis()),
                    );
                    ev.step = Some(step);
                    ev.job_id = Some(c.job.id);
                    ev.data = serde_json::json!({"attempt": c.job.attempts, "owner": self.config.owner, "ms": took.as_millis() as u64});
                    if let Some(s) = &out.sync {
                        ev.data["bytes_total"] = s.bytes_total.into();
                        ev.data["bytes_sent"] = s.bytes_sent.into();
                    }
                    ch.events.push(ev);
                    if let Some(f) = &out.facts {
                        let mut ev = NewEvent::new(
                            Some(m.id),
                            FACTS_EVENT,
                            format!("cutover facts recorded by {step}"),
                        );
                        ev.step = Some(step);
                        ev.data = serde_json::to_value(f).unwrap_or_default();
                        ch.events.push(ev);
                    }
                    if let Some((phase, b)) = &out.boot {
                        let phase = match phase {
                            CheckPhase::Uat => "uat",
                            CheckPhase::Final => "production",
                        };
                        let mut ev = NewEvent::new(
                            Some(m.id),
                            CONVERSION_EVENT,
                            format!("{phase} boot: {}", b.summary),
                        );
                        ev.step = Some(step);
                        ev.data = serde_json::json!({"phase": phase, "ms": b.ms, "converted": b.converted, "details": b.data});
                        ch.events.push(ev);
                        for w in &b.warnings {
                            let mut ev = NewEvent::new(Some(m.id), WARNING_EVENT, w.clone());
                            ev.step = Some(step);
                            ch.events.push(ev);
                        }
                    }
                    if let Some(v) = &out.uat {
                        let mut ev = NewEvent::new(
                            Some(m.id),
                            "uat.validation",
                            match v {
                                Ok(()) => "UAT validation passed".to_string(),
                                Err(e) => format!("UAT validation failed: {e}"),
                            },
                        );
                        ev.data =
                            serde_json::json!({"passed": v.is_ok(), "error": v.as_ref().err()});
                        ch.events.push(ev);
                    }
                    if step == Step::FinalValidation {
                        ch.events.push(self.downtime_event(m.id, took).await?);
                    }
                    ch.sync_run = out.sync.clone();
                    ch.last_error = Some(None);
                }
                Err(e) => {
                    ch.job_failed = true;
                    let mut ev = NewEvent::new(
                        Some(m.id),
                        "step.failed",
                        format!("step {step} failed: {}", e.message),
                    );
                    ev.step = Some(step);
                    ev.job_id = Some(c.job.id);
                    ev.data = serde_json::json!({"attempt": c.job.attempts, "error": e.message});
                    ch.events.push(ev);
                    ch.last_error = Some(Some(e.message.clone()));
                }
            }
            ch.events
                .push(state_event(&m, m.status.state, status.state, step.as_str()));
            match self.store.apply(ch).await {
                Ok(_) => {
                    if let Ok(StepOutput { uat: Some(v), .. }) = &result {
                        let cmd = if v.is_ok() {
                            Command::UatPass
                        } else {
                            Command::UatFail
                        };
                        if let Err(e) = self.command(m.id, cmd, "validation").await {
                            tracing::warn!(migration = %m.id, "recording the UAT verdict failed: {}", e.message);
                        }
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(c.job.migration_id))
    }

    /// Downtime of the cutover that final validation just passed: from the start of
    /// `stop_services` to now, by phase (the steps' own durations; `other_ms` is the time
    /// between steps: queueing and bookkeeping).
    async fn downtime_event(&self, id: Uuid, validation: Duration) -> Result<NewEvent, StoreError> {
        // (phase, completed at, ms); a guest's conversion is shown apart from the boot
        // of the step it ran in.
        let mut phases: Vec<(String, i64, i64)> = vec![];
        let mut after = 0;
        let mut conversion_ms = 0;
        loop {
            let page = self.store.list_events(Some(id), after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for e in &page {
                if e.kind == CONVERSION_EVENT && e.step == Some(Step::StartTarget) {
                    let c = e.data.get("ms").and_then(|v| v.as_i64()).unwrap_or(0);
                    // Recorded with the step's completion, just after it.
                    match phases.last_mut() {
                        Some((s, at, ms)) if s == Step::StartTarget.as_str() && c > 0 => {
                            let c = c.min(*ms);
                            *ms -= c;
                            let at = *at;
                            phases.insert(phases.len() - 1, ("conversion".into(), at, c));
                        }
                        _ => conversion_ms += c,
                    }
                    continue;
                }
                let Some(step) = e.step.filter(|_| e.kind == "step.completed") else {
                    continue;
                };
                let ms = e.data.get("ms").and_then(|v| v.as_i64()).unwrap_or(0);
                if step == Step::StopServices {
                    phases.clear();
                    conversion_ms = 0;
                }
                if CUTOVER_STEPS.contains(&step) {
                    if step == Step::StartTarget && conversion_ms > 0 {
                        let c = conversion_ms.min(ms);
                        phases.push(("conversion".into(), e.at, c));
                        phases.push((step.to_string(), e.at, ms - c));
                        conversion_ms = 0;
                    } else {
                        phases.push((step.to_string(), e.at, ms));
                    }
                }
            }
        }
        let now = ferry_store::now_ms();
        let v_ms = validation.as_millis() as i64;
        phases.push((Step::FinalValidation.to_string(), now, v_ms));
        let start = match phases.first() {
            Some((s, at, ms)) if s == Step::StopServices.as_str() => at - ms,
            _ => now - v_ms,
        };
        let total = (now - start).max(0);
        let sum: i64 = phases.iter().map(|p| p.2).sum();
        let list: Vec<serde_json::Value> = phases
            .iter()
            .map(|(s, _, ms)| serde_json::json!({"phase": s, "ms": ms}))
            .collect();
        let mut ev = NewEvent::new(
            Some(id),
            DOWNTIME_EVENT,
            format!(
                "downtime {:.1} s (stop services → target passed validation)",
                total as f64 / 1000.0
            ),
        );
        ev.data = serde_json::json!({"total_ms": total, "phases": list, "other_ms": (total - sum).max(0)});
        Ok(ev)
    }

    /// One pass of the scheduler: due deltas and move-group cutovers.
    pub async fn schedule_tick(&self) -> Result<(), StoreError> {
        // One scheduler at a time among the appliances sharing the store.
        if !self
            .store
            .try_lease("scheduler", &self.config.owner, 5_000)
            .await?
        {
            return Ok(());
        }
        let now = ferry_store::now_ms();
        for m in self.store.due_syncs(now, 100).await? {
            match m.state() {
                State::Synced | State::Uat => {
                    if let Err(e) = self.command(m.id, Command::Sync, "scheduler").await {
                        tracing::debug!(migration = %m.id, "scheduled delta not started: {}", e.message);
                    }
                }
                _ => {
                    // A step is running or the migration moved on: its completion reschedules.
                    let mut c = Change::new(&m, m.status.clone());
                    c.next_sync_at = Some(None);
                    let _ = self.store.apply(c).await;
                }
            }
        }
        for g in self.store.groups_with_cutover().await? {
            self.group_cutover_tick(&g).await?;
        }
        Ok(())
    }

    async fn group_cutover_tick(&self, g: &MoveGroup) -> Result<(), StoreError> {
        let filter = ferry_store::MigrationFilter {
            move_group_id: Some(g.id),
            ..Default::default()
        };
        let mut members: Vec<(i32, Migration)> = vec![];
        let mut offset = 0;
        loop {
            let (page, total) = self
                .store
                .list_migrations(&filter, ferry_store::Page { limit: 500, offset })
                .await?;
            for m in page {
                let w = self.store.get_workload(&m.workload_id.to_string()).await?;
                members.push((w.group_order, m));
            }
            offset += 500;
            if offset >= total {
                break;
            }
        }
        members.sort_by_key(|(o, m)| (*o, m.created_at));
        let in_flight = members
            .iter()
            .filter(|(_, m)| m.state().is_cutover())
            .count();
        let mut slots = (g.concurrency.max(1) as usize).saturating_sub(in_flight);
        let mut blocked_from: Option<i32> = None;
        let mut pending = 0;
        for (order, m) in &members {
            let st = m.state();
            if st.is_terminal() {
                continue;
            }
            if let Some(b) = blocked_from {
                if *order > b {
                    pending += 1;
                    continue;
                }
            }
            if st == State::Synced && slots > 0 {
                match self
                    .command(m.id, Command::Cutover, &format!("move group {}", g.name))
                    .await
                {
                    Ok(_) => slots -= 1,
                    Err(e) => {
                        tracing::info!(migration = %m.id, "group cutover skipped: {}", e.message)
                    }
                }
            }
            pending += 1;
            // Later orders wait until every member of this order is finished.
            blocked_from.get_or_insert(*order);
        }
        if pending == 0 {
            self.store.set_group_cutover(g.id, false).await?;
            let mut ev = NewEvent::new(
                None,
                "group.cutover.done",
                format!("move group {} cut over", g.name),
            );
            ev.data = serde_json::json!({"move_group_id": g.id});
            self.store.insert_event(&ev).await?;
        }
        Ok(())
    }

    pub async fn run_scheduler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.schedule_tick().await {
                tracing::warn!("scheduler pass failed: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
}
