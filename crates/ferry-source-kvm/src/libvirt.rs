//! KVM hosts run by libvirt: the same source, reached through `virsh` instead of QEMU's
//! own sockets (libvirt owns them).
//!
//! Source config: `{"libvirt": "qemu:///system", "scratch_dir": "/var/lib/libvirt/ferry"}`
//! (or the URI as the source's endpoint).
//! A workload is a libvirt domain; its disks are named by their target device (`vda`).
//!
//! Point-in-time views are libvirt's pull-mode backups: `backup-begin` exports every
//! disk of the workload over one NBD socket, all at the same instant, and creates a
//! checkpoint (a persistent dirty bitmap in each qcow2) in the same operation. An
//! incremental backup from the previous checkpoint exports that bitmap, so a delta reads
//! only what changed. The checkpoint the target has committed is recorded in the
//! migration's work directory; any later checkpoint is a sync that never committed and
//! is deleted before the next one, which folds its bitmap back into the committed one,
//! so no change is ever lost. QEMU runs as libvirt's own user, so the socket and the
//! copy-before-write scratch files live in `scratch_dir`, which that user can write.

use crate::guest::{self, Agent};
use ferry_adapter::{AResult, AdapterError, SourceDisk, StepContext};
use ferry_model::{Disk, DiskFormat, NewWorkload, Source};
use ferry_qemu::Qga;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::process::Command;
use uuid::Uuid;

const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long discovery waits for a guest agent (it only adds the OS name and addresses).
const DISCOVERY_AGENT_TIMEOUT: Duration = Duration::from_secs(3);
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);
const DEFAULT_SCRATCH: &str = "/var/lib/libvirt/ferry";
/// The prefix of every checkpoint Ferry makes; others are left alone.
const CHECKPOINT_PREFIX: &str = "ferry-";
/// The file in a migration's work directory naming its committed checkpoint.
const COMMITTED_FILE: &str = "libvirt-checkpoint";

/// A libvirt connection as a source's config names it.
#[derive(Debug, Clone)]
pub struct Host {
    pub uri: String,
    pub scratch_dir: PathBuf,
}

impl Host {
    /// `Some` when the source is a libvirt host (config has `libvirt`).
    pub fn of(source: &Source) -> Option<Host> {
        let uri = match source.config.get("libvirt").and_then(|v| v.as_str()) {
            Some(u) => u.to_string(),
            // `ferry source add --kind kvm --endpoint qemu:///system` says the same.
            None => source
                .endpoint
                .as_deref()
                .filter(|e| e.starts_with("qemu"))?
                .to_string(),
        };
        let scratch_dir = source
            .config
            .get("scratch_dir")
            .and_then(|v| v.as_str())
            .unwrap_or(DEFAULT_SCRATCH)
            .into();
        Some(Host { uri, scratch_dir })
    }

    /// Runs `virsh -c URI args…`; its standard output.
    pub async fn virsh(&self, args: &[&str]) -> AResult<String> {
        let out = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(VIRSH_TIMEOUT, out).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(AdapterError::permanent(format!(
                    "cannot run virsh ({e}): install libvirt-clients"
                )))
            }
            Err(_) => {
                return Err(AdapterError::transient(format!(
                    "`virsh {}` on {} did not answer within {}s: is libvirtd overloaded?",
                    args.join(" "),
                    self.uri,
                    VIRSH_TIMEOUT.as_secs()
                )))
            }
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| l.trim_start_matches("error: ").trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let hint = if err.contains("Failed to connect") || err.contains("no connection driver") {
            " (is libvirtd running? start it with `systemctl start libvirtd`, or `virtlogd -d; libvirtd -d` without systemd)"
        } else {
            ""
        };
        Err(AdapterError::transient(format!(
            "`virsh {}` on {} failed: {err}{hint}",
            args.first().copied().unwrap_or(""),
            self.uri
        )))
    }

    async fn domain_xml(&self, domain: &str) -> AResult<DomainXml> {
        let xml = self.virsh(&["dumpxml", domain]).await.map_err(|e| {
            AdapterError::permanent(format!(
                "libvirt domain '{domain}' on {}: {}; run `ferry source discover` again",
                self.uri, e.message
            ))
        })?;
        DomainXml::parse(&xml).map_err(|e| {
            AdapterError::permanent(format!("domain XML of '{domain}' is unreadable: {e}"))
        })
    }

    async fn state(&self, domain: &str) -> AResult<String> {
        Ok(self.virsh(&["domstate", domain]).await?.trim().to_string())
    }

    async fn agent(&self, domain: &str, timeout: Duration) -> AResult<Agent> {
        let qga = Qga::connect_libvirt(&self.uri, domain, timeout)
            .await
            .map_err(|e| AdapterError::transient(format!("guest agent of VM '{domain}': {e}")))?;
        Ok(Agent::new(domain, qga))
    }

    async fn describe(&self, domain: &str, source: &Source) -> AResult<NewWorkload> {
        let x = self.domain_xml(domain).await?;
        let mut disks = vec![];
        for d in &x.disks {
            let info = self.virsh(&["domblkinfo", domain, &d.dev]).await?;
            disks.push(Disk {
                name: d.dev.clone(),
                size_bytes: capacity(&info).unwrap_or(0),
                path: d.file.clone(),
                format: d.format.as_deref().and_then(DiskFormat::parse),
            });
        }
        let running = self.state(domain).await? == "running";
        let info = if running {
            match self.agent(domain, DISCOVERY_AGENT_TIMEOUT).await {
                Ok(a) => guest::info(a).await,
                Err(_) => Default::default(),
            }
        } else {
            Default::default()
        };
        let nics = x
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| info.nic(i, n.network.clone(), n.mac.clone()))
            .collect();
        Ok(NewWorkload {
            name: domain.to_string(),
            source_id: Some(source.id),
            os: info.os,
            cpus: Some(x.vcpus),
            memory_mib: Some(x.memory_mib),
            disks,
            nics,
            hardware: x.hardware.clone(),
            ..Default::default()
        })
    }

    pub async fn discover(&self, source: &Source) -> AResult<Vec<NewWorkload>> {
        let names = self.virsh(&["list", "--all", "--name"]).await?;
        let mut out = vec![];
        let mut first_error = None;
        for name in names.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // One domain libvirt cannot describe (its disk removed under it, XML Ferry
            // cannot read) is skipped with a warning; the others are still discovered.
            match self.describe(name, source).await {
                Ok(w) => out.push(w),
                Err(e) => {
                    tracing::warn!(vm = %name, "not discovered: {}", e.message);
                    first_error.get_or_insert(e);
                }
            }
        }
        if out.is_empty() {
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        let domain = &ctx.workload.name;
        let x = self.domain_xml(domain).await?;
        if ctx.workload.disks.is_empty() {
            return Err(AdapterError::permanent(format!(
                "workload '{domain}' lists no disks: run `ferry source discover`"
            )));
        }
        for d in &ctx.workload.disks {
            match x.disks.iter().find(|x| x.dev == d.name) {
                None => {
                    return Err(AdapterError::permanent(format!(
                        "domain '{domain}' has no disk '{}': run `ferry source discover` again",
                        d.name
                    )))
                }
                Some(xd) if xd.format.as_deref() != Some("qcow2") => {
                    return Err(AdapterError::permanent(format!(
                        "disk '{}' of domain '{domain}' is {}: libvirt checkpoints need qcow2 (convert it with qemu-img convert -O qcow2 while the domain is off)",
                        d.name,
                        xd.format.as_deref().unwrap_or("of an unknown format")
                    )))
                }
                Some(_) => {}
            }
        }
        if self.state(domain).await? == "running" {
            if let Err(e) = self.agent(domain, DISCOVERY_AGENT_TIMEOUT).await {
                tracing::warn!(vm = %domain, "{}{}", crate::services_need_agent(ctx), e.message);
            }
        }
        Ok(())
    }

    /// The directory QEMU writes this migration's socket and scratch files into.
    fn job_dir(&self, migration: Uuid) -> PathBuf {
        self.scratch_dir.join(migration.to_string())
    }

    fn socket(&self, migration: Uuid) -> PathBuf {
        self.job_dir(migration).join("nbd.sock")
    }

    /// Ends a backup job of ours (`stale`: one an interrupted sync left, else this sync's
    /// own, done); refuses to touch another's.
    async fn end_job(&self, domain: &str, migration: Uuid, stale: bool) -> AResult<()> {
        let Ok(xml) = self.virsh(&["backup-dumpxml", domain]).await else {
            return Ok(()); // no backup job
        };
        let sock = self.socket(migration);
        if !xml.contains(&*sock.to_string_lossy()) {
            return Err(AdapterError::transient(format!(
                "domain '{domain}' is already being backed up by someone else; wait for that backup to end (`virsh domjobinfo {domain}`)"
            )));
        }
        if stale {
            tracing::info!(vm = %domain, "ending the backup job of an interrupted sync");
        } else {
            tracing::debug!(vm = %domain, "ending this sync's backup job");
        }
        self.virsh(&["domjobabort", domain]).await.map(drop)
    }

    async fn checkpoints(&self, domain: &str) -> AResult<Vec<String>> {
        // Oldest first, so deleting in reverse always deletes a leaf.
        let out = self
            .virsh(&["checkpoint-list", domain, "--name", "--topological"])
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with(CHECKPOINT_PREFIX))
            .map(str::to_string)
            .collect())
    }

    pub async fn open_disks(
        &self,
        jobs: &Mutex<HashMap<Uuid, Job>>,
        ctx: &StepContext,
        full: bool,
    ) -> AResult<Vec<SourceDisk>> {
        let domain = &ctx.workload.name;
        let x = self.domain_xml(domain).await?;
        if self.state(domain).await? != "running" {
            // Powered off (after cutover): its image files are quiescent and read as such.
            return offline_disks(&x, ctx);
        }
        let id = ctx.migration.id;
        self.end_job(domain, id, true).await?;

        tokio::fs::create_dir_all(&ctx.work_dir).await?;
        let committed_file = ctx.work_dir.join(COMMITTED_FILE);
        let committed = tokio::fs::read_to_string(&committed_file)
            .await
            .ok()
            .map(|s| s.trim().to_string());
        let existing = self.checkpoints(domain).await?;
        let base = committed.filter(|c| !full && existing.contains(c));
        // Newest first: each deletion merges a leaf's bitmap into its parent.
        for c in existing.iter().rev() {
            if Some(c) != base.as_ref() {
                tracing::info!(vm = %domain, checkpoint = %c, "deleting a checkpoint no sync committed");
                self.virsh(&["checkpoint-delete", domain, c]).await?;
            }
        }

        let dir = self.job_dir(id);
        prepare_job_dir(&dir, &self.scratch_dir)?;
        let _ = std::fs::remove_file(self.socket(id));
        let name = format!(
            "{CHECKPOINT_PREFIX}{}",
            time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
        );
        let wanted: Vec<&str> = ctx.workload.disks.iter().map(|d| d.name.as_str()).collect();
        let backup_xml = backup_xml(&x, &wanted, base.as_deref(), &self.socket(id), &dir);
        let checkpoint_xml = checkpoint_xml(&x, &wanted, &name);
        let bx = dir.join("backup.xml");
        let cx = dir.join("checkpoint.xml");
        std::fs::write(&bx, backup_xml)?;
        std::fs::write(&cx, checkpoint_xml)?;

        // Quiesce: the guest's file systems are flushed and frozen for the instant the
        // backup starts (crash-consistent without an agent).
        let mut agent = self.agent(domain, Duration::from_secs(2)).await.ok();
        let frozen = match agent.as_mut() {
            Some(a) => a.fsfreeze_freeze().await.is_ok(),
            None => false,
        };
        let begun = self
            .virsh(&[
                "backup-begin",
                domain,
                &bx.to_string_lossy(),
                &cx.to_string_lossy(),
            ])
            .await;
        if frozen {
            if let Some(a) = agent.as_mut() {
                if let Err(e) = a.fsfreeze_thaw().await {
                    tracing::error!(vm = %domain, "thawing file systems: {e}");
                }
            }
        }
        begun.map_err(|e| e.context(format!("point-in-time view of domain '{domain}'")))?;
        jobs.lock().expect("jobs lock").insert(
            id,
            Job {
                domain: domain.clone(),
                checkpoint: name.clone(),
                base: base.clone(),
            },
        );

        let active = self.virsh(&["backup-dumpxml", domain]).await?;
        let exports = exports(&active).map_err(|e| {
            AdapterError::permanent(format!("backup description of '{domain}': {e}"))
        })?;
        let mut out = vec![];
        for d in &ctx.workload.disks {
            let (export, bitmap) = exports.get(&d.name).cloned().ok_or_else(|| {
                AdapterError::permanent(format!(
                    "libvirt did not export disk '{}' of domain '{domain}'",
                    d.name
                ))
            })?;
            let info = self.virsh(&["domblkinfo", domain, &d.name]).await?;
            out.push(SourceDisk {
                name: d.name.clone(),
                spec: format!(
                    "nbd+unix:///{export}?socket={}",
                    self.socket(id).to_string_lossy()
                ),
                size_bytes: capacity(&info).unwrap_or(d.size_bytes),
                format: None,
                dirty_bitmap: base.as_ref().and(bitmap),
                changed_areas: None,
            });
        }
        tracing::info!(vm = %domain, checkpoint = %name, base = ?base, "libvirt backup view open");
        Ok(out)
    }

    pub async fn close_disks(
        &self,
        jobs: &Mutex<HashMap<Uuid, Job>>,
        ctx: &StepContext,
        committed: bool,
    ) -> AResult<()> {
        let id = ctx.migration.id;
        let domain = &ctx.workload.name;
        let job = jobs.lock().expect("jobs lock").remove(&id);
        if self.state(domain).await.ok().as_deref() == Some("running") {
            self.end_job(domain, id, job.is_none()).await?;
        }
        let Some(job) = job else {
            // Nothing of ours was open (an offline read, or an appliance restarted in
            // between: the next view cleans up by the committed-checkpoint record).
            return Ok(());
        };
        let _ = std::fs::remove_dir_all(self.job_dir(id));
        if committed {
            // Record first: from here on a crash keeps the new checkpoint.
            write_atomic(&ctx.work_dir.join(COMMITTED_FILE), &job.checkpoint)?;
            if let Some(old) = &job.base {
                self.virsh(&["checkpoint-delete", &job.domain, old]).await?;
            }
        } else {
            // Its bitmap folds back into the base: the next delta reads these changes too.
            self.virsh(&["checkpoint-delete", &job.domain, &job.checkpoint])
                .await?;
        }
        Ok(())
    }

    pub async fn guest(&self, ctx: &StepContext) -> AResult<Agent> {
        self.agent(&ctx.workload.name, AGENT_TIMEOUT).await
    }

    pub async fn shutdown(&self, ctx: &StepContext) -> AResult<()> {
        let domain = &ctx.workload.name;
        if self.state(domain).await? == "shut off" {
            return Ok(()); // a retried step
        }
        self.virsh(&["shutdown", domain]).await?;
        let timeout = crate::shutdown_timeout(ctx);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.state(domain).await? == "shut off" {
                tracing::info!(vm = %domain, "source domain is off");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::warn!(vm = %domain, "no clean shutdown within {} s (the source's config.shutdown_timeout_s): destroying", timeout.as_secs());
        self.virsh(&["destroy", domain]).await.map(drop)
    }

    pub async fn restart(&self, ctx: &StepContext) -> AResult<()> {
        let domain = &ctx.workload.name;
        if self.state(domain).await? == "running" {
            // Cutover stopped before the shutdown: start its services again.
            let mut services = ctx.profile.spec.services_to_stop.clone();
            services.extend(ctx.workload.services.iter().cloned());
            let mut g = self.guest(ctx).await?;
            for s in services {
                g.shell(&format!("systemctl start {}", guest::quote(&s)))
                    .await?;
            }
            return Ok(());
        }
        self.virsh(&["start", domain]).await.map(drop)
    }
}

/// A backup job a sync has open.
#[derive(Debug, Clone)]
pub struct Job {
    domain: String,
    checkpoint: String,
    base: Option<String>,
}

fn offline_disks(x: &DomainXml, ctx: &StepContext) -> AResult<Vec<SourceDisk>> {
    ctx.workload
        .disks
        .iter()
        .map(|d| {
            let xd = x.disks.iter().find(|x| x.dev == d.name).ok_or_else(|| {
                AdapterError::permanent(format!(
                    "domain '{}' has no disk '{}'",
                    ctx.workload.name, d.name
                ))
            })?;
            let file = xd.file.clone().ok_or_else(|| {
                AdapterError::permanent(format!(
                    "disk '{}' of domain '{}' is not backed by a file",
                    d.name, ctx.workload.name
                ))
            })?;
            Ok(SourceDisk {
                name: d.name.clone(),
                spec: file,
                size_bytes: d.size_bytes,
                format: xd.format.clone(),
                dirty_bitmap: None,
                changed_areas: None,
            })
        })
        .collect()
}

/// Creates the job directory owned by the user QEMU runs as (the owner of the scratch
/// root, which the administrator, or libvirt's packaging, gave to that user).
fn prepare_job_dir(dir: &Path, root: &Path) -> AResult<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(root)?;
    let qemu_owner = std::fs::metadata(root)
        .ok()
        .filter(|m| m.uid() != 0)
        .or_else(|| std::fs::metadata("/var/lib/libvirt/qemu").ok());
    if let Some(m) = &qemu_owner {
        let _ = std::os::unix::fs::chown(root, Some(m.uid()), Some(m.gid()));
    }
    std::fs::create_dir_all(dir)?;
    if let Some(m) = &qemu_owner {
        std::os::unix::fs::chown(dir, Some(m.uid()), Some(m.gid())).map_err(|e| {
            AdapterError::permanent(format!(
                "cannot give {} to libvirt's QEMU user: {e}",
                dir.display()
            ))
        })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    Ok(())
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `Capacity:` of `virsh domblkinfo`, in bytes.
fn capacity(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What Ferry reads of a domain's XML.
#[derive(Debug, Default, PartialEq)]
struct DomainXml {
    vcpus: u32,
    memory_mib: u64,
    disks: Vec<DiskXml>,
    nics: Vec<NicXml>,
    /// `virtio`, `vmware` or `emulated`, from the disks' bus and the NICs' model.
    hardware: Option<String>,
}

#[derive(Debug, PartialEq)]
struct DiskXml {
    dev: String,
    file: Option<String>,
    format: Option<String>,
}

#[derive(Debug, PartialEq)]
struct NicXml {
    mac: Option<String>,
    network: Option<String>,
}

impl DomainXml {
    fn parse(xml: &str) -> Result<DomainXml, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
        let root = doc.root_element();
        let vcpus = child(root, "vcpu")
            .and_then(|n| n.text())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(1);
        let memory_mib = child(root, "memory")
            .map(|n| {
                let v: u64 = n.text().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
                match n.attribute("unit").unwrap_or("KiB") {
                    "b" | "bytes" => v >> 20,
                    "KiB" | "k" => v >> 10,
                    "MiB" | "M" => v,
                    "GiB" | "G" => v << 10,
                    _ => v >> 10,
                }
            })
            .unwrap_or(0);
        let mut disks = vec![];
        let mut nics = vec![];
        // (virtio devices, VMware devices, other emulated devices)
        let mut seen = (0, 0, 0);
        if let Some(devices) = child(root, "devices") {
            for c in devices.children().filter(|c| c.is_element()) {
                let kind = match c.tag_name().name() {
                    "disk" if c.attribute("device").unwrap_or("disk") == "disk" => {
                        child(c, "target").and_then(|t| t.attribute("bus"))
                    }
                    "interface" => child(c, "model").and_then(|m| m.attribute("type")),
                    "controller" if c.attribute("type") == Some("scsi") => {
                        c.attribute("model").filter(|m| *m == "vmpvscsi")
                    }
                    _ => None,
                };
                match kind {
                    Some("virtio") => seen.0 += 1,
                    Some("vmxnet3") | Some("vmpvscsi") => seen.1 += 1,
                    Some(_) => seen.2 += 1,
                    None => {}
                }
            }
            for d in devices.children().filter(|c| c.has_tag_name("disk")) {
                if d.attribute("device").unwrap_or("disk") != "disk" {
                    continue; // cdrom, floppy, lun
                }
                let Some(dev) = child(d, "target").and_then(|t| t.attribute("dev")) else {
                    continue;
                };
                let source = child(d, "source");
                disks.push(DiskXml {
                    dev: dev.to_string(),
                    file: source
                        .and_then(|s| s.attribute("file").or(s.attribute("dev")))
                        .map(str::to_string),
                    format: child(d, "driver")
                        .and_then(|x| x.attribute("type"))
                        .map(str::to_string),
                });
            }
            for n in devices.children().filter(|c| c.has_tag_name("interface")) {
                let source = child(n, "source");
                nics.push(NicXml {
                    mac: child(n, "mac")
                        .and_then(|m| m.attribute("address"))
                        .map(str::to_string),
                    network: source
                        .and_then(|s| {
                            s.attribute("network")
                                .or(s.attribute("bridge"))
                                .or(s.attribute("dev"))
                        })
                        .map(str::to_string),
                });
            }
        }
        let hardware = match seen {
            (_, v, _) if v > 0 => Some("vmware"),
            (v, 0, _) if v > 0 => Some("virtio"),
            (0, 0, e) if e > 0 => Some("emulated"),
            _ => None,
        };
        Ok(DomainXml {
            vcpus,
            memory_mib,
            disks,
            nics,
            hardware: hardware.map(str::to_string),
        })
    }
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A pull-mode backup of the `wanted` disks (others are left out), incremental from
/// `base` when given.
fn backup_xml(
    x: &DomainXml,
    wanted: &[&str],
    base: Option<&str>,
    socket: &Path,
    dir: &Path,
) -> String {
    let mut s = String::from("<domainbackup mode='pull'>\n");
    if let Some(b) = base {
        s += &format!("  <incremental>{}</incremental>\n", xml_escape(b));
    }
    s += &format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        xml_escape(&socket.to_string_lossy())
    );
    for d in &x.disks {
        let dev = xml_escape(&d.dev);
        if wanted.contains(&d.dev.as_str()) {
            let scratch = dir.join(format!("scratch-{}.qcow2", d.dev));
            s += &format!(
                "    <disk name='{dev}' backup='yes' type='file'><scratch file='{}'/></disk>\n",
                xml_escape(&scratch.to_string_lossy())
            );
        } else {
            s += &format!("    <disk name='{dev}' backup='no'/>\n");
        }
    }
    s + "  </disks>\n</domainbackup>\n"
}

fn checkpoint_xml(x: &DomainXml, wanted: &[&str], name: &str) -> String {
    let mut s = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>Ferry sync</description>\n  <disks>\n",
        xml_escape(name)
    );
    for d in &x.disks {
        let how = if wanted.contains(&d.dev.as_str()) {
            "bitmap"
        } else {
            "no"
        };
        s += &format!(
            "    <disk name='{}' checkpoint='{how}'/>\n",
            xml_escape(&d.dev)
        );
    }
    s + "  </disks>\n</domaincheckpoint>\n"
}

/// Export name and dirty bitmap per disk of an active backup (`backup-dumpxml`).
fn exports(xml: &str) -> Result<HashMap<String, (String, Option<String>)>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("backup") == Some("yes"))
        .filter_map(|n| {
            let name = n.attribute("name")?.to_string();
            let export = n.attribute("exportname").unwrap_or(&name).to_string();
            let bitmap = n.attribute("exportbitmap").map(str::to_string);
            Some((name, (export, bitmap)))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu'>
  <name>web1</name>
  <memory unit='KiB'>524288</memory>
  <vcpu placement='static'>2</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/><target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/data/web1-data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='prod'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:57'/>
      <source bridge='br1'/>
    </interface>
  </devices>
</domain>"#;

    #[test]
    fn domain_xml_gives_disks_nics_and_size() {
        let x = DomainXml::parse(DOMAIN).unwrap();
        assert_eq!(x.vcpus, 2);
        assert_eq!(x.memory_mib, 512);
        assert_eq!(
            x.disks,
            vec![
                DiskXml {
                    dev: "vda".into(),
                    file: Some("/var/lib/libvirt/images/web1.qcow2".into()),
                    format: Some("qcow2".into())
                },
                DiskXml {
                    dev: "vdb".into(),
                    file: Some("/data/web1-data.raw".into()),
                    format: Some("raw".into())
                },
            ]
        );
        assert_eq!(x.nics[0].network.as_deref(), Some("prod"));
        assert_eq!(x.nics[1].network.as_deref(), Some("br1"));
        assert_eq!(x.nics[1].mac.as_deref(), Some("52:54:00:12:34:57"));
    }

    #[test]
    fn backup_and_checkpoint_cover_only_the_wanted_disks() {
        let x = DomainXml::parse(DOMAIN).unwrap();
        let b = backup_xml(
            &x,
            &["vda"],
            Some("ferry-1"),
            Path::new("/s/nbd.sock"),
            Path::new("/s"),
        );
        assert!(b.contains("<incremental>ferry-1</incremental>"));
        assert!(b.contains(
            "<disk name='vda' backup='yes' type='file'><scratch file='/s/scratch-vda.qcow2'/>"
        ));
        assert!(b.contains("<disk name='vdb' backup='no'/>"));
        let c = checkpoint_xml(&x, &["vda"], "ferry-2");
        assert!(c.contains("<name>ferry-2</name>"));
        assert!(c.contains("<disk name='vda' checkpoint='bitmap'/>"));
        assert!(c.contains("<disk name='vdb' checkpoint='no'/>"));
        // Roots parse as XML.
        roxmltree::Document::parse(&b).unwrap();
        roxmltree::Document::parse(&c).unwrap();
    }

    #[test]
    fn exports_of_an_incremental_backup() {
        let xml = "<domainbackup mode='pull'><incremental>ferry-1</incremental><server transport='unix' socket='/s'/><disks>\
            <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='ferry-1' exportname='vda' exportbitmap='backup-vda' index='4'/>\
            <disk name='vdb' backup='no'/></disks></domainbackup>";
        let e = exports(xml).unwrap();
        assert_eq!(
            e.get("vda"),
            Some(&("vda".to_string(), Some("backup-vda".to_string())))
        );
        assert!(!e.contains_key("vdb"));
    }

    #[test]
    fn capacity_of_domblkinfo() {
        assert_eq!(
            capacity("Capacity:       2147483648\nAllocation:     1\n"),
            Some(2147483648)
        );
        assert_eq!(capacity("nothing"), None);
    }
}
