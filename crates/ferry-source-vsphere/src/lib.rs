//! The VMware vSphere source, agentless, through vCenter's API.
//!
//! Source: `kind: vsphere`, `endpoint: https://vcenter`, `credential_id`: the vCenter
//! account. Config: `ca_bundle` (PEM of vCenter's CA), `insecure` (a lab only).
//! Workloads are VMs by name; disks are named by their label (`Hard disk 1`) with the
//! VMDK path as `path`; NICs carry their port group as the network.
//!
//! Discovery and pre-flight checks work today. Syncs (snapshot, disk reads with CBT) are
//! not built yet: `open_disks` says so instead of pretending.

use async_trait::async_trait;
use ferry_adapter::{
    AResult, AdapterError, Secrets, SourceAdapter, SourceDisk, StepContext, SOURCE_PASSWORD,
    SOURCE_USERNAME,
};
use ferry_model::{Disk, NewWorkload, Nic, Source};
use ferry_vsphere::{Client, ClientOptions, Vm, VsphereError};

#[derive(Default)]
pub struct VsphereSource;

fn err(e: VsphereError) -> AdapterError {
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
        ..Default::default()
    }
}

/// What stands between this VM and a migration, each with its fix. Empty: ready.
pub fn problems(vm: &Vm) -> Vec<String> {
    let mut out = vec![];
    if vm.template {
        out.push("it is a template: convert it to a VM first".to_string());
    }
    if !vm.cbt {
        out.push("changed block tracking is off: enable it (VM options > advanced > ctkEnabled = TRUE, or ReconfigVM with changeTrackingEnabled) and take and delete one snapshot so it starts, or deltas read whole disks".into());
    }
    if vm.has_snapshots {
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
        let source = ctx.source.as_ref().ok_or_else(|| {
            AdapterError::permanent(format!("workload '{}' has no source", ctx.workload.name))
        })?;
        let c = session(source, &ctx.secrets).await?;
        let inv = c.inventory().await.map_err(err);
        let _ = c.logout().await;
        let inv = inv?;
        let vm = inv
            .vms
            .iter()
            .find(|v| v.name == ctx.workload.name)
            .ok_or_else(|| {
                AdapterError::permanent(format!(
                    "vCenter has no VM '{}': run `ferry source discover {}`",
                    ctx.workload.name, source.name
                ))
            })?;
        if vm.tools.as_deref() != Some("guestToolsRunning") {
            tracing::warn!(vm = %vm.name, "VMware Tools are not running: cutover cannot stop services or shut the guest down cleanly");
        }
        let p = problems(vm);
        if !p.is_empty() {
            return Err(AdapterError::permanent(format!(
                "VM '{}' is not ready to migrate: {}",
                vm.name,
                p.join("; ")
            )));
        }
        Ok(())
    }

    async fn open_disks(&self, ctx: &StepContext, _full: bool) -> AResult<Vec<SourceDisk>> {
        Err(AdapterError::permanent(format!(
            "syncing VM '{}' from vSphere is not available in this version (discovery and pre-flight are)",
            ctx.workload.name
        )))
    }

    async fn close_disks(
        &self,
        _ctx: &StepContext,
        _disks: &[SourceDisk],
        _committed: bool,
    ) -> AResult<()> {
        Ok(())
    }

    async fn stop_services(&self, ctx: &StepContext, _services: &[String]) -> AResult<()> {
        Err(AdapterError::permanent(format!(
            "stopping services of '{}' through VMware Tools is not available in this version",
            ctx.workload.name
        )))
    }

    async fn guest_command(&self, ctx: &StepContext, _command: &str) -> AResult<String> {
        Err(AdapterError::permanent(format!(
            "guest commands in '{}' through VMware Tools are not available in this version",
            ctx.workload.name
        )))
    }

    async fn shutdown(&self, ctx: &StepContext) -> AResult<()> {
        Err(AdapterError::permanent(format!(
            "shutting down '{}' through vCenter is not available in this version",
            ctx.workload.name
        )))
    }

    async fn restart(&self, ctx: &StepContext) -> AResult<()> {
        Err(AdapterError::permanent(format!(
            "powering on '{}' through vCenter is not available in this version",
            ctx.workload.name
        )))
    }
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
        vm.cbt = false;
        vm.has_snapshots = true;
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
    }
}
