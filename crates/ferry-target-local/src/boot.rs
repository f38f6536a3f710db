//! What an instance boots from: the synced disks as they are, or — when the guest must be
//! converted for KVM — the overlays `ferry_convert::prepare` made above them (above a
//! copy of the last complete sync for a test instance, since replication goes on into
//! the originals; above the synced disks themselves for production). A rollback deletes
//! the overlays and leaves nothing converted behind.

use std::path::{Path, PathBuf};

use ferry_adapter::{AResult, BootPrep, StepContext};
use ferry_convert::step::{boot_prep, guest_nics, made_mac, prepare_error, tools, wanted};
use ferry_convert::{BootRequest, GuestDisk, ImageFormat, Prepared};
use ferry_qemu::Hardware;

/// The hardware an instance of `p` boots on.
pub(crate) fn hardware(p: &Prepared) -> Hardware {
    if p.emulated {
        Hardware::Emulated
    } else {
        Hardware::Virtio
    }
}

/// Prepares `dir` to boot the qcow2 `bases` (disk name, synced image), converted.
pub(crate) async fn prepare(
    ctx: &StepContext,
    dir: &Path,
    bases: Vec<(String, PathBuf)>,
    copy_first: bool,
    guestfs_cache: &Path,
) -> AResult<Option<BootPrep>> {
    if !wanted(ctx) {
        return Ok(None);
    }
    let mac = ctx
        .workload
        .nics
        .first()
        .and_then(|n| n.mac.clone())
        .unwrap_or_else(|| made_mac(ctx));
    let kvm = ferry_qemu::detect_accel().await == ferry_qemu::Accel::Kvm;
    let (policy, tools) = tools(ctx, guestfs_cache, kvm).await;
    let req = BootRequest {
        name: ctx.workload.name.clone(),
        bases: bases
            .into_iter()
            .map(|(n, path)| {
                (
                    n,
                    GuestDisk {
                        path,
                        format: ImageFormat::Qcow2,
                    },
                )
            })
            .collect(),
        copy_first,
        // The local target gives an instance one NIC.
        nics: guest_nics(ctx, &[mac]),
        dir: dir.to_path_buf(),
        policy,
    };
    let p = ferry_convert::prepare(&tools, &req)
        .await
        .map_err(|e| prepare_error(ctx, e))?;
    Ok(Some(boot_prep(&p)))
}

/// The preparation finished in `dir`, if any.
pub(crate) fn load(dir: &Path) -> Option<Prepared> {
    Prepared::load(dir)
}
