//! `ferry migration`: start, watch and steer migrations.

use super::client::{
    details, enc, opt, print_json, print_page_footer, table, when, Client, ClientArgs, PageArgs,
};
use super::source::Paged;
use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use ferry_model::{Command, DeltaSchedule, Event, LogLine, Migration, ScheduleMode, State};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MigrationArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: MigrationCommand,
}

#[derive(Subcommand, Debug)]
pub enum MigrationCommand {
    /// Start migrating a workload with a profile (pre-flight, then the initial sync).
    Start {
        /// Workload name or id.
        workload: String,
        #[arg(long)]
        profile: String,
        /// Create it without starting.
        #[arg(long)]
        no_start: bool,
        /// Follow with a progress bar until the initial sync is done.
        #[arg(long)]
        follow: bool,
    },
    /// List migrations.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Where a migration stands (id, or the workload's name).
    #[command(alias = "show")]
    Status {
        migration: String,
        /// Follow until the running steps are done.
        #[arg(long)]
        follow: bool,
    },
    /// A delta sync now.
    Sync {
        migration: String,
        #[arg(long)]
        follow: bool,
    },
    /// Set the delta schedule: --manual, --cron EXPR or --continuous.
    Schedule {
        migration: String,
        #[arg(long, conflicts_with_all = ["cron", "continuous"])]
        manual: bool,
        /// Five-field cron expression, UTC (e.g. "0 */2 * * *").
        #[arg(long)]
        cron: Option<String>,
        #[arg(long)]
        continuous: bool,
        /// Least seconds between continuous deltas.
        #[arg(long, default_value_t = 60)]
        min_interval: u64,
    },
    /// User acceptance testing on a test instance.
    #[command(subcommand)]
    Uat(UatCommand),
    /// Stop services, final delta, shut the source down, a last delta of what the shutdown
    /// wrote, start the target.
    Cutover {
        migration: String,
        #[arg(long)]
        follow: bool,
    },
    /// Roll back: remove the target instance, restart the source if it was shut down.
    Rollback {
        migration: String,
        #[arg(long)]
        follow: bool,
    },
    /// Re-run the step that failed (and what follows it).
    Retry {
        migration: String,
        #[arg(long)]
        follow: bool,
    },
    /// Cancel before cutover.
    Cancel { migration: String },
    /// Log lines from the steps, workers and agents.
    Logs { migration: String },
    /// The audit trail.
    Events {
        migration: String,
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum UatCommand {
    /// Boot the test instance in the isolated network.
    Start {
        migration: String,
        #[arg(long)]
        follow: bool,
    },
    /// Tear the test instance down without a verdict.
    Stop { migration: String },
    /// Record a pass (and tear the test instance down).
    Pass { migration: String },
    /// Record a failure (and tear the test instance down).
    Fail { migration: String },
}

/// A migration by id, or by its workload's name (the latest migration of that workload).
async fn resolve(c: &Client, key: &str) -> Result<uuid::Uuid> {
    if let Ok(id) = uuid::Uuid::parse_str(key) {
        return Ok(id);
    }
    let p: Paged<Migration> = c
        .get(&format!("/api/migrations?workload={}&limit=500", enc(key)))
        .await?;
    p.items
        .iter()
        .filter(|m| !m.status.state.is_terminal())
        .chain(p.items.iter())
        .max_by_key(|m| (!m.status.state.is_terminal(), m.created_at))
        .map(|m| m.id)
        .ok_or_else(|| anyhow!("workload {key:?} has no migration; start one with `ferry migration start {key} --profile P`"))
}

fn status_rows(m: &Migration, detail: &Value) -> Vec<(&'static str, String)> {
    let allowed = detail["allowed_commands"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    vec![
        ("migration", m.id.to_string()),
        ("workload", m.workload_name.clone()),
        ("state", m.status.state.to_string()),
        (
            "running step",
            detail["running_step"].as_str().unwrap_or("-").to_string(),
        ),
        ("syncs completed", m.status.generation.to_string()),
        (
            "UAT verdict",
            opt(&m
                .status
                .uat_verdict
                .map(|v| format!("{v:?}").to_lowercase())),
        ),
        ("source shut down", m.status.source_down.to_string()),
        ("schedule", m.schedule.mode.to_string()),
        (
            "next delta",
            m.next_sync_at.map(when).unwrap_or_else(|| "-".into()),
        ),
        ("last error", opt(&m.last_error)),
        ("allowed commands", allowed),
        ("updated", when(m.updated_at)),
    ]
}

const PATH: [State; 17] = [
    State::Onboarded,
    State::Preflight,
    State::Ready,
    State::InitialSync,
    State::Synced,
    State::DeltaSync,
    State::UatStarting,
    State::Uat,
    State::UatStopping,
    State::StoppingServices,
    State::FinalDelta,
    State::ShuttingDownSource,
    State::ShutdownDelta,
    State::StartingTarget,
    State::PostCutover,
    State::FinalValidation,
    State::Completed,
];

/// Polls until the migration rests (no step running), with a progress bar on a terminal.
async fn follow(c: &Client, id: uuid::Uuid) -> Result<Migration> {
    let bar = if c.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(PATH.len() as u64 - 1)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let d: Value = c.get(&format!("/api/migrations/{id}")).await?;
        let m: Migration = serde_json::from_value(d["migration"].clone())?;
        let st = m.status.state;
        if let Some(pos) = PATH.iter().position(|s| *s == st) {
            bar.set_position(pos as u64);
        }
        bar.set_message(format!("{} {}", m.workload_name, st));
        if !st.is_running() {
            bar.finish_with_message(format!("{} {}", m.workload_name, st));
            return Ok(m);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn command(c: &Client, key: &str, cmd: Command, then_follow: bool) -> Result<ExitCode> {
    let id = resolve(c, key).await?;
    let m: Migration = c
        .post(
            &format!("/api/migrations/{id}/commands"),
            &serde_json::json!({"command": cmd}),
        )
        .await?;
    let m = if then_follow { follow(c, id).await? } else { m };
    if c.json {
        print_json(&m)?;
    } else {
        println!("{} {}: {}", m.workload_name, m.id, m.status.state);
    }
    Ok(outcome(&m))
}

/// The exit code a script sees for where a migration came to rest: non-zero when it
/// failed, with the failed step, its error and the ways on written to stderr.
fn outcome(m: &Migration) -> ExitCode {
    if m.status.state != State::Failed {
        return ExitCode::SUCCESS;
    }
    let step = m
        .status
        .failed_state
        .and_then(|s| s.step())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "?".into());
    eprintln!(
        "error: {}: step {step} failed: {}",
        m.workload_name,
        m.last_error.as_deref().unwrap_or("no error was recorded")
    );
    let ways = if m.status.failed_state == Some(State::RollingBack) {
        format!("ferry migration retry {}", m.id)
    } else {
        format!(
            "ferry migration retry {id}` (the same step again) or `ferry migration rollback {id}",
            id = m.id
        )
    };
    eprintln!(
        "  then: `{ways}`; the step's log: `ferry migration logs {}`",
        m.id
    );
    ExitCode::FAILURE
}

pub fn run(a: MigrationArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            MigrationCommand::Start { workload, profile, no_start, follow: f } => {
                let m: Migration = c.post("/api/migrations", &serde_json::json!({"workload": workload, "profile": profile, "start": !no_start})).await?;
                let m = if f && !no_start { follow(&c, m.id).await? } else { m };
                if c.json {
                    print_json(&m)?;
                } else {
                    println!("migration {} of {}: {}", m.id, m.workload_name, m.status.state);
                }
                Ok(outcome(&m))
            }
            MigrationCommand::List { state, group, workload, page } => {
                let mut q = page.query();
                for (k, v) in [("state", state), ("group", group), ("workload", workload)] {
                    if let Some(v) = v {
                        q.push_str(&format!("&{k}={}", enc(&v)));
                    }
                }
                let p: Paged<Migration> = c.get(&format!("/api/migrations?{q}")).await?;
                if c.json {
                    print_json(&p.items)?;
                    return Ok(ExitCode::SUCCESS);
                }
                let rows = p.items.iter().map(|m| vec![m.workload_name.clone(), m.status.state.to_string(), m.status.generation.to_string(), opt(&m.last_error), when(m.updated_at), m.id.to_string()]).collect();
                println!("{}", table(&["WORKLOAD", "STATE", "SYNCS", "LAST ERROR", "UPDATED", "ID"], rows));
                print_page_footer(p.total, p.items.len(), p.offset);
                Ok(ExitCode::SUCCESS)
            }
            MigrationCommand::Status { migration, follow: f } => {
                let id = resolve(&c, &migration).await?;
                if f {
                    follow(&c, id).await?;
                }
                let d: Value = c.get(&format!("/api/migrations/{id}")).await?;
                let m: Migration = serde_json::from_value(d["migration"].clone())?;
                // Following, a script waits for an outcome: a failed migration is one.
                let code = if f { outcome(&m) } else { ExitCode::SUCCESS };
                if c.json {
                    print_json(&d)?;
                    return Ok(code);
                }
                println!("{}", details(status_rows(&m, &d)));
                if let Some(syncs) = d["syncs"].as_array().filter(|s| !s.is_empty()) {
                    let rows = syncs.iter().map(|s| vec![s["generation"].to_string(), s["kind"].as_str().unwrap_or("").into(), s["bytes_total"].to_string(), s["bytes_sent"].to_string(), format!("{} ms", s["finished_at"].as_i64().unwrap_or(0) - s["started_at"].as_i64().unwrap_or(0))]).collect();
                    println!("{}", table(&["GEN", "KIND", "BYTES", "SENT", "TOOK"], rows));
                }
                if let Some(dt) = d["downtime"].as_object() {
                    let secs = |v: &Value| format!("{:.1} s", v.as_i64().unwrap_or(0) as f64 / 1000.0);
                    let mut rows: Vec<Vec<String>> = dt.get("phases").and_then(|p| p.as_array()).into_iter().flatten().map(|p| vec![p["phase"].as_str().unwrap_or("").to_string(), secs(&p["ms"])]).collect();
                    rows.push(vec!["between steps".into(), secs(&dt["other_ms"])]);
                    rows.push(vec!["downtime".into(), secs(&dt["total_ms"])]);
                    println!("downtime (stop services → target passed validation):\n{}", table(&["PHASE", "TIME"], rows));
                }
                Ok(code)
            }
            MigrationCommand::Sync { migration, follow: f } => command(&c, &migration, Command::Sync, f).await,
            MigrationCommand::Schedule { migration, manual: _, cron, continuous, min_interval } => {
                let id = resolve(&c, &migration).await?;
                let mode = if cron.is_some() { ScheduleMode::Cron } else if continuous { ScheduleMode::Continuous } else { ScheduleMode::Manual };
                if let Some(expr) = &cron {
                    ferry_model::CronSchedule::parse(expr)?;
                }
                let m: Migration = c.put(&format!("/api/migrations/{id}/schedule"), &DeltaSchedule { mode, cron, min_interval_secs: min_interval }).await?;
                if c.json {
                    return print_json(&m).map(|_| ExitCode::SUCCESS);
                }
                println!("{}: schedule {}, next delta {}", m.workload_name, m.schedule.mode, m.next_sync_at.map(when).unwrap_or_else(|| "-".into()));
                Ok(ExitCode::SUCCESS)
            }
            MigrationCommand::Uat(u) => match u {
                UatCommand::Start { migration, follow: f } => command(&c, &migration, Command::UatStart, f).await,
                UatCommand::Stop { migration } => command(&c, &migration, Command::UatStop, false).await,
                UatCommand::Pass { migration } => command(&c, &migration, Command::UatPass, false).await,
                UatCommand::Fail { migration } => command(&c, &migration, Command::UatFail, false).await,
            },
            MigrationCommand::Cutover { migration, follow: f } => command(&c, &migration, Command::Cutover, f).await,
            MigrationCommand::Rollback { migration, follow: f } => command(&c, &migration, Command::Rollback, f).await,
            MigrationCommand::Retry { migration, follow: f } => command(&c, &migration, Command::Retry, f).await,
            MigrationCommand::Cancel { migration } => command(&c, &migration, Command::Cancel, false).await,
            MigrationCommand::Logs { migration } => {
                let id = resolve(&c, &migration).await?;
                let logs: Vec<LogLine> = c.get(&format!("/api/migrations/{id}/logs?limit=1000")).await?;
                if c.json {
                    return print_json(&logs).map(|_| ExitCode::SUCCESS);
                }
                for l in logs {
                    println!("{} {:5} [{}] {}", when(l.at), l.level, l.origin, l.message);
                }
                Ok(ExitCode::SUCCESS)
            }
            MigrationCommand::Events { migration, follow: f } => {
                let id = resolve(&c, &migration).await?;
                let mut after = 0;
                loop {
                    let evs: Vec<Event> = c.get(&format!("/api/migrations/{id}/events?after={after}&limit=1000")).await?;
                    for e in &evs {
                        if c.json {
                            println!("{}", serde_json::to_string(e)?);
                        } else {
                            println!("{} #{:<6} {:<18} {}", when(e.at), e.id, e.kind, e.message);
                        }
                        after = e.id;
                    }
                    if !f {
                        break;
                    }
                    if evs.is_empty() {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
