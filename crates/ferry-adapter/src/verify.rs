//! Final validation's disk check: each disk of the target holds the bytes its source disk
//! holds once the source is off. Shared by the targets whose synced disks are files of
//! this appliance; it reads both sides with their formats stated, never guessed.

use std::path::Path;

use ferry_disk::qemu_img::{self, Image};

use crate::{AResult, AdapterError, SourceDisk};

/// The format a source disk is read as: an NBD export is raw bytes; a file has the format
/// its source adapter recorded, or one recognised the checked way (a header naming
/// another file is refused).
pub async fn source_format(d: &SourceDisk) -> AResult<String> {
    if d.spec.starts_with("nbd://") || d.spec.starts_with("nbd+unix://") {
        return Ok("raw".into());
    }
    if let Some(f) = &d.format {
        return Ok(f.clone());
    }
    ferry_disk::recognise_format(Path::new(&d.spec))
        .await
        .map_err(|e| {
            let m = format!(
                "reading disk '{}' of the source to validate it: {e}",
                d.name
            );
            if e.is_permanent() {
                AdapterError::permanent(m)
            } else {
                AdapterError::transient(m)
            }
        })
}

/// Compares source disk `src` with the target's synced copy `target` (format
/// `target_format`); a difference is a permanent failure naming the disk, both sides and
/// the first offset that differs.
pub async fn disk_matches_source(
    src: &SourceDisk,
    target: &Path,
    target_format: &str,
) -> AResult<()> {
    let format = source_format(src).await?;
    let target_spec = target.to_string_lossy();
    let differs = qemu_img::compare(
        Image {
            spec: &src.spec,
            format: &format,
        },
        Image {
            spec: &target_spec,
            format: target_format,
        },
        qemu_img::compare_timeout(src.size_bytes),
    )
    .await
    .map_err(|e| {
        AdapterError::transient(format!(
            "comparing disk '{}' of the source with {}: {e}",
            src.name,
            target.display()
        ))
    })?;
    match differs {
        None => Ok(()),
        Some(at) => Err(AdapterError::permanent(format!(
            "data check failed: disk '{}' on the target ({}) differs from the source ({}){}: the target does not hold the source's disk as it stopped; roll the migration back and cut over again",
            src.name,
            target.display(),
            src.spec,
            at.map(|o| format!(" from offset {o}")).unwrap_or_default()
        ))),
    }
}
