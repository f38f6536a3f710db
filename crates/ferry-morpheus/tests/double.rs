//! The Morpheus client against the test double, which checks every request and answer
//! against the official API document (`$FERRY_MORPHEUS_OPENAPI`, or
//! ../shared/morpheus-openapi/ beside the repository).

use ferry_morpheus::iam::{self, IamRequest, ROLE};
use ferry_morpheus::inventory::{Inventory, Placement};
use ferry_morpheus::{Client, ClientOptions, Login, MorpheusError};
use ferry_morpheus_double::{Double, Fault};
use ferry_openapi::Spec;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const ADMIN_PASSWORD: &str = "Adm1n-pa55word!";

fn spec() -> Arc<Spec> {
    static SPEC: OnceLock<Arc<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let p = Spec::morpheus_default_path();
        Arc::new(
            Spec::load(&p)
                .unwrap_or_else(|e| panic!("the Morpheus API document {}: {e}", p.display())),
        )
    })
    .clone()
}

async fn double() -> Double {
    Double::start(spec(), "admin", ADMIN_PASSWORD).await
}

fn client(d: &Double, user: &str, password: &str) -> Client {
    let mut o = ClientOptions::new(&d.url);
    o.timeout = Duration::from_secs(2);
    Client::new(
        &o,
        Login {
            username: user.into(),
            password: password.into(),
        },
    )
    .unwrap()
}

fn request(dry_run: bool) -> IamRequest {
    IamRequest {
        service_user: "ferry-svc".into(),
        email: "ferry@example.com".into(),
        set_email: false,
        password: "Svc-pa55word-1".into(),
        reset_password: false,
        dry_run,
    }
}

/// Log lines written while `f` runs.
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn setup_iam_creates_the_role_and_user_once_and_never_logs_the_password() {
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || Captured(l.clone()))
        .finish();
    let _g = tracing::subscriber::set_default(sub);

    let d = double().await;
    let admin = client(&d, "admin", ADMIN_PASSWORD);

    // Dry run: the plan, and nothing changes.
    let plan = iam::setup(&admin, &request(true)).await.unwrap();
    assert_eq!(plan.changes.len(), 2, "{:#?}", plan.changes);
    assert_eq!(plan.changes[0].call, "POST /api/roles");
    assert_eq!(plan.changes[1].call, "POST /api/users");
    assert_eq!(plan.changes[1].body["user"]["password"], "<redacted>");
    assert!(d.state().mutations.is_empty());

    let rep = iam::setup(&admin, &request(false)).await.unwrap();
    assert_eq!(rep.changes.len(), 2);
    assert!(rep.password_set);
    {
        let st = d.state();
        let role = st.role_by_name(ROLE).expect("role created");
        assert_eq!(role.permissions.len(), iam::permissions().len());
        let user = st.user_by_name("ferry-svc").expect("user created");
        assert_eq!(user.role_ids, vec![role.id], "the user holds only the role");
    }

    // Every permission code is one the API document lists for roles.
    let codes = spec()
        .document()
        .pointer("/paths/~1api~1roles/post/requestBody/content/application~1json/schema/properties/role/properties/featurePermissions/items/properties/code/enum")
        .and_then(|v| v.as_array())
        .cloned()
        .expect("the document lists feature permission codes");
    for (code, _) in iam::permissions() {
        assert!(
            codes.iter().any(|c| c == code),
            "{code} is not a Morpheus permission code"
        );
    }
    // Every row of the call table is an operation of the document.
    let doc = spec();
    for (call, _, _) in iam::CALLS {
        let (method, template) = call.split_once(' ').unwrap();
        let path: String = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let op = doc.find(method, &path);
        assert_eq!(op.map(|o| o.template), Some(template.to_string()), "{call}");
    }

    // A second run changes nothing.
    let n = d.state().mutations.len();
    let again = iam::setup(&admin, &request(false)).await.unwrap();
    assert!(again.changes.is_empty(), "{:#?}", again.changes);
    assert!(!again.password_set);
    assert_eq!(d.state().mutations.len(), n);

    // Drift is put back: a permission granted by hand, one taken away.
    {
        let mut st = d.state();
        let id = st.role_by_name(ROLE).unwrap().id;
        let r = st.roles.iter_mut().find(|r| r.id == id).unwrap();
        r.permissions.insert("admin-users".into(), "full".into());
        r.permissions.insert("snapshots".into(), "none".into());
    }
    let fixed = iam::setup(&admin, &request(false)).await.unwrap();
    let whats: Vec<&str> = fixed.changes.iter().map(|c| c.what.as_str()).collect();
    assert_eq!(whats.len(), 2, "{whats:?}");
    assert!(whats
        .iter()
        .any(|w| w.contains("admin-users from full to none")));
    assert!(whats
        .iter()
        .any(|w| w.contains("snapshots from none to full")));

    // The service user logs in with the password Ferry set; it cannot manage roles.
    let svc = client(&d, "ferry-svc", "Svc-pa55word-1");
    Inventory::discover(&svc).await.unwrap();
    let e = iam::setup(&svc, &request(false)).await.unwrap_err();
    assert!(matches!(e, MorpheusError::Forbidden { .. }), "{e}");
    assert!(e.to_string().contains("GET /api/roles"), "{e}");
    assert!(e.to_string().contains("setup-iam"), "{e}");

    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!text.is_empty(), "logs were captured");
    assert!(
        !text.contains(ADMIN_PASSWORD),
        "the admin password is in the logs"
    );
    assert!(
        !text.contains("Svc-pa55word-1"),
        "the service password is in the logs"
    );
    let n = d.assert_conforming();
    println!("setup-iam: {n} requests validated against the Morpheus API document");
}

#[tokio::test]
async fn discovery_validates_a_placement_and_names_what_is_missing() {
    let d = double().await;
    let c = client(&d, "admin", ADMIN_PASSWORD);
    let inv = Inventory::discover(&c).await.unwrap();
    assert_eq!(inv.clouds.len(), 1);
    assert_eq!(inv.hosts.len(), 2);
    assert_eq!(inv.datastores.len(), 2);
    assert_eq!(inv.networks.len(), 2);
    let mut p = Placement {
        cloud: Some("vme-prod".into()),
        group: Some("migrations".into()),
        cluster: Some("hvm-cluster-a".into()),
        plan: Some("2 CPU, 4GB Memory".into()),
        datastore: Some("ceph-rbd".into()),
        networks: vec!["VLAN-120-prod".into()],
    };
    inv.check_placement(&p).unwrap();
    p.datastore = Some("ceph-ssd".into());
    p.group = Some("wave-1".into());
    let e = inv.check_placement(&p).unwrap_err().to_string();
    assert!(
        e.contains("no datastore 'ceph-ssd' (it has: ceph-rbd, nfs-templates)"),
        "{e}"
    );
    assert!(e.contains("no group 'wave-1'"), "{e}");
    let n = d.assert_conforming();
    println!("discovery: {n} requests validated against the Morpheus API document");
}

#[tokio::test]
async fn bad_credentials_expiry_server_errors_and_timeouts_are_clear() {
    let d = double().await;

    // Wrong password.
    let e = Inventory::discover(&client(&d, "admin", "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(e, MorpheusError::BadCredentials { .. }), "{e}");
    let t = e.to_string();
    assert!(
        t.contains("POST /oauth/token")
            && t.contains("Bad credentials")
            && t.contains("check the username and password"),
        "{t}"
    );

    // An expired access token is renewed with the refresh token, then by logging in again.
    let c = client(&d, "admin", ADMIN_PASSWORD);
    Inventory::discover(&c).await.unwrap();
    d.expire_tokens(false);
    Inventory::discover(&c).await.unwrap();
    d.expire_tokens(true);
    Inventory::discover(&c).await.unwrap();

    // 500s are retried; a GET that keeps failing says so, with the API's message.
    d.inject(Fault::Status {
        method: "GET".into(),
        path_prefix: "/api/zones".into(),
        status: 500,
        times: 2,
    });
    Inventory::discover(&c).await.unwrap();
    d.inject(Fault::Status {
        method: "GET".into(),
        path_prefix: "/api/groups".into(),
        status: 503,
        times: 4,
    });
    let e = Inventory::discover(&c).await.unwrap_err();
    assert!(
        matches!(e, MorpheusError::Server { attempts: 4, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("GET /api/groups") && e.to_string().contains("injected failure"),
        "{e}"
    );

    // A POST that failed on the server is not repeated (it may have created something).
    d.inject(Fault::Status {
        method: "POST".into(),
        path_prefix: "/api/roles".into(),
        status: 500,
        times: 1,
    });
    let e = iam::setup(&c, &request(false)).await.unwrap_err();
    assert!(
        matches!(e, MorpheusError::Server { attempts: 1, .. }),
        "{e}"
    );
    assert!(d.state().role_by_name(ROLE).is_none());

    // A manager that does not answer in time.
    d.inject(Fault::Hang {
        path_prefix: "/api/networks".into(),
        delay: Duration::from_secs(5),
        times: 10,
    });
    let e = Inventory::discover(&c).await.unwrap_err();
    assert!(matches!(e, MorpheusError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("GET /api/networks"), "{e}");

    // Nothing there at all.
    let mut o = ClientOptions::new("http://127.0.0.1:9");
    o.timeout = Duration::from_secs(2);
    let c = Client::new(
        &o,
        Login {
            username: "a".into(),
            password: "b".into(),
        },
    )
    .unwrap();
    let e = Inventory::discover(&c).await.unwrap_err();
    assert!(matches!(e, MorpheusError::Unreachable { .. }), "{e}");
    let n = d.assert_conforming();
    println!("errors: {n} requests validated against the Morpheus API document");
}

#[tokio::test]
async fn snapshot_revert_and_network_moves() {
    use ferry_morpheus::provision::{self, InstanceSpec};
    let d = double().await;
    let c = client(&d, "admin", ADMIN_PASSWORD);
    let spec = InstanceSpec {
        name: "db01".into(),
        cloud_id: 1,
        group_id: 1,
        plan_id: 1,
        layout_id: 1,
        instance_type: "mvm".into(),
        resource_pool: None,
        image_id: None,
        volumes: vec![(1, Some(1))],
        networks: vec![(2, Some("10.99.0.20".into()))],
        powered_off: true,
    };
    let id = provision::create_instance(&c, &spec).await.unwrap();
    let vol = d.state().instances[0].volumes[0].path.clone();
    let before = std::fs::read(&vol).unwrap();
    let sid = provision::snapshot(&c, id, "before-delta-1").await.unwrap();
    assert_eq!(
        provision::snapshots(&c, id).await.unwrap(),
        vec![(sid, "before-delta-1".to_string())]
    );
    // A delta that went wrong half-way.
    std::fs::write(&vol, b"half-written").unwrap();
    provision::revert_snapshot(&c, id, sid).await.unwrap();
    assert_eq!(
        std::fs::read(&vol).unwrap(),
        before,
        "reverted to the snapshot"
    );

    // From the migration network to production: the migration network's address is
    // not one of production's range, and the manager says so; a production address is
    // taken.
    let e = provision::move_to_network(&c, id, 1, Some("10.99.0.20"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("10.20.120.0/24"), "{e}");
    provision::move_to_network(&c, id, 1, Some("10.20.120.20"))
        .await
        .unwrap();
    assert_eq!(
        d.state().instances[0].nics,
        vec![("network-1".to_string(), Some("10.20.120.20".to_string()))]
    );
    let e = provision::move_to_network(&c, id, 42, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no such network network-42"), "{e}");

    // Snapshots need the instance stopped in the double; the message says so.
    provision::start_instance(&c, id).await.unwrap();
    provision::wait_status(&c, id, "running", Duration::from_secs(10))
        .await
        .unwrap();
    let e = provision::snapshot(&c, id, "live").await.unwrap_err();
    assert!(e.to_string().contains("stop it first"), "{e}");
    // Waiting for a status that never comes ends with the last one seen.
    let e = provision::wait_status(&c, id, "stopped", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, MorpheusError::Stuck { .. }) && e.to_string().contains("running"),
        "{e}"
    );
    let n = d.assert_conforming();
    println!("snapshots: {n} requests validated against the Morpheus API document");
}
