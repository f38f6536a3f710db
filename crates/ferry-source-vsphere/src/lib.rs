//! The VMware vSphere source, agentless, through vCenter's API.
//!
//! Source: `kind: vsphere`, `endpoint: https://vcenter`, `credential_id`: the vCenter
//! account. Config: `ca_bundle` (PEM of vCenter's CA), `insecure` (a lab only).
//! Workloads are VMs by name; disks are named by their label (`Hard disk 1`) with the
//! VMDK path as `path`; NICs carry their port group as the network.
//!
//! A sync takes a snapshot (quiesced when VMware Tools run), reads the snapshot's disks
//! through nbdkit — the `curl` plugin on the datastore's HTTPS file access, or the `vddk`
//! plugin when `config.vddk_libdir` points at an installed VDDK — and removes the
//! snapshot whatever happened. A delta reads only the areas changed block tracking lists
//! since the last committed sync's change id (kept in the migration's work directory); a
//! change id vCenter no longer knows falls back to a hash-compare read, with a warning.
//! Cutover stops services with guest operations (`config.guest_credential_id`: a guest
//! account), shuts the guest down through Tools and powers it off after
//! `config.shutdown_timeout_s` (default 300); rollback powers it on.

use async_trait::async_trait;
use ferry_adapter::{
    AResult, AdapterError, Secrets, SourceAdapter, SourceDisk, StepContext, GUEST_PASSWORD,
    GUEST_USERNAME, SOURCE_PASSWORD, SOURCE_USERNAME,
};
use ferry_model::{Disk, NewWorkload, Nic, Source};
use ferry_vsphere::{Client, ClientOptions, Vm, VsphereError};
use std::collections::HashMap;
use std::sync::Mutex;

mod power;
mod sync;

/// The adapter. It holds the vCenter session and nbdkit exports of each sync between
/// `open_disks` and `close_disks`.
#[derive(Default)]
pub struct VsphereSource {
    open: Mutex<HashMap<uuid::Uuid, (Client, sync::OpenSync)>>,
}

pub(crate) fn err(e: VsphereError) -> AdapterError {
    let retryable = matches!(e, VsphereError::Unreachable { .. });
    AdapterError {
        retryable,
        message: e.to_string(),
    }
}

async fn session(source: &Source, secrets: &Secrets) -> AResult<Client> {
    let url = source.endpoint.clone().ok_or_else(|| {
        AdapterError::permanent(format!(
            "vsphere source '{}' has no endpoint: set vCenter's URL",
            source.name
        ))
    })?;
    let (Some(user), Some(pass)) = (secrets.get(SOURCE_USERNAME), secrets.get(SOURCE_PASSWORD))
    else {
        return Err(AdapterError::permanent(format!(
            "vsphere source '{}' has no credential: create one with the vCenter account (POST /api/credentials) and set the source's credential_id",
            source.name
        )));
    };
    let mut o = ClientOptions::new(url);
    o.ca_bundle = source
        .config
        .get("ca_bundle")
        .and_then(|v| v.as_str())
        .map(Into::into);
    o.insecure = source.config.get("insecure").and_then(|v| v.as_bool()) == Some(true);
    let c = Client::connect(&o).await.map_err(err)?;
    c.login(user, pass).await.map_err(err)?;
    Ok(c)
}

fn workload(vm: &Vm, source: &Source) -> NewWorkload {
    NewWorkload {
        name: vm.name.clone(),
        source_id: Some(source.id),
        os: vm.guest_os.clone(),
        cpus: Some(vm.cpus),
        memory_mib: Some(vm.memory_mib),
        disks: vm
            .disks
            .iter()
            .map(|d| Disk {
                name: d.label.clone(),
                size_bytes: d.capacity_bytes,
                path: d.file.clone(),
                // Read through the datastore or VDDK as bytes, never as an image file.
                format: None,
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| Nic {
                name: n.label.clone(),
                network: n.network.clone(),
                mac: n.mac.clone(),
                ips: vm.ip.iter().cloned().collect(),
            })
            .collect(),
        // PVSCSI or LSI Logic disks, VMXNET3 or E1000 NICs: never virtio.
        hardware: Some("vmware".into()),
        ..Default::default()
    }
}

/// Guest OSes KVM (and so VME) does not run.
fn unsupported_guest(guest_id: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "darwin", "netware", "os2", "dos", "win31", "win95", "win98", "winMe", "winNT", "vmkernel",
    ];
    PREFIXES.iter().any(|p| guest_id.starts_with(p))
}

/// What stands between this VM and a migration, each with its fix. Empty: ready.
pub fn problems(vm: &Vm) -> Vec<String> {
    let mut out = vec![];
    if vm.template {
        out.push("it is a template: convert it to a VM first".to_string());
    }
    if vm.encrypted {
        out.push("it is encrypted (VM encryption): its disks cannot be read outside vSphere; decrypt it first (VM policies > edit VM storage policies > a policy without encryption)".to_string());
    }
    if let Some(id) = vm.guest_id.as_deref().filter(|id| unsupported_guest(id)) {
        out.push(format!(
            "its guest OS ({id}) does not run on KVM/VME: rebuild the workload on a supported OS"
        ));
    }
    if !vm.cbt {
        out.push(format!("changed block tracking is off: enable it with `ferry source fix SOURCE enable-cbt {}` (or in vSphere: ctkEnabled = TRUE, then take and delete one snapshot so it starts), or every delta reads whole disks", vm.name));
    }
    if vm
        .snapshots
        .iter()
        .any(|(_, n)| !n.starts_with(sync::SNAPSHOT_PREFIX))
    {
        out.push(
            "it has snapshots: delete or consolidate them before migrating (Ferry takes its own)"
                .into(),
        );
    }
    for d in &vm.disks {
        if d.mode
            .as_deref()
            .is_some_and(|m| m.starts_with("independent"))
        {
            out.push(format!(
                "{} is independent ({}): snapshots do not cover it; make it dependent",
                d.label,
                d.mode.as_deref().unwrap_or_default()
            ));
        }
        if d.backing.contains("RawDisk") {
            out.push(format!(
                "{} is a raw device mapping: migrate it as a volume separately or convert it to a virtual disk",
                d.label
            ));
        }
        if let Some(s) = &d.sharing {
            out.push(format!(
                "{} is shared ({s}): shared disks cannot be snapshotted; detach it or migrate the cluster differently",
                d.label
            ));
        }
    }
    out
}

#[async_trait]
impl SourceAdapter for VsphereSource {
    async fn fix(
        &self,
        source: &Source,
        secrets: &Secrets,
        fix: &str,
        workloads: &[String],
    ) -> AResult<Vec<String>> {
        match fix {
            "enable-cbt" => enable_change_tracking(source, secrets, workloads).await,
            other => Err(AdapterError::permanent(format!(
                "no fix '{other}' for vSphere sources (there is: enable-cbt)"
            ))),
        }
    }

    async fn discover(&self, source: &Source, secrets: &Secrets) -> AResult<Vec<NewWorkload>> {
        let c = session(source, secrets).await?;
        let inv = c.inventory().await.map_err(err);
        let _ = c.logout().await;
        Ok(inv?
            .vms
            .iter()
            .filter(|v| !v.template)
            .map(|v| workload(v, source))
            .collect())
    }

    async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        let (c, vm) = self.vm(ctx).await?;
        // Snapshots of an earlier sync that could not remove them (vCenter was
        // unreachable, the appliance died): Ferry's own, so they go now.
        let r = sync::remove_stale_snapshots(&c, &vm).await;
        let _ = c.logout().await;
        r?;
        let mut p = problems(&vm);
        // What cutover needs in the guest: services to stop need VMware Tools and a guest
        // account; cutover would refuse without them, after the first syncs.
        let mut services = ctx.profile.spec.services_to_stop.clone();
        services.extend(ctx.workload.services.iter().cloned());
        let tools = vm.tools.as_deref() == Some("guestToolsRunning");
        if !services.is_empty() {
            if !tools {
                p.push(format!(
                    "cutover must stop services ({}) but VMware Tools are not running in it: start them (or install open-vm-tools), or remove the services from the workload and profile",
                    services.join(", ")
                ));
            }
            if ctx.secrets.get(GUEST_USERNAME).is_none()
                || ctx.secrets.get(GUEST_PASSWORD).is_none()
            {
                p.push(format!(
                    "cutover must stop services ({}) but no guest account is set: create a credential for a guest user and set the source's config.guest_credential_id",
                    services.join(", ")
                ));
            }
        } else if !tools {
            tracing::warn!(vm = %vm.name, "VMware Tools are not running: cutover cannot shut the guest down cleanly and will power it off");
        }
        if !p.is_empty() {
            let source = ctx
                .source
                .as_ref()
                .map(|s| s.name.as_str())
                .unwrap_or("SOURCE");
            return Err(AdapterError::permanent(format!(
                "VM '{}' is not ready to migrate: {}",
                vm.name,
                p.join("; ").replace(
                    "ferry source fix SOURCE",
                    &format!("ferry source fix {source}")
                )
            )));
        }
        Ok(())
    }

    async fn open_disks(&self, ctx: &StepContext, full: bool) -> AResult<Vec<SourceDisk>> {
        let (c, vm) = self.vm(ctx).await?;
        let (disks, open) = sync::open(&c, &vm, ctx, full).await?;
        self.open
            .lock()
            .expect("open syncs")
            .insert(ctx.migration.id, (c, open));
        Ok(disks)
    }

    async fn close_disks(
        &self,
        ctx: &StepContext,
        _disks: &[SourceDisk],
        committed: bool,
    ) -> AResult<()> {
        let Some((c, open)) = self
            .open
            .lock()
            .expect("open syncs")
            .remove(&ctx.migration.id)
        else {
            return Ok(());
        };
        let r = sync::close(&c, open, ctx, committed).await;
        let _ = c.logout().await;
        r
    }

    async fn stop_services(&self, ctx: &StepContext, services: &[String]) -> AResult<()> {
        if services.is_empty() {
            return Ok(());
        }
        let (c, vm) = self.vm(ctx).await?;
        let r = power::stop_services(&c, &vm, ctx, services).await;
        let _ = c.logout().await;
        r
    }

    async fn guest_command(&self, ctx: &StepContext, command: &str) -> AResult<String> {
        let (c, vm) = self.vm(ctx).await?;
        let r = power::guest_command(&c, &vm, ctx, command).await;
        let _ = c.logout().await;
        r
    }

    async fn shutdown(&self, ctx: &StepContext) -> AResult<()> {
        let (c, vm) = self.vm(ctx).await?;
        let r = power::shutdown(&c, &vm, ctx).await;
        let _ = c.logout().await;
        r
    }

    async fn restart(&self, ctx: &StepContext) -> AResult<()> {
        let (c, vm) = self.vm(ctx).await?;
        let r = c.power_on(&vm.moref).await.map_err(err);
        let _ = c.logout().await;
        r
    }
}

impl VsphereSource {
    /// A session and the workload's VM.
    async fn vm(&self, ctx: &StepContext) -> AResult<(Client, Vm)> {
        let source = ctx.source.as_ref().ok_or_else(|| {
            AdapterError::permanent(format!("workload '{}' has no source", ctx.workload.name))
        })?;
        let c = session(source, &ctx.secrets).await?;
        let inv = match c.inventory().await {
            Ok(i) => i,
            Err(e) => {
                let _ = c.logout().await;
                return Err(err(e));
            }
        };
        match inv.vms.into_iter().find(|v| v.name == ctx.workload.name) {
            Some(vm) => Ok((c, vm)),
            None => {
                let _ = c.logout().await;
                Err(AdapterError::permanent(format!(
                    "vCenter has no VM '{}': run `ferry source discover {}`",
                    ctx.workload.name, source.name
                )))
            }
        }
    }
}

/// Turns changed block tracking on for the VMs named (the fix pre-flight offers), and
/// cycles a snapshot so that tracking starts. Returns what was done, per VM.
pub async fn enable_change_tracking(
    source: &Source,
    secrets: &Secrets,
    vms: &[String],
) -> AResult<Vec<String>> {
    let c = session(source, secrets).await?;
    let r = async {
        let inv = c.inventory().await.map_err(err)?;
        let mut done = vec![];
        for name in vms {
            let vm =
                inv.vms.iter().find(|v| &v.name == name).ok_or_else(|| {
                    AdapterError::permanent(format!("vCenter has no VM '{name}'"))
                })?;
            if vm.cbt {
                done.push(format!("{name}: changed block tracking was already on"));
                continue;
            }
            c.enable_change_tracking(&vm.moref).await.map_err(err)?;
            // Tracking starts at the next stun: a snapshot taken and removed at once.
            let snap = c
                .create_snapshot(
                    &vm.moref,
                    sync::SNAPSHOT_PREFIX,
                    "Ferry: starts changed block tracking",
                    false,
                )
                .await
                .map_err(err)?;
            c.remove_snapshot(&snap).await.map_err(err)?;
            done.push(format!("{name}: changed block tracking enabled"));
        }
        Ok(done)
    }
    .await;
    let _ = c.logout().await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_vsphere::VmDisk;

    #[test]
    fn problems_name_the_fix() {
        let mut vm = Vm {
            name: "db01".into(),
            cbt: true,
            ..Default::default()
        };
        assert!(problems(&vm).is_empty());
        // Ferry's own leftover snapshot is not a problem: the sync removes it.
        vm.has_snapshots = true;
        vm.snapshots = vec![("snapshot-1".into(), "ferry-sync-0a1b".into())];
        assert!(problems(&vm).is_empty());
        vm.cbt = false;
        vm.snapshots
            .push(("snapshot-2".into(), "before patching".into()));
        vm.disks.push(VmDisk {
            label: "Hard disk 2".into(),
            mode: Some("independent_persistent".into()),
            backing: "VirtualDiskRawDiskMappingVer1BackingInfo".into(),
            sharing: Some("sharingMultiWriter".into()),
            ..Default::default()
        });
        let p = problems(&vm).join("\n");
        assert!(p.contains("changed block tracking is off"), "{p}");
        assert!(p.contains("it has snapshots"), "{p}");
        assert!(p.contains("Hard disk 2 is independent"), "{p}");
        assert!(p.contains("raw device mapping"), "{p}");
        assert!(p.contains("is shared (sharingMultiWriter)"), "{p}");
        vm.encrypted = true;
        vm.guest_id = Some("darwin19_64Guest".into());
        let p = problems(&vm).join("\n");
        assert!(p.contains("it is encrypted"), "{p}");
        assert!(p.contains("(darwin19_64Guest) does not run on KVM"), "{p}");
        vm.guest_id = Some("ubuntu64Guest".into());
        assert!(!problems(&vm).join("\n").contains("does not run"));
    }
}
