//! `ferry quickstart`: a real migration of a running guest through the whole workflow, on
//! the embedded defaults — a Debian guest under QEMU (the KVM source, agentless), the
//! local target (qcow2 disks, QEMU instances, network namespaces), a real DNS server
//! taking a TSIG-signed update, and an appliance driven through its API.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use ferry_model::{Command, Migration, State};
use ferry_net::{Network, NetworkSpec};
use ferry_qemu::{NicBackend, Vm, VmDisk, VmNic, VmSpec};
use serde_json::{json, Value};

use crate::cmd::client::{Client, ClientArgs};
use crate::cmd::util::{parse_size, runtime};

#[derive(clap::Args)]
pub struct Args {
    /// Where the quickstart keeps everything (reset on each run).
    #[arg(long, default_value = "/var/tmp/ferry-quickstart")]
    data_dir: PathBuf,
    /// Leave the appliance, the migrated instance, its network and the DNS server running
    /// at the end, to look at them.
    #[arg(long)]
    keep: bool,
    /// Stop and remove what an earlier run (with --keep) left, then exit.
    #[arg(long)]
    clean: bool,
    /// Only the replication engine: a disk image, a full sync and a dirty-bitmap delta.
    #[arg(long)]
    disk_only: bool,
    /// Size of the source disk with --disk-only.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// The source guest: `virtio` (a KVM guest) or `vmware` (a guest installed on VMware
    /// hardware — PVSCSI disk, VMXNET3 NIC, open-vm-tools, an initramfs without virtio
    /// drivers, a static address on its predictable NIC name — which Ferry converts
    /// before its test and production boots).
    #[arg(long, default_value = "virtio", value_parser = ["virtio", "vmware"])]
    guest: String,
}

const GUEST_IP: &str = "10.200.1.10";
const GATEWAY: &str = "10.200.1.1/24";
const ZONE: &str = "ferry.test";
const SERVICES: [&str; 2] = ["ferry-ledger", "ferry-web"];
/// An address only the production network has, with a listener behind it.
const CANARY_IP: &str = "10.200.1.253";
/// An address only the migration (UAT) network has.
const UAT_CANARY_IP: &str = "10.200.1.254";
const CANARY_PORT: u16 = 7777;

/// A shell test, run in a guest, that `ip`:CANARY_PORT accepts a connection.
fn reach(ip: &str) -> String {
    format!("timeout 3 bash -c 'echo > /dev/tcp/{ip}/{CANARY_PORT}'")
}

/// Whether a shell command exits 0 in the guest (through its agent).
async fn guest_succeeds(vm: &Vm, command: &str) -> Result<bool> {
    let mut agent = vm.qga(Duration::from_secs(30)).await?;
    Ok(agent
        .shell(command, Duration::from_secs(10))
        .await?
        .success())
}

/// Listens on an address only `net` has; returns the listener's thread.
fn start_canary(net: &Network, ip: &str) -> Result<std::thread::JoinHandle<()>> {
    let st = net
        .command("ip")
        .args(["addr", "add", &format!("{ip}/24"), "dev", ferry_net::BRIDGE])
        .status()?;
    if !st.success() {
        bail!(
            "adding the canary address {ip} to network {} failed ({st})",
            net.name
        );
    }
    let ip = ip.to_string();
    let listener =
        net.in_netns(move || std::net::TcpListener::bind((ip.as_str(), CANARY_PORT)))??;
    Ok(std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    }))
}

/// Names and places of one quickstart run.
struct Layout {
    data: PathBuf,
    /// Network namespace of the production network (short: it names interfaces too).
    prod_ns: String,
    /// The migration network test instances boot in.
    uat_ns: String,
    suffix: String,
}

impl Layout {
    fn new(data: &Path) -> Layout {
        let h = short_hash(data.to_string_lossy().as_bytes());
        Layout {
            data: data.to_path_buf(),
            prod_ns: format!("fqs-{}", &h[..6]),
            uat_ns: format!("fqu-{}", &h[..6]),
            suffix: h[..6].to_string(),
        }
    }
    fn vm_dir(&self) -> PathBuf {
        self.data.join("vms")
    }
    fn source_run(&self) -> PathBuf {
        self.vm_dir().join("web")
    }
    fn appliance_dir(&self) -> PathBuf {
        self.data.join("appliance")
    }
    fn target_dir(&self) -> PathBuf {
        self.data.join("target")
    }
}

fn short_hash(b: &[u8]) -> String {
    // A stable short name per data directory, so parallel runs do not collide.
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn step(n: u32, title: &str, why: &str) {
    println!("\n[{n}] {title}\n    {why}");
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.disk_only {
        return crate::cmd::quickstart_disk::run(crate::cmd::quickstart_disk::Args {
            data_dir: args.data_dir,
            size: args.size,
        });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the quickstart creates network namespaces and tap devices: run it as root (or try `ferry quickstart --disk-only`)");
    }
    let rt = runtime()?;
    rt.block_on(quickstart(args))
}

async fn quickstart(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    let lay = Layout::new(&args.data_dir);
    clean_previous(&lay).await;
    if args.clean {
        println!(
            "removed what the quickstart in {} left running",
            lay.data.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&lay.data)
        .with_context(|| format!("creating {}", lay.data.display()))?;

    let vmware = args.guest == "vmware";
    if vmware {
        step(1, "the guest image", "A small Debian guest as installed on VMware: GRUB, a PVSCSI disk, a VMXNET3 NIC with a static address on its predictable name, open-vm-tools, and an initramfs built host-only (no virtio drivers); plus a web service and a ledger that appends numbered, fsync'ed records. Built once with debootstrap and cached outside the repository.");
    } else {
        step(1, "the guest image", "A small Debian guest (systemd, qemu-guest-agent, a web service and a ledger that appends numbered, fsync'ed records), built once with debootstrap and cached outside the repository.");
    }
    let which = if vmware {
        ferry_qemu::testbed::Guest::Vmware
    } else {
        ferry_qemu::testbed::Guest::Virtio
    };
    // debootstrap and friends say a lot: into a log file, with one progress line here.
    let log = lay.data.join("guest-image.log");
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let image = {
        let (bar, log) = (bar.clone(), log.clone());
        tokio::task::spawn_blocking(move || {
            ferry_qemu::testbed::image_logged(which, &log, &mut |line| {
                bar.set_message(line.chars().take(100).collect::<String>())
            })
        })
        .await?
    };
    bar.finish_and_clear();
    let image = image.context("preparing the guest image")?;
    println!("    the recipe's messages: {}", log.display());
    let manifest: Value = serde_json::from_slice(&std::fs::read(image.join("manifest.json"))?)?;
    let base_append = manifest["append"]
        .as_str()
        .unwrap_or("root=/dev/vda rw console=ttyS0");
    println!("    image: {}", image.display());
    let accel = ferry_qemu::accel::detect_with(&ferry_qemu::DetectOptions::from_env()).await;
    println!("    accelerator: {} ({})", accel.accel, accel.reason);

    step(2, "the production network and the source VM", &format!("A network namespace with a bridge plays the production network ({GATEWAY}); the source VM runs there under QEMU with its disk in qcow2 (persistent dirty bitmaps need it), reachable through QMP and its guest agent — no agent of Ferry's inside."));
    let prod = tokio::task::spawn_blocking({
        let ns = lay.prod_ns.clone();
        move || Network::ensure(&NetworkSpec::new(ns).with_cidr(GATEWAY.parse().expect("valid")))
    })
    .await??;
    let src_disk = lay.source_run().join("disk0.qcow2");
    std::fs::create_dir_all(lay.source_run())?;
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image.join("disk.qcow2"))
        .arg(&src_disk)
        .status()
        .context("running qemu-img")?;
    if !st.success() {
        bail!("qemu-img create of the source disk failed ({st})");
    }
    let tap = prod.add_tap(&format!("fqs{}", lay.suffix))?;
    let mut spec = VmSpec::new("web", &lay.source_run(), accel.accel);
    if vmware {
        // Its own boot loader, on the devices it was installed on.
        spec.hardware = ferry_qemu::Hardware::Vmware;
    } else {
        spec.kernel = Some(image.join("vmlinuz"));
        spec.initrd = Some(image.join("initrd.img"));
        spec.append = Some(format!(
            "{base_append} ferry.ip={GUEST_IP}/24 ferry.gw=10.200.1.1"
        ));
    }
    spec.disks = vec![VmDisk {
        path: src_disk.clone(),
        format: "qcow2".into(),
        node_name: "disk0".into(),
        read_only: false,
    }];
    spec.nics = vec![VmNic {
        backend: NicBackend::Tap {
            ifname: tap.ifname.clone(),
        },
        mac: Some("52:54:00:fe:01:10".into()),
    }];
    spec.netns = Some(prod.namespace.clone());
    let vm = Vm::launch(&spec).await?;
    let t = Instant::now();
    vm.wait_serial("FERRY-GUEST-READY", Duration::from_secs(300))
        .await
        .context("waiting for the source guest to boot")?;
    println!(
        "    source VM 'web' up at {GUEST_IP} after {:.0} s",
        t.elapsed().as_secs_f64()
    );
    // A canary only production has: the source reaches it, a test instance must not.
    let canary = start_canary(&prod, CANARY_IP)?;
    // The migration network: the same addresses as production, no link to it, and a
    // canary of its own.
    let uat_net = tokio::task::spawn_blocking({
        let ns = lay.uat_ns.clone();
        move || Network::ensure(&NetworkSpec::new(ns).with_cidr(GATEWAY.parse().expect("valid")))
    })
    .await??;
    let uat_canary = start_canary(&uat_net, UAT_CANARY_IP)?;
    let reach_prod = reach(CANARY_IP);
    if !guest_succeeds(&vm, &reach_prod).await? {
        bail!("the source VM cannot reach the production canary {CANARY_IP}:{CANARY_PORT}: the production network is not working");
    }
    println!("    the source reaches production's canary at {CANARY_IP}:{CANARY_PORT}");
    let ledger = LedgerWatch::start(prod.namespace.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "    its ledger writes {:.0} records/s",
        ledger.rate(Duration::from_secs(3)).await
    );

    step(3, "a DNS server", &format!("Knot serves zone {ZONE}; web.{ZONE} points at the source. After cutover Ferry updates it with RFC 2136, signed with a TSIG key it keeps encrypted."));
    let key_secret: [u8; 32] = rand::random();
    let key = ferry_dns::TsigKey::new(
        "ferry-quickstart",
        ferry_dns::TsigAlgorithm::HmacSha256,
        key_secret.to_vec(),
    )?;
    let zone = ferry_dns::parse_name(ZONE)?;
    let record = ferry_dns::parse_name(&format!("web.{ZONE}"))?;
    let knot = {
        let (dir, zone, key, record) = (
            lay.data.join("dns"),
            zone.clone(),
            key.clone(),
            record.clone(),
        );
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            ferry_dns::knot::KnotServer::start(
                &dir,
                &zone,
                &key,
                &[ferry_dns::RecordSet {
                    name: record,
                    ttl: 3600,
                    addrs: vec![GUEST_IP.parse().expect("ip")],
                }],
            )
            .map_err(anyhow::Error::from)
        })
        .await??
    };
    println!("    DNS server on {}", knot.addr);

    step(4, "the appliance", "The control plane (API, orchestrator, scheduler, replication) in its own process with SQLite, as `ferry appliance` runs it.");
    let (mut appliance, client) = start_appliance(&lay).await?;
    println!("    listening on {}", client_url(&lay)?);

    step(5, "inventory and profile", "Register the KVM host and the local target, discover the VM (disks, NIC, address through the guest agent), and a profile: services to stop at cutover, validation checks, and the DNS update.");
    let tsig = format!(
        "hmac-sha256:ferry-quickstart:{}",
        base64::engine::general_purpose::STANDARD.encode(key_secret)
    );
    let _: Value = client
        .post(
            "/api/credentials",
            &json!({"name": "quickstart-tsig", "kind": "token", "secret": tsig}),
        )
        .await?;
    let _: Value = client
        .post(
            "/api/sources",
            &json!({"name": "kvm-host", "kind": "kvm", "config": {"vm_dir": lay.vm_dir()}}),
        )
        .await?;
    // The virtio guest has no boot loader: the target boots it with the host's kernel.
    // A converted guest boots with its own.
    let target_config = if vmware {
        json!({"path": lay.target_dir(), "gateway": GATEWAY})
    } else {
        json!({
            "path": lay.target_dir(),
            "kernel": image.join("vmlinuz"),
            "initrd": image.join("initrd.img"),
            "append": format!("{base_append} ferry.ip={{ip}}/24 ferry.gw=10.200.1.1"),
            "gateway": GATEWAY,
        })
    };
    let _: Value = client
        .post(
            "/api/targets",
            &json!({"name": "local", "kind": "local", "config": target_config}),
        )
        .await?;
    let found: Vec<Value> = client
        .post("/api/sources/kvm-host/discover", &json!({}))
        .await?;
    for w in &found {
        println!(
            "    discovered {}: {} disk(s), NIC {} {}",
            w["name"].as_str().unwrap_or(""),
            w["disks"].as_array().map_or(0, |d| d.len()),
            w["nics"][0]["mac"].as_str().unwrap_or("-"),
            w["nics"][0]["ips"]
        );
    }
    let _: Value = client.post("/api/profiles", &json!({
        "name": "quickstart",
        "target": "local",
        "conversion": if vmware { "required" } else { "auto" },
        "services_to_stop": SERVICES,
        "uat": {"network": lay.uat_ns},
        "validation": [
            {"kind": "command", "params": {"phase": "uat", "command": format!("if {reach_prod}; then echo reached production; exit 1; fi; {} && echo isolated", reach(UAT_CANARY_IP))}},
            {"kind": "http", "params": {"path": "/", "contains": "ferry test guest"}},
            {"kind": "tcp", "params": {"port": "80"}},
            {"kind": "command", "params": {"command": "systemctl is-active ferry-ledger", "expect": "active"}},
            {"kind": "data", "params": {
                "capture": "cat /var/lib/ledger/acked",
                // Records 1..N, in order and without a gap, where N is the last one the
                // source acknowledged before its services stopped.
                "verify": "awk -v n={value} 'BEGIN{e=1} $1<=n{if($1!=e)exit 1; e++} END{exit (e<=n)}' /var/lib/ledger/records && echo all {value} records present"
            }}
        ],
        "post_cutover": [{"kind": "dns", "params": {"server": knot.addr.to_string(), "zone": ZONE, "name": "web", "ttl": "60", "tsig_credential": "quickstart-tsig"}}]
    })).await?;

    step(6, "initial sync", "A point-in-time view of the running VM's disk (a QMP transaction: dirty bitmap + copy-before-write fleecing, exported over NBD) read by the replication engine into a qcow2 on the target.");
    let m: Migration = client
        .post(
            "/api/migrations",
            &json!({"workload": "web", "profile": "quickstart"}),
        )
        .await?;
    let id = m.id;
    wait(&client, id, &[State::Synced]).await?;
    report_last_sync(&client, id).await?;

    for n in 1..=2 {
        step(6 + n, &format!("delta sync {n}"), "The ledger keeps writing; the dirty bitmap since the last view says what changed, and only that is read and sent.");
        tokio::time::sleep(Duration::from_secs(5)).await;
        command(&client, id, Command::Sync).await?;
        wait(&client, id, &[State::Synced]).await?;
        report_last_sync(&client, id).await?;
    }

    step(9, "UAT", "A copy of the last complete sync boots in a migration network of its own — same addresses, no link to production — and the profile's checks run against it; replication could go on meanwhile.");
    command(&client, id, Command::UatStart).await?;
    wait(&client, id, &[State::Synced]).await?;
    let d: Value = client.get(&format!("/api/migrations/{id}")).await?;
    let verdict = d["migration"]["status"]["uat_verdict"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    println!("    UAT verdict: {verdict}");
    let events: Vec<Value> = client
        .get(&format!("/api/migrations/{id}/events?limit=1000"))
        .await?;
    print_conversion(&events, "uat");
    if let Some(e) = events.iter().rev().find(|e| e["kind"] == "uat.validation") {
        println!("    {}", e["message"].as_str().unwrap_or(""));
    }
    println!("    the test instance reached its own network's canary {UAT_CANARY_IP} and not production's {CANARY_IP}");
    if guest_succeeds(&vm, &reach(UAT_CANARY_IP)).await? {
        bail!("the source VM reaches the migration network's canary {UAT_CANARY_IP}: the migration network is not isolated");
    }
    println!(
        "    the source cannot reach the migration network ({UAT_CANARY_IP}): isolated both ways"
    );
    if verdict != "passed" {
        bail!("the UAT did not pass: see `ferry migration show {id}` and its events");
    }
    if vmware {
        println!("\n[9b] a delta after UAT\n    The test instance booted a converted overlay; the synced disk is still the source's, byte for byte, so replication goes on into it.");
        command(&client, id, Command::Sync).await?;
        wait(&client, id, &[State::Synced]).await?;
        report_last_sync(&client, id).await?;
    }

    step(10, "cutover", "Stop the services through the guest agent and note the last acknowledged ledger record, final delta, shut the source down, a last delta of what its shutdown wrote, start the target on the production network with the source's address, update DNS, validate (HTTP, TCP, a command, and every acknowledged record present).");
    let acked_before = ledger.max();
    command(&client, id, Command::Cutover).await?;
    if std::env::var("FERRY_QUICKSTART_CRASH").as_deref() == Ok("final_delta") {
        // A fault test: the appliance dies in the middle of the final delta and starts
        // again; the cutover must finish from the store alone.
        wait_for_state(&client, id, State::FinalDelta).await?;
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 400)).await;
        appliance.kill()?;
        let _ = appliance.wait();
        println!("    appliance killed during final_delta; starting it again");
        let (a, _) = start_appliance(&lay).await?;
        appliance = a;
    }
    wait(&client, id, &[State::Completed]).await?;
    ledger.stop();
    drop((canary, uat_canary));

    step(11, "afterwards", "What a user checks the morning after.");
    let resp = prod.http_get(
        &format!("http://{GUEST_IP}/cgi-bin/ledger"),
        Duration::from_secs(10),
    );
    let served = resp.map(|r| r.body_text()).unwrap_or_default();
    println!(
        "    http://{GUEST_IP}/ is served by the target; its ledger is at {}",
        served.trim()
    );
    let dns = knot.client(None).query_a(&record).await?;
    println!("    web.{ZONE} A {:?} ttl {}", dns.addrs, dns.ttl);
    let facts: Vec<Value> = client
        .get(&format!("/api/migrations/{id}/events?limit=1000"))
        .await?;
    let captured = facts
        .iter()
        .rev()
        .find(|e| e["kind"] == "cutover.facts")
        .and_then(|e| e["data"]["captured"]["4"].as_str().map(str::to_string))
        .unwrap_or_default();
    println!("    ledger: the source acknowledged {captured} records before its services stopped ({acked_before} seen over HTTP before the cutover began); the target holds all of them");
    if dns.addrs.iter().all(|a| a.to_string() != GUEST_IP) {
        bail!("the DNS record does not point at the target");
    }
    print_conversion(&facts, "production");
    if vmware {
        let nic = manifest["nic_name"].as_str().unwrap_or("").to_string();
        check_converted(&lay, &nic).await?;
    }

    let d: Value = client.get(&format!("/api/migrations/{id}")).await?;
    let dt = &d["downtime"];
    println!("\ndowntime by phase:");
    for p in dt["phases"].as_array().into_iter().flatten() {
        println!(
            "    {:<18} {:>6.1} s",
            p["phase"].as_str().unwrap_or(""),
            p["ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
    println!(
        "    {:<18} {:>6.1} s",
        "between steps",
        dt["other_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    let took = started.elapsed().as_secs_f64();
    if args.keep {
        println!("\nquickstart took {took:.0} s. Look at the result with:");
        println!(
            "    ferry migration show web --url {} --token $(cat {}/admin-token)",
            client_url(&lay)?,
            lay.appliance_dir().display()
        );
        println!(
            "    ip netns exec {} wget -qO- http://{GUEST_IP}/   # the migrated web service",
            lay.prod_ns
        );
        println!(
            "    kdig @{} -p {} web.{ZONE}",
            knot.addr.ip(),
            knot.addr.port()
        );
        println!(
            "    ferry quickstart --clean --data-dir {}   # when done",
            lay.data.display()
        );
        std::mem::forget(knot);
        std::mem::forget(appliance);
    } else {
        println!("\nquickstart took {took:.0} s; everything it started is stopped and removed (run it with --keep to look at the migrated instance, the appliance and the DNS record).");
        let _ = appliance.kill();
        let _ = appliance.wait();
        drop(knot);
        clean_previous(&lay).await;
    }
    println!(
        "downtime: {:.1} s",
        dt["total_ms"].as_f64().unwrap_or(0.0) / 1000.0
    );
    Ok(ExitCode::SUCCESS)
}

/// The conversion events of one phase (`uat` or `production`), as the migration has them.
fn print_conversion(events: &[Value], phase: &str) {
    for e in events
        .iter()
        .filter(|e| e["kind"] == "conversion" && e["data"]["phase"] == phase)
    {
        println!("    {}", e["message"].as_str().unwrap_or(""));
    }
    for e in events.iter().filter(|e| e["kind"] == "warning") {
        println!("    warning: {}", e["message"].as_str().unwrap_or(""));
    }
}

/// What conversion must have changed in the running target, asked of its guest agent:
/// VMware's tools gone, virtio drivers in the initramfs it booted, the NIC's old name.
async fn check_converted(lay: &Layout, nic: &str) -> Result<()> {
    let run = find_run_dirs(&lay.target_dir())
        .into_iter()
        .find(|r| !r.to_string_lossy().contains("/uat/"))
        .ok_or_else(|| {
            anyhow!(
                "no running target instance under {}",
                lay.target_dir().display()
            )
        })?;
    let vm = Vm::attach(&run)?;
    let checks = [
        (
            "open-vm-tools removed",
            "! dpkg-query -W -f='${Status}' open-vm-tools 2>/dev/null | grep -q 'ok installed'"
                .to_string(),
        ),
        (
            "virtio_blk in the initramfs it booted",
            "lsinitramfs /boot/initrd.img-$(uname -r) | grep -q '/virtio_blk.ko'".to_string(),
        ),
        (
            "its disk on virtio",
            "ls /sys/bus/virtio/drivers/virtio_blk | grep -q virtio".to_string(),
        ),
        (
            "its NIC keeps its name",
            format!(
                "ip -o link show {} | grep -q 'state UP'",
                crate::cmd::util::shell_word(nic)
            ),
        ),
    ];
    for (what, cmd) in checks {
        if !guest_succeeds(&vm, &cmd).await? {
            bail!("the converted target fails the check '{what}' ({cmd})");
        }
        println!("    target: {what}");
    }
    Ok(())
}

fn client_url(lay: &Layout) -> Result<String> {
    Ok(
        std::fs::read_to_string(lay.appliance_dir().join("quickstart-url"))?
            .trim()
            .to_string(),
    )
}

async fn start_appliance(lay: &Layout) -> Result<(Child, Client)> {
    let dir = lay.appliance_dir();
    std::fs::create_dir_all(&dir)?;
    // The same address again after a restart: clients keep working.
    let url = match std::fs::read_to_string(dir.join("quickstart-url")) {
        Ok(u) => u.trim().to_string(),
        Err(_) => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            format!("http://127.0.0.1:{port}")
        }
    };
    let port = url.rsplit(':').next().unwrap_or_default().to_string();
    std::fs::write(dir.join("quickstart-url"), &url)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("appliance.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args([
        "appliance",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(&dir)
    .args(["--backoff-ms", "500"]);
    if std::env::var_os("FERRY_QUICKSTART_CRASH").is_some() {
        // Widens each step so the fault lands inside the one it aims at.
        cmd.args(["--step-delay-ms", "600"]);
    }
    let child = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the appliance")?;
    std::fs::write(dir.join("appliance.pid"), child.id().to_string())?;
    let token_file = dir.join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(&token_file) {
            let c = Client::new(&ClientArgs {
                url: url.clone(),
                token: Some(t.trim().to_string()),
                json: false,
            })?;
            if c.get::<Value>("/api/health").await.is_ok() {
                return Ok((child, c));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the appliance did not come up within 30 s: see {}",
                dir.join("appliance.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn command(c: &Client, id: uuid::Uuid, cmd: Command) -> Result<()> {
    let _: Value = c
        .post(
            &format!("/api/migrations/{id}/commands"),
            &json!({"command": cmd}),
        )
        .await?;
    Ok(())
}

/// Waits until the migration is in `state` (running or at rest).
async fn wait_for_state(c: &Client, id: uuid::Uuid, state: State) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let d: Value = c.get(&format!("/api/migrations/{id}")).await?;
        if d["migration"]["status"]["state"] == json!(state) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the migration never reached {state}")
}

/// Waits until the migration rests in one of `states`, showing where it is.
async fn wait(c: &Client, id: uuid::Uuid, states: &[State]) -> Result<()> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(Duration::from_millis(200));
    let t = Instant::now();
    loop {
        let d: Value = c.get(&format!("/api/migrations/{id}")).await?;
        let m: Migration = serde_json::from_value(d["migration"].clone())?;
        let st = m.status.state;
        if states.contains(&st) && m.status.running_step().is_none() {
            pb.finish_and_clear();
            println!("    → {st} after {:.1} s", t.elapsed().as_secs_f64());
            return Ok(());
        }
        if st == State::Failed {
            pb.finish_and_clear();
            return Err(anyhow!(
                "the migration failed in {}: {}",
                m.status
                    .failed_state
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                m.last_error.unwrap_or_default()
            ));
        }
        pb.set_message(format!("{st} ({:.0} s)", t.elapsed().as_secs_f64()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn report_last_sync(c: &Client, id: uuid::Uuid) -> Result<()> {
    let d: Value = c.get(&format!("/api/migrations/{id}")).await?;
    if let Some(s) = d["syncs"].as_array().and_then(|s| s.last()) {
        println!(
            "    generation {}: {} sent of a {} disk in {:.1} s",
            s["generation"],
            crate::cmd::util::human_bytes(s["bytes_sent"].as_u64().unwrap_or(0)),
            crate::cmd::util::human_bytes(s["bytes_total"].as_u64().unwrap_or(0)),
            (s["finished_at"].as_i64().unwrap_or(0) - s["started_at"].as_i64().unwrap_or(0)) as f64
                / 1000.0
        );
    }
    Ok(())
}

/// Polls the source's ledger over HTTP from the production network: the highest record
/// it acknowledged is what the target must hold after cutover.
struct LedgerWatch {
    max: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LedgerWatch {
    fn start(ns: String) -> LedgerWatch {
        let max = Arc::new(AtomicU64::new(0));
        let m = max.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(r) = ferry_net::http_get_async(
                    &ns,
                    &format!("http://{GUEST_IP}/cgi-bin/ledger"),
                    Duration::from_secs(2),
                )
                .await
                {
                    if let Ok(n) = r.body_text().trim().parse::<u64>() {
                        m.fetch_max(n, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        LedgerWatch { max, task }
    }
    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
    async fn rate(&self, over: Duration) -> f64 {
        let a = self.max();
        tokio::time::sleep(over).await;
        (self.max() - a) as f64 / over.as_secs_f64()
    }
    fn stop(&self) {
        self.task.abort();
    }
}

/// Stops what an earlier run left: its appliance, VMs, network and DNS server.
async fn clean_previous(lay: &Layout) {
    if let Ok(pid) = std::fs::read_to_string(lay.appliance_dir().join("appliance.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) on a pid this data directory's appliance wrote.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let _ = std::process::Command::new("pkill")
        .args(["-9", "-f", &format!("{}/dns/knot.conf", lay.data.display())])
        .status();
    for root in [lay.vm_dir(), lay.target_dir()] {
        for run in find_run_dirs(&root) {
            if let Ok(vm) = Vm::attach(&run) {
                let _ = vm.kill().await;
            }
        }
    }
    for ns in [lay.prod_ns.clone(), lay.uat_ns.clone()] {
        let _ = tokio::task::spawn_blocking(move || ferry_net::delete_namespace(&ns)).await;
    }
    let _ = std::fs::remove_dir_all(&lay.data);
}

fn find_run_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.join("qemu.pid").exists() {
                    out.push(p.clone());
                }
                stack.push(p);
            }
        }
    }
    out
}
