//! One suite, run against SQLite always and against PostgreSQL when FERRY_TEST_PG_URL is
//! set (scripts/start-postgres.sh prints it). Each PostgreSQL test gets its own database.

use ferry_model::*;
use ferry_store::*;
use std::collections::HashSet;
use uuid::Uuid;

struct Backends {
    stores: Vec<(&'static str, Store)>,
    _dir: tempfile::TempDir,
}

async fn fresh_pg_url(base: &str) -> String {
    use sqlx::Connection;
    let name = format!("ferry_test_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .expect("connect to FERRY_TEST_PG_URL");
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create test database (the role needs CREATEDB)");
    let (prefix, _) = base.rsplit_once('/').expect("URL with a database name");
    format!("{prefix}/{name}")
}

/// Prints a line the test harness does not capture.
fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn backends() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
    let mut stores = vec![("sqlite", Store::open(&url).await.unwrap())];
    match std::env::var("FERRY_TEST_PG_URL") {
        Ok(base) if !base.is_empty() => {
            let url = fresh_pg_url(&base).await;
            stores.push(("postgres", Store::open(&url).await.unwrap()));
        }
        _ => {
            note("SKIP postgres backend: FERRY_TEST_PG_URL is not set (run scripts/start-postgres.sh)");
        }
    }
    Backends { stores, _dir: dir }
}

async fn seed(store: &Store) -> (Workload, Profile, Target) {
    let target = store
        .insert_target(&NewTarget {
            name: "local".into(),
            kind: TargetKind::LocalDir,
            endpoint: None,
            credential_id: None,
            config: serde_json::json!({"path": "/tmp/x"}),
        })
        .await
        .unwrap();
    let wl = store
        .insert_workload(&NewWorkload {
            name: "web-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let spec: ProfileSpec =
        serde_json::from_value(serde_json::json!({"name": "p", "target": "local"})).unwrap();
    let p = store.insert_profile(&spec).await.unwrap();
    (wl, p, target)
}

async fn start(store: &Store, m: &Migration) -> Migration {
    let (status, effects) = transition(&m.status, Input::Command(Command::Start)).unwrap();
    let mut c = Change::new(m, status);
    for e in effects {
        if let Effect::Run(step) = e {
            c.enqueue.push(NewJob {
                step,
                run_at: 0,
                max_attempts: 3,
            });
        }
    }
    store.apply(c).await.unwrap()
}

#[tokio::test]
async fn schema_is_versioned_and_reopen_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("f.db").display());
    let s = Store::open(&url).await.unwrap();
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    s.close().await;
    let s = Store::open(&url).await.unwrap();
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    for (name, s) in backends().await.stores {
        assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION, "{name}");
    }
}

#[tokio::test]
async fn inventory_crud_and_duplicates() {
    for (name, s) in backends().await.stores {
        let (wl, p, t) = seed(&s).await;
        assert_eq!(s.get_workload("web-1").await.unwrap().id, wl.id, "{name}");
        assert_eq!(
            s.get_workload(&wl.id.to_string()).await.unwrap().name,
            "web-1"
        );
        assert_eq!(s.get_profile("p").await.unwrap().id, p.id);
        assert_eq!(s.get_target("local").await.unwrap().id, t.id);
        let dup = s
            .insert_workload(&NewWorkload {
                name: "web-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(dup, StoreError::Duplicate { .. }), "{name}: {dup}");
        assert!(matches!(
            s.get_source("nope").await.unwrap_err(),
            StoreError::NotFound { .. }
        ));
        let (list, total) = s
            .list_workloads(
                &WorkloadFilter {
                    name_contains: Some("web".into()),
                    ..Default::default()
                },
                Page::default(),
            )
            .await
            .unwrap();
        assert_eq!((list.len(), total), (1, 1));
        let (_, total) = s
            .list_workloads(
                &WorkloadFilter {
                    name_contains: Some("db".into()),
                    ..Default::default()
                },
                Page::default(),
            )
            .await
            .unwrap();
        assert_eq!(total, 0);
    }
}

#[tokio::test]
async fn state_change_and_job_are_one_transaction_with_fencing() {
    for (name, s) in backends().await.stores {
        let (wl, p, t) = seed(&s).await;
        let m = s
            .insert_migration(
                wl.id,
                p.id,
                t.id,
                Status::new(false),
                DeltaSchedule::default(),
            )
            .await
            .unwrap();
        let dup = s
            .insert_migration(
                wl.id,
                p.id,
                t.id,
                Status::new(false),
                DeltaSchedule::default(),
            )
            .await;
        assert!(matches!(dup, Err(StoreError::Duplicate { .. })), "{name}");
        let m = start(&s, &m).await;
        assert_eq!(m.state(), State::Preflight);
        let jobs = s.list_jobs(m.id).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].step, Step::Preflight);

        // A stale version conflicts and writes nothing.
        let mut stale = m.clone();
        stale.version -= 1;
        let err = s
            .apply(Change::new(&stale, m.status.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{name}: {err}");

        let c = s.claim_job("a", 30_000).await.unwrap().expect("a job");
        assert!(
            s.claim_job("b", 30_000).await.unwrap().is_none(),
            "{name}: claimed twice"
        );
        assert!(s.heartbeat(&c, 30_000).await.unwrap());

        // Completing with a wrong token is refused and changes nothing.
        let (next, _) = transition(&m.status, Input::StepSucceeded(Step::Preflight)).unwrap();
        let mut bad = Change::new(&m, next.clone());
        bad.complete_job = Some((c.job.id, Uuid::new_v4()));
        assert!(matches!(
            s.apply(bad).await.unwrap_err(),
            StoreError::LeaseLost(_)
        ));
        assert_eq!(
            s.get_migration(m.id).await.unwrap().state(),
            State::Preflight
        );

        let mut good = Change::new(&m, next);
        good.complete_job = Some((c.job.id, c.token));
        good.enqueue.push(NewJob {
            step: Step::FullSync,
            run_at: 0,
            max_attempts: 3,
        });
        let m2 = s.apply(good).await.unwrap();
        assert_eq!(m2.state(), State::InitialSync);
        assert_eq!(s.get_job(c.job.id).await.unwrap().status, JobStatus::Done);
        assert!(
            !s.heartbeat(&c, 30_000).await.unwrap(),
            "{name}: heartbeat after completion"
        );

        // Retry later, then cancel: the holder loses its lease.
        let c2 = s.claim_job("a", 30_000).await.unwrap().unwrap();
        assert_eq!(c2.job.step, Step::FullSync);
        assert!(s.retry_job_later(&c2, 0, "boom").await.unwrap());
        let c3 = s.claim_job("b", 30_000).await.unwrap().unwrap();
        assert_eq!(c3.job.id, c2.job.id);
        assert_eq!(c3.job.attempts, 2);
        let (st, _) = transition(&m2.status, Input::Command(Command::Cancel)).unwrap();
        let mut cancel = Change::new(&m2, st);
        cancel.cancel_running = true;
        s.apply(cancel).await.unwrap();
        assert!(
            !s.heartbeat(&c3, 30_000).await.unwrap(),
            "{name}: lease survived cancel"
        );
        assert_eq!(
            s.get_job(c3.job.id).await.unwrap().status,
            JobStatus::Cancelled
        );

        let events = s.list_events(Some(m.id), 0, 100).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "step.started").count(),
            3,
            "{name}: {kinds:?}"
        );
        assert!(kinds.contains(&"step.retry"));
    }
}

#[tokio::test]
async fn expired_leases_are_taken_over() {
    for (name, s) in backends().await.stores {
        let (wl, p, t) = seed(&s).await;
        let m = s
            .insert_migration(
                wl.id,
                p.id,
                t.id,
                Status::new(false),
                DeltaSchedule::default(),
            )
            .await
            .unwrap();
        start(&s, &m).await;
        let c = s.claim_job("dead", 1).await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let c2 = s.claim_job("alive", 30_000).await.unwrap().expect(name);
        assert_eq!(c2.job.id, c.job.id);
        assert!(!s.heartbeat(&c, 30_000).await.unwrap());
        // release_owned puts a crashed owner's jobs back at once.
        assert_eq!(s.release_owned("alive").await.unwrap(), 1);
        assert!(s.claim_job("again", 30_000).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn concurrent_claimers_never_share_a_job() {
    for (name, s) in backends().await.stores {
        let target = s
            .insert_target(&NewTarget {
                name: "t".into(),
                kind: TargetKind::LocalDir,
                endpoint: None,
                credential_id: None,
                config: serde_json::json!({}),
            })
            .await
            .unwrap();
        let spec: ProfileSpec =
            serde_json::from_value(serde_json::json!({"name": "p", "target": "t"})).unwrap();
        let p = s.insert_profile(&spec).await.unwrap();
        for i in 0..40 {
            let wl = s
                .insert_workload(&NewWorkload {
                    name: format!("w{i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            let m = s
                .insert_migration(
                    wl.id,
                    p.id,
                    target.id,
                    Status::new(false),
                    DeltaSchedule::default(),
                )
                .await
                .unwrap();
            start(&s, &m).await;
        }
        let mut tasks = vec![];
        for w in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = vec![];
                while let Some(c) = s.claim_job(&format!("w{w}"), 60_000).await.unwrap() {
                    got.push(c.job.id);
                }
                got
            }));
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), 40, "{name}");
        assert_eq!(unique.len(), 40, "{name}: a job was claimed twice");
    }
}

#[tokio::test]
async fn import_is_all_or_nothing() {
    for (name, s) in backends().await.stores {
        s.insert_workload(&NewWorkload {
            name: "taken".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let row = |n: &str| ImportRow {
            workload: NewWorkload {
                name: n.into(),
                ..Default::default()
            },
            move_group_name: Some("wave-1".into()),
            group_target_date: None,
            credential: Some((CredentialKind::Password, Some("root".into()), "enc".into())),
        };
        let err = s
            .import_workloads(vec![row("a"), row("taken")])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Duplicate { .. }), "{name}: {err}");
        assert!(s.get_workload("a").await.is_err(), "{name}: half-imported");
        assert!(
            s.get_group("wave-1").await.is_err(),
            "{name}: group left behind"
        );
        let done = s.import_workloads(vec![row("a"), row("b")]).await.unwrap();
        assert_eq!(done.len(), 2);
        let g = s.get_group("wave-1").await.unwrap();
        assert_eq!(done[0].move_group_id, Some(g.id));
        assert_eq!(done[1].move_group_id, Some(g.id));
    }
}

#[tokio::test]
async fn named_lease_has_one_holder_at_a_time() {
    for (name, s) in backends().await.stores {
        assert!(
            s.try_lease("scheduler", "a", 60_000).await.unwrap(),
            "{name}"
        );
        assert!(
            !s.try_lease("scheduler", "b", 60_000).await.unwrap(),
            "{name}"
        );
        assert!(
            s.try_lease("scheduler", "a", 1).await.unwrap(),
            "{name}: renewal"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(
            s.try_lease("scheduler", "b", 60_000).await.unwrap(),
            "{name}: takeover after expiry"
        );
        assert!(
            !s.try_lease("scheduler", "a", 60_000).await.unwrap(),
            "{name}"
        );
    }
}
