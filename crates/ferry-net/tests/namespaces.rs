//! Real network namespaces, bridges, veths and taps. Needs root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::Location;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_net::{
    delete_namespace, ensure_namespace, http_get, tcp_check, Cidr, NetError, Network, NetworkSpec,
};

/// Unreachable must be decided quickly: nothing answers ARP on an isolated bridge.
const SHORT: Duration = Duration::from_millis(300);
const LONG: Duration = Duration::from_secs(2);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Deletes the namespaces it was given when dropped, whether the test passed or not.
#[derive(Default)]
struct Cleanup(Vec<String>);

impl Cleanup {
    fn name(&mut self) -> String {
        let n = unique("ft");
        self.0.push(n.clone());
        n
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.0 {
            if let Err(e) = delete_namespace(ns) {
                eprintln!("cleanup of {ns}: {e}");
            }
        }
    }
}

/// Kills the process when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn addrs(ns: &str, ifname: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args([
            "-n", ns, "-o", "addr", "show", "dev", ifname, "scope", "global",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "inet")
                .map(|i| w[i + 1].to_string())
        })
        .collect()
}

fn links(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .collect()
}

/// Serves `HTTP/1.0 200` with `body` on a listener bound inside `ns` until dropped.
///
/// The listening socket holds a reference on the namespace: while it is open, a deleted
/// namespace (and every veth in it) lives on. Drop it before checking what deletion removed.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(ns: &str, addr: SocketAddr, body: &'static str) -> Server {
    let listener = ferry_net::in_netns(ns, move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            let mut conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(LONG));
            let mut buf = [0u8; 1024];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Server {
        stop,
        thread: Some(thread),
    }
}

fn routes(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "route", "show", "table", "main"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn root_link_exists(ifname: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", ifname])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn unreachable(res: Result<Duration, NetError>) {
    match res {
        Err(NetError::Timeout { .. } | NetError::Unreachable { .. }) => {}
        other => panic!("expected unreachable, got {other:?}"),
    }
}

/// Reachable within a couple of seconds (a restored link needs a moment to forward).
#[track_caller]
fn eventually_reachable(ns: &str, addr: SocketAddr) -> Duration {
    let deadline = Instant::now() + LONG;
    loop {
        match tcp_check(ns, addr, SHORT) {
            Ok(d) => return d,
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "{addr} unreachable from {ns} (line {}): {e}",
                    Location::caller().line()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn ensure_and_destroy_are_idempotent() {
    let mut clean = Cleanup::default();
    let name = clean.name();
    let spec = NetworkSpec::new(&name).with_cidr(cidr("10.200.1.1/24"));
    let a = Network::ensure(&spec).unwrap();
    let b = Network::ensure(&spec).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.namespace, name);
    assert_eq!(a.bridge, "br0");
    assert!(a.exists());
    let br = a.link_info("br0").unwrap().expect("bridge exists");
    assert!(br.admin_up);
    let lo = a.link_info("lo").unwrap().unwrap();
    assert!(lo.admin_up);
    assert_eq!(addrs(&name, "br0"), ["10.200.1.1/24"]);

    // A changed spec converges: exactly the new address, then none.
    Network::ensure(&NetworkSpec::new(&name).with_cidr(cidr("10.200.2.1/24"))).unwrap();
    assert_eq!(addrs(&name, "br0"), ["10.200.2.1/24"]);
    let bare = Network::ensure(&NetworkSpec::new(&name)).unwrap();
    assert!(addrs(&name, "br0").is_empty());
    assert_eq!(bare.cidr, None);

    a.destroy().unwrap();
    assert!(!a.exists());
    a.destroy().unwrap();
    assert!(!ferry_net::netns_path(&name).exists());
}

#[test]
fn migration_network_is_isolated_until_linked() {
    let mut clean = Cleanup::default();
    let prod =
        Network::ensure(&NetworkSpec::new(clean.name()).with_cidr(cidr("10.200.7.1/24"))).unwrap();
    // An isolated UAT network with no address of its own, and one with the same subnet.
    let uat = Network::ensure(&NetworkSpec::new(clean.name())).unwrap();
    let uat2 =
        Network::ensure(&NetworkSpec::new(clean.name()).with_cidr(cidr("10.200.7.2/24"))).unwrap();
    // Two "machines": one plugged into production, one into UAT. (They must not share an
    // address here because the test links the networks later: the production server would
    // then learn the UAT machine's MAC for that address.)
    let m_prod = clean.name();
    let m_uat = clean.name();
    ensure_namespace(&m_prod).unwrap();
    ensure_namespace(&m_uat).unwrap();
    prod.attach_veth("m0", Some(&m_prod), Some(cidr("10.200.7.10/24")))
        .unwrap();
    // Idempotent.
    prod.attach_veth("m0", Some(&m_prod), Some(cidr("10.200.7.10/24")))
        .unwrap();
    uat.attach_veth("m0", Some(&m_uat), Some(cidr("10.200.7.20/24")))
        .unwrap();

    let server: SocketAddr = "10.200.7.1:8080".parse().unwrap();
    let _server = serve(&prod.namespace, server, "hello from prod");

    // Inside production: TCP and HTTP work.
    eventually_reachable(&m_prod, server);
    let r = http_get(&m_prod, "http://10.200.7.1:8080/health", LONG).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body_text(), "hello from prod");
    prod.tcp_check(server, SHORT).unwrap();

    // From the migration networks the same address is unreachable, and fast.
    let t = Instant::now();
    unreachable(tcp_check(&m_uat, server, SHORT));
    unreachable(uat2.tcp_check(server, SHORT));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(
        http_get(&m_uat, "http://10.200.7.1:8080/", SHORT),
        Err(NetError::Timeout { .. } | NetError::Unreachable { .. })
    ));
    // And the UAT namespaces hold nothing but their own interfaces.
    assert_eq!(links(&uat.namespace), ["lo", "br0", "m0"]);
    assert_eq!(links(&uat2.namespace), ["lo", "br0"]);
    assert_eq!(routes(&uat.namespace), Vec::<String>::new());
    assert_eq!(
        routes(&uat2.namespace).len(),
        1,
        "{:?}",
        routes(&uat2.namespace)
    );
    assert!(routes(&uat2.namespace)[0].starts_with("10.200.7.0/24 dev br0"));

    // Link UAT to production: reachable. Cut: unreachable. Restore: reachable again.
    let link = prod.link_to(&uat, "lk0").unwrap();
    prod.link_to(&uat, "lk0").unwrap();
    eventually_reachable(&m_uat, server);
    let r = http_get(&m_uat, "http://10.200.7.1:8080/", LONG).unwrap();
    assert_eq!(r.body_text(), "hello from prod");
    // uat2 is still on its own.
    unreachable(uat2.tcp_check(server, SHORT));

    link.cut().unwrap();
    unreachable(tcp_check(&m_uat, server, SHORT));
    link.restore().unwrap();
    eventually_reachable(&m_uat, server);

    link.remove().unwrap();
    link.remove().unwrap();
    unreachable(tcp_check(&m_uat, server, SHORT));
    assert!(prod.link_info("lk0").unwrap().is_none());
    // Production itself never lost its machine.
    eventually_reachable(&m_prod, server);
}

#[test]
fn isolated_networks_can_reuse_production_addresses() {
    // A UAT copy of production keeps its addresses: each machine reaches its own network's
    // 10.200.5.1 and never the other one.
    let mut clean = Cleanup::default();
    let gw = cidr("10.200.5.1/24");
    let prod = Network::ensure(&NetworkSpec::new(clean.name()).with_cidr(gw)).unwrap();
    let uat = Network::ensure(&NetworkSpec::new(clean.name()).with_cidr(gw)).unwrap();
    let server: SocketAddr = "10.200.5.1:80".parse().unwrap();
    let _p = serve(&prod.namespace, server, "production");
    let _u = serve(&uat.namespace, server, "uat");
    for (net, body) in [(&prod, "production"), (&uat, "uat")] {
        let machine = clean.name();
        ensure_namespace(&machine).unwrap();
        net.attach_veth("eth0", Some(&machine), Some(cidr("10.200.5.10/24")))
            .unwrap();
        eventually_reachable(&machine, server);
        let r = http_get(&machine, "http://10.200.5.1/", LONG).unwrap();
        assert_eq!(r.body_text(), body);
    }
}

#[test]
fn uplink_gives_root_namespace_an_address() {
    let mut clean = Cleanup::default();
    let octet = std::process::id() % 200 + 20;
    let gw = format!("10.254.{octet}.1");
    let net = Network::ensure(&NetworkSpec::new(clean.name()).with_cidr(cidr(&format!("{gw}/24"))))
        .unwrap();
    let server: SocketAddr = format!("{gw}:8081").parse().unwrap();
    let srv = serve(&net.namespace, server, "up");
    let host_if = format!("fu{}", std::process::id());
    let up = net
        .uplink_host(&host_if, cidr(&format!("10.254.{octet}.100/24")))
        .unwrap();
    // From the root namespace, no in_netns: the answer must come from our server.
    let deadline = Instant::now() + LONG;
    let body = loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&server, SHORT) {
            s.set_read_timeout(Some(LONG)).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "root namespace cannot reach {server}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.ends_with("\r\n\r\nup"), "{body:?}");
    // Do not probe the address after removal: the root namespace has a default route
    // off the machine. Check that the route through the uplink is gone instead.
    up.remove().unwrap();
    up.remove().unwrap();
    assert!(!root_link_exists(&host_if));
    // Deleting the namespace also removes the root end.
    net.uplink_host(&host_if, cidr(&format!("10.254.{octet}.100/24")))
        .unwrap();
    drop(srv);
    net.destroy().unwrap();
    // The kernel tears a namespace down asynchronously once its last user is gone.
    let deadline = Instant::now() + LONG;
    while root_link_exists(&host_if) {
        assert!(Instant::now() < deadline, "root end {host_if} survived");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tap_attaches_to_a_running_qemu() {
    let mut clean = Cleanup::default();
    let net = Network::ensure(&NetworkSpec::new(clean.name())).unwrap();
    let tap = net.add_tap("tap0").unwrap();
    assert_eq!(net.add_tap("tap0").unwrap(), tap);
    let info = tap.info().unwrap().unwrap();
    assert!(info.admin_up);
    assert!(!info.carrier, "nothing has the tap open yet: {info:?}");
    assert_eq!(info.master.as_deref(), Some("br0"));

    let qemu = net
        .command("qemu-system-x86_64")
        .args(["-accel", "tcg", "-nodefaults", "-display", "none", "-S"])
        .args(["-m", "64", "-monitor", "none", "-serial", "none"])
        .args(["-netdev", &tap.qemu_netdev("n0")])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu = Kill(qemu);
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = tap.info().unwrap().unwrap();
        if info.carrier {
            break info;
        }
        if let Some(status) = qemu.0.try_wait().unwrap() {
            let mut err = String::new();
            qemu.0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("qemu exited with {status}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "tap never got a carrier: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(info.oper_state, "UP");
    assert_eq!(info.master.as_deref(), Some("br0"));
    let shown = Command::new("ip")
        .args(["-n", &net.namespace, "link", "show", "tap0"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("master br0") && shown.contains("state UP"),
        "{shown}"
    );

    drop(qemu);
    // The tap is persistent: it stays, without carrier, until removed.
    let info = tap.info().unwrap().unwrap();
    assert!(!info.carrier, "{info:?}");
    net.remove_tap("tap0").unwrap();
    net.remove_tap("tap0").unwrap();
    assert!(tap.info().unwrap().is_none());
}

#[test]
fn bad_names_are_refused_clearly() {
    let mut clean = Cleanup::default();
    let e = Network::ensure(&NetworkSpec::new("///")).unwrap_err();
    assert!(matches!(e, NetError::InvalidNetworkName { .. }), "{e}");

    let raw = format!("FT Spaced/{}", unique("x"));
    let net = Network::ensure(&NetworkSpec::new(&raw)).unwrap();
    clean.0.push(net.namespace.clone());
    assert_eq!(net.name, raw);
    assert!(net.namespace.starts_with("ft-spaced-"), "{}", net.namespace);

    let e = net.add_tap("a-very-long-tap-name").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, NetError::InvalidIfName { .. }));
    assert!(msg.contains("20 bytes") && msg.contains("15"), "{msg}");
    assert!(matches!(
        net.add_tap("tap 0").unwrap_err(),
        NetError::InvalidIfName { .. }
    ));
    assert!(matches!(
        net.link_to(&net, "").unwrap_err(),
        NetError::InvalidIfName { .. }
    ));
    assert!(matches!(
        ensure_namespace("Not Clean").unwrap_err(),
        NetError::InvalidNetworkName { .. }
    ));
    let e = "10.0.0.1".parse::<Cidr>().unwrap_err();
    assert!(e.to_string().contains("10.200.1.1/24"), "{e}");

    let missing = unique("ft-missing");
    let e = tcp_check(&missing, "10.0.0.1:1".parse().unwrap(), SHORT).unwrap_err();
    assert!(matches!(e, NetError::NoSuchNamespace { .. }), "{e}");
    assert!(e.to_string().contains("Network::ensure"), "{e}");
    let e = net.attach_veth("m0", Some(&missing), None).unwrap_err();
    assert!(matches!(e, NetError::NoSuchNamespace { .. }), "{e}");
    // Destroying what was never there is fine.
    delete_namespace(&missing).unwrap();
}

#[tokio::test]
async fn async_probes() {
    let mut clean = Cleanup::default();
    let name = clean.name();
    let net = tokio::task::spawn_blocking(move || {
        Network::ensure(&NetworkSpec::new(name).with_cidr(cidr("10.200.9.1/24")))
    })
    .await
    .unwrap()
    .unwrap();
    let server: SocketAddr = "10.200.9.1:8082".parse().unwrap();
    let _server = serve(&net.namespace, server, "async");
    ferry_net::tcp_check_async(&net.namespace, server, LONG)
        .await
        .unwrap();
    let r = ferry_net::http_get_async(&net.namespace, "http://10.200.9.1:8082/", LONG)
        .await
        .unwrap();
    assert_eq!(r.body_text(), "async");
    // A command run inside the namespace sees its bridge.
    let out = net
        .tokio_command("ip")
        .args(["-o", "addr", "show", "dev", "br0"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.200.9.1/24"));
}
