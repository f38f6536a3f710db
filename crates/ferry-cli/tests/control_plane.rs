//! Control plane, end to end: the real `ferry appliance` and `ferry` CLI, on SQLite and
//! (when FERRY_TEST_PG_URL is set) PostgreSQL.

mod cp;

use cp::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn lifecycle(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let app = Appliance::start(&dir.join("data"), extra, None);
    let mode = std::fs::metadata(dir.join("data/admin-token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    let img = dir.join("disk0.img");
    std::fs::write(&img, vec![0x5a; 3 << 20]).unwrap();
    app.ok(&[
        "source",
        "add",
        "images",
        "--kind",
        "disk_image",
        "--path",
        dir.to_str().unwrap(),
    ]);
    app.ok(&[
        "target",
        "add",
        "lab",
        "--kind",
        "local_dir",
        "--path",
        dir.join("target").to_str().unwrap(),
    ]);
    app.ok(&[
        "inventory",
        "add",
        "web-1",
        "--source",
        "images",
        "--disk",
        &format!("root={}", img.display()),
        "--services",
        "nginx",
    ]);
    let profile = dir.join("p.toml");
    std::fs::write(
        &profile,
        "name = \"default\"\ntarget = \"lab\"\n[uat]\nrequired = true\nnetwork = \"isolated\"\n",
    )
    .unwrap();
    app.ok(&["profile", "create", profile.to_str().unwrap()]);

    let out = app.ok(&[
        "migration",
        "start",
        "web-1",
        "--profile",
        "default",
        "--follow",
        "--json",
    ]);
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["status"]["state"], "synced", "{out}");

    // Cutover before the required UAT pass is refused, naming the state and what is allowed.
    let o = app.ferry(&["migration", "cutover", "web-1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("'synced'") && err.contains("allowed now:") && err.contains("UAT"),
        "{err}"
    );

    // The source changes; a delta sync carries only the change.
    let mut data = vec![0x5a; 3 << 20];
    data[(1 << 20) + 7] = 1;
    std::fs::write(&img, &data).unwrap();
    app.ok(&["migration", "sync", "web-1", "--follow"]);
    app.ok(&["migration", "uat", "start", "web-1", "--follow"]);
    app.ok(&["migration", "uat", "pass", "web-1"]);
    let st = app.ok(&["migration", "status", "web-1", "--follow", "--json"]);
    let st: Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["migration"]["status"]["state"], "synced");
    assert_eq!(st["migration"]["status"]["uat_verdict"], "passed");
    let syncs = st["syncs"].as_array().unwrap();
    // One changed byte: the replication engine sends its 64 KiB chunk and a frame header.
    let sent = syncs[1]["bytes_sent"].as_u64().unwrap();
    assert!(
        (64 << 10..(64 << 10) + 256).contains(&sent),
        "delta moved only the changed chunk: {syncs:?}"
    );

    let out = app.ok(&["migration", "cutover", "web-1", "--follow", "--json"]);
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["status"]["state"], "completed", "{out}");
    assert_eq!(m["status"]["source_down"], true);

    // Every state was passed through, each step completed once.
    let events = app.ok(&["migration", "events", "web-1", "--json"]);
    let events: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "state.changed")
        .map(|e| e["data"]["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "preflight",
            "initial_sync",
            "synced",
            "delta_sync",
            "synced",
            "uat_starting",
            "uat",
            "uat_stopping",
            "synced",
            "stopping_services",
            "final_delta",
            "shutting_down_source",
            "shutdown_delta",
            "starting_target",
            "post_cutover",
            "final_validation",
            "completed"
        ]
    );
    let migrations = vec![json!({"id": m["id"]})];
    check_exactly_once(&events, &migrations);

    // The target holds the source's bytes and a running instance.
    let inst = std::fs::read_dir(dir.join("target"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(std::fs::read(inst.join("root.img")).unwrap(), data);
    assert!(inst.join("instance.json").exists());

    // Tables by default.
    let table = app.ok(&["migration", "list"]);
    assert!(
        table.contains("web-1") && table.contains("completed"),
        "{table}"
    );
    let logs = app.ok(&["migration", "logs", "web-1"]);
    assert!(logs.contains("running step final_validation"), "{logs}");
}

#[test]
fn migration_goes_through_every_state_on_sqlite() {
    lifecycle(&[]);
}

#[test]
fn migration_goes_through_every_state_on_postgres() {
    let Some(url) = fresh_pg_database("migration_goes_through_every_state_on_postgres") else {
        return;
    };
    lifecycle(&["--database", &url]);
}

#[tokio::test]
async fn api_auth_errors_and_openapi() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("data"), &[], None);
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/api/openapi.json", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["paths"]["/api/migrations/{id}/commands"]["post"].is_object());

    for (token, what) in [(None, "no token"), (Some("ferry_wrong"), "wrong token")] {
        let mut rb = http.get(format!("{}/api/migrations", app.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
    }

    let api = app.client();
    let (s, v) = api.get("/api/migrations?limit=0").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    let (s, v) = api.get("/api/migrations?state=flying").await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown state 'flying'"));
    let (s, v) = api.get("/api/nope").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, v) = api.get("/api/migrations/not-a-uuid").await;
    assert_eq!(s, 400, "{v}");
    let r = http
        .post(format!("{}/api/groups", app.url))
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "bad_request");
    let (s, _) = api
        .post(
            "/api/groups",
            json!({"name": "wave-1", "target_date": "2026-02-30"}),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = api
        .post(
            "/api/groups",
            json!({"name": "wave-1", "target_date": "2026-12-01", "concurrency": 2}),
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = api.post("/api/groups", json!({"name": "wave-1"})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")));
    // Kinds no adapter of this build runs are refused when added, not when a migration
    // reaches them.
    let (s, v) = api
        .post(
            "/api/targets",
            json!({"name": "kvm1", "kind": "libvirt", "endpoint": "qemu:///system"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["details"]["fields"][0]["field"], "kind", "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("'libvirt'") && m.contains("local, local_dir, vme"),
        "{m}"
    );
    let (s, v) = api
        .post("/api/sources", json!({"name": "host1", "kind": "agent"}))
        .await;
    assert_eq!(s, 400, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("'agent'") && m.contains("disk_image"), "{m}");

    // Sources and targets are edited under the rules that admit new ones; a stored
    // credential does not follow its endpoint to another host.
    let cred = api
        .ok(
            "/api/credentials",
            Some(json!({"name": "vc", "kind": "password", "username": "u", "secret": "s3cret"})),
        )
        .await;
    api.ok("/api/sources", Some(json!({"name": "vc1", "kind": "vsphere", "endpoint": "https://vc1.example/sdk", "credential_id": cred["id"]}))).await;
    let (s, v) = api
        .patch(
            "/api/sources/vc1",
            json!({"endpoint": "https://elsewhere.example/sdk"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        v["error"]["details"]["fields"][0]["field"], "credential_id",
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("never sent to another"),
        "{v}"
    );
    let (s, v) = api
        .patch(
            "/api/sources/vc1",
            json!({"endpoint": "https://vc2.example/sdk", "credential_id": cred["id"]}),
        )
        .await;
    assert_eq!(
        (s, v["endpoint"].as_str()),
        (200, Some("https://vc2.example/sdk")),
        "{v}"
    );
    let out = app.ok(&[
        "source",
        "set",
        "vc1",
        "--config",
        r#"{"ca_bundle": "/etc/ssl/vc.pem"}"#,
    ]);
    assert!(out.contains("source vc1 updated"), "{out}");
    let (_, v) = api.get("/api/sources/vc1").await;
    assert_eq!(v["config"]["ca_bundle"], "/etc/ssl/vc.pem", "{v}");
    api.ok(
        "/api/targets",
        Some(json!({"name": "dir1", "kind": "local_dir", "config": {"path": "/srv/t"}})),
    )
    .await;
    let (s, v) = api.patch("/api/targets/dir1", json!({"config": {}})).await;
    assert_eq!(s, 400, "a local_dir target without a path: {v}");

    // A refused command: 409 with the current state and the allowed commands.
    api.setup(tmp.path(), false).await;
    api.workload(tmp.path(), "w", 4096).await;
    let m = api
        .ok(
            "/api/migrations",
            Some(json!({"workload": "w", "profile": "default", "start": false})),
        )
        .await;
    let (s, v) = api
        .post(
            &format!("/api/migrations/{}/commands", m["id"].as_str().unwrap()),
            json!({"command": "cutover"}),
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(v["error"]["code"], "invalid_state");
    assert_eq!(v["error"]["details"]["state"], "onboarded");
    assert_eq!(
        v["error"]["details"]["allowed"],
        json!(["preflight", "start", "cancel"])
    );

    // Credentials: the secret is stored encrypted and never returned.
    let c = api.ok("/api/credentials", Some(json!({"name": "root@w", "kind": "password", "username": "root", "secret": "hunter2"}))).await;
    assert!(c.get("secret").is_none());
    let db = std::fs::read(tmp.path().join("data/ferry.db")).unwrap();
    let wal = std::fs::read(tmp.path().join("data/ferry.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(7).any(|w| w == b"hunter2"),
            "secret stored in clear"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_appliance_resumes_and_no_step_completes_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = ["--step-delay-ms", "150", "--workers", "8"];
    let mut app = Appliance::start(&data, &args, None);
    let api = app.client();
    api.setup(tmp.path(), false).await;
    let n = 24;
    for i in 0..n {
        api.workload(tmp.path(), &format!("vm-{i:02}"), 256 << 10)
            .await;
        api.ok(
            "/api/migrations",
            Some(json!({"workload": format!("vm-{i:02}"), "profile": "default"})),
        )
        .await;
    }
    let t0 = Instant::now();
    let mut kills = 0;
    // Kill while the initial syncs run, restart, repeat.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        app.kill();
        kills += 1;
        app = Appliance::start(&data, &args, Some(&api.token));
    }
    let api = app.client();
    api.wait_for("synced", n, Duration::from_secs(120)).await;
    for m in api.all_migrations().await {
        api.ok(
            &format!("/api/migrations/{}/commands", m["id"].as_str().unwrap()),
            Some(json!({"command": "cutover"})),
        )
        .await;
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.kill();
        kills += 1;
        app = Appliance::start(&data, &args, Some(&api.token));
    }
    let api = app.client();
    api.wait_for("completed", n, Duration::from_secs(180)).await;
    let events = api.all_events().await;
    let migrations = api.all_migrations().await;
    let (jobs, starts) = check_exactly_once(&events, &migrations);
    assert!(
        starts > jobs,
        "the kills interrupted no step ({starts} starts for {jobs} jobs): the test proved nothing"
    );
    note(&format!("crash test: {n} migrations, {kills} SIGKILLs, {jobs} steps completed once each, {} restarted steps, {:.1?}", starts - jobs, t0.elapsed()));
}

fn csv_500(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u64>) {
    let mut text = String::from("host,username,password,private_key,agent,domain,move_group_name,target_migration_date,assigned_resource_email,cloud_sizing,tags\n");
    let mut bad = vec![];
    for i in 0..500u64 {
        let line = i + 2;
        let row = match i % 50 {
            7 => { bad.push(line); format!("srv-{i},root,pw,,maybe,corp.local,wave-{},2026-12-01,ops@corp.local,medium,web", i % 5) }
            19 => { bad.push(line); format!("srv-{i},root,pw,,true,corp.local,wave-{},2026-13-01,ops@corp.local,medium,web", i % 5) }
            31 => { bad.push(line); format!(",root,pw,,true,corp.local,wave-{},2026-12-01,ops@corp.local,medium,web", i % 5) }
            43 => { bad.push(line); format!("srv-{i},,pw,,true,corp.local,wave-{},2026-12-01,not-an-email,medium,web", i % 5) }
            _ if i % 2 == 0 => format!("srv-{i},root,pw{i},,true,corp.local,wave-{},12/0{}/2026,ops@corp.local,large,web;tier-{}", i % 5, 1 + i % 9, i % 3),
            _ => format!("srv-{i},admin,,\"-----BEGIN KEY-----\nabc{i}\n-----END KEY-----\",no,,wave-{},,,small,db", i % 5),
        };
        text.push_str(&row);
        text.push('\n');
    }
    let p = dir.join("inventory.csv");
    std::fs::write(&p, text).unwrap();
    (p, bad)
}

#[tokio::test]
async fn csv_import_of_500_rows_reports_bad_lines_and_imports_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("data"), &[], None);
    let (csv, bad) = csv_500(tmp.path());
    let o = app.ferry(&[
        "inventory",
        "import",
        "--csv",
        csv.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(2), "rejected rows give exit code 2");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["imported"], 500 - bad.len());
    let lines: Vec<u64> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    // Rows with a multi-line private key shift later line numbers: count physical lines.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut expected = vec![];
    let mut rdr = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    for rec in rdr.records() {
        let rec = rec.unwrap();
        let host = &rec[0];
        let i: Option<u64> = host.strip_prefix("srv-").and_then(|s| s.parse().ok());
        if i.is_none_or(|i| [7, 19, 31, 43].contains(&(i % 50))) {
            expected.push(rec.position().unwrap().line());
        }
    }
    assert_eq!(lines, expected);
    let msgs: Vec<&str> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(msgs[0].contains("agent 'maybe'"), "{msgs:?}");
    assert!(msgs[1].contains("2026-13-01"), "{msgs:?}");
    assert!(msgs[2].contains("host must not be empty"), "{msgs:?}");
    assert!(
        msgs[3].contains("needs a username") && msgs[3].contains("not-an-email"),
        "{msgs:?}"
    );

    let api = app.client();
    assert_eq!(
        api.ok("/api/workloads?limit=1", None).await["total"],
        500 - bad.len()
    );
    assert_eq!(api.ok("/api/groups", None).await["total"], 5);
    let w = api.ok("/api/workloads/srv-2", None).await;
    assert_eq!(w["target_migration_date"], "2026-12-03");
    assert_eq!(w["tags"], json!(["web", "tier-2"]));
    assert!(
        api.ok("/api/workloads?tag=tier-2&limit=1", None).await["total"]
            .as_i64()
            .unwrap()
            > 0
    );

    // Importing again: every row is now a duplicate, nothing is half-imported.
    let o = app.ferry(&[
        "inventory",
        "import",
        "--csv",
        csv.to_str().unwrap(),
        "--json",
    ]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["imported"], 0);
    assert_eq!(r["rejected"], 500);
    assert_eq!(
        api.ok("/api/workloads?limit=1", None).await["total"],
        500 - bad.len()
    );

    // An imported workload gets its source and disk, then migrates.
    api.setup(tmp.path(), false).await;
    let img = tmp.path().join("srv-2.img");
    std::fs::write(&img, vec![2u8; 65536]).unwrap();
    app.ok(&[
        "inventory",
        "set",
        "srv-2",
        "--source",
        "images",
        "--disk",
        &format!("root={}", img.display()),
        "--services",
        "nginx,cron",
        "--order",
        "3",
    ]);
    let w = api.ok("/api/workloads/srv-2", None).await;
    assert_eq!(w["services"], json!(["nginx", "cron"]));
    assert_eq!(w["group_order"], 3);
    assert_eq!(w["tags"], json!(["web", "tier-2"]), "fields not given stay");
    let out = app.ok(&[
        "migration",
        "start",
        "srv-2",
        "--profile",
        "default",
        "--follow",
        "--json",
    ]);
    assert!(out.contains("\"synced\""), "{out}");

    // A file with an unknown column is refused as a whole, pointing at line 1.
    std::fs::write(tmp.path().join("bad.csv"), "host,colour\nx,red\n").unwrap();
    let o = app.ferry(&[
        "inventory",
        "import",
        "--csv",
        tmp.path().join("bad.csv").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 1: unknown column 'colour'"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_cutover_respects_order_and_concurrency() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("data"), &["--step-delay-ms", "60"], None);
    let api = app.client();
    api.setup(tmp.path(), false).await;
    let g = api
        .ok(
            "/api/groups",
            Some(json!({"name": "wave-1", "concurrency": 2})),
        )
        .await;
    let src = api.ok("/api/sources/images", None).await;
    for (i, order) in [0, 0, 0, 1, 1].iter().enumerate() {
        let img = tmp.path().join(format!("g{i}.img"));
        std::fs::write(&img, vec![i as u8; 8192]).unwrap();
        api.ok("/api/workloads", Some(json!({"name": format!("g{i}"), "source_id": src["id"], "move_group_id": g["id"], "group_order": order, "disks": [{"name": "root", "size_bytes": 8192, "path": img.display().to_string()}]}))).await;
    }
    let r = api
        .ok(
            "/api/groups/wave-1/migrations",
            Some(json!({"profile": "default"})),
        )
        .await;
    assert_eq!(r["created"].as_array().unwrap().len(), 5);
    api.wait_for("synced", 5, Duration::from_secs(60)).await;
    api.ok("/api/groups/wave-1/cutover", Some(json!({}))).await;
    api.wait_for("completed", 5, Duration::from_secs(120)).await;

    // Replay the audit trail: never more than 2 in cutover, order 1 only after order 0 ended.
    let events = api.all_events().await;
    let names: std::collections::HashMap<String, usize> = api
        .all_migrations()
        .await
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["workload_name"].as_str().unwrap()[1..].parse().unwrap(),
            )
        })
        .collect();
    let mut in_cutover = std::collections::HashSet::new();
    let mut done = std::collections::HashSet::new();
    let mut peak = 0;
    for e in events.iter().filter(|e| e["kind"] == "state.changed") {
        let i = names[e["migration_id"].as_str().unwrap()];
        match (
            e["data"]["from"].as_str().unwrap(),
            e["data"]["to"].as_str().unwrap(),
        ) {
            ("synced", "stopping_services") => {
                if i >= 3 {
                    assert!(
                        (0..3).all(|j| done.contains(&j)),
                        "g{i} (order 1) started before order 0 finished"
                    );
                }
                in_cutover.insert(i);
            }
            (_, "completed") => {
                in_cutover.remove(&i);
                done.insert(i);
            }
            _ => {}
        }
        peak = peak.max(in_cutover.len());
    }
    assert!(
        peak <= 2,
        "{peak} members cut over at once with concurrency 2"
    );
    assert_eq!(peak, 2, "concurrency 2 was never used");
    // The scheduler closes the group's cutover on its next pass.
    let t0 = Instant::now();
    while api.ok("/api/groups/wave-1", None).await["cutover_requested"] != false {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "group cutover never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_schedule_runs_deltas_and_sse_streams_events() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("data"), &[], None);
    let api = app.client();
    api.setup(tmp.path(), false).await;
    api.workload(tmp.path(), "c1", 4096).await;
    let m = api
        .ok(
            "/api/migrations",
            Some(json!({"workload": "c1", "profile": "default"})),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    api.wait_for("synced", 1, Duration::from_secs(30)).await;
    let r = api
        .http
        .put(format!("{}/api/migrations/{id}/schedule", api.url))
        .bearer_auth(&api.token)
        .json(&json!({"mode": "continuous", "min_interval_secs": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = {
        let r = api
            .http
            .put(format!("{}/api/migrations/{id}/schedule", api.url))
            .bearer_auth(&api.token)
            .json(&json!({"mode": "cron", "cron": "61 * * * *"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(s, 400, "a bad cron expression is a client error");
    let t0 = Instant::now();
    loop {
        let d = api.ok(&format!("/api/migrations/{id}"), None).await;
        if d["migration"]["status"]["generation"].as_u64().unwrap() >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "continuous deltas did not run: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The SSE stream replays from a cursor.
    let mut r = api
        .http
        .get(format!(
            "{}/api/events/stream?after=0&migration_id={id}",
            api.url
        ))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    while !buf.contains("event: step.completed") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("SSE data")
            .unwrap()
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        buf.contains("id: 1\n") || buf.contains("event: migration.created"),
        "{buf}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_appliances_on_one_postgres_run_each_step_exactly_once() {
    let Some(url) = fresh_pg_database("two_appliances_on_one_postgres_run_each_step_exactly_once")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("shared.key");
    let key = key.to_str().unwrap();
    let a = Appliance::start(
        &tmp.path().join("a"),
        &[
            "--database",
            &url,
            "--secret-key-file",
            key,
            "--workers",
            "8",
        ],
        None,
    );
    let b = Appliance::start(
        &tmp.path().join("b"),
        &[
            "--database",
            &url,
            "--secret-key-file",
            key,
            "--workers",
            "8",
        ],
        Some(&a.token),
    );
    assert!(
        !tmp.path().join("b/admin-token").exists(),
        "only the first appliance creates the admin token"
    );
    let (api_a, api_b) = (a.client(), b.client());
    api_a.setup(tmp.path(), false).await;
    let n: i64 = std::env::var("FERRY_SCALE_MIGRATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for i in 0..n {
        api_a
            .workload(tmp.path(), &format!("s{i:03}"), 64 << 10)
            .await;
    }
    let t0 = Instant::now();
    for i in 0..n {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        api.ok(
            "/api/migrations",
            Some(json!({"workload": format!("s{i:03}"), "profile": "default"})),
        )
        .await;
    }
    api_a.wait_for("synced", n, Duration::from_secs(300)).await;
    let t_synced = t0.elapsed();
    for (i, m) in api_b.all_migrations().await.iter().enumerate() {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        api.ok(
            &format!("/api/migrations/{}/commands", m["id"].as_str().unwrap()),
            Some(json!({"command": "cutover"})),
        )
        .await;
    }
    api_b
        .wait_for("completed", n, Duration::from_secs(600))
        .await;
    let wall = t0.elapsed();
    let events = api_a.all_events().await;
    let migrations = api_a.all_migrations().await;
    let (jobs, starts) = check_exactly_once(&events, &migrations);
    assert_eq!(starts, jobs, "a step was started twice without a crash");
    assert_eq!(jobs as i64, n * 9, "9 steps per migration");
    let owners: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e["kind"] == "step.completed")
        .map(|e| e["data"]["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 2, "both appliances worked: {owners:?}");
    note(&format!("scale test: {n} migrations through all states on two appliances sharing PostgreSQL: {jobs} steps, each once; synced after {t_synced:.1?}, completed after {wall:.1?}"));
}

/// Schemathesis (from PyPI) against /api/openapi.json: no 5xx, every response as
/// documented, schema-violating requests rejected. Semantic checks the document cannot
/// express (cron syntax, CSV contents, calendar dates) are why positive-data acceptance
/// is not among the checks.
#[test]
fn api_conforms_to_its_openapi_document() {
    let st = std::env::var("FERRY_SCHEMATHESIS")
        .unwrap_or_else(|_| "/var/cache/ferry/venv/bin/st".to_string());
    if !std::path::Path::new(&st).exists() {
        note(&format!("SKIP api_conforms_to_its_openapi_document: schemathesis not found at {st} (scripts/install-deps.sh installs it)"));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("data"), &[], None);
    let img = tmp.path().join("d.img");
    std::fs::write(&img, vec![1u8; 4096]).unwrap();
    app.ok(&[
        "source",
        "add",
        "images",
        "--kind",
        "disk_image",
        "--path",
        tmp.path().to_str().unwrap(),
    ]);
    app.ok(&[
        "target",
        "add",
        "lab",
        "--kind",
        "local_dir",
        "--path",
        tmp.path().join("t").to_str().unwrap(),
    ]);
    app.ok(&[
        "inventory",
        "add",
        "web-1",
        "--source",
        "images",
        "--disk",
        &format!("root={}", img.display()),
    ]);
    let p = tmp.path().join("p.toml");
    std::fs::write(&p, "name = \"default\"\ntarget = \"lab\"\n").unwrap();
    app.ok(&["profile", "create", p.to_str().unwrap()]);
    app.ok(&[
        "migration",
        "start",
        "web-1",
        "--profile",
        "default",
        "--follow",
    ]);
    let secs = std::env::var("FERRY_SCHEMATHESIS_SECONDS").unwrap_or_else(|_| "120".into());
    let out = std::process::Command::new(&st)
        .args(["run", &format!("{}/api/openapi.json", app.url)])
        .args(["-H", &format!("Authorization: Bearer {}", app.token)])
        .args(["--exclude-path", "/api/events/stream"])
        .args(["--exclude-checks", "positive_data_acceptance"])
        .args([
            "-n",
            "30",
            "--max-time",
            &secs,
            "--request-timeout",
            "10",
            "--seed",
            "1",
        ])
        .env("NO_COLOR", "1")
        .current_dir(tmp.path())
        .output()
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    eprintln!("{}", tail[tail.len().saturating_sub(6)..].join("\n"));
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{}\n{}",
        tail.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ferry credential add` takes the secret from standard input, $FERRY_SECRET or a file,
/// never from the command line; `list` shows everything but the secret, which is stored
/// only encrypted.
#[test]
fn credentials_are_added_without_the_secret_on_the_command_line() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(&tmp.path().join("appliance"), &[], None);
    let secret_a = "Stdin-Secret-7f3a";
    let mut child = std::process::Command::new(FERRY)
        .args([
            "credential",
            "add",
            "vc-admin",
            "--kind",
            "password",
            "--username",
            "administrator@vsphere.local",
        ])
        .env("FERRY_URL", &app.url)
        .env("FERRY_TOKEN", &app.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{secret_a}").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stored encrypted"));

    let secret_b = "hmac-sha256:ferry-key:c2VjcmV0LWJ5dGVz";
    let key_file = tmp.path().join("tsig");
    std::fs::write(&key_file, format!("{secret_b}\n")).unwrap();
    app.ok(&[
        "credential",
        "add",
        "dns-key",
        "--kind",
        "token",
        "--secret-file",
        key_file.to_str().unwrap(),
    ]);

    let o = app.ferry(&["credential", "add", "empty", "--kind", "token"]);
    assert!(!o.status.success(), "an empty secret is refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("the secret is empty"));
    let o = app.ferry(&["credential", "add", "x", "--kind", "pin"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("password, private_key, token"));

    let list = app.ok(&["credential", "list"]);
    assert!(
        list.contains("vc-admin") && list.contains("administrator@vsphere.local"),
        "{list}"
    );
    assert!(list.contains("dns-key") && list.contains("token"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&app.ok(&["credential", "list", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    drop(app);
    for (p, b) in std::fs::read_dir(tmp.path().join("appliance"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
    {
        for s in [secret_a, secret_b] {
            assert!(
                !b.windows(s.len()).any(|w| w == s.as_bytes()),
                "{s} in clear in {}",
                p.display()
            );
        }
    }
}
