//! `ferry target setup-iam` against the Morpheus test double (every request checked
//! against the official API document) and a real appliance: the role and service user
//! are made once, the service user's password lands encrypted in the appliance, a second
//! run changes nothing, and no password is anywhere in clear.

mod cp;

use cp::*;
use ferry_morpheus_double::Double;
use ferry_openapi::Spec;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const ADMIN_PASSWORD: &str = "Vme-Adm1n-Secret#42";

/// Every file under `dir`, as bytes.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
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

    // Dry run: the plan, no change.
    let o = run(
        s(&["target", "setup-iam", "vme1", "--dry-run"]),
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
    let o = run(s(&["target", "setup-iam", "vme1"]), ADMIN_PASSWORD)
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
    let o = run(s(&["target", "setup-iam", "vme1"]), ADMIN_PASSWORD)
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(d.state().mutations.len(), n);
    everything_printed.extend(&o.stdout);
    everything_printed.extend(&o.stderr);
    let again = app.client().ok("/api/targets/vme1", None).await;
    assert_eq!(again["credential_id"], target["credential_id"]);

    // A wrong admin password is named as such.
    let o = run(s(&["target", "setup-iam", "vme1"]), "not-it")
        .await
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused the login") && err.contains("check the username and password"),
        "{err}"
    );

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
    note(&format!(
        "setup-iam through the CLI: {n} requests validated against the Morpheus API document"
    ));
}
