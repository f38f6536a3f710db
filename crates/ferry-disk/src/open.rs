//! Opening a disk from what a user typed: a path (raw, or any QEMU format served by a
//! `qemu-nbd` that Ferry starts) or an NBD URI.

use std::path::Path;

use ferry_nbd::{NbdTarget, QemuNbd, QemuNbdOptions};

use crate::{Disk, DiskError, Extent, NbdDisk, RawDisk};

/// How to open a disk.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Image format; `None` = recognise it from the file's header.
    pub format: Option<String>,
    /// Dirty bitmap to read changes from (NBD exports and qcow2 images only).
    pub dirty_bitmap: Option<String>,
    /// Changed areas `(offset, length)` the platform listed (VMware CBT); NBD exports only.
    pub changed_areas: Option<Vec<(u64, u64)>>,
}

/// Either kind of disk, so callers need no generics or boxing.
#[derive(Clone)]
pub enum AnyDisk {
    Raw(RawDisk),
    Nbd(NbdDisk),
}

/// Opens `spec`: an `nbd://` / `nbd+unix://` URI, or a path to an image file or block
/// device.
pub async fn open(spec: &str, opts: &OpenOptions) -> Result<AnyDisk, DiskError> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        let target = NbdTarget::parse_uri(spec).map_err(|source| DiskError::Nbd {
            disk: spec.to_string(),
            source,
        })?;
        let mut disk = NbdDisk::connect(
            spec.to_string(),
            &target,
            opts.dirty_bitmap.as_deref(),
            None,
        )
        .await?;
        if let Some(areas) = &opts.changed_areas {
            disk = disk.with_changed_areas(areas.clone());
        }
        return Ok(AnyDisk::Nbd(disk));
    }
    if opts.changed_areas.is_some() {
        return Err(DiskError::Unsupported(format!(
            "{spec}: a list of changed areas applies to NBD exports only"
        )));
    }
    let path = Path::new(spec);
    let format = match &opts.format {
        Some(f) => f.clone(),
        None => sniff_format(path)?,
    };
    if format == "raw" {
        if let Some(bitmap) = &opts.dirty_bitmap {
            return Err(DiskError::Unsupported(format!(
                "{spec}: a raw image carries no dirty bitmap ({bitmap:?}); use a qcow2 image or an NBD export that serves the bitmap, or sync without --dirty-bitmap (hash compare)"
            )));
        }
        return Ok(AnyDisk::Raw(RawDisk::open(path)?));
    }
    let server = QemuNbd::start(
        path,
        QemuNbdOptions {
            format: Some(format),
            read_only: true,
            bitmap: opts.dirty_bitmap.clone(),
            ..Default::default()
        },
    )
    .await
    .map_err(|source| DiskError::Nbd {
        disk: spec.to_string(),
        source,
    })?;
    let target = server.target();
    let disk = NbdDisk::connect(
        spec.to_string(),
        &target,
        opts.dirty_bitmap.as_deref(),
        Some(server),
    )
    .await?;
    Ok(AnyDisk::Nbd(disk))
}

/// Recognises the common image formats from their magic; anything else is raw. Cheaper
/// than asking `qemu-img info`, and works where QEMU is not installed.
pub fn sniff_format(path: &Path) -> Result<String, DiskError> {
    use std::io::Read;
    let io = |source| DiskError::Io {
        disk: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 64];
    let n = f.read(&mut head).map_err(io)?;
    let head = &head[..n];
    let format = if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        "vmdk"
    } else if head.starts_with(b"vhdxfile") {
        "vhdx"
    } else if head.starts_with(b"conectix") {
        "vpc"
    } else {
        "raw"
    };
    Ok(format.to_string())
}

impl Disk for AnyDisk {
    fn name(&self) -> &str {
        match self {
            AnyDisk::Raw(d) => d.name(),
            AnyDisk::Nbd(d) => d.name(),
        }
    }

    fn size(&self) -> u64 {
        match self {
            AnyDisk::Raw(d) => d.size(),
            AnyDisk::Nbd(d) => d.size(),
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.read_at(offset, len).await,
            AnyDisk::Nbd(d) => d.read_at(offset, len).await,
        }
    }

    async fn read_into(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.read_into(offset, len, buf).await,
            AnyDisk::Nbd(d) => d.read_into(offset, len, buf).await,
        }
    }

    fn reads_block(&self) -> bool {
        match self {
            AnyDisk::Raw(d) => d.reads_block(),
            AnyDisk::Nbd(d) => d.reads_block(),
        }
    }

    fn read_blocking(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.read_blocking(offset, len, buf),
            AnyDisk::Nbd(d) => d.read_blocking(offset, len, buf),
        }
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.extents(offset, len).await,
            AnyDisk::Nbd(d) => d.extents(offset, len).await,
        }
    }

    async fn changed_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<Extent>>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.changed_extents(offset, len).await,
            AnyDisk::Nbd(d) => d.changed_extents(offset, len).await,
        }
    }

    fn tracks_changes(&self) -> bool {
        match self {
            AnyDisk::Raw(d) => d.tracks_changes(),
            AnyDisk::Nbd(d) => d.tracks_changes(),
        }
    }
}
