//! The vSphere source through the appliance, against govmomi's simulator: `ferry source
//! discover` puts vCenter's VMs into the inventory, and pre-flight reports what keeps a VM
//! from migrating (here: changed block tracking off) with the fix; the migration syncs,
//! cuts over to a `local_dir` target (what the guest wrote while it shut down included,
//! the whole disk compared) and rolls back.

mod cp;

use cp::*;
use ferry_vsphere::vcsim::Vcsim;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcenter_vms_are_discovered_and_preflight_names_what_to_fix() {
    let bin = match Vcsim::build() {
        Ok(b) => b,
        Err(e) if std::env::var("FERRY_TEST_VCSIM").is_ok() => panic!("building vcsim: {e}"),
        Err(e) => {
            note(&format!("SKIP: vcsim cannot be built here: {e}"));
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let ca = ferry_pki::CaDir::new(tmp.path().join("pki"));
    ca.init("ferry-test-ca").unwrap();
    ca.issue("vcsim", &["127.0.0.1".to_string()]).unwrap();
    let key = tmp.path().join("vcsim.key");
    ca.export_key("vcsim", &key).unwrap();
    let sim = Vcsim::start(&bin, &ca.cert_path("vcsim"), &key, tmp.path()).unwrap();
    let app = Appliance::start(&tmp.path().join("appliance"), &[], None);
    let api = app.client();

    let cred = api
        .ok("/api/credentials", Some(json!({"name": "vcenter", "kind": "password", "username": sim.username(), "secret": sim.password()})))
        .await;
    let config = json!({"ca_bundle": ca.ca_cert_path().display().to_string()}).to_string();
    // The simulator as a vSphere source, logging in with credential `cred`.
    let add_source = |name: &str, cred: &serde_json::Value| {
        app.ok(&[
            "source",
            "add",
            name,
            "--kind",
            "vsphere",
            "--endpoint",
            sim.url(),
            "--credential",
            cred["id"].as_str().unwrap(),
            "--config",
            &config,
        ]);
    };
    add_source("vc1", &cred);
    let out = app.ok(&["source", "discover", "vc1", "--json"]);
    let found: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        found.len() as u64,
        sim.info["vms"].as_u64().unwrap(),
        "{out}"
    );
    for w in &found {
        assert!(!w["disks"].as_array().unwrap().is_empty(), "{w}");
        assert!(
            w["disks"][0]["path"].as_str().unwrap().ends_with(".vmdk"),
            "{w}"
        );
        assert!(!w["nics"].as_array().unwrap().is_empty(), "{w}");
    }
    let table = app.ok(&["source", "discover", "vc1"]);
    assert!(table.contains("workload(s) discovered on vc1"), "{table}");

    // A wrong password is named as such.
    let bad = api
        .ok("/api/credentials", Some(json!({"name": "vcenter-bad", "kind": "password", "username": sim.username(), "secret": "nope"})))
        .await;
    add_source("vc2", &bad);
    let o = app.ferry(&["source", "discover", "vc2"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused the login") && err.contains("check the user name"),
        "{err}"
    );

    // Pre-flight of a VM with CBT off: refused, with the fix.
    let vm = found[0]["name"].as_str().unwrap().to_string();
    api.ok("/api/targets", Some(json!({"name": "lab", "kind": "local_dir", "config": {"path": tmp.path().join("target").display().to_string()}}))).await;
    api.ok("/api/profiles", Some(json!({"name": "p", "target": "lab"})))
        .await;
    let m = api
        .ok(
            "/api/migrations",
            Some(json!({"workload": vm, "profile": "p"})),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let last_error = loop {
        let m = api.ok(&format!("/api/migrations/{id}"), None).await;
        if m["migration"]["status"]["state"] == "failed" {
            break m["migration"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pre-flight did not fail: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        last_error.contains("changed block tracking is off") && last_error.contains("enable it"),
        "{last_error}"
    );

    // The fix pre-flight names, applied through Ferry; the retried migration syncs the
    // VM's disk (64 MiB flat extent in the simulator's datastore) to the local target.
    let out = app.ok(&["source", "fix", "vc1", "enable-cbt", &vm]);
    assert!(out.contains("changed block tracking enabled"), "{out}");
    let flat = sim
        .datastore_dir("LocalDS_0")
        .unwrap()
        .join(&vm)
        .join("disk1-flat.vmdk");
    let write = |offset: u64, data: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&flat).unwrap();
        f.write_all_at(data, offset).unwrap();
    };
    let data: Vec<u8> = (0..6u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    write(2 << 20, &data);
    app.ok(&["migration", "retry", &id]);
    let st = app.ok(&["migration", "status", &id, "--follow", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["migration"]["status"]["state"], "synced", "{st}");
    let target = find_image(&tmp.path().join("target")).unwrap_or_else(|| {
        let out = std::process::Command::new("find")
            .arg(tmp.path())
            .output()
            .unwrap();
        panic!(
            "no target disk: {st}\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let same = |t: &std::path::Path| std::fs::read(&flat).unwrap() == std::fs::read(t).unwrap();
    assert!(same(&target), "the target differs from the VM's disk");

    // The guest writes; the delta reads only what changed block tracking lists.
    write(10 << 20, b"a change the delta must carry");
    write(40 << 20, &[7u8; 100_000]);
    app.ok(&["migration", "sync", &id, "--follow"]);
    let st = app.ok(&["migration", "status", &id, "--json"]);
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    let syncs = st["syncs"].as_array().unwrap();
    let last = syncs.last().unwrap();
    assert!(same(&target), "the target differs after the delta");
    // CBT listed 1 + 2 blocks of 64 KiB: only those chunks travel (plus frame headers).
    let read = last["bytes_sent"].as_u64().unwrap();
    assert!(
        (3 * 65_536..3 * 65_536 + 1024).contains(&read),
        "the delta sent {read} bytes: {syncs:?}"
    );

    // Changed block tracking switched off behind Ferry's back: the next delta warns, as
    // an event of the migration, before it reads the whole disk; it still carries the
    // change. Switched on again, deltas read what CBT lists.
    sim.admin(&ca.ca_cert_path(), &format!("/ferry/cbt-off?vm={vm}"))
        .await
        .unwrap();
    write(30 << 20, b"written while CBT was off");
    app.ok(&["migration", "sync", &id, "--follow"]);
    assert!(
        same(&target),
        "the target differs after a delta without CBT"
    );
    let events = app.ok(&["migration", "events", &id]);
    assert!(
        events.contains("warning") && events.contains("changed block tracking is off"),
        "{events}"
    );
    let logs = app.ok(&["migration", "logs", &id]);
    assert!(logs.contains("changed block tracking is off"), "{logs}");
    app.ok(&["source", "fix", "vc1", "enable-cbt", &vm]);
    app.ok(&["migration", "sync", &id, "--follow"]);

    // A cutover that cannot stop the workload's services (no guest account): `--follow`
    // exits non-zero and says which step failed, why and what to do.
    app.ok(&["inventory", "set", &vm, "--services", "nginx"]);
    let out = app.ferry(&["migration", "cutover", &id, "--follow"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed cutover exited 0: {err}");
    assert!(
        err.contains("step stop_services failed")
            && err.contains("no guest account")
            && err.contains("ferry migration rollback"),
        "{err}"
    );
    let follow = app.ferry(&["migration", "status", &id, "--follow"]);
    assert!(
        !follow.status.success(),
        "status --follow of a failed migration exited 0"
    );
    app.ok(&["inventory", "set", &vm, "--services", ""]);

    // Cutover. What the guest writes while it shuts down (armed in the simulator: 64 KiB
    // at 20 MiB, written as the VM powers off) reaches the target through the last delta,
    // read from the powered-off VM; validation compares the whole disk and passes.
    sim.admin(
        &ca.ca_cert_path(),
        &format!("/ferry/shutdown-write?vm={vm}&offset={}", 20 << 20),
    )
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let out = app.ferry(&["migration", "retry", &id, "--follow"]);
    let cutover_s = t.elapsed().as_secs_f64();
    let st = app.ok(&["migration", "status", &id, "--json"]);
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert!(
        out.status.success(),
        "cutover failed: {}\n{st}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(st["migration"]["status"]["state"], "completed", "{st}");
    let disk = std::fs::read(&flat).unwrap();
    assert!(
        disk[20 << 20..].starts_with(format!("written by {vm} while it shut down").as_bytes()),
        "the simulator did not write the shutdown record"
    );
    assert!(
        same(&target),
        "the target misses what the source wrote while it shut down"
    );
    let syncs = st["syncs"].as_array().unwrap();
    let shutdown_delta = syncs.last().unwrap()["bytes_sent"].as_u64().unwrap();
    assert!(
        (65_536..65_536 + 1024).contains(&shutdown_delta),
        "the shutdown delta sent {shutdown_delta} bytes: {syncs:?}"
    );
    let events = app.ok(&["migration", "events", &id]);
    assert!(events.contains("shutdown_delta"), "{events}");

    // Rollback powers the VM on again; the migration can be tried again.
    app.ok(&["migration", "rollback", &id, "--follow"]);
    let st = app.ok(&["migration", "status", &id, "--json"]);
    assert!(st.contains("\"rolled_back\""), "{st}");
    let out = app.ok(&["source", "discover", "vc1", "--json"]);
    assert!(
        out.contains("poweredOn") || !out.contains("poweredOff"),
        "{out}"
    );

    // The same vCenter added again: its discovery would take the workloads over from vc1,
    // which is refused (nothing changes) until the user adopts them.
    add_source("vc3", &cred);
    let o = app.ferry(&["source", "discover", "vc3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a silent re-bind: {err}");
    assert!(
        err.contains(&format!("'{vm}' (source 'vc1')")) && err.contains("--adopt"),
        "{err}"
    );
    let w = app.ok(&["inventory", "show", &vm, "--json"]);
    let w: serde_json::Value = serde_json::from_str(&w).unwrap();
    let vc1 = app.ok(&["source", "show", "vc1", "--json"]);
    let vc1: serde_json::Value = serde_json::from_str(&vc1).unwrap();
    assert_eq!(w["source_id"], vc1["id"], "{w}");
    app.ok(&["source", "discover", "vc3", "--adopt"]);
    let w = app.ok(&["inventory", "show", &vm, "--json"]);
    assert!(!w.contains(vc1["id"].as_str().unwrap()), "{w}");

    note(&format!(
        "vsphere: {} VMs discovered; pre-flight said: {last_error}; full sync sent {} bytes, CBT delta sent {read}; cutover to local_dir in {cutover_s:.1} s, its shutdown delta sent {shutdown_delta} bytes",
        found.len(),
        syncs[0]["bytes_sent"]
    ));
}

fn find_image(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "uat") {
                continue;
            }
            if let Some(f) = find_image(&p) {
                return Some(f);
            }
        } else if p.extension().is_some_and(|x| x == "img") {
            return Some(p);
        }
    }
    None
}
