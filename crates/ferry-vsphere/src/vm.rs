//! What Ferry does to a VM: snapshots, changed block tracking on, power.

use std::time::Duration;

use crate::inventory::{parse_disk, snapshot_list};
use crate::props::{prop, prop_text};
use crate::soap::{esc, parse, this, Client};
use crate::{VmDisk, VsphereError};

/// Snapshots of big VMs take a while (quiescing, then the stun).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Consolidating a snapshot after a long sync merges everything the guest wrote meanwhile.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
const TASK_TIMEOUT: Duration = Duration::from_secs(10 * 60);

impl Client {
    /// Takes a snapshot of `vm` without memory; `quiesce` asks VMware Tools to freeze the
    /// guest's file systems first. The snapshot's moref.
    pub async fn create_snapshot(
        &self,
        vm: &str,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<String, VsphereError> {
        let body = format!(
            "{}<name>{}</name><description>{}</description><memory>false</memory><quiesce>{quiesce}</quiesce>",
            this("VirtualMachine", vm),
            esc(name),
            esc(description)
        );
        self.run_task("CreateSnapshot_Task", &body, SNAPSHOT_TIMEOUT)
            .await?
            .ok_or_else(|| VsphereError::BadAnswer {
                call: "CreateSnapshot_Task".into(),
                why: "the task names no snapshot".into(),
            })
    }

    /// Deletes a snapshot (not its children), consolidating the disks.
    pub async fn remove_snapshot(&self, snapshot: &str) -> Result<(), VsphereError> {
        let body = format!(
            "{}<removeChildren>false</removeChildren><consolidate>true</consolidate>",
            this("VirtualMachineSnapshot", snapshot)
        );
        self.run_task("RemoveSnapshot_Task", &body, REMOVE_TIMEOUT)
            .await
            .map(drop)
    }

    /// The VM's snapshots: (moref, name).
    pub async fn snapshots(&self, vm: &str) -> Result<Vec<(String, String)>, VsphereError> {
        let out = self.properties("VirtualMachine", vm, &["snapshot"]).await?;
        let doc = parse("RetrievePropertiesEx", &out)?;
        Ok(prop(&doc, "snapshot")
            .map(snapshot_list)
            .unwrap_or_default())
    }

    /// The disks as the snapshot froze them (their files and change ids).
    pub async fn snapshot_disks(&self, snapshot: &str) -> Result<Vec<VmDisk>, VsphereError> {
        let out = self
            .properties(
                "VirtualMachineSnapshot",
                snapshot,
                &["config.hardware.device"],
            )
            .await?;
        let doc = parse("RetrievePropertiesEx", &out)?;
        Ok(prop(&doc, "config.hardware.device")
            .map(|devices| {
                devices
                    .children()
                    .filter(|d| {
                        d.is_element()
                            && d.attribute((crate::soap::XSI, "type")) == Some("VirtualDisk")
                    })
                    .map(parse_disk)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Turns changed block tracking on. It starts tracking at the VM's next stun: take
    /// and remove a snapshot afterwards (which Ferry's first sync does anyway).
    pub async fn enable_change_tracking(&self, vm: &str) -> Result<(), VsphereError> {
        let body = format!(
            "{}<spec><changeTrackingEnabled>true</changeTrackingEnabled></spec>",
            this("VirtualMachine", vm)
        );
        self.run_task("ReconfigVM_Task", &body, TASK_TIMEOUT)
            .await
            .map(drop)
    }

    /// `poweredOn`, `poweredOff` or `suspended`, and the Tools' running status.
    pub async fn power_and_tools(
        &self,
        vm: &str,
    ) -> Result<(String, Option<String>), VsphereError> {
        let out = self
            .properties(
                "VirtualMachine",
                vm,
                &["runtime.powerState", "guest.toolsRunningStatus"],
            )
            .await?;
        let doc = parse("RetrievePropertiesEx", &out)?;
        Ok((
            prop_text(&doc, "runtime.powerState").unwrap_or_default(),
            prop_text(&doc, "guest.toolsRunningStatus"),
        ))
    }

    pub async fn power_on(&self, vm: &str) -> Result<(), VsphereError> {
        self.run_task("PowerOnVM_Task", &this("VirtualMachine", vm), TASK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Hard power-off (the guest gets no say).
    pub async fn power_off(&self, vm: &str) -> Result<(), VsphereError> {
        self.run_task("PowerOffVM_Task", &this("VirtualMachine", vm), TASK_TIMEOUT)
            .await
            .map(drop)
    }

    /// Asks VMware Tools to shut the guest down; returns at once (watch the power state).
    pub async fn shutdown_guest(&self, vm: &str) -> Result<(), VsphereError> {
        self.call("ShutdownGuest", &this("VirtualMachine", vm))
            .await
            .map(drop)
    }
}
