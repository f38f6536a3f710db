//! `ferry bench api`: load on the appliance's API — N migrations in one SQLite appliance,
//! list and status requests from many concurrent clients; reports latency percentiles and
//! the appliance's memory.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchApiArgs {
    /// Migrations in the appliance.
    #[arg(long, default_value_t = 1000)]
    pub migrations: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Data directory for the appliance (a temporary one when unset).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(a: BenchApiArgs) -> Result<ExitCode> {
    if a.clients == 0 || a.requests == 0 || a.migrations == 0 {
        bail!("--migrations, --clients and --requests must be at least 1");
    }
    let tmp = tempfile_dir()?;
    let dir = a.data_dir.clone().unwrap_or_else(|| tmp.join("data"));
    let exe = std::env::current_exe().context("finding the ferry binary")?;
    let mut child = Child(
        std::process::Command::new(exe)
            .args(["appliance", "--listen", "127.0.0.1:0", "--data-dir"])
            .env("FERRY_LOG", "warn")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(tmp.join("appliance.log"))
                    .context("creating the appliance log")?,
            ))
            .spawn()
            .context("starting the appliance")?,
    );
    let pid = child.0.id();
    let mut out = std::io::BufReader::new(child.0.stdout.take().context("appliance stdout")?);
    let mut url = None;
    for _ in 0..3 {
        let mut l = String::new();
        out.read_line(&mut l)?;
        if let Some(i) = l.find("http://") {
            url = Some(l[i..].trim().to_string());
        }
    }
    let url = url.context("the appliance did not say where it listens")?;
    let token = std::fs::read_to_string(dir.join("admin-token"))
        .context("reading the admin token (use a fresh --data-dir)")?
        .trim()
        .to_string();
    let rt = super::util::runtime()?;
    let report = match rt.block_on(load(&a, &url, &token, &tmp, pid)) {
        Ok(r) => r,
        Err(e) => {
            let log = std::fs::read_to_string(tmp.join("appliance.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(e.context(format!(
                "appliance log ({}):\n{}",
                tmp.join("appliance.log").display(),
                tail.join("\n")
            )));
        }
    };
    drop(child);
    let _ = std::fs::remove_dir_all(&tmp);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut rows = vec![];
        for (name, r) in report["endpoints"].as_object().into_iter().flatten() {
            rows.push(vec![
                name.clone(),
                r["requests"].to_string(),
                format!("{:.2}", r["p50_ms"].as_f64().unwrap_or(0.0)),
                format!("{:.2}", r["p95_ms"].as_f64().unwrap_or(0.0)),
                format!("{:.2}", r["p99_ms"].as_f64().unwrap_or(0.0)),
                format!("{:.2}", r["max_ms"].as_f64().unwrap_or(0.0)),
            ]);
        }
        println!(
            "{}",
            super::client::table(
                &["REQUEST", "COUNT", "P50 MS", "P95 MS", "P99 MS", "MAX MS"],
                rows
            )
        );
        println!(
            "{} migrations, {} clients, {} requests in {:.1} s ({:.0} req/s); p99 overall {:.2} ms (budget 50 ms); appliance RSS idle {} MiB, after load {} MiB (budget 150 MiB)",
            report["migrations"], report["clients"], report["requests"],
            report["seconds"].as_f64().unwrap_or(0.0), report["requests_per_second"].as_f64().unwrap_or(0.0),
            report["p99_ms"].as_f64().unwrap_or(0.0), report["rss_idle_mib"], report["rss_after_mib"],
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("ferry-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

async fn load(
    a: &BenchApiArgs,
    url: &str,
    token: &str,
    tmp: &std::path::Path,
    pid: u32,
) -> Result<Value> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.clients)
        .build()?;
    let post = |path: &str, body: Value| {
        http.post(format!("{url}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let img = tmp.join("disk.img");
    std::fs::write(&img, vec![1u8; 4096])?;
    post(
        "/api/sources",
        json!({"name": "images", "kind": "disk_image"}),
    )
    .await?
    .error_for_status()?;
    post("/api/targets", json!({"name": "lab", "kind": "local_dir", "config": {"path": tmp.join("target").display().to_string()}}))
        .await?
        .error_for_status()?;
    post("/api/profiles", json!({"name": "default", "target": "lab"}))
        .await?
        .error_for_status()?;
    let src: Value = http
        .get(format!("{url}/api/sources/images"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    let mut ids = vec![];
    let t_setup = Instant::now();
    for i in 0..a.migrations {
        post("/api/workloads", json!({"name": format!("bench-{i:05}"), "source_id": src["id"], "disks": [{"name": "root", "size_bytes": 4096, "path": img.display().to_string()}]}))
            .await?
            .error_for_status()?;
        let m: Value = post(
            "/api/migrations",
            json!({"workload": format!("bench-{i:05}"), "profile": "default"}),
        )
        .await?
        .error_for_status()?
        .json()
        .await?;
        ids.push(m["id"].as_str().unwrap_or_default().to_string());
    }
    // Let every migration reach `synced`, so the appliance is idle when measured.
    loop {
        let v: Value = http
            .get(format!("{url}/api/migrations?state=synced&limit=1"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if v["total"].as_u64().unwrap_or(0) as usize >= a.migrations {
            break;
        }
        if t_setup.elapsed() > Duration::from_secs(600) {
            bail!("migrations did not reach synced within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let setup_s = t_setup.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(pid).unwrap_or(0) / 1024;

    let ids = Arc::new(ids);
    let per_client = a.requests.div_ceil(a.clients);
    let t0 = Instant::now();
    let mut tasks = vec![];
    for c in 0..a.clients {
        let (http, ids, url, token) = (
            http.clone(),
            ids.clone(),
            url.to_string(),
            token.to_string(),
        );
        let n = ids.len();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<(u8, Duration)> = Vec::with_capacity(per_client);
            for r in 0..per_client {
                let k = (c * 7919 + r * 104_729) % n;
                let (kind, path) = match r % 4 {
                    0 | 1 => (
                        0u8,
                        format!("/api/migrations?limit=50&offset={}", k / 50 * 50),
                    ),
                    2 => (1, format!("/api/migrations/{}", ids[k])),
                    _ => (2, "/api/migrations?state=synced&limit=50".to_string()),
                };
                let t = Instant::now();
                let resp = http
                    .get(format!("{url}{path}"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                match resp {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.bytes().await;
                    }
                    Ok(resp) => return Err(anyhow::anyhow!("{path}: HTTP {}", resp.status())),
                    Err(e) => return Err(e.into()),
                }
                lat.push((kind, t.elapsed()));
            }
            Ok(lat)
        }));
    }
    let mut all: Vec<(u8, Duration)> = vec![];
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss_after = rss_kib(pid).unwrap_or(0) / 1024;
    let mut endpoints = serde_json::Map::new();
    for (kind, name) in [
        (0u8, "list (page of 50)"),
        (1, "status (one migration)"),
        (2, "list filtered by state"),
    ] {
        let mut v: Vec<Duration> = all
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        endpoints.insert(
            name.to_string(),
            json!({"requests": v.len(), "p50_ms": pct(&v, 0.5), "p95_ms": pct(&v, 0.95), "p99_ms": pct(&v, 0.99), "max_ms": pct(&v, 1.0)}),
        );
    }
    let mut every: Vec<Duration> = all.iter().map(|(_, d)| *d).collect();
    every.sort();
    Ok(json!({
        "migrations": a.migrations,
        "clients": a.clients,
        "requests": every.len(),
        "seconds": secs,
        "requests_per_second": every.len() as f64 / secs,
        "p50_ms": pct(&every, 0.5),
        "p99_ms": pct(&every, 0.99),
        "setup_seconds": setup_s,
        "rss_idle_mib": rss_idle,
        "rss_after_mib": rss_after,
        "endpoints": endpoints,
    }))
}
