//! HTML building blocks: the page frame, tables, badges, the sync chart.

use axum::response::{Html, IntoResponse, Response};
use ferry_model::{State, SyncRun};
use maud::{html, Markup, PreEscaped, DOCTYPE};

pub fn html(m: Markup) -> Response {
    Html(m.into_string()).into_response()
}

/// The frame of every page: navigation, the live-update indicator, and `main` (what the
/// script swaps when something changed).
pub fn page(title: &str, body: Markup) -> Markup {
    frame(title, body, true)
}

/// A page built around a form (or a form's result): never refreshed under the user's
/// hands.
pub fn form_page(title: &str, body: Markup) -> Markup {
    frame(title, body, false)
}

fn frame(title: &str, body: Markup, live: bool) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Ferry" }
                link rel="stylesheet" href="/ui/static/app.css";
                script src="/ui/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Main" {
                        a.brand href="/ui/" { "Ferry" }
                        a href="/ui/" { "Overview" }
                        a href="/ui/workloads" { "Workloads" }
                        a href="/ui/profiles" { "Profiles" }
                        a href="/ui/import" { "Import" }
                        a href="/ui/sources" { "Sources" }
                        a href="/ui/targets" { "Targets" }
                    }
                    span #live role="status" aria-live="polite" { "" }
                    form.logout method="post" action="/ui/logout" { button type="submit" { "Log out" } }
                }
                main #main tabindex="-1" data-live=(if live { "on" } else { "off" }) {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

pub fn login(message: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Log in · Ferry" }
                link rel="stylesheet" href="/ui/static/app.css";
            }
            body.login {
                main #main {
                    h1 { "Ferry" }
                    form method="post" action="/ui/login" {
                        @if let Some(m) = message { p.error role="alert" { (m) } }
                        label for="token" { "API token" }
                        input #token name="token" type="password" autocomplete="current-password" required autofocus;
                        p.hint { "The admin token is in the appliance's data directory (file admin-token); `ferry token create` makes others." }
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

pub fn state_badge(s: State) -> Markup {
    html! { span class={"badge state-" (s.as_str())} data-state=(s.as_str()) { (s.as_str()) } }
}

pub fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A Unix-ms time as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_default()
}

/// A bar per sync: its size (bytes sent) as the bar, its duration as the dot. Drawn on the
/// server (SVG), so it needs no script and no chart library.
pub fn sync_chart(syncs: &[SyncRun]) -> Markup {
    if syncs.is_empty() {
        return html! { p.muted { "No sync yet." } };
    }
    let (w, h, pad) = (640.0f64, 180.0f64, 28.0f64);
    let max_b = syncs.iter().map(|s| s.bytes_sent).max().unwrap_or(1).max(1) as f64;
    let max_d = syncs
        .iter()
        .map(|s| (s.finished_at - s.started_at).max(1))
        .max()
        .unwrap_or(1) as f64;
    let n = syncs.len() as f64;
    let step = (w - 2.0 * pad) / n;
    let bar = (step * 0.6).max(2.0);
    let mut body = String::new();
    for (i, s) in syncs.iter().enumerate() {
        let x = pad + step * i as f64 + (step - bar) / 2.0;
        // At least 2 px: a tiny delta stays visible next to a full copy.
        let bh = ((s.bytes_sent as f64 / max_b) * (h - 2.0 * pad)).max(2.0);
        let d = (s.finished_at - s.started_at).max(1) as f64;
        let cy = h - pad - (d / max_d) * (h - 2.0 * pad);
        body.push_str(&format!(
            "<g class=\"point\" data-generation=\"{g}\"><rect class=\"bar\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{bh:.1}\"><title>generation {g}: {b} sent</title></rect><circle class=\"dur\" cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"4\"><title>generation {g}: {ds}</title></circle></g>",
            g = s.generation,
            y = h - pad - bh,
            b = bytes(s.bytes_sent),
            cx = x + bar / 2.0,
            ds = duration(d as i64),
        ));
    }
    html! {
        figure.chart {
            svg #sync-chart viewBox={"0 0 " (w) " " (h)} role="img" aria-label={"Size and duration of " (syncs.len()) " syncs"} {
                line.axis x1=(pad) y1=(h - pad) x2=(w - pad) y2=(h - pad) {}
                (PreEscaped(body))
            }
            figcaption { "Bars: bytes sent per sync (largest " (bytes(max_b as u64)) "). Dots: duration (longest " (duration(max_d as i64)) ")." }
        }
    }
}

/// A progress bar with its text (for screen readers too).
pub fn progress(done: i64, total: i64) -> Markup {
    let pct = if total > 0 { done * 100 / total } else { 0 };
    html! {
        span.progress {
            progress value=(done) max=(total.max(1)) aria-label={(done) " of " (total)} {}
            " " (done) "/" (total) " (" (pct) "%)"
        }
    }
}

/// Milliseconds as `850 ms`, `12.4 s` or `3 min 05 s`.
pub fn duration(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
