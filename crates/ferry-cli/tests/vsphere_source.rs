//! The vSphere source through the appliance, against govmomi's simulator: `ferry source
//! discover` puts vCenter's VMs into the inventory, and pre-flight reports what keeps a VM
//! from migrating (here: changed block tracking off) with the fix.

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
    let sim = Vcsim::start(
        &bin,
        &ca.cert_path("vcsim"),
        &ca.key_path("vcsim"),
        tmp.path(),
    )
    .unwrap();
    let app = Appliance::start(&tmp.path().join("appliance"), &[], None);
    let api = app.client();

    let cred = api
        .ok("/api/credentials", Some(json!({"name": "vcenter", "kind": "password", "username": sim.username(), "secret": sim.password()})))
        .await;
    let config = json!({"ca_bundle": ca.ca_cert_path().display().to_string()}).to_string();
    app.ok(&[
        "source",
        "add",
        "vc1",
        "--kind",
        "vsphere",
        "--endpoint",
        sim.url(),
        "--credential",
        cred["id"].as_str().unwrap(),
        "--config",
        &config,
    ]);
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
    app.ok(&[
        "source",
        "add",
        "vc2",
        "--kind",
        "vsphere",
        "--endpoint",
        sim.url(),
        "--credential",
        bad["id"].as_str().unwrap(),
        "--config",
        &config,
    ]);
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
    note(&format!(
        "vsphere: {} VMs discovered; pre-flight said: {last_error}",
        found.len()
    ));
}
