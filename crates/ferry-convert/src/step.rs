//! The conversion as a migration step sees it: whether a workload's boots are converted,
//! the NICs that replace the source's, and errors and events in the adapters' terms.
//! Shared by every target that converts (the local target, VME image mode).

use std::path::Path;

use ferry_adapter::{AdapterError, BootPrep, StepContext};
use ferry_model::{ConversionMode, SourceKind};

use crate::{GuestNic, Policy, PrepareError, Prepared, Tools};

/// Whether this workload's boots are converted: `required`, or `auto` for a guest that
/// does not run on virtio at its source (every vSphere VM, a QEMU VM on VMware's
/// devices).
pub fn wanted(ctx: &StepContext) -> bool {
    match ctx.profile.spec.conversion {
        ConversionMode::None => false,
        ConversionMode::Required => true,
        ConversionMode::Auto => {
            ctx.source.as_ref().map(|s| s.kind) == Some(SourceKind::Vsphere)
                || matches!(
                    ctx.workload.hardware.as_deref(),
                    Some("vmware") | Some("emulated")
                )
        }
    }
}

/// A MAC for an instance whose source NIC had none recorded: stable per migration.
pub fn made_mac(ctx: &StepContext) -> String {
    let b = ctx.migration.id.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The source's NICs and the ones replacing them: `target_macs[i]` for NIC `i`.
pub fn guest_nics(ctx: &StepContext, target_macs: &[String]) -> Vec<GuestNic> {
    ctx.workload
        .nics
        .iter()
        .zip(target_macs)
        .map(|(n, mac)| GuestNic {
            source_mac: n.mac.as_ref().map(|m| m.to_ascii_lowercase()),
            source_name: Some(n.name.clone()),
            target_mac: mac.to_ascii_lowercase(),
        })
        .collect()
}

/// The policy, and the tools set up for this machine: `kvm` says whether KVM really
/// works here (libguestfs fails at once on a KVM that is present but unusable, instead
/// of falling back).
pub async fn tools(ctx: &StepContext, guestfs_cache: &Path, kvm: bool) -> (Policy, Tools) {
    let policy = if ctx.profile.spec.conversion == ConversionMode::Required {
        Policy::Required
    } else {
        Policy::Auto
    };
    let _ = tokio::fs::create_dir_all(guestfs_cache).await;
    let tools = Tools {
        force_tcg: !kvm,
        cache_dir: Some(guestfs_cache.to_path_buf()),
        ..Tools::default()
    };
    (policy, tools)
}

/// What the engine records of a preparation.
pub fn boot_prep(p: &Prepared) -> BootPrep {
    BootPrep {
        summary: p.summary.clone(),
        converted: p.converted,
        ms: p.ms,
        data: serde_json::json!({
            "converted": p.converted,
            "emulated": p.emulated,
            "report": p.report,
        }),
        warnings: p.warnings.clone(),
    }
}

/// An adapter error for a failed preparation, naming the workload and what to do.
pub fn prepare_error(ctx: &StepContext, e: PrepareError) -> AdapterError {
    match e {
        PrepareError::Required(e) => AdapterError::permanent(format!(
            "the profile requires conversion of workload '{}', and {e}; fix the guest, or set the profile's conversion to \"auto\" or \"none\"",
            ctx.workload.name
        )),
        PrepareError::Failed(e) if e.is_transient() => AdapterError::transient(format!(
            "converting workload '{}': {e}",
            ctx.workload.name
        )),
        PrepareError::Failed(e) => AdapterError::permanent(format!(
            "converting workload '{}': {e}",
            ctx.workload.name
        )),
    }
}

/// Pre-flight for a Windows workload whose boots are converted: refused, with the fix,
/// where the appliance lacks what virt-v2v needs for Windows.
pub fn check_windows(ctx: &StepContext) -> Result<(), AdapterError> {
    let windows = ctx
        .workload
        .os
        .as_deref()
        .is_some_and(|o| o.to_ascii_lowercase().contains("windows"));
    if windows && wanted(ctx) {
        windows_ready(&ctx.workload.name, ctx.workload.os.as_deref())?;
    }
    Ok(())
}

/// Whether this appliance can convert a Windows guest: virt-v2v needs the virtio-win
/// drivers (`VIRTIO_WIN`: an ISO or a directory) and rhsrvany, which Debian does not
/// package. The error names what is missing and what to do.
pub fn windows_ready(workload: &str, os: Option<&str>) -> Result<(), AdapterError> {
    let os = os.unwrap_or("Windows");
    let Some(path) = std::env::var_os("VIRTIO_WIN").map(std::path::PathBuf::from) else {
        return Err(AdapterError::permanent(format!(
            "workload '{workload}' runs {os}: converting Windows needs the virtio-win drivers and rhsrvany; set VIRTIO_WIN in the appliance's environment to the virtio-win ISO or directory (and install rhsrvany under /usr/share/virt-tools), or set the profile's conversion to \"none\""
        )));
    };
    if !path.exists() {
        return Err(AdapterError::permanent(format!(
            "workload '{workload}' runs {os}: VIRTIO_WIN names {}, which does not exist: point it at the virtio-win ISO or directory",
            path.display()
        )));
    }
    let rhsrvany = std::path::Path::new("/usr/share/virt-tools/rhsrvany.exe");
    if !rhsrvany.exists() {
        return Err(AdapterError::permanent(format!(
            "workload '{workload}' runs {os}: {} is missing; virt-v2v needs rhsrvany (from the rhsrvany project) to run its first-boot scripts in Windows",
            rhsrvany.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_windows_guest_without_drivers_is_refused_with_the_fix() {
        // Nothing here sets VIRTIO_WIN or installs rhsrvany.
        let e = windows_ready("dc01", Some("Microsoft Windows Server 2019")).unwrap_err();
        assert!(!e.retryable);
        assert!(
            e.message.contains("VIRTIO_WIN") || e.message.contains("rhsrvany"),
            "{}",
            e.message
        );
    }
}
