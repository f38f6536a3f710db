//! Against a real knotd: each test starts its own server in a temporary directory. The
//! `Fixture` drops the server (killing knotd) before the directory, also when a test panics.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_dns::knot::KnotServer;
use ferry_dns::{parse_name, DnsError, DnsServer, Name, RecordSet, TsigAlgorithm, TsigKey};

const ZONE: &str = "ferry.test";
const SECRET: &str = "Zm9yLXRlc3RzLW9ubHktMzItYnl0ZXMtb2Ytc2VjcmV0ISE="; // 35 bytes
const OTHER_SECRET: &str = "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZyE=";

struct Fixture {
    knot: KnotServer,
    key: TsigKey,
    _dir: tempfile::TempDir,
}

fn key(alg: TsigAlgorithm) -> TsigKey {
    TsigKey::from_base64("ferry-update", alg, SECRET).unwrap()
}

fn name(s: &str) -> Name {
    parse_name(s).unwrap()
}

fn a(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn start_with(alg: TsigAlgorithm, initial: &[RecordSet]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = key(alg);
    let knot =
        KnotServer::start(dir.path(), &name(ZONE), &key, initial).unwrap_or_else(|e| panic!("{e}"));
    Fixture {
        knot,
        key,
        _dir: dir,
    }
}

fn start() -> Fixture {
    start_with(
        TsigAlgorithm::HmacSha256,
        &[RecordSet {
            name: name("app.ferry.test"),
            ttl: 120,
            addrs: vec![a("192.0.2.10"), a("192.0.2.11")],
        }],
    )
}

impl Fixture {
    fn signed(&self) -> DnsServer {
        self.knot
            .client(Some(self.key.clone()))
            .with_timeout(Duration::from_secs(3))
    }

    /// `kdig +short` against the server: what an outside tool sees.
    fn kdig(&self, qname: &str) -> Vec<Ipv4Addr> {
        let out = Command::new("kdig")
            .arg(format!("@{}", self.knot.addr.ip()))
            .arg("-p")
            .arg(self.knot.addr.port().to_string())
            .args(["+short", "+time=2", "+retry=0", qname, "A"])
            .output()
            .expect("kdig (package knot-dnsutils) must be installed");
        assert!(out.status.success(), "{out:?}");
        let mut addrs: Vec<Ipv4Addr> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        addrs.sort();
        addrs
    }
}

#[tokio::test]
async fn replace_then_query_and_kdig_agrees() {
    let f = start();
    let dns = f.signed();
    let app = name("app.ferry.test");

    let before = dns.query_a(&app).await.unwrap();
    assert_eq!(before.addrs, vec![a("192.0.2.10"), a("192.0.2.11")]);
    assert_eq!(before.ttl, 120);
    assert_eq!(before.name, app);

    dns.replace_a(&app, &[a("198.51.100.7")], 60).await.unwrap();
    let after = dns.query_a(&app).await.unwrap();
    assert_eq!(after.addrs, vec![a("198.51.100.7")]);
    assert_eq!(after.ttl, 60);
    assert_eq!(f.kdig("app.ferry.test"), vec![a("198.51.100.7")]);

    // Several addresses, and a name that did not exist.
    let new = name("new.ferry.test");
    assert!(dns.query_a(&new).await.unwrap().is_empty());
    dns.replace_a(&new, &[a("203.0.113.2"), a("203.0.113.1")], 30)
        .await
        .unwrap();
    assert_eq!(
        dns.query_a(&new).await.unwrap().addrs,
        vec![a("203.0.113.1"), a("203.0.113.2")]
    );
    assert_eq!(
        f.kdig("new.ferry.test"),
        vec![a("203.0.113.1"), a("203.0.113.2")]
    );
}

#[tokio::test]
async fn hmac_sha512_key_works() {
    let f = start_with(TsigAlgorithm::HmacSha512, &[]);
    let dns = f.signed();
    let app = name("app.ferry.test");
    dns.replace_a(&app, &[a("198.51.100.9")], 60).await.unwrap();
    assert_eq!(
        dns.query_a(&app).await.unwrap().addrs,
        vec![a("198.51.100.9")]
    );
}

#[tokio::test]
async fn restore_puts_back_previous_records() {
    let f = start();
    let dns = f.signed();
    let app = name("app.ferry.test");
    let previous = dns.query_a(&app).await.unwrap();

    dns.replace_a(&app, &[a("198.51.100.7")], 60).await.unwrap();
    dns.restore(&previous).await.unwrap();

    assert_eq!(dns.query_a(&app).await.unwrap(), previous);
    assert_eq!(f.kdig("app.ferry.test"), previous.addrs);
}

#[tokio::test]
async fn restore_of_an_empty_previous_deletes() {
    let f = start();
    let dns = f.signed();
    let fresh = name("fresh.ferry.test");
    let previous = dns.query_a(&fresh).await.unwrap();
    assert!(previous.is_empty());
    assert_eq!(previous.ttl, 0);

    dns.replace_a(&fresh, &[a("198.51.100.8")], 60)
        .await
        .unwrap();
    assert_eq!(
        dns.query_a(&fresh).await.unwrap().addrs,
        vec![a("198.51.100.8")]
    );
    dns.restore(&previous).await.unwrap();

    assert!(dns.query_a(&fresh).await.unwrap().is_empty());
    assert!(f.kdig("fresh.ferry.test").is_empty());
}

async fn assert_unchanged(f: &Fixture) {
    assert_eq!(
        f.signed()
            .query_a(&name("app.ferry.test"))
            .await
            .unwrap()
            .addrs,
        vec![a("192.0.2.10"), a("192.0.2.11")]
    );
}

#[tokio::test]
async fn unsigned_update_is_refused_clearly_and_changes_nothing() {
    let f = start();
    let dns = f.knot.client(None);
    let err = dns
        .replace_a(&name("app.ferry.test"), &[a("198.51.100.66")], 60)
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, DnsError::KeyRejected { .. }), "{msg}");
    assert!(
        msg.contains("refused the update for app.ferry.test"),
        "{msg}"
    );
    assert!(msg.contains("NOTAUTH"), "{msg}");
    assert!(msg.contains(&f.knot.addr.to_string()), "{msg}");
    assert_unchanged(&f).await;
}

#[tokio::test]
async fn wrong_secret_is_refused_clearly_and_changes_nothing() {
    let f = start();
    let wrong =
        TsigKey::from_base64("ferry-update", TsigAlgorithm::HmacSha256, OTHER_SECRET).unwrap();
    let dns = f.knot.client(Some(wrong));
    let err = dns
        .replace_a(&name("app.ferry.test"), &[a("198.51.100.66")], 60)
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, DnsError::KeyRejected { .. }), "{msg}");
    assert!(
        msg.contains("TSIG key 'ferry-update' not accepted (NOTAUTH/BADSIG)"),
        "{msg}"
    );
    assert!(
        msg.contains("check the key name, algorithm and secret"),
        "{msg}"
    );
    assert!(
        !msg.contains(OTHER_SECRET) && !msg.contains(SECRET),
        "{msg}"
    );
    assert_unchanged(&f).await;
}

#[tokio::test]
async fn wrong_key_name_or_algorithm_is_refused_clearly() {
    let f = start();
    let wrong_name =
        TsigKey::from_base64("someone-else", TsigAlgorithm::HmacSha256, SECRET).unwrap();
    let err = f
        .knot
        .client(Some(wrong_name))
        .replace_a(&name("app.ferry.test"), &[a("198.51.100.66")], 60)
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, DnsError::KeyRejected { .. }), "{msg}");
    assert!(
        msg.contains("TSIG key 'someone-else' not accepted (NOTAUTH/BADKEY)"),
        "{msg}"
    );

    let wrong_alg = key(TsigAlgorithm::HmacSha512);
    let err = f
        .knot
        .client(Some(wrong_alg))
        .replace_a(&name("app.ferry.test"), &[a("198.51.100.66")], 60)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DnsError::KeyRejected { .. }), "{err}");
    assert_unchanged(&f).await;
}

#[tokio::test]
async fn name_outside_the_zone_fails_before_sending() {
    // Nothing listens on this address's port: an attempt to send would fail differently.
    let addr = closed_port();
    let dns = DnsServer::new(addr, name(ZONE))
        .with_key(key(TsigAlgorithm::HmacSha256))
        .with_timeout(Duration::from_millis(300));
    for outside in ["app.example.org", "ferry.test.evil", "xferry.test"] {
        let err = dns
            .replace_a(&name(outside), &[a("198.51.100.1")], 60)
            .await
            .unwrap_err();
        eprintln!("{err}");
        assert!(matches!(err, DnsError::OutsideZone { .. }), "{err}");
        assert!(err.to_string().contains(outside), "{err}");
        let err = dns.query_a(&name(outside)).await.unwrap_err();
        assert!(matches!(err, DnsError::OutsideZone { .. }), "{err}");
    }
}

/// A port with nothing behind it (the socket that found it is closed again).
fn closed_port() -> SocketAddr {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    s.local_addr().unwrap()
}

#[tokio::test]
async fn silent_server_times_out_quickly() {
    // Bound but never answering: datagrams vanish, TCP connects are never accepted.
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = udp.local_addr().unwrap();
    let _tcp = std::net::TcpListener::bind(addr).ok();
    let dns = DnsServer::new(addr, name(ZONE))
        .with_key(key(TsigAlgorithm::HmacSha256))
        .with_timeout(Duration::from_millis(300));

    let t = Instant::now();
    let err = dns.query_a(&name("app.ferry.test")).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, DnsError::Timeout { .. }), "{msg}");
    assert_eq!(
        msg,
        format!("no answer from DNS server {addr} within 0.3s: is it running and reachable?")
    );
    let t = Instant::now();
    let err = dns
        .replace_a(&name("app.ferry.test"), &[a("198.51.100.1")], 60)
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(err, DnsError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn server_not_running_fails_quickly() {
    let f = start();
    let addr = f.knot.addr;
    let dns = f.signed().with_timeout(Duration::from_millis(500));
    let mut f = f;
    f.knot.stop();
    assert!(f.knot.pid().is_none());

    let t = Instant::now();
    let err = dns.query_a(&name("app.ferry.test")).await.unwrap_err();
    assert!(
        matches!(err, DnsError::Io { .. } | DnsError::Timeout { .. }),
        "{err}"
    );
    let err = dns
        .replace_a(&name("app.ferry.test"), &[a("198.51.100.1")], 60)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, DnsError::Io { .. } | DnsError::Timeout { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(err.to_string().contains("is it running"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn knot_server_is_killed_on_drop_and_debug_hides_the_secret() {
    let f = start();
    let pid = f.knot.pid().unwrap();
    let conf = std::fs::read_to_string(f.knot.dir().join("knot.conf")).unwrap();
    assert!(conf.contains(SECRET), "the server must know the key");
    let dbg = format!("{:?} {:?} {:?}", f.key, f.signed(), f.knot);
    assert!(!dbg.contains(SECRET), "{dbg}");
    assert!(dbg.contains("ferry-update"), "{dbg}");
    drop(f);
    // Killed and reaped: the pid no longer exists.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn zone_not_served_by_the_server_is_named() {
    let f = start();
    let other = DnsServer::new(f.knot.addr, name("other.test"))
        .with_key(f.key.clone())
        .with_timeout(Duration::from_secs(3));
    let err = other.query_a(&name("app.other.test")).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DnsError::NotAuthoritative { .. }), "{err}");
    let err = other
        .replace_a(&name("app.other.test"), &[a("198.51.100.1")], 60)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, DnsError::NotAuthoritative { .. }), "{err}");
    assert!(err.to_string().contains("other.test"), "{err}");
    assert_unchanged(&f).await;
}
