//! Helpers for the control-plane tests: run the real `ferry appliance` and CLI.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Prints a line the test harness does not capture (skips and measured figures).
pub fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

pub struct Appliance {
    pub child: Child,
    pub url: String,
    pub token: String,
    pub dir: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl Appliance {
    /// Starts `ferry appliance` on a free port with `dir` as its data directory.
    pub fn start(dir: &Path, extra: &[&str], token: Option<&str>) -> Appliance {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("stderr.log"))
            .unwrap();
        let mut child = Command::new(FERRY)
            .args(["appliance", "--data-dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_TEST_APPLIANCE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("run ferry appliance");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut url = None;
        let mut lines = vec![];
        for _ in 0..3 {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            if let Some(i) = line.find("http://") {
                url = Some(line[i..].trim().to_string());
            }
            lines.push(line);
        }
        let url = url.unwrap_or_else(|| {
            panic!(
                "appliance did not say where it listens: {lines:?}; see {}",
                dir.with_extension("stderr.log").display()
            )
        });
        let token = match token {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(dir.join("admin-token"))
                .expect("admin-token written")
                .trim()
                .to_string(),
        };
        Appliance {
            child,
            url,
            token,
            dir: dir.to_path_buf(),
            _stdout: out,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// Runs the CLI against this appliance.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(FERRY)
            .args(args)
            .env("FERRY_URL", &self.url)
            .env("FERRY_TOKEN", &self.token)
            .output()
            .expect("run ferry")
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ferry(args);
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn client(&self) -> Api {
        Api {
            url: self.url.clone(),
            token: self.token.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PATCH, path, body).await
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn ok(&self, path: &str, body: Option<Value>) -> Value {
        let (s, v) = match body {
            Some(b) => self.post(path, b).await,
            None => self.get(path).await,
        };
        assert!((200..300).contains(&s), "{path}: HTTP {s}: {v}");
        v
    }

    /// Count of migrations in `state`.
    pub async fn count(&self, state: &str) -> i64 {
        self.ok(&format!("/api/migrations?state={state}&limit=1"), None)
            .await["total"]
            .as_i64()
            .unwrap()
    }

    pub async fn wait_for(&self, state: &str, n: i64, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let c = self.count(state).await;
            if c >= n {
                return;
            }
            if t0.elapsed() > timeout {
                let stats = self.ok("/api/stats", None).await;
                let failed = self.ok("/api/migrations?state=failed", None).await;
                panic!(
                    "waited {timeout:?} for {n} migrations in {state}, have {c}; by state: {stats}; failed: {failed}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every migration id (all pages).
    pub async fn all_migrations(&self) -> Vec<Value> {
        let mut out = vec![];
        loop {
            let p = self
                .ok(
                    &format!("/api/migrations?limit=500&offset={}", out.len()),
                    None,
                )
                .await;
            let items = p["items"].as_array().unwrap().clone();
            let n = items.len();
            out.extend(items);
            if n == 0 || out.len() as i64 >= p["total"].as_i64().unwrap() {
                return out;
            }
        }
    }

    /// All events, oldest first.
    pub async fn all_events(&self) -> Vec<Value> {
        let mut out: Vec<Value> = vec![];
        let mut after = 0;
        loop {
            let page = self
                .ok(&format!("/api/events?after={after}&limit=1000"), None)
                .await;
            let items = page.as_array().unwrap().clone();
            if items.is_empty() {
                return out;
            }
            after = items.last().unwrap()["id"].as_i64().unwrap();
            out.extend(items);
        }
    }

    /// A source of disk images in `dir`, a local-directory target in `dir/target`, a profile.
    pub async fn setup(&self, dir: &Path, uat_required: bool) {
        self.ok("/api/sources", Some(serde_json::json!({"name": "images", "kind": "disk_image", "config": {"path": dir.display().to_string()}}))).await;
        self.ok("/api/targets", Some(serde_json::json!({"name": "lab", "kind": "local_dir", "config": {"path": dir.join("target").display().to_string()}}))).await;
        self.ok("/api/profiles", Some(serde_json::json!({"name": "default", "target": "lab", "uat": {"required": uat_required}}))).await;
    }

    /// A workload with one small disk image of its own.
    pub async fn workload(&self, dir: &Path, name: &str, size: usize) -> Value {
        let img = dir.join(format!("{name}.img"));
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + name.len()) as u8).collect();
        std::fs::write(&img, data).unwrap();
        let src = self.ok("/api/sources/images", None).await;
        self.ok(
            "/api/workloads",
            Some(serde_json::json!({"name": name, "source_id": src["id"], "disks": [{"name": "root", "size_bytes": size, "path": img.display().to_string()}]})),
        )
        .await
    }
}

/// Checks the audit trail: no job completed twice, and each one-off step of a migration
/// completed exactly once. Returns (jobs completed, step starts).
pub fn check_exactly_once(events: &[Value], migrations: &[Value]) -> (usize, usize) {
    use std::collections::HashMap;
    let mut by_job: HashMap<String, usize> = HashMap::new();
    let mut by_step: HashMap<(String, String), usize> = HashMap::new();
    let mut starts = 0;
    for e in events {
        match e["kind"].as_str() {
            Some("step.completed") => {
                *by_job
                    .entry(e["job_id"].as_str().unwrap().to_string())
                    .or_default() += 1;
                *by_step
                    .entry((
                        e["migration_id"].as_str().unwrap().to_string(),
                        e["step"].as_str().unwrap().to_string(),
                    ))
                    .or_default() += 1;
            }
            Some("step.started") => starts += 1,
            _ => {}
        }
    }
    for (job, n) in &by_job {
        assert_eq!(*n, 1, "job {job} completed {n} times");
    }
    for m in migrations {
        let id = m["id"].as_str().unwrap().to_string();
        for step in [
            "preflight",
            "full_sync",
            "stop_services",
            "final_delta",
            "shutdown_source",
            "shutdown_delta",
            "start_target",
            "post_cutover",
            "final_validation",
        ] {
            let n = by_step
                .get(&(id.clone(), step.to_string()))
                .copied()
                .unwrap_or(0);
            assert_eq!(n, 1, "migration {id}: step {step} completed {n} times");
        }
    }
    (by_job.len(), starts)
}

/// A fresh PostgreSQL database on the test server, or None (with a skip line) without one.
pub fn fresh_pg_database(test: &str) -> Option<String> {
    let base = match std::env::var("FERRY_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            note(&format!("SKIP {test}: FERRY_TEST_PG_URL is not set (export FERRY_TEST_PG_URL=$(scripts/start-postgres.sh))"));
            return None;
        }
    };
    let name = format!("ferry_it_{}", std::process::id())
        + "_"
        + &format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                & 0xffff_ffff
        );
    let o = Command::new("psql")
        .arg(&base)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .expect("psql (postgresql-client) is needed for the PostgreSQL tests");
    assert!(
        o.status.success(),
        "creating database: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (prefix, _) = base.rsplit_once('/').unwrap();
    Some(format!("{prefix}/{name}"))
}
