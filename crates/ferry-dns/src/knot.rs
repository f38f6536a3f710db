//! A real, local Knot DNS server (`knotd`) serving one zone that accepts TSIG-signed updates.
//! Used by the tests and by `ferry quickstart`.
//!
//! Everything lives in the given directory: `knot.conf` (0600: it holds the key's secret),
//! the zone file, `run/` (control socket, pid file), `storage/` (journal, timers) and
//! `knotd.log`. No `user:` is configured, so knotd keeps the identity it was started with and
//! needs no access rights beyond the caller's. The process is killed on [`KnotServer::stop`]
//! and on drop.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use crate::client::{DnsServer, RecordSet};
use crate::error::DnsError;
use crate::key::TsigKey;

/// How long to wait for knotd to answer for its zone.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Where knotd is looked for after `PATH` (Debian installs it in /usr/sbin, often not in a
/// non-root user's PATH).
const KNOTD_FALLBACKS: &[&str] = &["/usr/sbin/knotd", "/usr/local/sbin/knotd", "/sbin/knotd"];

/// The path of `knotd`, from `PATH` or the usual sbin directories.
pub fn find_knotd() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("knotd"));
    from_path
        .chain(KNOTD_FALLBACKS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// A running knotd. Killed on drop.
#[derive(Debug)]
pub struct KnotServer {
    /// Where it answers, UDP and TCP.
    pub addr: SocketAddr,
    /// The zone it serves.
    pub zone: Name,
    dir: PathBuf,
    child: Option<Child>,
}

impl KnotServer {
    /// Writes a configuration and a zone file into `dir` (created if needed), starts knotd on
    /// a free port of 127.0.0.1 and waits until it answers for `zone`.
    ///
    /// The zone has an SOA, `NS ns1.<zone>`, `ns1.<zone> A 127.0.0.1` and the `initial`
    /// records; only updates signed with `key` are allowed.
    ///
    /// Blocking (it waits for knotd, typically well under a second); from async code prefer
    /// `tokio::task::spawn_blocking` when the runtime must not stall.
    pub fn start(
        dir: &Path,
        zone: &Name,
        key: &TsigKey,
        initial: &[RecordSet],
    ) -> Result<Self, DnsError> {
        let knotd = find_knotd().ok_or(DnsError::KnotNotInstalled)?;
        let knot_err = |reason: String| DnsError::Knot {
            dir: dir.to_path_buf(),
            reason,
        };
        let mut zone = zone.clone();
        zone.set_fqdn(true);
        let zone_text = zone.to_ascii();
        if zone.is_root() || !is_safe_name(&zone_text) {
            return Err(knot_err(format!(
                "zone '{zone_text}' is not usable: use letters, digits, '-', '_' and '.'"
            )));
        }
        for set in initial {
            let mut name = set.name.clone();
            name.set_fqdn(true);
            if !zone.zone_of(&name) || !is_safe_name(&name.to_ascii()) {
                return Err(knot_err(format!(
                    "initial record '{name}' is not a plain name inside zone '{zone_text}'"
                )));
            }
        }

        let run = dir.join("run");
        let storage = dir.join("storage");
        for d in [dir, &run, &storage] {
            fs::create_dir_all(d)
                .map_err(|e| knot_err(format!("cannot create {}: {e}", d.display())))?;
        }
        let zone_file = dir.join(format!("{}zone", zone_text));
        fs::write(&zone_file, zone_file_text(&zone, initial))
            .map_err(|e| knot_err(format!("cannot write {}: {e}", zone_file.display())))?;

        let port = free_port().map_err(|e| knot_err(format!("no free port on 127.0.0.1: {e}")))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let conf = dir.join("knot.conf");
        write_private(
            &conf,
            &config_text(addr, &run, &storage, &zone, &zone_file, key),
        )
        .map_err(|e| knot_err(format!("cannot write {}: {e}", conf.display())))?;

        let log_path = dir.join("knotd.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| knot_err(format!("cannot create {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| knot_err(format!("cannot open {}: {e}", log_path.display())))?;
        let child = Command::new(&knotd)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| knot_err(format!("cannot run {}: {e}", knotd.display())))?;

        let mut server = Self {
            addr,
            zone,
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        server.wait_ready()?;
        tracing::info!(addr = %server.addr, zone = %server.zone, pid = server.pid(), "knotd started");
        Ok(server)
    }

    /// A client for this server's zone, signing updates with `key` when given.
    pub fn client(&self, key: Option<TsigKey>) -> DnsServer {
        let server = DnsServer::new(self.addr, self.zone.clone());
        match key {
            Some(key) => server.with_key(key),
            None => server,
        }
    }

    /// The process id of knotd while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding the configuration, zone, storage and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What knotd logged (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("knotd.log")).unwrap_or_default()
    }

    /// Kills knotd and waits for it to exit. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(addr = %self.addr, "knotd stopped");
        }
    }

    fn wait_ready(&mut self) -> Result<(), DnsError> {
        let started = Instant::now();
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0));
        let socket = socket.and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            s.connect(self.addr)?;
            Ok(s)
        });
        let socket = match socket {
            Ok(s) => s,
            Err(e) => return Err(self.fail(format!("cannot open a UDP socket: {e}"))),
        };
        let mut buf = [0u8; 4096];
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.fail(format!("knotd exited at start ({status})")));
                }
            }
            let mut query = Message::query();
            query.add_query(Query::query(self.zone.clone(), RecordType::SOA));
            let id = query.metadata.id;
            if let Ok(bytes) = query.to_vec() {
                if socket.send(&bytes).is_ok() {
                    if let Ok(n) = socket.recv(&mut buf) {
                        if let Ok(answer) = Message::from_vec(&buf[..n]) {
                            if answer.metadata.id == id
                                && answer.metadata.response_code == ResponseCode::NoError
                                && answer
                                    .answers
                                    .iter()
                                    .any(|r| r.record_type() == RecordType::SOA)
                            {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(self.fail(format!(
                    "knotd did not answer for zone {} on {} within {}s",
                    self.zone,
                    self.addr,
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops knotd and builds an error with the end of its log.
    fn fail(&mut self, reason: String) -> DnsError {
        self.stop();
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let mut reason = reason;
        if !tail.is_empty() {
            reason.push_str("; its log ends with:");
            for line in tail.into_iter().rev() {
                reason.push_str("\n  ");
                reason.push_str(line);
            }
        }
        DnsError::Knot {
            dir: self.dir.clone(),
            reason,
        }
    }
}

impl Drop for KnotServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Only names that can be written into knot.conf and a zone file without quoting.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
}

/// A port free on 127.0.0.1 for both TCP and UDP at the time of asking.
fn free_port() -> std::io::Result<u16> {
    let mut last = None;
    for _ in 0..20 {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = tcp.local_addr()?.port();
        match UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port")))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn zone_file_text(zone: &Name, initial: &[RecordSet]) -> String {
    let origin = zone.to_ascii();
    let mut text = format!(
        "$ORIGIN {origin}\n$TTL 300\n\
         @ SOA ns1.{origin} hostmaster.{origin} 1 3600 900 604800 300\n\
         @ NS ns1.{origin}\n\
         ns1 A 127.0.0.1\n"
    );
    for set in initial {
        let mut name = set.name.clone();
        name.set_fqdn(true);
        for addr in &set.addrs {
            let _ = writeln!(text, "{} {} A {}", name.to_ascii(), set.ttl, addr);
        }
    }
    text
}

fn config_text(
    addr: SocketAddr,
    run: &Path,
    storage: &Path,
    zone: &Name,
    zone_file: &Path,
    key: &TsigKey,
) -> String {
    let key_name = key.name_str();
    let secret = key.secret_base64();
    format!(
        r#"# Written by Ferry: a local Knot DNS server for zone {zone}.
server:
    rundir: "{run}"
    listen: {ip}@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

log:
  - target: stderr
    any: info

database:
    storage: "{storage}"

key:
  - id: {key_name}
    algorithm: {alg}
    secret: {secret}

acl:
  - id: ferry_update
    key: {key_name}
    action: update

zone:
  - domain: {zone}
    file: "{zone_file}"
    storage: "{storage}"
    acl: ferry_update
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: changes
"#,
        zone = zone.to_ascii(),
        run = run.display(),
        ip = addr.ip(),
        port = addr.port(),
        storage = storage.display(),
        alg = key.algorithm.as_str(),
        secret = secret.as_str(),
        zone_file = zone_file.display(),
    )
}
