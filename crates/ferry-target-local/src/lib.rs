//! The local target, Ferry's embedded default: nothing to install but QEMU.
//!
//! - Disks are qcow2 files in the target's directory, one sub-directory per migration
//!   (`<workload>-<id>/`), written by the replication engine.
//! - Instances are QEMU processes Ferry starts detached (they outlive an appliance
//!   restart and are found again from their run directory).
//! - Networks are network namespaces with a bridge (`ferry_net`): the *production*
//!   network is the one the source's NIC was on (or the profile's network map says), and
//!   each test instance gets a *migration* network of its own with the same addresses and
//!   no link to anything else, so a test copy with the source's IP cannot disturb it.

mod boot;
mod checks;
mod config;
mod dns;

use async_trait::async_trait;
use ferry_adapter::{
    AResult, AdapterError, BootPrep, CheckPhase, DiskDestination, SourceDisk, StepContext,
    TargetAdapter,
};
use ferry_model::{PostCutoverAction, ValidationCheck};
use ferry_net::{Network, NetworkSpec};
use ferry_qemu::{NicBackend, Vm, VmDisk, VmNic, VmSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config::LocalConfig;

#[derive(Default)]
pub struct LocalTarget;

fn sanitize(name: &str, max: usize) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if s.is_empty() {
        "x".into()
    } else {
        s
    }
}

/// Eight hex digits of the migration id: short names for taps and namespaces.
fn short_id(ctx: &StepContext) -> String {
    ctx.migration.id.simple().to_string()[..8].to_string()
}

fn instance_dir(cfg: &LocalConfig, ctx: &StepContext) -> PathBuf {
    // Short: QEMU's Unix sockets live below it and socket paths are limited to 107 bytes.
    cfg.path.join(format!(
        "{}-{}",
        sanitize(&ctx.workload.name, 20),
        short_id(ctx)
    ))
}

/// A QEMU node name for a disk (letters, digits, '-', '_'; starting with a letter).
fn node_name(disk: &str) -> String {
    format!("d{}", sanitize(disk, 20))
}

/// The workload's first IPv4 address: the instance keeps the source's address.
fn workload_ip(ctx: &StepContext) -> Option<String> {
    ctx.workload
        .nics
        .iter()
        .flat_map(|n| n.ips.iter())
        .find(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        .cloned()
}

/// Copies a disk image keeping its holes.
async fn copy_sparse(from: &Path, to: &Path) -> AResult<()> {
    let st = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .await
        .map_err(|e| AdapterError::transient(format!("copying {}: {e}", from.display())))?;
    if !st.success() {
        return Err(AdapterError::transient(format!(
            "copying {} to {} failed ({st})",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}

fn net_err(e: ferry_net::NetError) -> AdapterError {
    AdapterError::transient(e.to_string())
}

fn vm_err(e: ferry_qemu::VmError) -> AdapterError {
    AdapterError::transient(e.to_string())
}

struct Placement {
    cfg: LocalConfig,
    dir: PathBuf,
}

impl Placement {
    fn of(ctx: &StepContext) -> AResult<Placement> {
        let cfg = LocalConfig::parse(&ctx.target)?;
        let dir = instance_dir(&cfg, ctx);
        Ok(Placement { cfg, dir })
    }

    fn disk_path(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("{}.qcow2", sanitize(disk, 64)))
    }

    fn uat_dir(&self) -> PathBuf {
        self.dir.join("uat")
    }

    /// Production's converted overlays, when the guest is converted.
    fn boot_dir(&self) -> PathBuf {
        self.dir.join("boot")
    }

    /// libguestfs' appliance, kept between conversions.
    fn guestfs_cache(&self) -> PathBuf {
        self.cfg.path.join(".guestfs")
    }

    /// Overlays above the synced disks that a production instance booted without
    /// conversion writes to: the synced generation stays the source's disks as they
    /// stopped (final validation compares them), and a rollback that removes the
    /// overlays leaves the disks the replication index describes. Kept by a retried step.
    async fn production_overlays(&self, ctx: &StepContext) -> AResult<Vec<(String, PathBuf)>> {
        tokio::fs::create_dir_all(self.boot_dir()).await?;
        let mut out = vec![];
        for (name, synced) in self.synced_disks(ctx) {
            let overlay = self
                .boot_dir()
                .join(format!("{}.overlay.qcow2", sanitize(&name, 64)));
            if tokio::fs::metadata(&overlay).await.is_err() {
                let base = ferry_convert::GuestDisk {
                    path: synced,
                    format: ferry_convert::ImageFormat::Qcow2,
                };
                let tmp = overlay.with_extension("qcow2.tmp");
                ferry_convert::create_overlay(&base, &tmp)
                    .await
                    .map_err(|e| {
                        AdapterError::transient(format!(
                            "creating the production overlay of disk '{name}': {e}"
                        ))
                    })?;
                tokio::fs::rename(&tmp, &overlay).await?;
            }
            out.push((name, overlay));
        }
        Ok(out)
    }

    fn synced_disks(&self, ctx: &StepContext) -> Vec<(String, PathBuf)> {
        ctx.workload
            .disks
            .iter()
            .map(|d| (d.name.clone(), self.disk_path(&d.name)))
            .collect()
    }

    /// The production network: the profile's map of the source NIC's network, else the
    /// NIC's own network name, else the target's default.
    fn production_network(&self, ctx: &StepContext) -> AResult<String> {
        let nic_net = ctx.workload.nics.first().and_then(|n| n.network.clone());
        nic_net
            .as_ref()
            .and_then(|n| ctx.profile.spec.network_map.get(n).cloned())
            .or(nic_net)
            .or(self.cfg.network.clone())
            .ok_or_else(|| {
                AdapterError::permanent(format!(
                    "no production network for '{}': its NIC names none; map one in the profile's network_map or set the target's config.network",
                    ctx.workload.name
                ))
            })
    }

    fn uat_network(&self, ctx: &StepContext) -> String {
        ctx.profile
            .spec
            .uat
            .network
            .clone()
            .unwrap_or_else(|| format!("ferry-uat-{}", short_id(ctx)))
    }

    /// The network `name`: an existing one is used as it is (production is shared with
    /// the source and whatever else lives there: never reconfigured), a missing one is
    /// created with the target's gateway address.
    fn network(&self, name: &str) -> AResult<Network> {
        let ns = ferry_net::sanitize_netns_name(name).map_err(net_err)?;
        if ferry_net::netns_exists(&ns) {
            return Ok(Network {
                name: name.to_string(),
                namespace: ns,
                bridge: ferry_net::BRIDGE.to_string(),
                cidr: None,
            });
        }
        let mut spec = NetworkSpec::new(name);
        if let Some(g) = &self.cfg.gateway {
            spec = spec.with_cidr(g.parse().map_err(|e: ferry_net::NetError| {
                AdapterError::permanent(format!("target config.gateway: {e}"))
            })?);
        }
        Network::ensure(&spec).map_err(net_err)
    }

    /// Starts (or finds running) an instance booting `disks`, on `network`.
    /// `prepared`: what [`boot::prepare`] made, booted by the guest's own boot loader on
    /// the hardware it says; otherwise `disks` with the target's kernel (if it has one).
    #[allow(clippy::too_many_arguments)]
    async fn start_instance(
        &self,
        ctx: &StepContext,
        name: &str,
        run_dir: &Path,
        disks: Vec<(String, PathBuf)>,
        prepared: Option<&ferry_convert::Prepared>,
        network: &Network,
        tap: &str,
    ) -> AResult<Vm> {
        if let Ok(vm) = Vm::attach(run_dir) {
            return Ok(vm); // a retried step: it is already up
        }
        let tap = network.add_tap(tap).map_err(net_err)?;
        let accel = ferry_qemu::detect_accel().await;
        let mut spec = VmSpec::new(name, run_dir, accel);
        spec.memory_mib = ctx
            .workload
            .memory_mib
            .map(|m| m as u32)
            .unwrap_or(self.cfg.memory_mib);
        spec.cpus = ctx.workload.cpus.unwrap_or(self.cfg.cpus);
        let disks = match prepared {
            Some(b) => {
                spec.hardware = boot::hardware(b);
                b.disks.clone()
            }
            None => {
                spec.kernel = self.cfg.kernel.clone();
                spec.initrd = self.cfg.initrd.clone();
                spec.append =
                    self.cfg.append.as_ref().map(|a| {
                        a.replace("{ip}", workload_ip(ctx).as_deref().unwrap_or("0.0.0.0"))
                    });
                disks
            }
        };
        spec.disks = disks
            .into_iter()
            .map(|(disk, path)| VmDisk {
                path,
                format: "qcow2".into(),
                node_name: node_name(&disk),
                read_only: false,
            })
            .collect();
        spec.nics = vec![VmNic {
            backend: NicBackend::Tap {
                ifname: tap.ifname.clone(),
            },
            mac: prepared
                .and_then(|b| b.mac.clone())
                .or_else(|| ctx.workload.nics.first().and_then(|n| n.mac.clone())),
        }];
        spec.netns = Some(network.namespace.clone());
        tracing::info!(instance = name, network = %network.name, %accel, hardware = %spec.hardware, "starting instance");
        Vm::launch(&spec).await.map_err(vm_err)
    }

    fn subject<'a>(
        &'a self,
        vm: &'a Vm,
        netns: &'a str,
        ip: Option<&'a str>,
    ) -> checks::Subject<'a> {
        checks::Subject {
            vm,
            netns,
            ip,
            boot_timeout: Duration::from_secs(self.cfg.boot_timeout_s),
            check_timeout: Duration::from_secs(self.cfg.check_timeout_s),
        }
    }
}

async fn stop_vm(run_dir: &Path) {
    if let Ok(vm) = Vm::attach(run_dir) {
        if let Err(e) = vm.kill().await {
            tracing::warn!(vm = %vm.name(), "stopping instance: {e}");
        }
    }
}

#[async_trait]
impl TargetAdapter for LocalTarget {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        let p = Placement::of(ctx)?;
        for (what, f) in [("kernel", &p.cfg.kernel), ("initrd", &p.cfg.initrd)] {
            if let Some(f) = f {
                if !f.exists() {
                    return Err(AdapterError::permanent(format!(
                        "local target '{}': {what} {} does not exist",
                        ctx.target.name,
                        f.display()
                    )));
                }
            }
        }
        p.production_network(ctx)?;
        if ctx.profile.spec.conversion == ferry_model::ConversionMode::Required {
            let missing = ferry_convert::missing_tools();
            if !missing.is_empty() {
                return Err(AdapterError::permanent(format!(
                    "the profile requires guest conversion, and {} {} not installed on the appliance's machine: `apt-get install virt-v2v libguestfs-tools`",
                    missing.join(", "),
                    if missing.len() == 1 { "is" } else { "are" }
                )));
            }
        }
        ferry_convert::step::check_windows(ctx)?;
        tokio::fs::create_dir_all(&p.dir).await.map_err(|e| {
            AdapterError::permanent(format!(
                "target directory {} is not writable: {e}",
                p.dir.display()
            ))
        })?;
        Ok(())
    }

    async fn disk_destination(
        &self,
        ctx: &StepContext,
        disk: &SourceDisk,
    ) -> AResult<DiskDestination> {
        Ok(DiskDestination::Local(
            Placement::of(ctx)?.disk_path(&disk.name),
        ))
    }

    async fn prepare_boot(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
    ) -> AResult<Option<BootPrep>> {
        let p = Placement::of(ctx)?;
        match phase {
            CheckPhase::Uat => {
                if Vm::attach(&p.uat_dir().join("run")).is_ok() {
                    // A retried step whose instance already runs: whatever it booted.
                    return Ok(boot::load(&p.uat_dir()).map(|b| BootPrep {
                        summary: b.summary,
                        converted: b.converted,
                        ..BootPrep::default()
                    }));
                }
                boot::prepare(
                    ctx,
                    &p.uat_dir(),
                    p.synced_disks(ctx),
                    true,
                    &p.guestfs_cache(),
                )
                .await
            }
            CheckPhase::Final => {
                boot::prepare(
                    ctx,
                    &p.boot_dir(),
                    p.synced_disks(ctx),
                    false,
                    &p.guestfs_cache(),
                )
                .await
            }
        }
    }

    async fn start_test_instance(&self, ctx: &StepContext) -> AResult<()> {
        let p = Placement::of(ctx)?;
        let uat = p.uat_dir();
        let run = uat.join("run");
        let prepared = boot::load(&uat);
        if prepared.is_none() && Vm::attach(&run).is_err() {
            // A copy of the last complete generation: replication goes on into the
            // originals while the test instance writes to its own.
            let _ = tokio::fs::remove_dir_all(&uat).await;
            tokio::fs::create_dir_all(&uat).await?;
            for d in &ctx.workload.disks {
                copy_sparse(
                    &p.disk_path(&d.name),
                    &uat.join(format!("{}.qcow2", sanitize(&d.name, 64))),
                )
                .await?;
            }
        }
        let disks = ctx
            .workload
            .disks
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    uat.join(format!("{}.qcow2", sanitize(&d.name, 64))),
                )
            })
            .collect();
        let net = p.network(&p.uat_network(ctx))?;
        let vm = p
            .start_instance(
                ctx,
                &format!("{}-uat", ctx.workload.name),
                &run,
                disks,
                prepared.as_ref(),
                &net,
                &format!("fu{}", short_id(ctx)),
            )
            .await?;
        let ip = workload_ip(ctx);
        let took = p
            .subject(&vm, &net.namespace, ip.as_deref())
            .wait_boot()
            .await?;
        tracing::info!(instance = %vm.name(), secs = took.as_secs(), network = %net.name, "test instance up");
        Ok(())
    }

    async fn stop_test_instance(&self, ctx: &StepContext) -> AResult<()> {
        let p = Placement::of(ctx)?;
        stop_vm(&p.uat_dir().join("run")).await;
        let name = p.uat_network(ctx);
        if ctx.profile.spec.uat.network.is_none() {
            // Ours alone: it goes with the instance.
            p.network(&name)?.destroy().map_err(net_err)?;
        }
        match tokio::fs::remove_dir_all(p.uat_dir()).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn start_production(&self, ctx: &StepContext) -> AResult<()> {
        let p = Placement::of(ctx)?;
        let net = p.network(&p.production_network(ctx)?)?;
        let prepared = boot::load(&p.boot_dir());
        let disks = match &prepared {
            Some(_) => p.synced_disks(ctx),
            None => p.production_overlays(ctx).await?,
        };
        p.start_instance(
            ctx,
            &ctx.workload.name,
            &p.dir.join("run"),
            disks,
            prepared.as_ref(),
            &net,
            &format!("fp{}", short_id(ctx)),
        )
        .await?;
        Ok(())
    }

    async fn post_cutover(
        &self,
        ctx: &StepContext,
        actions: &[PostCutoverAction],
    ) -> AResult<Vec<serde_json::Value>> {
        let p = Placement::of(ctx)?;
        let ip = workload_ip(ctx);
        let mut undo = vec![];
        for a in actions {
            match a.kind.as_str() {
                "dns" => undo.push(dns::update(a, &ctx.workload.name, ip.as_deref(), &ctx.secrets).await?),
                "hook" => {
                    let vm = Vm::attach(&p.dir.join("run")).map_err(vm_err)?;
                    let net = p.production_network(ctx)?;
                    let s = p.subject(&vm, &net, ip.as_deref());
                    s.wait_boot().await?;
                    let check = ValidationCheck {
                        kind: "command".into(),
                        params: a.params.clone(),
                    };
                    s.run(0, &check, CheckPhase::Final, &ctx.facts).await?;
                }
                other => {
                    return Err(AdapterError::permanent(format!(
                        "post-cutover action '{other}' is not supported by the local target (it supports dns and hook)"
                    )))
                }
            }
        }
        Ok(undo)
    }

    /// Final validation always compares the synced disks with the source's, which is off
    /// by then: they are files here, so the check costs reads, not transfers.
    fn wants_source_disks(&self, _checks: &[ValidationCheck]) -> bool {
        true
    }

    async fn validate(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
        checks: &[ValidationCheck],
        source_disks: &[SourceDisk],
    ) -> AResult<()> {
        let p = Placement::of(ctx)?;
        // The synced generation is never booted (the instance runs from overlays above
        // it), so it must still be the source's disks byte for byte.
        if phase == CheckPhase::Final {
            for d in source_disks {
                let synced = p.disk_path(&d.name);
                ferry_adapter::verify::disk_matches_source(d, &synced, "qcow2").await?;
                tracing::info!(disk = %d.name, "the synced disk equals the source's disk as it stopped");
            }
        }
        let (run, net) = match phase {
            CheckPhase::Uat => (p.uat_dir().join("run"), p.uat_network(ctx)),
            CheckPhase::Final => (p.dir.join("run"), p.production_network(ctx)?),
        };
        let vm = Vm::attach(&run).map_err(|e| {
            AdapterError::transient(format!("the instance to validate is not running: {e}"))
        })?;
        let ip = workload_ip(ctx);
        let s = p.subject(&vm, &net, ip.as_deref());
        let booted = s.wait_boot().await?;
        tracing::info!(instance = %vm.name(), secs = booted.as_secs_f64(), "instance answers");
        for (i, c) in checks.iter().enumerate() {
            if let Some(what) = s.run(i, c, phase, &ctx.facts).await? {
                tracing::info!(instance = %vm.name(), check = i, kind = %c.kind, "passed: {what}");
            }
        }
        // A converted guest keeps its network identity: every static address its own
        // configuration holds is up on the instance.
        let dir = match phase {
            CheckPhase::Uat => p.uat_dir(),
            CheckPhase::Final => p.boot_dir(),
        };
        if let Some(b) = boot::load(&dir) {
            for addr in b.static_addresses() {
                s.address_is_up(&addr).await?;
                tracing::info!(instance = %vm.name(), %addr, "static address of the source is up");
            }
        }
        Ok(())
    }

    async fn remove(&self, ctx: &StepContext) -> AResult<()> {
        let p = Placement::of(ctx)?;
        stop_vm(&p.dir.join("run")).await;
        stop_vm(&p.uat_dir().join("run")).await;
        // The converted overlays go; the synced disks stay as the source left them.
        match tokio::fs::remove_dir_all(p.boot_dir()).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(AdapterError::transient(format!(
                    "removing the converted disks in {}: {e}",
                    p.boot_dir().display()
                )))
            }
            _ => {}
        }
        for u in ctx.facts.undo.iter().rev() {
            if u["kind"] == "dns" {
                dns::undo(u, &ctx.secrets).await?;
            }
        }
        if let Ok(n) = p.production_network(ctx).and_then(|net| p.network(&net)) {
            let _ = n.remove_tap(&format!("fp{}", short_id(ctx)));
        }
        Ok(())
    }
}
