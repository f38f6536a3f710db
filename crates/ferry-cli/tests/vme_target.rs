//! `ferry target setup-iam` against the Morpheus test double (every request checked
//! against the official API document) and a real appliance: the role and service user
//! are made once, the service user's password lands encrypted in the appliance, a second
//! run changes nothing, and no password is anywhere in clear.

mod common;
mod cp;

use cp::*;
use ferry_morpheus_double::Double;
use ferry_openapi::Spec;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const ADMIN_PASSWORD: &str = "Vme-Adm1n-Secret#42";
/// The service user's address: the double, like a real manager, refuses one without a domain.
const EMAIL: &str = "ferry@example.com";

/// Every call the service user made has its row in the client's table of calls and
/// permissions, with the permission the manager checked: the role Ferry makes is exactly
/// what its calls need.
fn assert_calls_in_table(d: &Double) {
    let table = ferry_morpheus::iam::CALLS;
    let missing: Vec<String> = d
        .service_calls()
        .into_iter()
        .filter(|(call, code)| !table.iter().any(|(c, p, _)| c == call && p == code))
        .map(|(call, code)| format!("(\"{call}\", \"{code}\")"))
        .collect();
    assert!(
        missing.is_empty(),
        "calls without their row in ferry_morpheus::iam::CALLS:\n{}",
        missing.join("\n")
    );
}

/// Every file under `dir`, as bytes.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    common::files_under(dir)
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_iam_once_then_nothing_and_no_password_in_clear() {
    let path = Spec::morpheus_default_path();
    let spec = Arc::new(Spec::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let d = Double::start(spec, "admin", ADMIN_PASSWORD).await;
    let tmp = tempfile::tempdir().unwrap();
    let app_dir = tmp.path().join("appliance");
    let app = Arc::new(Appliance::start(&app_dir, &[], None));

    let run = |args: Vec<String>, password: &'static str| {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(FERRY)
                .args(&args)
                .env("FERRY_URL", &app.url)
                .env("FERRY_TOKEN", &app.token)
                .env("FERRY_ADMIN_PASSWORD", password)
                .env("FERRY_LOG", "trace")
                .output()
                .unwrap()
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let o = run(
        s(&[
            "target",
            "add",
            "vme1",
            "--kind",
            "vme",
            "--endpoint",
            &d.url,
        ]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut everything_printed: Vec<u8> = vec![];

    // The manager is at an address, not a name: there is no default e-mail to make, and
    // nothing is called before that is said.
    let o = run(s(&["target", "setup-iam", "vme1"]), ADMIN_PASSWORD)
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("give --email"), "{err}");
    let o = run(
        s(&["target", "setup-iam", "vme1", "--email", "ferry@localhost"]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("has no dot"), "{err}");
    assert!(d.state().mutations.is_empty());

    // Dry run: the plan, no change.
    let o = run(
        s(&["target", "setup-iam", "vme1", "--dry-run", "--email", EMAIL]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("WOULD CALL")
            && out.contains("POST /api/roles")
            && out.contains("POST /api/users"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(d.state().mutations.is_empty());
    everything_printed.extend(&o.stdout);
    everything_printed.extend(&o.stderr);

    // The real thing.
    let o = run(
        s(&["target", "setup-iam", "vme1", "--email", EMAIL]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("create role ferry-migration"), "{out}");
    assert!(out.contains("stored encrypted in the appliance"), "{out}");
    everything_printed.extend(&o.stdout);
    everything_printed.extend(&o.stderr);
    let service_password = d
        .state()
        .user_by_name("ferry-svc")
        .expect("service user")
        .password
        .clone();
    let target = app.client().ok("/api/targets/vme1", None).await;
    assert!(target["credential_id"].is_string(), "{target}");

    // Again: nothing to change, no new credential.
    let n = d.state().mutations.len();
    let o = run(
        s(&["target", "setup-iam", "vme1", "--email", EMAIL]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(d.state().mutations.len(), n);
    everything_printed.extend(&o.stdout);
    everything_printed.extend(&o.stderr);
    let again = app.client().ok("/api/targets/vme1", None).await;
    assert_eq!(again["credential_id"], target["credential_id"]);

    // A new address for the existing user: one change, the address.
    let o = run(
        s(&[
            "target",
            "setup-iam",
            "vme1",
            "--email",
            "migrations@example.com",
        ]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("e-mail ferry@example.com -> migrations@example.com"),
        "{out}"
    );
    assert_eq!(d.state().mutations.len(), n + 1);
    assert_eq!(
        d.state().user_by_name("ferry-svc").unwrap().email,
        "migrations@example.com"
    );
    everything_printed.extend(&o.stdout);
    everything_printed.extend(&o.stderr);

    // A wrong admin password is named as such.
    let o = run(
        s(&["target", "setup-iam", "vme1", "--email", EMAIL]),
        "not-it",
    )
    .await
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused the login") && err.contains("check the username and password"),
        "{err}"
    );

    // Pre-flight checks each instance's address against its network's range: the test
    // instance keeps the production address unless the profile gives it one (or DHCP).
    let imgs = tmp.path().join("images");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::write(imgs.join("db01.raw"), vec![0u8; 1 << 20]).unwrap();
    let api = app.client();
    let placement = serde_json::json!({"cloud": "vme-prod", "group": "migrations", "plan": "2 CPU, 4GB Memory"});
    let o = run(
        s(&["target", "set", "vme1", "--config", &placement.to_string()]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    api.ok(
        "/api/sources",
        Some(serde_json::json!({"name": "images", "kind": "disk_image", "config": {"path": imgs}})),
    )
    .await;
    let src = api.ok("/api/sources/images", None).await;
    api.ok("/api/workloads", Some(serde_json::json!({
        "name": "db01", "source_id": src["id"],
        "disks": [{"name": "root", "size_bytes": 1u64 << 20, "format": "raw", "path": imgs.join("db01.raw")}],
        "nics": [{"name": "eth0", "network": "prod-vlan", "ips": ["10.20.120.15"]}],
    }))).await;
    for (name, uat) in [
        (
            "same-address",
            serde_json::json!({"network": "VLAN-900-migration"}),
        ),
        (
            "own-address",
            serde_json::json!({"network": "VLAN-900-migration", "addresses": {"eth0": "10.99.0.15"}}),
        ),
    ] {
        api.ok(
            "/api/profiles",
            Some(serde_json::json!({
                "name": name, "target": "vme1",
                "network_map": {"prod-vlan": "VLAN-120-prod"}, "uat": uat,
            })),
        )
        .await;
    }
    let o = run(
        s(&[
            "migration",
            "start",
            "db01",
            "--profile",
            "same-address",
            "--follow",
        ]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "pre-flight passed an address the manager refuses"
    );
    assert!(
        err.contains("step preflight failed")
            && err.contains("10.20.120.15")
            && err.contains("10.99.0.0/24")
            && err.contains("uat.addresses"),
        "{err}"
    );
    let (_, list) = api.get("/api/migrations?workload=db01").await;
    let first = list["items"][0]["id"].as_str().unwrap().to_string();
    run(s(&["migration", "cancel", &first]), ADMIN_PASSWORD)
        .await
        .unwrap();
    let o = run(
        s(&[
            "migration",
            "start",
            "db01",
            "--profile",
            "own-address",
            "--follow",
        ]),
        ADMIN_PASSWORD,
    )
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // No password in clear: not in anything printed (logs at trace), nor in any file of
    // the appliance (database, logs, keys).
    assert!(
        !contains(&everything_printed, ADMIN_PASSWORD),
        "admin password printed"
    );
    assert!(
        !contains(&everything_printed, &service_password),
        "service password printed"
    );
    drop(app);
    let mut all = files(&app_dir);
    if let Ok(b) = std::fs::read(app_dir.with_extension("stderr.log")) {
        all.push((app_dir.with_extension("stderr.log"), b));
    }
    assert!(!all.is_empty());
    for (p, b) in &all {
        assert!(
            !contains(b, ADMIN_PASSWORD),
            "admin password in {}",
            p.display()
        );
        assert!(
            !contains(b, &service_password),
            "service password in clear in {}",
            p.display()
        );
    }

    let n = d.assert_conforming();
    assert_calls_in_table(&d);
    note(&format!(
        "setup-iam through the CLI: {n} requests validated against the Morpheus API document"
    ));
}

/// Gives the migration a command.
/// Creates the profile `to-vme` (the double's networks, boot and HTTP validation, then
/// `post_cutover`) and a migration of `web01` with it; returns the migration's id.
async fn migrate_to_vme(api: &Api, post_cutover: serde_json::Value) -> String {
    api.ok("/api/profiles", Some(serde_json::json!({
        "name": "to-vme", "target": "vme1",
        "placement": {"datastore": "ceph-rbd"},
        "network_map": {"prod-vlan": "VLAN-120-prod"},
        "uat": {"network": "VLAN-900-migration"},
        "validation": [{"kind": "boot"}, {"kind": "http", "params": {"contains": "ferry test guest"}}],
        "post_cutover": post_cutover,
    }))).await;
    let m = api
        .ok(
            "/api/migrations",
            Some(serde_json::json!({"workload": "web01", "profile": "to-vme"})),
        )
        .await;
    m["id"].as_str().unwrap().to_string()
}

async fn command(api: &Api, id: &str, command: &str) {
    api.ok(
        &format!("/api/migrations/{id}/commands"),
        Some(serde_json::json!({"command": command})),
    )
    .await;
}

/// Rolls the migration back and waits until the rollback has run.
async fn roll_back(api: &Api, id: &str, within: std::time::Duration) {
    command(api, id, "rollback").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let deadline = std::time::Instant::now() + within;
    loop {
        let (st, _) = state_of(api, id).await;
        if st != "rolling_back" && st != "completed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rollback still {st}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// The migration's current state, failing the test with the error if it failed.
async fn state_of(api: &Api, id: &str) -> (String, serde_json::Value) {
    let m = api.ok(&format!("/api/migrations/{id}"), None).await;
    let st = m["migration"]["status"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if st == "failed" {
        panic!("the migration failed: {}", m["migration"]["last_error"]);
    }
    (st, m)
}

async fn wait_state(
    api: &Api,
    id: &str,
    want: &str,
    within: std::time::Duration,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (st, m) = state_of(api, id).await;
        if st == want {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {st} after {within:?}, waiting for {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// What the VME workflow tests share: the test guest image, the Morpheus double booting
/// instances as QEMU guests on a network of their own, and an appliance with a VME target
/// `vme1` (extra `config` merged in) set up with its service account.
struct Lab {
    image: std::path::PathBuf,
    tmp: tempfile::TempDir,
    d: Double,
    net: Gone,
    app: Appliance,
}

struct Gone(ferry_net::Network);
impl Drop for Gone {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

async fn lab(net_name: &str, config: serde_json::Value) -> Lab {
    let image = ferry_qemu::testbed::guest_image(false).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    // FERRY_TEST_KEEP=1 keeps the appliance's directory and log for a look afterwards.
    let tmp = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("FERRY_TEST_KEEP").is_some())
        .tempdir()
        .unwrap();
    note(&format!("lab in {}", tmp.path().display()));
    let path = Spec::morpheus_default_path();
    let spec = Arc::new(Spec::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let d = Double::start(spec, "admin", ADMIN_PASSWORD).await;
    // The double boots every instance on this one namespace network: its VLANs have the
    // namespace's range, which the manager checks static addresses against.
    for n in d.state().inventory.get_mut("networks").unwrap() {
        n["cidr"] = "10.204.0.0/24".into();
    }
    let net = ferry_net::Network::ensure(
        &ferry_net::NetworkSpec::new(format!("{net_name}-{}", std::process::id()))
            .with_cidr("10.204.0.1/24".parse().unwrap()),
    )
    .unwrap();
    let net = Gone(net);
    d.set_boot(ferry_morpheus_double::Boot {
        kernel: image.join("vmlinuz"),
        initrd: image.join("initrd.img"),
        append: format!(
            "{} ferry.ip={{ip}}/24",
            manifest["append"].as_str().unwrap()
        ),
        network: net.0.clone(),
        memory_mib: 512,
    });
    let app = Appliance::start(
        &tmp.path().join("appliance"),
        &["--backoff-ms", "500"],
        None,
    );
    let mut cfg = serde_json::json!({
        "cloud": "vme-prod", "group": "migrations", "plan": "2 CPU, 4GB Memory",
        "probe_netns": net.0.namespace, "boot_timeout_s": 240,
    });
    for (k, v) in config.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    app.ok(&[
        "target",
        "add",
        "vme1",
        "--kind",
        "vme",
        "--endpoint",
        &d.url,
        "--config",
        &cfg.to_string(),
    ]);
    let o = Command::new(FERRY)
        .args(["target", "setup-iam", "vme1", "--email", EMAIL])
        .env("FERRY_URL", &app.url)
        .env("FERRY_TOKEN", &app.token)
        .env("FERRY_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Lab {
        image,
        tmp,
        d,
        net,
        app,
    }
}

/// A workload from a disk image migrated to VME in image mode through the whole workflow:
/// pre-flight against the manager's inventory, initial sync into staging, UAT on the
/// migration network (instance delivered, booted by the double as a QEMU guest, checked
/// over HTTP, deleted with its image), cutover (the production instance serves the page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_migrates_to_vme_in_image_mode() {
    if unsafe { libc::geteuid() } != 0 {
        note("SKIP: needs root (network namespaces)");
        return;
    }
    let Lab {
        image,
        tmp,
        d,
        net,
        app,
    } = lab("fmw", serde_json::json!({})).await;
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(image.join("disk.qcow2"), images.join("web01.qcow2")).unwrap();

    // A DNS server whose web01 record points at the old address until cutover.
    let key = ferry_dns::TsigKey::new(
        "ferry-vme-test",
        ferry_dns::TsigAlgorithm::HmacSha256,
        vec![7u8; 32],
    )
    .unwrap();
    let zone = ferry_dns::parse_name("vme.test").unwrap();
    let record = ferry_dns::parse_name("web01.vme.test").unwrap();
    let knot = {
        let (dir, zone, key, record) = (
            tmp.path().join("dns"),
            zone.clone(),
            key.clone(),
            record.clone(),
        );
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).unwrap();
            ferry_dns::knot::KnotServer::start(
                &dir,
                &zone,
                &key,
                &[ferry_dns::RecordSet {
                    name: record,
                    ttl: 3600,
                    addrs: vec!["192.0.2.10".parse().unwrap()],
                }],
            )
        })
        .await
        .unwrap()
        .expect("knotd starts (scripts/install-deps.sh installs knot)")
    };
    let api = app.client();
    use base64::Engine as _;
    let tsig = format!(
        "hmac-sha256:ferry-vme-test:{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    api.ok(
        "/api/credentials",
        Some(serde_json::json!({"name": "vme-tsig", "kind": "token", "secret": tsig})),
    )
    .await;
    api.ok("/api/sources", Some(serde_json::json!({"name": "images", "kind": "disk_image", "config": {"path": images.display().to_string()}}))).await;
    let src = api.ok("/api/sources/images", None).await;
    api.ok("/api/workloads", Some(serde_json::json!({
        "name": "web01", "source_id": src["id"],
        "disks": [{"name": "root", "size_bytes": 2u64 << 30, "path": images.join("web01.qcow2").display().to_string()}],
        "nics": [{"name": "eth0", "network": "prod-vlan", "ips": ["10.204.0.10"]}],
    }))).await;
    let id = migrate_to_vme(
        &api,
        serde_json::json!([{"kind": "dns", "params": {"server": knot.addr.to_string(), "zone": "vme.test", "tsig_credential": "vme-tsig"}}]),
    )
    .await;
    let t = std::time::Instant::now();
    wait_state(&api, &id, "synced", std::time::Duration::from_secs(120)).await;
    let t_sync = t.elapsed();

    // An appliance that died during an earlier delivery, after the manager made the
    // test instance's image and before Ferry recorded it, left it behind: the manager
    // refuses a second image of that name, so the delivery removes it first (a warning).
    d.state().images.push(ferry_morpheus_double::Image {
        id: 9001,
        name: "web01-ferry-uat".into(),
        file: None,
        size: 0,
    });
    command(&api, &id, "uat_start").await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let m = wait_state(&api, &id, "synced", std::time::Duration::from_secs(400)).await;
    assert_eq!(m["migration"]["status"]["uat_verdict"], "passed", "{m}");
    let (_, events) = api
        .get(&format!("/api/migrations/{id}/events?limit=1000"))
        .await;
    assert!(
        events.to_string().contains("an interrupted delivery left"),
        "the leftover is a warning of the migration: {events}"
    );
    assert!(
        d.state().instances.is_empty(),
        "the test instance was deleted"
    );
    assert!(
        d.state().images.is_empty(),
        "the test instance's image was deleted"
    );
    let t_uat = t.elapsed() - t_sync;

    command(&api, &id, "cutover").await;
    wait_state(&api, &id, "completed", std::time::Duration::from_secs(400)).await;
    let t_cutover = t.elapsed() - t_sync - t_uat;
    {
        let st = d.state();
        assert_eq!(st.instances.len(), 1);
        assert_eq!(st.instances[0].name, "web01");
        assert_eq!(st.instances[0].status, "running");
        let nic = &st.instances[0].body["networkInterfaces"][0];
        assert_eq!(nic["network"]["id"], "network-1", "the production network");
        assert_eq!(nic["ipAddress"], "10.204.0.10");
    }
    let page = net
        .0
        .http_get("http://10.204.0.10/", std::time::Duration::from_secs(5))
        .unwrap();
    assert!(page.body_text().contains("ferry test guest"));
    let a = knot.client(None).query_a(&record).await.unwrap();
    assert_eq!(
        a.addrs,
        vec!["10.204.0.10".parse::<std::net::Ipv4Addr>().unwrap()],
        "DNS points at the VME instance"
    );

    // Rollback: the VME instance goes, DNS points back.
    roll_back(&api, &id, std::time::Duration::from_secs(120)).await;
    assert!(
        d.state().instances.is_empty(),
        "the production instance was deleted"
    );
    let a = knot.client(None).query_a(&record).await.unwrap();
    assert_eq!(
        a.addrs,
        vec!["192.0.2.10".parse::<std::net::Ipv4Addr>().unwrap()],
        "DNS points back"
    );
    let n = d.assert_conforming();
    assert_calls_in_table(&d);
    note(&format!(
        "vme image mode: sync {:.1}s, UAT {:.1}s, cutover {:.1}s; {n} requests validated against the Morpheus API document",
        t_sync.as_secs_f64(), t_uat.as_secs_f64(), t_cutover.as_secs_f64()
    ));
}

/// A guest controls every byte of its disk: a raw disk whose first sector is a qcow2
/// header naming a file of the appliance's host as its backing file reaches VME in image
/// mode as the bytes it is. Its format stated raw, it is synced into staging, converted
/// with the format stated and uploaded; the production instance's volume equals the raw
/// disk and the host's file is in nothing Ferry made or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_raw_disk_reaches_vme_in_image_mode_as_its_bytes() {
    if unsafe { libc::geteuid() } != 0 {
        note("SKIP: needs root (network namespaces)");
        return;
    }
    let evil = common::evil_disk();
    let Lab { tmp, d, app, .. } = lab("fmh", serde_json::json!({})).await;
    // The disk does not boot: the double only marks its instances running.
    d.clear_boot();
    let api = app.client();
    let images = evil.raw.parent().unwrap().to_path_buf();
    api.ok("/api/sources", Some(serde_json::json!({"name": "images", "kind": "disk_image", "config": {"path": images.display().to_string()}}))).await;
    let src = api.ok("/api/sources/images", None).await;
    api.ok("/api/workloads", Some(serde_json::json!({
        "name": "web01", "source_id": src["id"],
        "disks": [{"name": "root", "size_bytes": 8u64 << 20, "path": evil.raw.display().to_string(), "format": "raw"}],
        "nics": [{"name": "eth0", "network": "prod-vlan", "ips": ["10.204.0.10"]}],
    }))).await;
    api.ok(
        "/api/profiles",
        Some(serde_json::json!({
            "name": "raw-vme", "target": "vme1",
            "placement": {"datastore": "ceph-rbd"},
            "network_map": {"prod-vlan": "VLAN-120-prod"},
            "validation": [],
        })),
    )
    .await;
    let m = api
        .ok(
            "/api/migrations",
            Some(serde_json::json!({"workload": "web01", "profile": "raw-vme"})),
        )
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    wait_state(&api, &id, "synced", std::time::Duration::from_secs(120)).await;
    command(&api, &id, "cutover").await;
    wait_state(&api, &id, "completed", std::time::Duration::from_secs(300)).await;
    let volume = {
        let st = d.state();
        assert_eq!(st.instances.len(), 1);
        assert_eq!(st.images.len(), 1, "the uploaded image");
        let image = st.images[0].file.clone().expect("uploaded");
        let bytes = std::fs::read(&image).unwrap();
        assert!(
            !common::contains(&bytes, &evil.secret_marker),
            "the uploaded image holds the host's secret"
        );
        st.instances[0].volumes[0].path.clone()
    };
    same_contents(&evil.raw, &volume).unwrap_or_else(|e| panic!("the volume differs: {e}"));
    // Nothing Ferry wrote holds the secret: its staging copy and converted image.
    for (path, bytes) in files(tmp.path()) {
        assert!(
            !common::contains(&bytes, &evil.secret_marker),
            "{} holds the host's secret",
            path.display()
        );
    }
    let n = d.assert_conforming();
    assert_calls_in_table(&d);
    note(&format!(
        "hostile raw disk to vme image mode: {n} requests validated"
    ));
}

/// Whether the instance's volume holds exactly the source image's contents (a volume
/// larger than the disk must read as zeros past its end).
fn same_contents(source: &Path, volume: &Path) -> Result<(), String> {
    let format = if source.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let o = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", "qcow2"])
        .arg(source)
        .arg(volume)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn qemu_io(image: &Path, command: &str) {
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `mib` MiB of incompressible bytes.
fn random_file(path: &Path, mib: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
}

/// Every file named `name` under `dir`.
fn find_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    files(dir)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.file_name().is_some_and(|f| f == name))
        .collect()
}

/// Delta mode through the whole workflow: the instance is created once with an empty
/// volume and the target worker volume; every sync boots the worker on it (a QEMU guest
/// behind the double) and writes the changes into the volume over mutual TLS. After the
/// initial sync and after each of two deltas, the volume equals the source byte for byte.
/// A delta whose worker dies midway is reverted from the snapshot taken before it, and
/// the retried sync completes. Then UAT boots the instance's own disk on the migration
/// network and reverts it afterwards, and cutover boots it on the production network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_migrates_to_vme_in_delta_mode() {
    if unsafe { libc::geteuid() } != 0 {
        note("SKIP: needs root (network namespaces)");
        return;
    }
    let image = ferry_qemu::testbed::guest_image(false).unwrap();
    let Lab {
        tmp, d, net, app, ..
    } = lab(
        "fmd",
        serde_json::json!({
            "delivery": "delta",
            "worker_base_image": image.join("disk.qcow2").display().to_string(),
        }),
    )
    .await;
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let source = images.join("web01.qcow2");
    std::fs::copy(image.join("disk.qcow2"), &source).unwrap();
    // A second disk: its own volume on the instance, its own port on the worker.
    let data = images.join("web01-data.raw");
    random_file(&data, 48, 42);
    let api = app.client();
    api.ok("/api/sources", Some(serde_json::json!({"name": "images", "kind": "disk_image", "config": {"path": images.display().to_string()}}))).await;
    let src = api.ok("/api/sources/images", None).await;
    api.ok(
        "/api/workloads",
        Some(serde_json::json!({
            "name": "web01", "source_id": src["id"],
            "disks": [
                {"name": "root", "size_bytes": 2u64 << 30, "path": source.display().to_string()},
                {"name": "data", "size_bytes": 48u64 << 20, "path": data.display().to_string()},
            ],
            "nics": [{"name": "eth0", "network": "prod-vlan", "ips": ["10.204.0.10"]}],
        })),
    )
    .await;
    let id = migrate_to_vme(&api, serde_json::json!([])).await;
    let volume = || {
        let st = d.state();
        assert_eq!(st.instances.len(), 1, "one instance for the migration");
        let i = &st.instances[0];
        assert_eq!(i.name, "web01");
        assert_eq!(i.status, "stopped", "the worker is shut down after a sync");
        assert_eq!(
            i.volumes.len(),
            2,
            "the worker volume is detached after a sync: the instance has its own disks only"
        );
        same_contents(&data, &i.volumes[1].path).expect("the second volume equals the data disk");
        i.volumes[0].path.clone()
    };
    let syncs_of = |m: &serde_json::Value| m["syncs"].as_array().map(Vec::len).unwrap_or(0);
    // Waits for sync number `expect` to be recorded, asking for it first when `ask`.
    let sync = |expect: usize, ask: bool| {
        let (api, id) = (&api, &id);
        async move {
            let t = std::time::Instant::now();
            if ask {
                command(api, id, "sync").await;
            }
            loop {
                let m = wait_state(api, id, "synced", std::time::Duration::from_secs(600)).await;
                if syncs_of(&m) >= expect {
                    return (t.elapsed(), m);
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    };

    // Initial sync.
    let (t_full, m) = sync(1, false).await;
    same_contents(&source, &volume()).expect("the volume equals the source after the full sync");
    let sent_full = m["syncs"][0]["bytes_sent"].as_u64().unwrap();

    // Two deltas.
    let mut t_deltas = vec![];
    for (k, cmd) in ["write -P 0x5a 300M 1M", "write -P 0xa5 1000M 64k"]
        .iter()
        .enumerate()
    {
        qemu_io(&source, cmd);
        let (t, m) = sync(k + 2, true).await;
        same_contents(&source, &volume()).unwrap_or_else(|e| panic!("after delta {}: {e}", k + 1));
        let sent = m["syncs"][k + 1]["bytes_sent"].as_u64().unwrap();
        assert!(sent < 4 << 20, "delta {} sent {sent} bytes", k + 1);
        t_deltas.push((t, sent));
    }

    // A delta whose worker dies midway: reverted, retried, complete.
    let random = tmp.path().join("random.bin");
    // Enough to catch it midway: the worker is a QEMU guest under software emulation
    // here, slower still when it runs a debug build.
    let mib = if cfg!(debug_assertions) { 24 } else { 256 };
    random_file(&random, mib, 0x9e3779b97f4a7c15);
    qemu_io(
        &source,
        &format!("write -s {} 1200M {mib}M", random.display()),
    );
    let vol = volume();
    let before = std::fs::metadata(&vol).unwrap().len();
    let reverts_before = d
        .state()
        .mutations
        .iter()
        .filter(|c| c.contains("revert-snapshot"))
        .count();
    command(&api, &id, "sync").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let address = loop {
        if let Some(p) = find_named(&app.dir, "worker-address").into_iter().next() {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // Midway: once the worker has written a few MiB of the delta into the volume.
    while std::fs::metadata(&vol).unwrap().len() < before + (4 << 20) {
        assert!(
            std::time::Instant::now() < deadline,
            "the delta never reached the volume"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let instance_id = d.state().instances[0].id;
    let run = d
        .state()
        .data_dir
        .join(format!("instance-{instance_id}"))
        .join("run");
    let vm = ferry_qemu::Vm::attach(&run).expect("the worker's QEMU runs");
    vm.kill().await.unwrap();
    assert_eq!(
        syncs_of(&api.ok(&format!("/api/migrations/{id}"), None).await),
        3,
        "the worker died before the delta committed"
    );
    drop(address);
    let (t_killed, _) = sync(4, false).await;
    same_contents(&source, &volume())
        .expect("the volume equals the source after the retried delta");
    let reverts = d
        .state()
        .mutations
        .iter()
        .filter(|c| c.contains("revert-snapshot"))
        .count();
    assert!(
        reverts > reverts_before,
        "the failed delta was reverted from its snapshot"
    );
    assert!(
        d.state().instances[0].snapshots.is_empty(),
        "no snapshot is left behind"
    );

    // UAT boots the instance's own disk, and is reverted afterwards.
    command(&api, &id, "uat_start").await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let m = wait_state(&api, &id, "synced", std::time::Duration::from_secs(400)).await;
    assert_eq!(m["migration"]["status"]["uat_verdict"], "passed", "{m}");
    same_contents(&source, &volume()).expect("UAT's changes were reverted");

    // Cutover: the final delta, then the instance boots on the production network.
    command(&api, &id, "cutover").await;
    wait_state(&api, &id, "completed", std::time::Duration::from_secs(600)).await;
    {
        let st = d.state();
        assert_eq!(st.instances.len(), 1);
        assert_eq!(st.instances[0].status, "running");
        assert_eq!(
            st.instances[0].nics[0].0, "network-1",
            "the production network"
        );
    }
    let page = net
        .0
        .http_get("http://10.204.0.10/", std::time::Duration::from_secs(5))
        .unwrap();
    assert!(page.body_text().contains("ferry test guest"));

    // Rollback: the instance stops, back on the migration network, and its volume holds
    // the last synced generation again (what production's boot wrote is undone).
    roll_back(&api, &id, std::time::Duration::from_secs(300)).await;
    same_contents(&source, &volume()).expect("the rollback put the last synced generation back");
    assert_ne!(
        d.state().instances[0].nics[0].0,
        "network-1",
        "back on the migration network"
    );
    let n = d.assert_conforming();
    assert_calls_in_table(&d);
    note(&format!(
        "vme delta mode: full sync {:.1}s ({sent_full} bytes sent), deltas {}, delta with the worker killed and retried {:.1}s; {n} requests validated against the Morpheus API document",
        t_full.as_secs_f64(),
        t_deltas
            .iter()
            .map(|(t, b)| format!("{:.1}s/{b} bytes", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        t_killed.as_secs_f64()
    ));
}
