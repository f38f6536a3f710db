//! The agentless KVM/QEMU source: VMs run by QEMU on this host, reached through their
//! QMP and guest-agent sockets, nothing installed in the guest beyond the standard
//! qemu-guest-agent.
//!
//! Two kinds of KVM host. Bare QEMU (the embedded default), source config
//! `{"vm_dir": DIR}`: each VM has a run directory `DIR/<name>/` as
//! `ferry_qemu::Vm::launch` lays it out (vm.json, qmp.sock, qga.sock). A workload's
//! disks are named by their QEMU block node; a sync reads a point-in-time view of each
//! node exported over NBD (`ferry_qemu::view`), with the dirty bitmap of the changes since
//! the previous sync. QEMU alone holds the bitmap chain, so a restarted appliance needs
//! no saved state: leftovers of an interrupted sync are cleaned up before the next one.
//! A libvirt host, source config `{"libvirt": URI}`: see [`libvirt`].

mod guest;
pub mod libvirt;

use async_trait::async_trait;
use ferry_adapter::{AResult, AdapterError, SourceAdapter, SourceDisk, StepContext};
use ferry_model::{Disk, DiskFormat, NewWorkload, Source};
use ferry_qemu::{view, Qmp, View, Vm, VmSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

pub use guest::GuestOps;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest may take to power off after the ACPI button before QEMU is ended,
/// unless the source's `config.shutdown_timeout_s` says otherwise (a database that
/// writes a long checkpoint needs more).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(90);

/// The start of a warning that the guest agent does not answer, saying what cutover
/// needs it for.
fn services_need_agent(ctx: &StepContext) -> String {
    let mut services = ctx.profile.spec.services_to_stop.clone();
    services.extend(ctx.workload.services.iter().cloned());
    if services.is_empty() {
        "cutover will shut the guest down without its agent: ".into()
    } else {
        format!(
            "cutover must stop services ({}) through the guest agent, which does not answer: ",
            services.join(", ")
        )
    }
}

/// The shutdown timeout of the workload's source.
fn shutdown_timeout(ctx: &StepContext) -> Duration {
    ctx.source
        .as_ref()
        .and_then(|s| s.config.get("shutdown_timeout_s"))
        .and_then(|v| v.as_u64())
        .map(Duration::from_secs)
        .unwrap_or(SHUTDOWN_TIMEOUT)
}

/// The source adapter. It holds the views a sync opened until the sync closes them; an
/// appliance that crashed in between finds their leftovers in QEMU instead.
#[derive(Default)]
pub struct KvmSource {
    open_views: Mutex<HashMap<Uuid, Vec<View>>>,
    open_jobs: Mutex<HashMap<Uuid, libvirt::Job>>,
}

/// The libvirt host of the workload's source, when it is one.
fn libvirt_host(ctx: &StepContext) -> AResult<Option<libvirt::Host>> {
    Ok(libvirt::Host::of(source_of(ctx)?))
}

/// The spec a VM was launched with (`vm.json` in its run directory).
fn load_spec(run_dir: &Path) -> Result<VmSpec, String> {
    let p = run_dir.join("vm.json");
    let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display()))
}

/// The run directory of every VM of a source.
fn vm_dir(source: &Source) -> AResult<PathBuf> {
    match source.config.get("vm_dir").and_then(|v| v.as_str()) {
        Some(d) => Ok(PathBuf::from(d)),
        None => Err(AdapterError::permanent(format!(
            "kvm source '{}' needs config.vm_dir (the directory holding one run directory per QEMU VM) or config.libvirt (a libvirt connection URI such as qemu:///system)",
            source.name
        ))),
    }
}

fn source_of(ctx: &StepContext) -> AResult<&Source> {
    ctx.source.as_ref().ok_or_else(|| {
        AdapterError::permanent(format!("workload '{}' has no source", ctx.workload.name))
    })
}

/// The run directory of the workload's VM.
pub fn run_dir(ctx: &StepContext) -> AResult<PathBuf> {
    Ok(vm_dir(source_of(ctx)?)?.join(&ctx.workload.name))
}

fn attach(run_dir: &Path, workload: &str) -> AResult<Vm> {
    Vm::attach(run_dir).map_err(|e| {
        AdapterError::transient(format!(
            "VM '{workload}' is not running: {e}; start it (or check the source's vm_dir)"
        ))
    })
}

async fn qmp(vm: &Vm) -> AResult<Qmp> {
    Qmp::connect(&vm.qmp_socket(), QMP_TIMEOUT)
        .await
        .map_err(|e| AdapterError::transient(format!("QMP of VM '{}': {e}", vm.name())))
}

fn qerr(what: impl std::fmt::Display) -> impl FnOnce(view::ViewError) -> AdapterError {
    move |e| AdapterError::transient(format!("{what}: {e}"))
}

/// The NBD socket a VM's views are exported on (QEMU runs one NBD server per VM).
fn nbd_socket(ctx: &StepContext) -> PathBuf {
    ctx.work_dir.join("src-nbd.sock")
}

impl KvmSource {
    /// Views of every disk of the workload (see `open_disks`).
    async fn begin_views(
        &self,
        ctx: &StepContext,
        q: &mut Qmp,
        full: bool,
        mut agent: Option<&mut ferry_qemu::Qga>,
    ) -> AResult<Vec<SourceDisk>> {
        let mut out = vec![];
        for d in &ctx.workload.disks {
            let node = d.path.clone().unwrap_or_else(|| d.name.clone());
            // An interrupted sync may have left its view behind: its bitmap is merged
            // back so no change is lost.
            view::cleanup_stale(q, &node).await.map_err(qerr(format!(
                "cleaning up after an earlier sync of '{node}'"
            )))?;
            let incremental = !full
                && view::ferry_bitmaps(q, &node)
                    .await
                    .map(|b| !b.is_empty())
                    .unwrap_or(false);
            let v = view::begin(
                q,
                &node,
                &ctx.work_dir,
                &nbd_socket(ctx),
                incremental,
                agent.as_deref_mut(),
            )
            .await
            .map_err(qerr(format!("point-in-time view of disk '{}'", d.name)))?;
            out.push(SourceDisk {
                name: d.name.clone(),
                spec: v.nbd_uri.clone(),
                size_bytes: v.size,
                format: None,
                dirty_bitmap: v.bitmap.clone(),
                changed_areas: None,
            });
            self.open_views
                .lock()
                .expect("views lock")
                .entry(ctx.migration.id)
                .or_default()
                .push(v);
        }
        Ok(out)
    }
    async fn describe(run_dir: &Path, source: &Source) -> AResult<Option<NewWorkload>> {
        let Ok(vm) = Vm::attach(run_dir) else {
            return Ok(None);
        };
        let Some(spec) = vm.spec().cloned() else {
            return Ok(None);
        };
        let mut q = qmp(&vm).await?;
        let nodes = q
            .query_named_block_nodes()
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?;
        let disks = spec
            .disks
            .iter()
            .map(|d| Disk {
                name: d.node_name.clone(),
                size_bytes: nodes
                    .iter()
                    .find(|n| n.node_name == d.node_name)
                    .map(|n| n.virtual_size)
                    .unwrap_or(0),
                path: Some(d.node_name.clone()),
                format: DiskFormat::parse(&d.format),
            })
            .collect();
        let info = GuestOps::new(&vm).info().await;
        let nics = spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| info.nic(i, spec.netns.clone(), n.mac.clone()))
            .collect();
        Ok(Some(NewWorkload {
            name: spec.name.clone(),
            source_id: Some(source.id),
            os: info.os,
            cpus: Some(spec.cpus),
            memory_mib: Some(spec.memory_mib as u64),
            disks,
            nics,
            hardware: Some(spec.hardware.to_string()),
            ..Default::default()
        }))
    }
}

#[async_trait]
impl SourceAdapter for KvmSource {
    async fn discover(
        &self,
        source: &Source,
        _secrets: &ferry_adapter::Secrets,
    ) -> AResult<Vec<NewWorkload>> {
        if let Some(h) = libvirt::Host::of(source) {
            return h.discover(source).await;
        }
        let dir = vm_dir(source)?;
        let mut entries = tokio::fs::read_dir(&dir).await.map_err(|e| {
            AdapterError::permanent(format!("cannot list VMs in {}: {e}", dir.display()))
        })?;
        let mut out = vec![];
        while let Some(e) = entries.next_entry().await? {
            if let Some(w) = Self::describe(&e.path(), source).await? {
                out.push(w);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        if let Some(h) = libvirt_host(ctx)? {
            return h.preflight(ctx).await;
        }
        let vm = attach(&run_dir(ctx)?, &ctx.workload.name)?;
        let mut q = qmp(&vm).await?;
        let nodes = q
            .query_named_block_nodes()
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?;
        if ctx.workload.disks.is_empty() {
            return Err(AdapterError::permanent(format!(
                "workload '{}' lists no disks: run `ferry source discover`",
                ctx.workload.name
            )));
        }
        for d in &ctx.workload.disks {
            let node = d.path.as_deref().unwrap_or(&d.name);
            match nodes.iter().find(|n| n.node_name == node) {
                None => {
                    return Err(AdapterError::permanent(format!(
                        "VM '{}' has no block node '{node}' for disk '{}': run `ferry source discover` again",
                        ctx.workload.name, d.name
                    )))
                }
                Some(n) if n.driver != "qcow2" => {
                    return Err(AdapterError::permanent(format!(
                        "disk '{}' of VM '{}' is {}: change tracking needs qcow2 (convert it with qemu-img convert -O qcow2 while the VM is off)",
                        d.name, ctx.workload.name, n.driver
                    )))
                }
                Some(_) => {}
            }
        }
        if let Err(e) = GuestOps::new(&vm).ping().await {
            // Syncs work without the agent (crash-consistent); cutover needs it to stop
            // services, so say it now (a guest still booting answers later: a warning,
            // not a refusal).
            tracing::warn!(vm = %ctx.workload.name, "{}{}", services_need_agent(ctx), e.message);
        }
        Ok(())
    }

    async fn open_disks(&self, ctx: &StepContext, full: bool) -> AResult<Vec<SourceDisk>> {
        if let Some(h) = libvirt_host(ctx)? {
            return h.open_disks(&self.open_jobs, ctx, full).await;
        }
        let rd = run_dir(ctx)?;
        let vm = match Vm::attach(&rd) {
            Ok(vm) => vm,
            // Powered off (after cutover): its qcow2 files are quiescent and read as such.
            Err(_) => return offline_disks(&rd, ctx).await,
        };
        tokio::fs::create_dir_all(&ctx.work_dir).await?;
        let mut q = qmp(&vm).await?;
        let mut agent = GuestOps::new(&vm).connect().await.ok();
        // Several disks: one freeze around all their views, so together they show one
        // instant of the guest's file systems (each view is its own QMP transaction).
        let freeze_all = ctx.workload.disks.len() > 1 && agent.is_some();
        if freeze_all {
            if let Some(a) = agent.as_deref_mut() {
                if let Err(e) = a.fsfreeze_freeze().await {
                    tracing::warn!(vm = %ctx.workload.name, "cannot freeze file systems: {e}");
                }
            }
        }
        let one_freeze = if freeze_all {
            None
        } else {
            agent.as_deref_mut()
        };
        let r = self.begin_views(ctx, &mut q, full, one_freeze).await;
        if r.is_err() {
            // Release the views of the disks before the one that failed: none of them
            // will be read, and their changes go back to the bitmaps.
            let opened = self
                .open_views
                .lock()
                .expect("views lock")
                .remove(&ctx.migration.id)
                .unwrap_or_default();
            for v in opened {
                let node = v.node.clone();
                if let Err(e) = v.end(&mut q, false).await {
                    tracing::warn!(vm = %ctx.workload.name, "releasing the view of '{node}': {e}");
                }
            }
        }
        if freeze_all {
            if let Some(a) = agent.as_deref_mut() {
                if let Err(e) = a.fsfreeze_thaw().await {
                    tracing::error!(vm = %ctx.workload.name, "thawing file systems: {e}");
                }
            }
        }
        r
    }

    async fn close_disks(
        &self,
        ctx: &StepContext,
        _disks: &[SourceDisk],
        committed: bool,
    ) -> AResult<()> {
        if let Some(h) = libvirt_host(ctx)? {
            return h.close_disks(&self.open_jobs, ctx, committed).await;
        }
        let views = self
            .open_views
            .lock()
            .expect("views lock")
            .remove(&ctx.migration.id)
            .unwrap_or_default();
        let Ok(vm) = Vm::attach(&run_dir(ctx)?) else {
            return Ok(());
        };
        let mut q = qmp(&vm).await?;
        for v in views {
            let node = v.node.clone();
            v.end(&mut q, committed)
                .await
                .map_err(qerr(format!("releasing the view of disk '{node}'")))?;
        }
        Ok(())
    }

    async fn stop_services(&self, ctx: &StepContext, services: &[String]) -> AResult<()> {
        // Nothing to stop: a guest without an agent still cuts over (shut down by ACPI).
        if services.is_empty() {
            return Ok(());
        }
        let mut g = match libvirt_host(ctx)? {
            Some(h) => h.guest(ctx).await?,
            None => {
                let vm = attach(&run_dir(ctx)?, &ctx.workload.name)?;
                GuestOps::new(&vm).connect().await?
            }
        };
        for s in services {
            g.shell(&format!("systemctl stop {}", guest::quote(s)))
                .await
                .map_err(|e| e.context(format!("stopping service '{s}'")))?;
        }
        // What the services wrote must be on the disk before the final delta reads it.
        g.shell("sync").await?;
        Ok(())
    }

    async fn guest_command(&self, ctx: &StepContext, command: &str) -> AResult<String> {
        if let Some(h) = libvirt_host(ctx)? {
            return h.guest(ctx).await?.shell(command).await;
        }
        let vm = attach(&run_dir(ctx)?, &ctx.workload.name)?;
        GuestOps::new(&vm).connect().await?.shell(command).await
    }

    async fn shutdown(&self, ctx: &StepContext) -> AResult<()> {
        if let Some(h) = libvirt_host(ctx)? {
            return h.shutdown(ctx).await;
        }
        let Ok(vm) = Vm::attach(&run_dir(ctx)?) else {
            return Ok(()); // already off: a retried step
        };
        vm.powerdown(shutdown_timeout(ctx))
            .await
            .map(|outcome| tracing::info!(vm = %ctx.workload.name, ?outcome, "source VM is off"))
            .map_err(|e| {
                AdapterError::transient(format!("shutting down VM '{}': {e}", ctx.workload.name))
            })
    }

    async fn restart(&self, ctx: &StepContext) -> AResult<()> {
        if let Some(h) = libvirt_host(ctx)? {
            return h.restart(ctx).await;
        }
        let rd = run_dir(ctx)?;
        if let Ok(vm) = Vm::attach(&rd) {
            // Still running (cutover stopped before the shutdown): start its services again.
            let mut services = ctx.profile.spec.services_to_stop.clone();
            services.extend(ctx.workload.services.iter().cloned());
            let mut g = GuestOps::new(&vm).connect().await?;
            for s in services {
                g.shell(&format!("systemctl start {}", guest::quote(&s)))
                    .await?;
            }
            return Ok(());
        }
        let spec = load_spec(&rd).map_err(|e| {
            AdapterError::permanent(format!(
                "cannot restart VM '{}': its launch spec is unreadable: {e}",
                ctx.workload.name
            ))
        })?;
        Vm::launch(&spec).await.map_err(|e| {
            AdapterError::transient(format!("restarting VM '{}': {e}", ctx.workload.name))
        })?;
        Ok(())
    }
}

/// The disks of a VM that is off, read straight from its image files.
async fn offline_disks(run_dir: &Path, ctx: &StepContext) -> AResult<Vec<SourceDisk>> {
    let spec = load_spec(run_dir).map_err(|e| {
        AdapterError::permanent(format!(
            "VM '{}' is not running and its launch spec is unreadable: {e}",
            ctx.workload.name
        ))
    })?;
    let mut out = vec![];
    for d in &ctx.workload.disks {
        let node = d.path.as_deref().unwrap_or(&d.name);
        let vd = spec
            .disks
            .iter()
            .find(|x| x.node_name == node)
            .ok_or_else(|| {
                AdapterError::permanent(format!("VM '{}' has no disk '{node}'", ctx.workload.name))
            })?;
        out.push(SourceDisk {
            name: d.name.clone(),
            spec: vd.path.display().to_string(),
            size_bytes: d.size_bytes,
            format: Some(vd.format.clone()),
            dirty_bitmap: None,
            changed_areas: None,
        });
    }
    Ok(out)
}
