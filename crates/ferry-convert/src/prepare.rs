//! What an instance boots from when its guest is converted: qcow2 overlays above the
//! synced disks (or above copies of them, when deltas go on into the originals meanwhile)
//! that conversion wrote into, recorded in `boot.json` beside them.
//!
//! The synced generation is never written, so deltas keep applying after a test boot
//! and deleting the directory undoes everything. `boot.json` is written last: a retried
//! step finds a finished preparation and does not convert again; one that died half-way
//! starts over from the intact synced disks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{ConvertError, GuestDisk, GuestNic, ImageFormat, Report, Request, Tools};

pub const BOOT_FILE: &str = "boot.json";

/// What a failed conversion leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// No boot without conversion.
    Required,
    /// A guest the tools cannot convert boots unconverted, on emulated devices, with a
    /// warning.
    Auto,
}

/// A finished preparation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// (disk name, image to boot), in the workload's disk order.
    pub disks: Vec<(String, PathBuf)>,
    pub converted: bool,
    /// Not converted: boot on emulated devices (SATA, e1000e) the guest has drivers for.
    pub emulated: bool,
    /// The MAC of the instance's first NIC.
    pub mac: Option<String>,
    #[serde(default)]
    pub report: Option<Report>,
    pub summary: String,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Time the preparation took.
    pub ms: u64,
}

impl Prepared {
    /// The preparation finished in `dir`, if there is one.
    pub fn load(dir: &Path) -> Option<Prepared> {
        let b = std::fs::read(dir.join(BOOT_FILE)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Static addresses the guest's own configuration holds (each must answer).
    pub fn static_addresses(&self) -> Vec<String> {
        self.report
            .as_ref()
            .map(|r| r.static_addresses())
            .unwrap_or_default()
    }
}

/// What to prepare.
#[derive(Debug, Clone)]
pub struct BootRequest {
    pub name: String,
    /// (disk name, synced image).
    pub bases: Vec<(String, GuestDisk)>,
    /// The bases change while the instance runs (a test boot while deltas go on): the
    /// overlays sit above copies made now.
    pub copy_first: bool,
    pub nics: Vec<GuestNic>,
    pub dir: PathBuf,
    pub policy: Policy,
}

/// Why a boot could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The policy requires conversion and the guest cannot be converted.
    #[error("{0}")]
    Required(ConvertError),
    #[error(transparent)]
    Failed(#[from] ConvertError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ConvertError {
    let path = path.to_path_buf();
    move |source| ConvertError::Io { what, path, source }
}

/// Copies a disk image keeping its holes.
async fn copy_sparse(from: &Path, to: &Path) -> Result<(), ConvertError> {
    let out = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io("running cp for", from))?;
    if !out.status.success() {
        return Err(ConvertError::Failed {
            tool: "cp".into(),
            why: format!(
                "copying {} to {}: {}",
                from.display(),
                to.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            log: to.to_path_buf(),
        });
    }
    Ok(())
}

/// Finds the finished preparation in `req.dir`, or makes one: overlays, conversion, and
/// `boot.json`.
pub async fn prepare(tools: &Tools, req: &BootRequest) -> Result<Prepared, PrepareError> {
    if let Some(mut p) = Prepared::load(&req.dir) {
        p.ms = 0;
        return Ok(p);
    }
    let started = Instant::now();
    match tokio::fs::remove_dir_all(&req.dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("clearing", &req.dir)(e).into())
        }
        _ => {}
    }
    tokio::fs::create_dir_all(&req.dir)
        .await
        .map_err(io("creating", &req.dir))?;
    let mut disks = vec![];
    let mut boot_disks = vec![];
    for (i, (name, base)) in req.bases.iter().enumerate() {
        let base = if req.copy_first {
            let copy = req.dir.join(format!("disk{i}.base.{}", base.format));
            copy_sparse(&base.path, &copy).await?;
            GuestDisk {
                path: copy,
                format: base.format,
            }
        } else {
            base.clone()
        };
        let overlay = req.dir.join(format!("disk{i}.qcow2"));
        crate::create_overlay(&base, &overlay).await?;
        disks.push(GuestDisk {
            path: overlay.clone(),
            format: ImageFormat::Qcow2,
        });
        boot_disks.push((name.clone(), overlay));
    }
    let creq = Request {
        name: req.name.clone(),
        disks,
        nics: req.nics.clone(),
        work_dir: req.dir.join("conversion"),
    };
    let mac = req.nics.first().map(|n| n.target_mac.clone());
    let mut p = match crate::convert(tools, &creq).await {
        Ok(report) => {
            let mut summary = format!(
                "converted {} to boot on virtio in {:.1} s (inspection {:.1} s, network {:.1} s, virt-v2v {:.1} s)",
                report.inspection.summary(),
                started.elapsed().as_secs_f64(),
                report.inspect_ms as f64 / 1000.0,
                report.network_ms as f64 / 1000.0,
                report.convert_ms as f64 / 1000.0,
            );
            if !report.pinned.is_empty() {
                let pins: Vec<String> = report
                    .pinned
                    .iter()
                    .map(|p| format!("{} → {}", p.name, p.target_mac))
                    .collect();
                summary.push_str(&format!("; NIC names kept: {}", pins.join(", ")));
            }
            Prepared {
                disks: boot_disks,
                converted: true,
                emulated: false,
                mac,
                warnings: report.warnings.clone(),
                report: Some(report),
                summary,
                ms: 0,
            }
        }
        Err(ConvertError::NotConvertible { why }) if req.policy == Policy::Auto => Prepared {
            disks: boot_disks,
            converted: false,
            emulated: true,
            mac,
            report: None,
            summary: "not converted: booting with emulated devices".into(),
            warnings: vec![format!(
                "workload '{}' cannot be converted ({why}): it boots unconverted with emulated devices (SATA disks, an e1000e NIC), slower than virtio; set the profile's conversion to \"none\" to boot it on virtio as synced",
                req.name
            )],
            ms: 0,
        },
        Err(e @ ConvertError::NotConvertible { .. }) => return Err(PrepareError::Required(e)),
        Err(e) => return Err(e.into()),
    };
    p.ms = started.elapsed().as_millis() as u64;
    let json = serde_json::to_vec_pretty(&p).expect("a preparation serializes");
    let tmp = req.dir.join(format!("{BOOT_FILE}.tmp"));
    tokio::fs::write(&tmp, json)
        .await
        .map_err(io("writing", &tmp))?;
    tokio::fs::rename(&tmp, req.dir.join(BOOT_FILE))
        .await
        .map_err(io("writing", &req.dir))?;
    Ok(p)
}

/// Tools conversion needs that are not on `PATH`.
pub fn missing_tools() -> Vec<&'static str> {
    [
        "virt-v2v-in-place",
        "virt-v2v-inspector",
        "guestfish",
        "qemu-img",
    ]
    .into_iter()
    .filter(|t| {
        !std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false)
    })
    .collect()
}
