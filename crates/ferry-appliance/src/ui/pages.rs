//! The dashboard's pages and the forms they post.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use ferry_model::*;
use ferry_store::{MigrationFilter, Page, WorkloadFilter};
use maud::{html, Markup};
use serde::Deserialize;

use super::view::{self, bytes, page, progress, state_badge, sync_chart, when};
use crate::api::{AppState, Caller};
use crate::error::ApiError;

const ALL: Page = Page {
    limit: 500,
    offset: 0,
};

/// A failed page: rendered as an error page that says what went wrong (and keeps the
/// navigation).
pub struct UiError(Box<ApiError>);

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let e = self.0;
        (
            e.status,
            view::html(page(
                "Something went wrong",
                html! { p.error role="alert" { (e.message) } p { a href="/ui/" { "Back to the overview" } } },
            )),
        )
            .into_response()
    }
}

fn fail(e: ApiError) -> UiError {
    UiError(Box::new(e))
}

type UiResult = Result<Response, UiError>;

fn api<T>(r: Result<T, impl Into<ApiError>>) -> Result<T, UiError> {
    r.map_err(|e| fail(e.into()))
}

/// What a command will do, said before it is done.
fn explain(c: Command) -> &'static str {
    match c {
        Command::Preflight => "Run the pre-flight checks against the source and the target. Nothing is copied.",
        Command::Start => "Run the pre-flight checks, then the initial full sync of every disk to the target. The source keeps running.",
        Command::Sync => "Run a delta sync now: only what changed since the last sync is copied. The source keeps running.",
        Command::UatStart => "Boot a test copy of the last synced generation on the isolated migration network. Replication into the target goes on meanwhile.",
        Command::UatStop => "Stop and remove the test copy.",
        Command::UatPass => "Record that the test copy passed user acceptance: cutover becomes possible.",
        Command::UatFail => "Record that the test copy failed user acceptance: cutover stays refused.",
        Command::Cutover => "Stop the source's services, run the final delta, shut the source down, copy what its shutdown wrote, and start the workload on the target's production network. The source stays down until a rollback.",
        Command::Rollback => "Stop the workload on the target and start the source again.",
        Command::Retry => "Run again the step that failed.",
        Command::Cancel => "Stop this migration for good. Data already on the target stays.",
    }
}

fn label(c: Command) -> &'static str {
    match c {
        Command::Preflight => "Pre-flight",
        Command::Start => "Start",
        Command::Sync => "Sync now",
        Command::UatStart => "Start UAT",
        Command::UatStop => "Stop UAT",
        Command::UatPass => "UAT passed",
        Command::UatFail => "UAT failed",
        Command::Cutover => "Cut over",
        Command::Rollback => "Roll back",
        Command::Retry => "Retry",
        Command::Cancel => "Cancel",
    }
}

async fn latest_sync(st: &AppState, m: &Migration) -> Result<Option<SyncRun>, UiError> {
    Ok(api(st.store().list_syncs(m.id).await)?.into_iter().last())
}

/// How far the target is behind, when deltas are scheduled: the time since the last
/// sync, if over twice the schedule's interval (at least ten minutes; an hour for cron).
fn lag(m: &Migration, last: Option<&SyncRun>) -> Option<i64> {
    let last = last?;
    if m.state().is_terminal() || m.schedule.mode == ScheduleMode::Manual {
        return None;
    }
    let allowed = match m.schedule.mode {
        ScheduleMode::Cron => 3_600_000,
        _ => (m.schedule.min_interval_secs as i64 * 2000).max(600_000),
    };
    let behind = view::now_ms() - last.finished_at;
    (behind > allowed).then_some(behind)
}

fn needs_attention(m: &Migration, last: Option<&SyncRun>) -> Option<String> {
    if let Some(l) = lag(m, last) {
        return Some(format!("lagging: last sync {} ago", view::duration(l)));
    }
    if m.state() == State::Failed {
        return Some(m.last_error.clone().unwrap_or_else(|| "failed".to_string()));
    }
    if m.status.uat_verdict == Some(UatVerdict::Failed) {
        return Some("UAT failed".into());
    }
    None
}

fn migrations_table(
    rows: &[(Migration, Option<SyncRun>)],
    warnings: &HashMap<uuid::Uuid, i64>,
) -> Markup {
    html! {
        table.migrations {
            thead { tr { th { "Workload" } th { "State" } th { "Generation" } th { "Last sync" } th { "Lag" } th { "Next delta" } th { "UAT" } th { "Warnings" } } }
            tbody {
                @for (m, last) in rows {
                    tr id={"m-" (m.id)} {
                        td { a href={"/ui/migrations/" (m.id)} { (m.workload_name) } }
                        td.state { (state_badge(m.state())) }
                        td { (m.status.generation) }
                        td { @if let Some(s) = last { (when(s.finished_at)) " (" (bytes(s.bytes_sent)) ")" } @else { "—" } }
                        td { @if let Some(l) = lag(m, last.as_ref()) { span.error { (view::duration(l)) } } @else { "—" } }
                        td { @if let Some(n) = m.next_sync_at { (when(n)) } @else { "manual" } }
                        td { @match m.status.uat_verdict { Some(UatVerdict::Passed) => "passed", Some(UatVerdict::Failed) => "failed", None => "—" } }
                        td.warnings { @match warnings.get(&m.id) { Some(n) => a href={"/ui/migrations/" (m.id) "?kind=warning"} { (n) }, None => "—" } }
                    }
                }
            }
        }
    }
}

pub async fn overview(AxState(st): AxState<AppState>) -> UiResult {
    let counts = api(st.store().count_by_state().await)?;
    let warnings = api(st
        .store()
        .count_events_by_migration(crate::engine::WARNING_EVENT)
        .await)?;
    let (migrations, _) = api(st
        .store()
        .list_migrations(&MigrationFilter::default(), ALL)
        .await)?;
    let (groups, _) = api(st.store().list_groups(ALL).await)?;
    let today = {
        let now = time::OffsetDateTime::now_utc();
        now.replace_time(time::Time::MIDNIGHT).unix_timestamp() * 1000
    };
    let mut moved_today = 0u64;
    let mut rows = vec![];
    for m in &migrations {
        let syncs = api(st.store().list_syncs(m.id).await)?;
        moved_today += syncs
            .iter()
            .filter(|s| s.finished_at >= today)
            .map(|s| s.bytes_sent)
            .sum::<u64>();
        rows.push((m.clone(), syncs.last().cloned()));
    }
    let mut group_rows = vec![];
    for g in &groups {
        let f = MigrationFilter {
            move_group_id: Some(g.id),
            ..Default::default()
        };
        let (ms, total) = api(st.store().list_migrations(&f, ALL).await)?;
        let mut per: BTreeMap<&'static str, i64> = BTreeMap::new();
        for m in &ms {
            *per.entry(m.state().as_str()).or_default() += 1;
        }
        let synced = ms
            .iter()
            .filter(|m| m.status.generation > 0 || m.state() == State::Completed)
            .count() as i64;
        group_rows.push((g.clone(), per, synced, total));
    }
    let attention: Vec<(&Migration, String)> = rows
        .iter()
        .filter_map(|(m, last)| needs_attention(m, last.as_ref()).map(|why| (m, why)))
        .collect();
    Ok(view::html(page(
        "Overview",
        html! {
            section aria-labelledby="h-counts" {
                h2 #h-counts { "Migrations by state" }
                ul.counts {
                    @for (s, n) in &counts { li { (state_badge(*s)) " " span.n data-count=(s.as_str()) { (n) } } }
                    @if counts.is_empty() { li.muted { "No migration yet: start one from " a href="/ui/workloads" { "Workloads" } "." } }
                }
                p { "Data moved today: " strong #moved-today { (bytes(moved_today)) } }
                p { "Warnings: " strong #warnings { (warnings.values().sum::<i64>()) } " in " (warnings.len()) " migration(s)" }
            }
            @if !attention.is_empty() {
                section.attention aria-labelledby="h-attention" {
                    h2 #h-attention { "Needs attention" }
                    ul { @for (m, why) in &attention { li { a href={"/ui/migrations/" (m.id)} { (m.workload_name) } ": " (why) } } }
                }
            }
            section aria-labelledby="h-groups" {
                h2 #h-groups { "Move groups" }
                @if group_rows.is_empty() { p.muted { "No move group yet (the inventory import creates them from its move-group column)." } }
                @else {
                    table {
                        thead { tr { th { "Group" } th { "Target date" } th { "Synced" } th { "By state" } } }
                        tbody { @for (g, per, synced, total) in &group_rows {
                            tr {
                                td { a href={"/ui/groups/" (g.name)} { (g.name) } }
                                td { (g.target_date.clone().unwrap_or_default()) }
                                td { (progress(*synced, *total)) }
                                td { @for (s, n) in per { span.pair { (s) ": " (n) } " " } }
                            }
                        } }
                    }
                }
            }
            section aria-labelledby="h-migrations" {
                h2 #h-migrations { "Migrations" }
                (migrations_table(&rows, &warnings))
            }
        },
    )))
}

#[derive(Deserialize, Default)]
pub struct ConfirmQuery {
    confirm: Option<String>,
    done: Option<String>,
    kind: Option<String>,
    level: Option<String>,
}

pub async fn group(
    AxState(st): AxState<AppState>,
    Path(key): Path<String>,
    Query(q): Query<ConfirmQuery>,
) -> UiResult {
    let g = api(st.store().get_group(&key).await)?;
    let warnings = api(st
        .store()
        .count_events_by_migration(crate::engine::WARNING_EVENT)
        .await)?;
    let f = MigrationFilter {
        move_group_id: Some(g.id),
        ..Default::default()
    };
    let (ms, _) = api(st.store().list_migrations(&f, ALL).await)?;
    let mut rows = vec![];
    for m in &ms {
        rows.push((m.clone(), latest_sync(&st, m).await?));
    }
    let active: Vec<&Migration> = ms.iter().filter(|m| !m.state().is_terminal()).collect();
    let confirm = q
        .confirm
        .as_deref()
        .filter(|c| matches!(*c, "sync" | "cutover" | "uat_start"));
    Ok(view::html(page(
        &format!("Move group {}", g.name),
        html! {
            @if let Some(d) = &q.done { p.notice role="status" { (d) } }
            p { "Target date: " (g.target_date.clone().unwrap_or_else(|| "—".into())) " · cutover window: " (g.cutover_window.clone().unwrap_or_else(|| "—".into())) " · " (g.concurrency) " at a time" }
            @if let Some(c) = confirm {
                section.confirm role="alertdialog" aria-labelledby="h-confirm" {
                    h2 #h-confirm { "Confirm" }
                    @if c == "sync" {
                        p { "A delta sync now for each of these " (active.len()) " migrations: only what changed since their last sync is copied; the sources keep running." }
                    } @else if c == "uat_start" {
                        p { "Boot a test copy of each synced member on the isolated migration network; replication goes on meanwhile. Members not synced are skipped." }
                    } @else {
                        p { "Cut over the members that are synced, in their group order, " (g.concurrency) " at a time: services stop, a final delta runs, each source shuts down, what its shutdown wrote is copied, and the workload starts on the target's production network." }
                    }
                    ul { @for m in &active { li { (m.workload_name) " (" (m.state().as_str()) ")" } } }
                    form method="post" action={"/ui/groups/" (g.name) "/action"} {
                        input type="hidden" name="action" value=(c);
                        button type="submit" { "Yes, " (match c { "sync" => "sync now", "uat_start" => "start UAT", _ => "cut over" }) }
                        " " a href={"/ui/groups/" (g.name)} { "Cancel" }
                    }
                }
            } @else {
                p.actions {
                    a.button href={"/ui/groups/" (g.name) "?confirm=sync"} { "Sync all now…" }
                    " " a.button href={"/ui/groups/" (g.name) "?confirm=uat_start"} { "Start UAT for all…" }
                    " " a.button href={"/ui/groups/" (g.name) "?confirm=cutover"} { "Cut over the group…" }
                }
                form.inline method="post" action={"/ui/groups/" (g.name) "/action"} {
                    input type="hidden" name="action" value="schedule";
                    label for="mode" { "Delta schedule for all members" }
                    select #mode name="mode" { option value="manual" { "manual" } option value="continuous" { "continuous" } option value="cron" { "cron" } }
                    label for="cron" { "cron (UTC)" }
                    input #cron name="cron" placeholder="0 */4 * * *" size="14";
                    label for="interval" { "min. interval (s)" }
                    input #interval name="interval" type="number" min="1" value="300" size="6";
                    button type="submit" { "Set schedule" }
                }
            }
            (migrations_table(&rows, &warnings))
        },
    )))
}

#[derive(Deserialize)]
pub struct GroupAction {
    action: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    interval: Option<String>,
}

/// Runs `c` on every member the predicate picks; a sentence saying what happened.
async fn on_members(
    st: &AppState,
    g: &MoveGroup,
    caller: &Caller,
    c: Command,
    pick: impl Fn(&Migration) -> bool,
) -> Result<String, UiError> {
    let filter = MigrationFilter {
        move_group_id: Some(g.id),
        ..Default::default()
    };
    let (ms, _) = api(st.store().list_migrations(&filter, ALL).await)?;
    let (mut ok, mut skipped) = (0, vec![]);
    for m in ms.iter().filter(|m| pick(m)) {
        match st
            .engine
            .command(m.id, c, &format!("dashboard, token '{}'", caller.0))
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => skipped.push(format!("{}: {}", m.workload_name, e.message)),
        }
    }
    Ok(format!(
        "{} started for {ok} migration(s).{}",
        label(c),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(" Skipped: {}", skipped.join("; "))
        }
    ))
}

pub async fn group_action(
    AxState(st): AxState<AppState>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    Form(f): Form<GroupAction>,
) -> UiResult {
    let g = api(st.store().get_group(&key).await)?;
    let msg = match f.action.as_str() {
        "sync" => {
            on_members(&st, &g, &caller, Command::Sync, |m| {
                !m.state().is_terminal()
            })
            .await?
        }
        "uat_start" => {
            on_members(&st, &g, &caller, Command::UatStart, |m| {
                m.state() == State::Synced
            })
            .await?
        }
        "schedule" => {
            let spec = serde_json::json!({
                "mode": f.mode.as_deref().unwrap_or("manual"),
                "cron": f.cron.as_deref().map(str::trim).filter(|c| !c.is_empty()),
                "min_interval_secs": f.interval.as_deref().and_then(|i| i.trim().parse::<u64>().ok()).unwrap_or(60),
            });
            let schedule: DeltaSchedule = serde_json::from_value(spec)
                .map_err(|e| fail(ApiError::bad_request(format!("schedule: {e}"))))?;
            let filter = MigrationFilter {
                move_group_id: Some(g.id),
                ..Default::default()
            };
            let (ms, _) = api(st.store().list_migrations(&filter, ALL).await)?;
            let (mut ok, mut refused) = (0, vec![]);
            for m in ms.iter().filter(|m| !m.state().is_terminal()) {
                match st.engine.set_schedule(m.id, schedule.clone()).await {
                    Ok(_) => ok += 1,
                    Err(e) => refused.push(format!("{}: {}", m.workload_name, e.message)),
                }
            }
            format!(
                "Schedule {} set for {ok} migration(s).{}",
                schedule.mode.as_str(),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!(" Refused: {}", refused.join("; "))
                }
            )
        }
        "cutover" => {
            api(st.store().set_group_cutover(g.id, true).await)?;
            let mut ev = NewEvent::new(
                None,
                "group.cutover.requested",
                format!(
                    "cutover of move group {} requested from the dashboard",
                    g.name
                ),
            );
            ev.data = serde_json::json!({"move_group_id": g.id});
            api(st.store().insert_event(&ev).await)?;
            "Group cutover requested: members cut over in their order as they become ready."
                .to_string()
        }
        other => {
            return Err(fail(ApiError::bad_request(format!(
                "unknown action '{other}'"
            ))))
        }
    };
    Ok(Redirect::to(&format!(
        "/ui/groups/{}?done={}",
        urlencode(&g.name),
        urlencode(&msg)
    ))
    .into_response())
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub async fn migration(
    AxState(st): AxState<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ConfirmQuery>,
) -> UiResult {
    let id: uuid::Uuid = id.parse().map_err(|_| {
        fail(ApiError::bad_request(format!(
            "'{id}' is not a migration id"
        )))
    })?;
    let m = api(st.store().get_migration(id).await)?;
    let w = api(st.store().get_workload(&m.workload_id.to_string()).await)?;
    let profile = st.store().get_profile(&m.profile_id.to_string()).await.ok();
    let syncs = api(st.store().list_syncs(id).await)?;
    let events = api(st.store().list_events(Some(id), 0, 1000).await)?;
    let mut logs = api(st.store().list_logs(id, 0, 1000).await)?;
    let levels: std::collections::BTreeSet<String> = logs.iter().map(|l| l.level.clone()).collect();
    if let Some(level) = q.level.as_deref().filter(|l| !l.is_empty()) {
        logs.retain(|l| l.level == level);
    }
    let timeline = steps(&events);
    let downtime: Option<crate::api::Downtime> = api(st
        .store()
        .latest_event(id, crate::engine::DOWNTIME_EVENT)
        .await)?
    .and_then(|e| serde_json::from_value(e.data).ok());
    let running = st
        .engine
        .running
        .lock()
        .ok()
        .and_then(|r| r.get(&id).cloned());
    let allowed = allowed_commands(&m.status);
    let confirm = q
        .confirm
        .as_deref()
        .and_then(Command::parse)
        .filter(|c| allowed.contains(c));
    let kinds: std::collections::BTreeSet<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let shown: Vec<&Event> = events
        .iter()
        .rev()
        .filter(|e| {
            q.kind
                .as_deref()
                .is_none_or(|k| k.is_empty() || e.kind == k)
        })
        .take(200)
        .collect();
    Ok(view::html(page(
        &format!("Migration of {}", m.workload_name),
        html! {
            @if let Some(d) = &q.done { p.notice role="status" { (d) } }
            p.status {
                "State: " span #state { (state_badge(m.state())) }
                @if let Some(step) = m.status.running_step() { " · running: " (step.as_str()) }
                " · generation " span #generation { (m.status.generation) }
                " · profile " (profile.as_ref().map(|p| p.spec.name.clone()).unwrap_or_default())
            }
            @if let Some(err) = &m.last_error { p.error role="alert" { (err) } }
            @if let Some(c) = confirm {
                section.confirm role="alertdialog" aria-labelledby="h-confirm" {
                    h2 #h-confirm { "Confirm: " (label(c)) }
                    p { (explain(c)) }
                    form method="post" action={"/ui/migrations/" (m.id) "/action"} {
                        input type="hidden" name="command" value=(c.as_str());
                        button #confirm-yes type="submit" { "Yes, " (label(c).to_lowercase()) }
                        " " a href={"/ui/migrations/" (m.id)} { "Cancel" }
                    }
                }
            } @else if !allowed.is_empty() {
                p.actions {
                    @for c in &allowed {
                        a.button data-command=(c.as_str()) href={"/ui/migrations/" (m.id) "?confirm=" (c.as_str())} { (label(*c)) "…" }
                        " "
                    }
                }
            }
            @if let Some(r) = &running {
                @let (scanned, total, sent) = {
                    use std::sync::atomic::Ordering::Relaxed;
                    (r.progress.scanned.load(Relaxed), r.progress.total.load(Relaxed), r.progress.sent.load(Relaxed))
                };
                @let secs = ((view::now_ms() - r.started_ms).max(1)) as f64 / 1000.0;
                section #running data-running="1" aria-labelledby="h-running" {
                    h2 #h-running { "Sync running" }
                    p {
                        "Disk " (r.disk) " of " (r.disks) " (" (r.disk_name) "): "
                        (progress((scanned / (1 << 20)) as i64, (total / (1 << 20)).max(1) as i64)) " MiB scanned · "
                        (bytes(r.sent_before + sent)) " sent at " (bytes(((r.sent_before + sent) as f64 / secs) as u64)) "/s · "
                        (view::duration((secs * 1000.0) as i64)) " so far"
                    }
                }
            }
            section aria-labelledby="h-syncs" {
                h2 #h-syncs { "Syncs" }
                (sync_chart(&syncs))
                table {
                    thead { tr { th { "Generation" } th { "Kind" } th { "Sent" } th { "Disk" } th { "Duration" } th { "Throughput" } th { "Finished" } } }
                    tbody { @for s in &syncs {
                        @let secs = ((s.finished_at - s.started_at).max(1)) as f64 / 1000.0;
                        tr {
                            td { (s.generation) }
                            td { (format!("{:?}", s.kind).to_lowercase()) }
                            td { (bytes(s.bytes_sent)) }
                            td { (bytes(s.bytes_total)) }
                            td { (view::duration(s.finished_at - s.started_at)) }
                            td { (bytes((s.bytes_sent as f64 / secs) as u64)) "/s" }
                            td { (when(s.finished_at)) }
                        }
                    } }
                }
            }
            @if let Some(d) = &downtime {
                section aria-labelledby="h-downtime" {
                    h2 #h-downtime { "Downtime: " (view::duration(d.total_ms)) }
                    ul { @for p in &d.phases { li { (p.phase.as_str()) ": " (view::duration(p.ms)) } }
                         li { "other: " (view::duration(d.other_ms)) } }
                }
            }
            section aria-labelledby="h-inventory" {
                h2 #h-inventory { "Inventory" }
                p { (w.os.clone().unwrap_or_else(|| "OS unknown".into())) " · " (w.cpus.map(|c| c.to_string()).unwrap_or_else(|| "?".into())) " CPU · " (w.memory_mib.map(|m| format!("{m} MiB")).unwrap_or_default()) }
                table {
                    thead { tr { th { "Disk" } th { "Size" } th { "Path" } } }
                    tbody { @for d in &w.disks { tr { td { (d.name) } td { (bytes(d.size_bytes)) } td { (d.path.clone().unwrap_or_default()) } } } }
                }
                table {
                    thead { tr { th { "NIC" } th { "Network" } th { "MAC" } th { "IPs" } } }
                    tbody { @for n in &w.nics { tr { td { (n.name) } td { (n.network.clone().unwrap_or_default()) } td { (n.mac.clone().unwrap_or_default()) } td { (n.ips.join(", ")) } } } }
                }
                @if !w.services.is_empty() { p { "Services: " (w.services.join(", ")) } }
            }
            section aria-labelledby="h-timeline" {
                h2 #h-timeline { "Timeline" }
                table.timeline {
                    thead { tr { th { "Step" } th { "Started" } th { "Took" } th { "Outcome" } } }
                    tbody { @for t in &timeline {
                        tr { td { (t.step) } td { (when(t.started)) } td { @if let Some(e) = t.ended { (view::duration(e - t.started)) } @else { "running" } } td class=(if t.outcome == "failed" { "error" } else { "" }) { (t.outcome) } }
                    } }
                }
            }
            section aria-labelledby="h-logs" {
                h2 #h-logs { "Logs" }
                form.filter method="get" action="#h-logs" {
                    label for="level" { "Level" }
                    select #level name="level" {
                        option value="" { "all" }
                        @for l in &levels { option value=(l) selected[q.level.as_deref() == Some(l.as_str())] { (l) } }
                    }
                    @if let Some(k) = &q.kind { input type="hidden" name="kind" value=(k); }
                    button type="submit" { "Filter" }
                }
                @if logs.is_empty() { p.muted { "No log lines." } }
                @else {
                    pre.logs { @for l in &logs[logs.len().saturating_sub(200)..] { (when(l.at)) " " (l.level) " " (l.origin) ": " (l.message) "\n" } }
                }
            }
            section aria-labelledby="h-events" {

                h2 #h-events { "Events" }
                form.filter method="get" {
                    label for="kind" { "Kind" }
                    select #kind name="kind" {
                        option value="" { "all" }
                        @for k in &kinds { option value=(k) selected[q.kind.as_deref() == Some(*k)] { (k) } }
                    }
                    @if let Some(l) = &q.level { input type="hidden" name="level" value=(l); }
                    button type="submit" { "Filter" }
                }
                table.events {
                    thead { tr { th { "When" } th { "Kind" } th { "Step" } th { "Message" } } }
                    tbody { @for e in &shown { tr { td { (when(e.at)) } td { (e.kind) } td { (e.step.map(|s| s.as_str()).unwrap_or("")) } td { (e.message) } } } }
                }
            }
        },
    )))
}

#[derive(Deserialize)]
pub struct CommandForm {
    command: String,
}

pub async fn migration_action(
    AxState(st): AxState<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(f): Form<CommandForm>,
) -> UiResult {
    let id: uuid::Uuid = id.parse().map_err(|_| {
        fail(ApiError::bad_request(format!(
            "'{id}' is not a migration id"
        )))
    })?;
    let c = Command::parse(&f.command).ok_or_else(|| {
        fail(ApiError::bad_request(format!(
            "unknown command '{}'",
            f.command
        )))
    })?;
    let done = match st
        .engine
        .command(id, c, &format!("dashboard, token '{}'", caller.0))
        .await
    {
        Ok(_) => format!("{}: accepted.", label(c)),
        Err(e) => format!("{} refused: {}", label(c), e.message),
    };
    Ok(Redirect::to(&format!("/ui/migrations/{id}?done={}", urlencode(&done))).into_response())
}

pub async fn workloads(AxState(st): AxState<AppState>) -> UiResult {
    let (ws, total) = api(st
        .store()
        .list_workloads(&WorkloadFilter::default(), ALL)
        .await)?;
    let (profiles, _) = api(st.store().list_profiles(ALL).await)?;
    let (migrations, _) = api(st
        .store()
        .list_migrations(&MigrationFilter::default(), ALL)
        .await)?;
    // The newest migration of each workload.
    let mut latest: std::collections::HashMap<uuid::Uuid, &Migration> = Default::default();
    for m in &migrations {
        let e = latest.entry(m.workload_id).or_insert(m);
        if m.created_at > e.created_at {
            *e = m;
        }
    }
    Ok(view::html(page(
        "Workloads",
        html! {
            p { (total) " workload(s) in the inventory." }
            table {
                thead { tr { th { "Name" } th { "OS" } th { "Disks" } th { "NICs" } th { "Migration" } th { "Start a migration" } } }
                tbody { @for w in &ws {
                    tr id={"w-" (w.name)} {
                        td { (w.name) }
                        td { (w.os.clone().unwrap_or_default()) }
                        td { @for d in &w.disks { (d.name) " " (bytes(d.size_bytes)) br; } }
                        td { @for n in &w.nics { (n.name) " " (n.network.clone().unwrap_or_default()) br; } }
                        td { @if let Some(m) = latest.get(&w.id) { a href={"/ui/migrations/" (m.id)} { (state_badge(m.state())) } } @else { "—" } }
                        td {
                            @if profiles.is_empty() { a href="/ui/profiles" { "Create a profile first" } }
                            @else {
                                form.inline method="post" action="/ui/migrations" {
                                    input type="hidden" name="workload" value=(w.name);
                                    label.sr for={"p-" (w.name)} { "Profile for " (w.name) }
                                    select id={"p-" (w.name)} name="profile" { @for p in &profiles { option value=(p.spec.name) { (p.spec.name) } } }
                                    button type="submit" { "Start" }
                                }
                            }
                        }
                    }
                } }
            }
        },
    )))
}

#[derive(Deserialize)]
pub struct StartForm {
    workload: String,
    profile: String,
}

pub async fn start_migration(AxState(st): AxState<AppState>, Form(f): Form<StartForm>) -> UiResult {
    let w = api(st.store().get_workload(&f.workload).await)?;
    let p = api(st.store().get_profile(&f.profile).await)?;
    let m = api(crate::api::new_migration(&st, &w, &p, true).await)?;
    Ok(Redirect::to(&format!("/ui/migrations/{}", m.id)).into_response())
}

#[derive(Deserialize, Default, Clone)]
pub struct ProfileForm {
    name: String,
    target: String,
    #[serde(default)]
    services: String,
    #[serde(default)]
    uat_required: Option<String>,
}

fn profile_page(
    profiles: &[Profile],
    targets: &[Target],
    form: &ProfileForm,
    errors: &BTreeMap<String, String>,
    created: Option<&str>,
) -> Markup {
    let err = |f: &str| errors.get(f).cloned();
    view::form_page(
        "Profiles",
        html! {
            @if let Some(c) = created { p.notice role="status" { (c) } }
            table {
                thead { tr { th { "Name" } th { "Target" } th { "UAT required" } th { "Services stopped at cutover" } th { "" } } }
                tbody { @for p in profiles { tr { td { (p.spec.name) } td { (p.spec.target) } td { (if p.spec.uat.required { "yes" } else { "no" }) } td { (p.spec.services_to_stop.join(", ")) } td { a href={"/ui/profiles/" (p.spec.name) "/edit"} aria-label={"Edit " (p.spec.name)} { "Edit" } } } } }
            }
            h2 { "New profile" }
            form.form method="post" action="/ui/profiles" novalidate {
                @if let Some(e) = err("_") { p.error role="alert" { (e) } }
                div.field {
                    label for="name" { "Name" }
                    input #name name="name" value=(form.name) aria-invalid=[err("name").map(|_| "true")] aria-describedby="name-error";
                    @if let Some(e) = err("name") { p.error #name-error { (e) } }
                }
                div.field {
                    label for="target" { "Target" }
                    select #target name="target" aria-invalid=[err("target").map(|_| "true")] aria-describedby="target-error" {
                        option value="" { "— choose —" }
                        @for t in targets { option value=(t.name) selected[form.target == t.name] { (t.name) " (" (t.kind.as_str()) ")" } }
                    }
                    @if let Some(e) = err("target") { p.error #target-error { (e) } }
                }
                div.field {
                    label for="services" { "Services to stop at cutover (comma-separated)" }
                    input #services name="services" value=(form.services) aria-invalid=[err("services_to_stop").map(|_| "true")];
                    @if let Some(e) = err("services_to_stop") { p.error { (e) } }
                }
                div.field {
                    input #uat_required type="checkbox" name="uat_required" value="on" checked[form.uat_required.is_some()];
                    label for="uat_required" { "Require a passed UAT before cutover" }
                }
                button type="submit" { "Create profile" }
            }
        },
    )
}

pub async fn profiles(AxState(st): AxState<AppState>, Query(q): Query<ConfirmQuery>) -> UiResult {
    let (profiles, _) = api(st.store().list_profiles(ALL).await)?;
    let (targets, _) = api(st.store().list_targets(ALL).await)?;
    Ok(view::html(profile_page(
        &profiles,
        &targets,
        &ProfileForm::default(),
        &BTreeMap::new(),
        q.done.as_deref(),
    )))
}

pub async fn create_profile(
    AxState(st): AxState<AppState>,
    Form(f): Form<ProfileForm>,
) -> UiResult {
    let mut errors = BTreeMap::new();
    let services: Vec<String> = f
        .services
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if f.target.trim().is_empty() {
        errors.insert(
            "target".to_string(),
            "choose the target this profile migrates to".to_string(),
        );
    }
    let spec: Result<ProfileSpec, _> = serde_json::from_value(serde_json::json!({
        "name": f.name.trim(),
        "target": f.target.trim(),
        "services_to_stop": services,
        "uat": {"required": f.uat_required.is_some()},
    }));
    let mut created: Option<String> = None;
    match spec {
        Err(e) => {
            errors.insert("_".into(), format!("the profile is not valid: {e}"));
        }
        Ok(spec)
            if {
                for fe in spec.validate() {
                    errors.entry(fe.field.clone()).or_insert(fe.message.clone());
                }
                errors.is_empty()
            } =>
        {
            match crate::api::insert_profile(&st, &spec).await {
                Ok(p) => created = Some(format!("Profile {} created.", p.spec.name)),
                Err(e) => {
                    let fields = e
                        .details
                        .as_ref()
                        .and_then(|d| d.get("fields"))
                        .and_then(|f| f.as_array())
                        .cloned()
                        .unwrap_or_default();
                    for fe in &fields {
                        if let (Some(field), Some(msg)) = (
                            fe.get("field").and_then(|v| v.as_str()),
                            fe.get("message").and_then(|v| v.as_str()),
                        ) {
                            errors.insert(field.to_string(), msg.to_string());
                        }
                    }
                    if fields.is_empty() {
                        let field = if e.message.contains("name") {
                            "name"
                        } else {
                            "_"
                        };
                        errors.insert(field.into(), e.message);
                    }
                }
            }
        }
        Ok(_) => {}
    }
    let (profiles, _) = api(st.store().list_profiles(ALL).await)?;
    let (targets, _) = api(st.store().list_targets(ALL).await)?;
    let status = if created.is_some() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let form = if created.is_some() {
        ProfileForm::default()
    } else {
        f
    };
    Ok((
        status,
        view::html(profile_page(
            &profiles,
            &targets,
            &form,
            &errors,
            created.as_deref(),
        )),
    )
        .into_response())
}

fn import_page(
    csv: &str,
    report: Option<&crate::api::ImportReport>,
    error: Option<&str>,
) -> Markup {
    view::form_page(
        "Import inventory",
        html! {
            p { "Choose a CSV file or paste one. Its first line names the columns (RiverMeadow's bulk format): " code { (crate::csv_import::COLUMNS.join(",")) } ". Valid rows are imported; each bad row is reported at its line." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            @if let Some(r) = report {
                p.notice role="status" #import-summary { (r.imported) " imported, " (r.rejected) " rejected." }
                @if !r.errors.is_empty() {
                    table.errors {
                        thead { tr { th { "Line" } th { "Problem" } } }
                        tbody { @for e in &r.errors { tr id={"line-" (e.line)} { td { (e.line) } td.error { (e.message) } } } }
                    }
                }
            }
            form.form method="post" action="/ui/import" enctype="multipart/form-data" {
                div.field {
                    label for="csv-file" { "CSV file" }
                    input #csv-file name="file" type="file" accept=".csv,text/csv";
                    p.hint { "A file chosen is imported; otherwise the text below." }
                }
                div.field {
                    label for="csv" { "CSV" }
                    textarea #csv name="csv" rows="12" cols="100" { (csv) }
                }
                button type="submit" { "Import" }
            }
        },
    )
}

struct ImportForm {
    csv: String,
}

pub async fn import_form() -> UiResult {
    Ok(view::html(import_page("", None, None)))
}

/// The CSV of the import form: the file chosen, else the text pasted.
async fn import_text(mut form: axum::extract::Multipart) -> Result<String, UiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        fail(ApiError::bad_request(format!(
            "the upload could not be read: {e}"
        )))
    };
    let (mut file, mut text) = (String::new(), String::new());
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("file") => {
                let bytes = field.bytes().await.map_err(bad)?;
                file = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    fail(ApiError::bad_request(
                        "the file is not UTF-8 text: save the CSV as UTF-8",
                    ))
                })?;
            }
            Some("csv") => text = field.text().await.map_err(bad)?,
            _ => {}
        }
    }
    Ok(if file.trim().is_empty() { text } else { file })
}

pub async fn import(AxState(st): AxState<AppState>, form: axum::extract::Multipart) -> UiResult {
    let csv = import_text(form).await?;
    let f = ImportForm { csv };
    match crate::api::import_csv(&st, &f.csv).await {
        Ok(r) => Ok(view::html(import_page(&f.csv, Some(&r), None))),
        Err(e) => {
            // A whole-file problem (no header, unknown column) is one error at its line.
            let lines: Vec<crate::csv_import::LineError> = e
                .details
                .as_ref()
                .and_then(|d| d.get("errors"))
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default();
            let report = crate::api::ImportReport {
                imported: 0,
                rejected: lines.len(),
                errors: lines,
                workload_ids: vec![],
            };
            Ok((
                StatusCode::BAD_REQUEST,
                view::html(import_page(&f.csv, Some(&report), Some(&e.message))),
            )
                .into_response())
        }
    }
}

/// The fields of a new source or target.
#[derive(Deserialize, Default, Clone)]
pub struct EndpointForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    endpoint: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    credential: String,
    #[serde(default)]
    config: String,
}

/// The form's values as the API's JSON (`name, kind, endpoint, credential_id, config`),
/// or the errors of the fields that cannot even be read.
fn endpoint_json(
    f: &EndpointForm,
    kinds: &[&str],
) -> Result<serde_json::Value, BTreeMap<String, String>> {
    let mut errors = BTreeMap::new();
    if !kinds.contains(&f.kind.as_str()) {
        errors.insert(
            "kind".to_string(),
            format!("choose a kind: {}", kinds.join(", ")),
        );
    }
    let mut config = if f.config.trim().is_empty() {
        serde_json::json!({})
    } else {
        match serde_json::from_str::<serde_json::Value>(&f.config) {
            Ok(v) if v.is_object() => v,
            Ok(_) => {
                errors.insert(
                    "config".into(),
                    "must be a JSON object, e.g. {\"ca_bundle\": \"/etc/ferry/ca.pem\"}".into(),
                );
                serde_json::json!({})
            }
            Err(e) => {
                errors.insert("config".into(), format!("not JSON: {e}"));
                serde_json::json!({})
            }
        }
    };
    if !f.path.trim().is_empty() {
        config["path"] = serde_json::json!(f.path.trim());
    }
    let credential = f.credential.trim();
    if !credential.is_empty() && credential.parse::<uuid::Uuid>().is_err() {
        errors.insert(
            "credential".into(),
            "a credential id (from `ferry credential list` or POST /api/credentials)".into(),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let endpoint = f.endpoint.trim();
    Ok(serde_json::json!({
        "name": f.name.trim(),
        "kind": f.kind,
        "endpoint": (!endpoint.is_empty()).then_some(endpoint),
        "credential_id": (!credential.is_empty()).then_some(credential),
        "config": config,
    }))
}

/// The API's error as errors at the form's fields.
fn field_errors(e: &ApiError) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(fields) = e
        .details
        .as_ref()
        .and_then(|d| d.get("fields"))
        .and_then(|f| f.as_array())
    {
        for fe in fields {
            if let (Some(field), Some(msg)) = (
                fe.get("field").and_then(|v| v.as_str()),
                fe.get("message").and_then(|v| v.as_str()),
            ) {
                out.insert(field.to_string(), msg.to_string());
            }
        }
    }
    if out.is_empty() {
        out.insert("_".into(), e.message.clone());
    }
    out
}

struct Listed {
    name: String,
    kind: &'static str,
    endpoint: Option<String>,
    path: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn endpoint_page(
    title: &str,
    noun: &str,
    action: &str,
    kinds: &[&str],
    list: &[Listed],
    form: &EndpointForm,
    errors: &BTreeMap<String, String>,
    created: Option<&str>,
) -> Markup {
    let err = |f: &str| errors.get(f).cloned();
    let field = |id: &'static str, label: &'static str, value: &str, hint: &'static str| {
        html! {
            div.field {
                label for=(id) { (label) }
                input id=(id) name=(id) value=(value) aria-invalid=[err(id).map(|_| "true")] aria-describedby={(id) "-error"};
                @if !hint.is_empty() { p.hint { (hint) } }
                @if let Some(e) = err(id) { p.error id={(id) "-error"} { (e) } }
            }
        }
    };
    view::form_page(
        title,
        html! {
            @if let Some(c) = created { p.notice role="status" { (c) } }
            table {
                thead { tr { th { "Name" } th { "Kind" } th { "Endpoint" } th { "Path" } th { "" } } }
                tbody { @for l in list { tr { td { (l.name) } td { (l.kind) } td { (l.endpoint.clone().unwrap_or_default()) } td { (l.path.clone().unwrap_or_default()) } td { a href={(action) "/" (l.name) "/edit"} aria-label={"Edit " (l.name)} { "Edit" } } } } }
            }
            h2 { "New " (noun) }
            form.form method="post" action=(action) novalidate {
                @if let Some(e) = err("_") { p.error role="alert" { (e) } }
                (field("name", "Name", &form.name, ""))
                div.field {
                    label for="kind" { "Kind" }
                    select #kind name="kind" aria-invalid=[err("kind").map(|_| "true")] aria-describedby="kind-error" {
                        option value="" { "— choose —" }
                        @for k in kinds { option value=(k) selected[form.kind == *k] { (k) } }
                    }
                    @if let Some(e) = err("kind") { p.error #kind-error { (e) } }
                }
                (field("endpoint", "Endpoint", &form.endpoint, "vCenter or VME manager URL, qemu:///system, …"))
                (field("path", "Path", &form.path, "Directory (disk images, local directory targets)"))
                (field("credential", "Credential id", &form.credential, "The account the adapter logs in with"))
                div.field {
                    label for="config" { "More settings (JSON object)" }
                    textarea #config name="config" rows="3" cols="60" aria-invalid=[err("config").map(|_| "true")] aria-describedby="config-error" { (form.config) }
                    @if let Some(e) = err("config") { p.error #config-error { (e) } }
                }
                button type="submit" { "Create " (noun) }
            }
        },
    )
}

/// Sources and targets: the same pages and forms over two kinds of endpoint.
#[derive(Clone, Copy)]
enum Endpoints {
    Sources,
    Targets,
}

impl Endpoints {
    fn title(self) -> &'static str {
        match self {
            Endpoints::Sources => "Sources",
            Endpoints::Targets => "Targets",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Endpoints::Sources => "source",
            Endpoints::Targets => "target",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Endpoints::Sources => "/ui/sources",
            Endpoints::Targets => "/ui/targets",
        }
    }

    /// The kinds this appliance has adapters for (the others are refused anyway).
    fn kinds(self, st: &AppState) -> Vec<&'static str> {
        let a = &st.engine.adapters;
        match self {
            Endpoints::Sources => SourceKind::ALL
                .iter()
                .filter(|k| a.refuse_source_kind(**k).is_none())
                .map(|k| k.as_str())
                .collect(),
            Endpoints::Targets => TargetKind::ALL
                .iter()
                .filter(|k| a.refuse_target_kind(**k).is_none())
                .map(|k| k.as_str())
                .collect(),
        }
    }

    async fn list(self, st: &AppState) -> Result<Vec<Listed>, UiError> {
        let rows: Vec<(String, &'static str, Option<String>, serde_json::Value)> = match self {
            Endpoints::Sources => api(st.store().list_sources(ALL).await)?
                .0
                .into_iter()
                .map(|s| (s.name, s.kind.as_str(), s.endpoint, s.config))
                .collect(),
            Endpoints::Targets => api(st.store().list_targets(ALL).await)?
                .0
                .into_iter()
                .map(|t| (t.name, t.kind.as_str(), t.endpoint, t.config))
                .collect(),
        };
        Ok(rows
            .into_iter()
            .map(|(name, kind, endpoint, config)| Listed {
                path: config
                    .get("path")
                    .and_then(|p| p.as_str())
                    .map(str::to_string),
                name,
                kind,
                endpoint,
            })
            .collect())
    }

    /// The stored settings of `key` as the edit form shows them.
    async fn stored(self, st: &AppState, key: &str) -> Result<EndpointForm, UiError> {
        Ok(match self {
            Endpoints::Sources => {
                let s = api(st.store().get_source(key).await)?;
                endpoint_form(
                    &s.name,
                    s.kind.as_str(),
                    &s.endpoint,
                    s.credential_id,
                    &s.config,
                )
            }
            Endpoints::Targets => {
                let t = api(st.store().get_target(key).await)?;
                endpoint_form(
                    &t.name,
                    t.kind.as_str(),
                    &t.endpoint,
                    t.credential_id,
                    &t.config,
                )
            }
        })
    }

    /// Checks the form through the API's rules; the API's JSON of it, or the errors by
    /// field.
    async fn checked(
        self,
        st: &AppState,
        f: &EndpointForm,
    ) -> Result<serde_json::Value, BTreeMap<String, String>> {
        let v = endpoint_json(f, &self.kinds(st))?;
        let one = |e: serde_json::Error| BTreeMap::from([("_".to_string(), e.to_string())]);
        let r = match self {
            Endpoints::Sources => {
                let new: NewSource = serde_json::from_value(v.clone()).map_err(one)?;
                crate::api::check_source(st, &new).await
            }
            Endpoints::Targets => {
                let new: NewTarget = serde_json::from_value(v.clone()).map_err(one)?;
                crate::api::check_target(st, &new).await
            }
        };
        r.map(|()| v).map_err(|e| field_errors(&e))
    }

    /// Stores a new one; its name, or the errors by field.
    async fn insert(
        self,
        st: &AppState,
        f: &EndpointForm,
    ) -> Result<String, BTreeMap<String, String>> {
        let v = self.checked(st, f).await?;
        let r = match self {
            Endpoints::Sources => {
                let new: NewSource = serde_json::from_value(v).expect("checked above");
                crate::api::insert_source(st, &new).await.map(|s| s.name)
            }
            Endpoints::Targets => {
                let new: NewTarget = serde_json::from_value(v).expect("checked above");
                crate::api::insert_target(st, &new).await.map(|t| t.name)
            }
        };
        r.map_err(|e| field_errors(&e))
    }

    /// Replaces the endpoint, credential and config of `key` (name and kind stay).
    async fn update(
        self,
        st: &AppState,
        key: &str,
        f: &EndpointForm,
    ) -> Result<Result<(), BTreeMap<String, String>>, UiError> {
        let v = match self.checked(st, f).await {
            Ok(v) => v,
            Err(errors) => return Ok(Err(errors)),
        };
        let endpoint = v["endpoint"].as_str().map(str::to_string);
        let credential_id = v["credential_id"].as_str().and_then(|c| c.parse().ok());
        let config = v["config"].clone();
        match self {
            Endpoints::Sources => {
                let old = api(st.store().get_source(key).await)?;
                let new = Source {
                    endpoint,
                    credential_id,
                    config,
                    ..old
                };
                api(st.store().update_source(&new).await)?;
            }
            Endpoints::Targets => {
                let old = api(st.store().get_target(key).await)?;
                let new = Target {
                    endpoint,
                    credential_id,
                    config,
                    ..old
                };
                api(st.store().update_target(&new).await)?;
            }
        }
        Ok(Ok(()))
    }

    async fn list_page(
        self,
        st: &AppState,
        form: &EndpointForm,
        errors: &BTreeMap<String, String>,
        notice: Option<&str>,
    ) -> Result<Markup, UiError> {
        let list = self.list(st).await?;
        Ok(endpoint_page(
            self.title(),
            self.noun(),
            self.action(),
            &self.kinds(st),
            &list,
            form,
            errors,
            notice,
        ))
    }

    async fn create(self, st: &AppState, f: EndpointForm) -> UiResult {
        match self.insert(st, &f).await {
            Ok(name) => {
                let notice = format!("{} {name} created.", capitalised(self.noun()));
                let page = self
                    .list_page(
                        st,
                        &EndpointForm::default(),
                        &BTreeMap::new(),
                        Some(&notice),
                    )
                    .await?;
                Ok(view::html(page))
            }
            Err(errors) => {
                let page = self.list_page(st, &f, &errors, None).await?;
                Ok((StatusCode::BAD_REQUEST, view::html(page)).into_response())
            }
        }
    }

    async fn edit_form(self, st: &AppState, key: &str) -> UiResult {
        let form = self.stored(st, key).await?;
        Ok(view::html(edit_endpoint_page(
            self.noun(),
            &format!("{}/{}/edit", self.action(), form.name),
            &form,
            &BTreeMap::new(),
        )))
    }

    async fn edit(self, st: &AppState, key: &str, mut f: EndpointForm) -> UiResult {
        let stored = self.stored(st, key).await?;
        f.name = stored.name;
        f.kind = stored.kind;
        match self.update(st, key, &f).await? {
            Ok(()) => Ok(Redirect::to(&format!(
                "{}?done={}",
                self.action(),
                urlencode(&format!("{} {} saved.", capitalised(self.noun()), f.name))
            ))
            .into_response()),
            Err(errors) => Ok((
                StatusCode::BAD_REQUEST,
                view::html(edit_endpoint_page(
                    self.noun(),
                    &format!("{}/{}/edit", self.action(), f.name),
                    &f,
                    &errors,
                )),
            )
                .into_response()),
        }
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

pub async fn sources(AxState(st): AxState<AppState>, Query(q): Query<ConfirmQuery>) -> UiResult {
    let page = Endpoints::Sources
        .list_page(
            &st,
            &EndpointForm::default(),
            &BTreeMap::new(),
            q.done.as_deref(),
        )
        .await?;
    Ok(view::html(page))
}

pub async fn create_source(
    AxState(st): AxState<AppState>,
    Form(f): Form<EndpointForm>,
) -> UiResult {
    Endpoints::Sources.create(&st, f).await
}

pub async fn targets(AxState(st): AxState<AppState>, Query(q): Query<ConfirmQuery>) -> UiResult {
    let page = Endpoints::Targets
        .list_page(
            &st,
            &EndpointForm::default(),
            &BTreeMap::new(),
            q.done.as_deref(),
        )
        .await?;
    Ok(view::html(page))
}

pub async fn create_target(
    AxState(st): AxState<AppState>,
    Form(f): Form<EndpointForm>,
) -> UiResult {
    Endpoints::Targets.create(&st, f).await
}

/// A step of a migration as its events tell it.
struct StepRow {
    step: String,
    started: i64,
    ended: Option<i64>,
    outcome: &'static str,
}

fn steps(events: &[Event]) -> Vec<StepRow> {
    let mut out: Vec<StepRow> = vec![];
    for e in events {
        let Some(step) = e.step else { continue };
        let name = step.as_str().to_string();
        match e.kind.as_str() {
            "step.started" => out.push(StepRow {
                step: name,
                started: e.at,
                ended: None,
                outcome: "running",
            }),
            "step.completed" | "step.failed" => {
                if let Some(r) = out
                    .iter_mut()
                    .rev()
                    .find(|r| r.step == name && r.ended.is_none())
                {
                    r.ended = Some(e.at);
                    r.outcome = if e.kind == "step.completed" {
                        "completed"
                    } else {
                        "failed"
                    };
                }
            }
            _ => {}
        }
    }
    out
}

/// The settings of a stored source or target as the form shows them (`path` apart).
fn endpoint_form(
    name: &str,
    kind: &str,
    endpoint: &Option<String>,
    credential: Option<uuid::Uuid>,
    config: &serde_json::Value,
) -> EndpointForm {
    let mut rest = config.clone();
    let path = rest
        .as_object_mut()
        .and_then(|o| o.remove("path"))
        .and_then(|p| p.as_str().map(str::to_string))
        .unwrap_or_default();
    let empty = rest.as_object().is_none_or(|o| o.is_empty());
    EndpointForm {
        name: name.into(),
        kind: kind.into(),
        endpoint: endpoint.clone().unwrap_or_default(),
        path,
        credential: credential.map(|c| c.to_string()).unwrap_or_default(),
        config: if empty {
            String::new()
        } else {
            serde_json::to_string_pretty(&rest).unwrap_or_default()
        },
    }
}

fn edit_endpoint_page(
    noun: &str,
    action: &str,
    form: &EndpointForm,
    errors: &BTreeMap<String, String>,
) -> Markup {
    let err = |f: &str| errors.get(f).cloned();
    let field = |id: &'static str, label: &'static str, value: &str| {
        html! {
            div.field {
                label for=(id) { (label) }
                input id=(id) name=(id) value=(value) aria-invalid=[err(id).map(|_| "true")] aria-describedby={(id) "-error"};
                @if let Some(e) = err(id) { p.error id={(id) "-error"} { (e) } }
            }
        }
    };
    view::form_page(
        &format!("Edit {noun} {}", form.name),
        html! {
            p { "Kind: " (form.kind) ". The name and the kind stay; migrations refer to them." }
            form.form method="post" action=(action) novalidate {
                @if let Some(e) = err("_") { p.error role="alert" { (e) } }
                input type="hidden" name="name" value=(form.name);
                input type="hidden" name="kind" value=(form.kind);
                (field("endpoint", "Endpoint", &form.endpoint))
                (field("path", "Path", &form.path))
                (field("credential", "Credential id", &form.credential))
                div.field {
                    label for="config" { "More settings (JSON object)" }
                    textarea #config name="config" rows="6" cols="60" aria-invalid=[err("config").map(|_| "true")] aria-describedby="config-error" { (form.config) }
                    @if let Some(e) = err("config") { p.error #config-error { (e) } }
                }
                button type="submit" { "Save" }
                " " a href=(action.trim_end_matches("/edit").rsplit_once('/').map(|(l, _)| l).unwrap_or("/ui/")) { "Cancel" }
            }
        },
    )
}

pub async fn edit_source_form(AxState(st): AxState<AppState>, Path(key): Path<String>) -> UiResult {
    Endpoints::Sources.edit_form(&st, &key).await
}

pub async fn edit_source(
    AxState(st): AxState<AppState>,
    Path(key): Path<String>,
    Form(f): Form<EndpointForm>,
) -> UiResult {
    Endpoints::Sources.edit(&st, &key, f).await
}

pub async fn edit_target_form(AxState(st): AxState<AppState>, Path(key): Path<String>) -> UiResult {
    Endpoints::Targets.edit_form(&st, &key).await
}

pub async fn edit_target(
    AxState(st): AxState<AppState>,
    Path(key): Path<String>,
    Form(f): Form<EndpointForm>,
) -> UiResult {
    Endpoints::Targets.edit(&st, &key, f).await
}

fn edit_profile_page(
    form: &ProfileForm,
    targets: &[Target],
    errors: &BTreeMap<String, String>,
) -> Markup {
    let err = |f: &str| errors.get(f).cloned();
    view::form_page(
        &format!("Edit profile {}", form.name),
        html! {
            p { "Migrations that use this profile take the new settings at their next step." }
            form.form method="post" action={"/ui/profiles/" (form.name) "/edit"} novalidate {
                @if let Some(e) = err("_") { p.error role="alert" { (e) } }
                input type="hidden" name="name" value=(form.name);
                div.field {
                    label for="target" { "Target" }
                    select #target name="target" aria-invalid=[err("target").map(|_| "true")] aria-describedby="target-error" {
                        @for t in targets { option value=(t.name) selected[form.target == t.name] { (t.name) " (" (t.kind.as_str()) ")" } }
                    }
                    @if let Some(e) = err("target") { p.error #target-error { (e) } }
                }
                div.field {
                    label for="services" { "Services to stop at cutover (comma-separated)" }
                    input #services name="services" value=(form.services) aria-invalid=[err("services_to_stop").map(|_| "true")];
                    @if let Some(e) = err("services_to_stop") { p.error { (e) } }
                }
                div.field {
                    input #uat_required type="checkbox" name="uat_required" value="on" checked[form.uat_required.is_some()];
                    label for="uat_required" { "Require a passed UAT before cutover" }
                }
                button type="submit" { "Save" }
                " " a href="/ui/profiles" { "Cancel" }
            }
        },
    )
}

pub async fn edit_profile_form(
    AxState(st): AxState<AppState>,
    Path(key): Path<String>,
) -> UiResult {
    let p = api(st.store().get_profile(&key).await)?;
    let (targets, _) = api(st.store().list_targets(ALL).await)?;
    let form = ProfileForm {
        name: p.spec.name.clone(),
        target: p.spec.target.clone(),
        services: p.spec.services_to_stop.join(", "),
        uat_required: p.spec.uat.required.then(|| "on".to_string()),
    };
    Ok(view::html(edit_profile_page(
        &form,
        &targets,
        &BTreeMap::new(),
    )))
}

pub async fn edit_profile(
    AxState(st): AxState<AppState>,
    Path(key): Path<String>,
    Form(mut f): Form<ProfileForm>,
) -> UiResult {
    let old = api(st.store().get_profile(&key).await)?;
    f.name = old.spec.name.clone();
    let mut spec = old.spec.clone();
    spec.target = f.target.trim().to_string();
    spec.services_to_stop = f
        .services
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    spec.uat.required = f.uat_required.is_some();
    match crate::api::check_profile(&st, &spec).await {
        Ok(()) => {
            api(st.store().update_profile(old.id, &spec).await)?;
            Ok(Redirect::to(&format!(
                "/ui/profiles?done={}",
                urlencode(&format!("Profile {} saved.", spec.name))
            ))
            .into_response())
        }
        Err(e) => {
            let (targets, _) = api(st.store().list_targets(ALL).await)?;
            Ok((
                StatusCode::BAD_REQUEST,
                view::html(edit_profile_page(&f, &targets, &field_errors(&e))),
            )
                .into_response())
        }
    }
}
