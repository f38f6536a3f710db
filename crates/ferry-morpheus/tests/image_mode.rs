//! Image mode against the test double: the test guest's disk is converted, uploaded as a
//! virtual image and provisioned as an HVM instance; the double boots the instance as a
//! real QEMU guest (software emulation here) on a network namespace, and it serves its
//! web page. Needs root and the guest image recipe's tools (scripts/install-deps.sh).

use ferry_morpheus::provision::{self, InstanceSpec};
use ferry_morpheus::{Client, ClientOptions, Login, MorpheusError};
use ferry_morpheus_double::{Boot, Double, Fault};
use ferry_net::{Network, NetworkSpec};
use ferry_openapi::Spec;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spec(name: &str, ip: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        cloud_id: 1,
        group_id: 1,
        plan_id: 1,
        layout_id: 1,
        instance_type: "mvm".into(),
        resource_pool: Some("pool-1".into()),
        image_id: None,
        volumes: vec![(3, Some(1))],
        networks: vec![(1, Some(ip.into()))],
        powered_off: true,
    }
}

struct Net(Network);
impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.0.destroy();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_mode_delivers_the_guest_and_the_instance_serves_its_page() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (network namespaces)");
        return;
    }
    let image = ferry_qemu::testbed::guest_image(false).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    let path = Spec::morpheus_default_path();
    let api = Arc::new(Spec::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let d = Double::start(api, "admin", "Adm1n-pa55").await;
    // Instances boot on this test's one namespace network: the VLANs have its range.
    for n in d.state().inventory.get_mut("networks").unwrap() {
        n["cidr"] = "10.203.0.0/24".into();
    }
    let net = Net(Network::ensure(
        &NetworkSpec::new(format!("fmi-{}", std::process::id()))
            .with_cidr("10.203.0.1/24".parse().unwrap()),
    )
    .unwrap());
    d.set_boot(Boot {
        kernel: image.join("vmlinuz"),
        initrd: image.join("initrd.img"),
        append: format!(
            "{} ferry.ip={{ip}}/24",
            manifest["append"].as_str().unwrap()
        ),
        network: net.0.clone(),
        memory_mib: 512,
    });
    let c = Client::new(
        &ClientOptions::new(&d.url),
        Login {
            username: "admin".into(),
            password: "Adm1n-pa55".into(),
        },
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();

    // The "synced disk": what the replication engine leaves, a raw image.
    let synced = work.path().join("web01.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image.join("disk.qcow2"))
        .arg(&synced)
        .output()
        .unwrap();
    assert!(o.status.success());

    let t = Instant::now();
    let got = provision::deliver_image_mode(
        &c,
        &synced,
        "raw",
        work.path(),
        &spec("web01", "10.203.0.10"),
    )
    .await
    .unwrap();
    eprintln!(
        "image mode: {} bytes uploaded, instance {} in {:.1}s",
        got.uploaded_bytes,
        got.instance_id,
        t.elapsed().as_secs_f64()
    );

    // What the manager stored is byte for byte the qcow2 Ferry made.
    let stored = d
        .state()
        .images
        .iter()
        .find(|i| i.id == got.image_id)
        .and_then(|i| i.file.clone())
        .unwrap();
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&got.qcow2).unwrap()
    );
    let body = d
        .state()
        .instances
        .iter()
        .find(|i| i.id == got.instance_id)
        .unwrap()
        .body
        .clone();
    assert_eq!(body["config"]["imageId"], got.image_id);
    assert_eq!(
        provision::instance_status(&c, got.instance_id)
            .await
            .unwrap(),
        "stopped"
    );

    // Power on: the instance boots from the delivered disk and serves its page.
    provision::start_instance(&c, got.instance_id)
        .await
        .unwrap();
    provision::wait_status(&c, got.instance_id, "running", Duration::from_secs(60))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let page = loop {
        match net
            .0
            .http_get("http://10.203.0.10/", Duration::from_secs(3))
        {
            Ok(r) if r.status == 200 => break r,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_secs(1)).await,
            other => panic!(
                "the instance does not serve its page: {other:?}; serial log:\n{}",
                std::fs::read_to_string(d.run_dir(got.instance_id).join("serial.log"))
                    .unwrap_or_default()
            ),
        }
    };
    assert!(String::from_utf8_lossy(&page.body).contains("ferry test guest"));
    eprintln!(
        "instance served its page {:.1}s after power-on",
        t.elapsed().as_secs_f64()
    );
    provision::stop_instance(&c, got.instance_id).await.unwrap();
    provision::wait_status(&c, got.instance_id, "stopped", Duration::from_secs(60))
        .await
        .unwrap();

    // A failed delivery removes what it created, and says why.
    d.inject(Fault::Status {
        method: "POST".into(),
        path_prefix: "/api/instances".into(),
        status: 500,
        times: 1,
    });
    let e = provision::deliver_image_mode(
        &c,
        &synced,
        "raw",
        work.path(),
        &spec("web02", "10.203.0.11"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, MorpheusError::Server { .. }), "{e}");
    assert!(e.to_string().contains("POST /api/instances"), "{e}");
    assert_eq!(
        d.state().images.len(),
        1,
        "the second image was deleted again"
    );
    // An instance that references a missing network is refused with the API's words.
    let mut bad = spec("web03", "10.203.0.12");
    bad.networks = vec![(77, None)];
    bad.image_id = Some(got.image_id);
    let e = provision::create_instance(&c, &bad).await.unwrap_err();
    assert!(e.to_string().contains("no such network network-77"), "{e}");

    provision::delete_instance(&c, got.instance_id)
        .await
        .unwrap();
    let n = d.assert_conforming();
    println!("image mode: {n} requests validated against the Morpheus API document");
}
