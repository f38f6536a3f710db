//! The dashboard in a real browser (headless Chromium driven through chromedriver, both
//! from Debian): log in, create a profile (an error shown at its field first), import a
//! CSV with one bad row (the error shown at that row), start a migration to a local
//! target and watch it reach "synced" without a reload, run a delta and see the chart
//! gain a point, also without a reload. Screenshots are saved at each step. No request
//! may leave for another host, and every page tells the truth without JavaScript.

mod cp;

use cp::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools() -> Option<()> {
    let have = |c: &str| Command::new(c).arg("--version").output().is_ok();
    if have("chromium") && have("chromedriver") {
        return Some(());
    }
    assert!(
        std::env::var("FERRY_TEST_BROWSER").is_err(),
        "chromium and chromedriver are missing (scripts/install-deps.sh installs them)"
    );
    note("SKIP: chromium/chromedriver not installed");
    None
}

async fn browser(dir: &Path) -> (Driver, Client) {
    // Two crypto back-ends are linked in (ring and aws-lc): say which one rustls uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver(child);
    let caps = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", dir.join("chrome").display())]
        }
    });
    let caps: serde_json::Map<String, serde_json::Value> = caps.as_object().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match ClientBuilder::rustls()
            .expect("TLS roots")
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "chromedriver did not start: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    (driver, client)
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn js(c: &Client, script: &str) -> serde_json::Value {
    c.execute(script, vec![]).await.unwrap()
}

/// The element `css` once the page that has it has loaded (a click that navigates
/// returns before the next page is there).
async fn wait_for(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} did not appear: {e}"))
}

/// Clicks `css`. A live page may swap its content between finding and clicking (a stale
/// element): then it is found again.
async fn click(c: &Client, css: &str) {
    for _ in 0..10 {
        match wait_for(c, css).await.click().await {
            Ok(()) => return,
            Err(fantoccini::error::CmdError::Standard(e))
                if e.error == fantoccini::error::ErrorStatus::StaleElementReference =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("clicking {css}: {e}"),
        }
    }
    panic!("{css} kept going stale");
}

/// Waits until `script` returns true, without reloading the page.
async fn until(c: &Client, what: &str, script: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if js(c, script).await == json!(true) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn screenshots_dir() -> PathBuf {
    let d = std::env::var("FERRY_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("ferry-ui-screenshots"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    if tools().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let shots = screenshots_dir();
    let app = Appliance::start(&dir.join("data"), &[], None);
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
    ]);

    let (_driver, c) = browser(dir).await;
    let base = app.url.trim_end_matches('/').to_string();

    // Log in: the dashboard sends us to the login form first.
    c.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&app.token)
        .await
        .unwrap();
    c.find(Locator::Css("form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, "#h-counts").await;
    let h1 = c
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(h1, "Overview");
    shot(&c, &shots, "1-overview").await;

    // A target: a local directory without its path is refused at the path field.
    c.goto(&format!("{base}/ui/targets")).await.unwrap();
    wait_for(&c, "#name").await.send_keys("lab2").await.unwrap();
    click(&c, "#kind option[value=local_dir]").await;
    click(&c, "form.form button[type=submit]").await;
    let err = wait_for(&c, "#path-error").await.text().await.unwrap();
    assert!(err.contains("config.path"), "{err}");
    wait_for(&c, "#path")
        .await
        .send_keys(dir.join("target2").to_str().unwrap())
        .await
        .unwrap();
    click(&c, "form.form button[type=submit]").await;
    let notice = wait_for(&c, ".notice").await.text().await.unwrap();
    assert!(notice.contains("Target lab2 created"), "{notice}");
    shot(&c, &shots, "2-target-created").await;

    // A profile: first without a name (the error is shown at the field), then valid.
    c.goto(&format!("{base}/ui/profiles")).await.unwrap();
    c.find(Locator::Css("form.form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let err = wait_for(&c, "#name-error").await.text().await.unwrap();
    assert!(!err.is_empty(), "no error at the name field");
    assert_eq!(
        c.find(Locator::Id("name"))
            .await
            .unwrap()
            .attr("aria-invalid")
            .await
            .unwrap()
            .as_deref(),
        Some("true")
    );
    shot(&c, &shots, "2-profile-error").await;
    c.find(Locator::Id("name"))
        .await
        .unwrap()
        .send_keys("web")
        .await
        .unwrap();
    c.find(Locator::Css("#target option[value=lab]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("form.form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let notice = wait_for(&c, ".notice").await.text().await.unwrap();
    assert!(notice.contains("Profile web created"), "{notice}");

    // Editing: a target's settings that are not JSON are refused at their field; a
    // profile's change is saved.
    c.goto(&format!("{base}/ui/targets/lab2/edit"))
        .await
        .unwrap();
    wait_for(&c, "#config")
        .await
        .send_keys("{not json")
        .await
        .unwrap();
    click(&c, "form.form button[type=submit]").await;
    let err = wait_for(&c, "#config-error").await.text().await.unwrap();
    assert!(err.contains("not JSON"), "{err}");
    c.goto(&format!("{base}/ui/profiles")).await.unwrap();
    click(&c, "a[href='/ui/profiles/web/edit']").await;
    click(&c, "#uat_required").await;
    click(&c, "form.form button[type=submit]").await;
    let notice = wait_for(&c, ".notice").await.text().await.unwrap();
    assert!(notice.contains("Profile web saved"), "{notice}");
    // (UAT not required again, so the migration below goes straight to synced.)
    c.goto(&format!("{base}/ui/profiles/web/edit"))
        .await
        .unwrap();
    click(&c, "#uat_required").await;
    click(&c, "form.form button[type=submit]").await;
    wait_for(&c, ".notice").await;

    // Inventory import with one bad row (line 3: a month 13): the error is at that row.
    c.goto(&format!("{base}/ui/import")).await.unwrap();
    let csv = "host,username,password,private_key,agent,domain,move_group_name,target_migration_date,assigned_resource_email,cloud_sizing,tags\n\
               db-1,root,pw,,true,corp.local,wave-1,2026-12-01,ops@corp.local,medium,db\n\
               db-2,root,pw,,true,corp.local,wave-1,2026-13-01,ops@corp.local,medium,db\n";
    // Uploaded as a file, as a user would.
    let csv_file = dir.join("inventory.csv");
    std::fs::write(&csv_file, csv).unwrap();
    wait_for(&c, "#csv-file")
        .await
        .send_keys(csv_file.to_str().unwrap())
        .await
        .unwrap();
    c.find(Locator::Css("form.form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let summary = wait_for(&c, "#import-summary").await.text().await.unwrap();
    assert!(summary.contains("1 imported, 1 rejected"), "{summary}");
    let row = c
        .find(Locator::Id("line-3"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        row.contains('3') && row.to_lowercase().contains("date"),
        "{row}"
    );
    shot(&c, &shots, "3-import-errors").await;

    // Start a migration of web-1 and watch it reach "synced" without a reload.
    c.goto(&format!("{base}/ui/workloads")).await.unwrap();
    click(&c, "#w-web-1 form button").await;
    wait_for(&c, "#state").await;
    let url = c.current_url().await.unwrap();
    assert!(url.path().starts_with("/ui/migrations/"), "{url}");
    let id = url.path().rsplit('/').next().unwrap().to_string();
    js(&c, "window.__notReloaded = true; return true;").await;
    until(
        &c,
        "the migration to show synced",
        "return !!document.querySelector('#state [data-state=synced]');",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        js(&c, "return window.__notReloaded === true;").await,
        json!(true),
        "the page was reloaded"
    );
    let points = js(
        &c,
        "return document.querySelectorAll('#sync-chart .point').length;",
    )
    .await;
    assert_eq!(points, json!(1));
    shot(&c, &shots, "4-synced").await;

    // A delta through the confirmation; the chart gains a point without a reload.
    let mut data = vec![0x5a; 3 << 20];
    data[(1 << 20) + 7] = 1;
    std::fs::write(&img, &data).unwrap();
    click(&c, "a[data-command=sync]").await;
    let confirm = wait_for(&c, ".confirm").await.text().await.unwrap();
    assert!(
        confirm.contains("only what changed since the last sync is copied"),
        "{confirm}"
    );
    shot(&c, &shots, "5-confirm").await;
    c.find(Locator::Id("confirm-yes"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, ".notice").await;
    js(&c, "window.__notReloaded = true; return true;").await;
    until(
        &c,
        "the chart to gain a point",
        "return document.querySelectorAll('#sync-chart .point').length === 2 && !!document.querySelector('#state [data-state=synced]');",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        js(&c, "return window.__notReloaded === true;").await,
        json!(true),
        "the page was reloaded"
    );
    shot(&c, &shots, "6-delta").await;

    // The timeline and the logs of the migration are on its page.
    let timeline = c
        .find(Locator::Css("table.timeline"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(timeline.contains("completed"), "{timeline}");

    // The move group the import created: its members, bulk actions behind a confirmation
    // that names them.
    c.goto(&format!("{base}/ui/")).await.unwrap();
    click(&c, "a[href='/ui/groups/wave-1']").await;
    click(&c, "a[href$='?confirm=sync']").await;
    let confirm = wait_for(&c, ".confirm").await.text().await.unwrap();
    assert!(
        confirm.contains("A delta sync now for each of these"),
        "{confirm}"
    );
    shot(&c, &shots, "7-group-confirm").await;

    // Nothing was fetched from anywhere but the appliance.
    let urls = js(
        &c,
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);",
    )
    .await;
    for u in urls.as_array().unwrap() {
        let u = u.as_str().unwrap();
        assert!(u.starts_with(&base), "a request left for another host: {u}");
    }
    c.close().await.unwrap();

    // Without JavaScript (a plain HTTP client with the session cookie), the pages say
    // the same: the migration is synced at generation 2.
    let http = reqwest::Client::new();
    let cookie = format!("ferry_token={}", app.token);
    for path in [
        "/ui/".to_string(),
        format!("/ui/migrations/{id}"),
        "/ui/workloads".into(),
    ] {
        let r = http
            .get(format!("{base}{path}"))
            .header("Cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("data-state=\"synced\""),
            "{path} does not show the state"
        );
    }
    let page = http
        .get(format!("{base}/ui/migrations/{id}"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("<span id=\"generation\">2</span>"),
        "generation 2 is not shown"
    );
    note(&format!("dashboard: screenshots in {}", shots.display()));
}
