//! Disk access: one small interface over "a disk" — its size, reading at an offset,
//! which ranges hold data, and (where the platform tracks it) which ranges changed since
//! a checkpoint.
//!
//! Two implementations: [`RawDisk`] reads raw files and block devices directly (pread,
//! SEEK_DATA/SEEK_HOLE), and [`NbdDisk`] reads any NBD export — and through a `qemu-nbd`
//! that Ferry starts itself, every image format QEMU knows (qcow2, vmdk, vhdx, ...).
//! [`open`] picks the right one from a path or an `nbd://` / `nbd+unix://` URI; it never
//! lets bytes a guest wrote decide to read another file of this host (see [`open`]'s
//! module for the rule).

mod extent;
mod nbd;
mod open;
pub mod qemu_img;
mod raw;

use std::future::Future;
use std::time::Duration;

pub use extent::{Extent, ExtentKind};
pub use nbd::NbdDisk;
pub use open::{check_format, open, recognise_format, sniff_format, AnyDisk, OpenOptions, FORMATS};
pub use raw::RawDisk;

/// Errors of disk access, each naming the disk it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{disk}: {source}")]
    Io {
        disk: String,
        source: std::io::Error,
    },
    #[error("{disk}: {source}")]
    Nbd {
        disk: String,
        source: ferry_nbd::NbdError,
    },
    #[error("{disk}: read past the end (offset {offset}, length {len}, disk size {size})")]
    OutOfRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{disk}: no dirty bitmap {bitmap:?} is exported (start the export with that bitmap, e.g. `qemu-nbd -B {bitmap}`, or sync without --dirty-bitmap)")]
    NoBitmap { disk: String, bitmap: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{disk}: {source}")]
    QemuImg {
        disk: String,
        source: qemu_img::QemuImgError,
    },
    /// The header says `format`, and opening the image as that would read another file:
    /// a guest may have written such a header into its raw disk to make Ferry read a file
    /// of this host.
    #[error("{disk}: refusing to guess its format: its header says {format} and names the {kind} {name:?}, which opening it as {format} would read (a guest controls its disk's bytes and may have written that header into a raw disk). State the format with --format {choices}: --format raw copies the file as it is; --format {format} only if you trust the image and the file it names", choices = open::format_choices())]
    GuessRefused {
        disk: String,
        format: String,
        kind: qemu_img::ReferenceKind,
        name: String,
    },
    #[error("{disk}: unknown image format {format:?}; state one of --format {choices}", choices = open::format_choices())]
    UnknownFormat { disk: String, format: String },
    #[error("{disk}: {what} did not finish within {} s", .timeout.as_secs())]
    TimedOut {
        disk: String,
        what: String,
        timeout: Duration,
    },
}

impl DiskError {
    /// Whether trying again cannot help: what the disk or the request is, not a passing
    /// failure of a link or a server.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DiskError::GuessRefused { .. }
                | DiskError::UnknownFormat { .. }
                | DiskError::Unsupported(_)
                | DiskError::NoBitmap { .. }
        )
    }
}

/// A disk Ferry can read. Offsets and lengths are in bytes.
pub trait Disk: Send + Sync {
    /// A name for messages (a path or a URI).
    fn name(&self) -> &str;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`. Reading past the end is an error.
    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = Result<Vec<u8>, DiskError>> + Send;

    /// Like [`Disk::read_at`], reusing `buf`'s memory: a scan of a whole disk then
    /// touches the same pages again instead of faulting in new ones for every read.
    fn read_into(
        &self,
        offset: u64,
        len: usize,
        buf: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, DiskError>> + Send {
        drop(buf);
        self.read_at(offset, len)
    }

    /// Whether [`Disk::read_blocking`] works: reads are plain blocking system calls
    /// (raw files and devices), not requests over a connection.
    fn reads_block(&self) -> bool {
        false
    }

    /// [`Disk::read_into`] on the calling thread, where [`Disk::reads_block`]. A caller
    /// that is on a blocking thread anyway (to hash what it reads) skips a hop to another
    /// thread and back for every read: on a scan of a whole disk, thousands of them.
    fn read_blocking(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        let _ = (offset, len, buf);
        Err(DiskError::Unsupported(format!(
            "{}: no blocking reads",
            self.name()
        )))
    }

    /// Which parts of [offset, offset+len) hold data and which are known to read as
    /// zeros. Contiguous and in order; may end before offset+len (ask again from there).
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, DiskError>> + Send;

    /// The ranges changed since the checkpoint the disk was opened with (a dirty bitmap or
    /// CBT), or `None` when this disk tracks no changes.
    fn changed_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Option<Vec<Extent>>, DiskError>> + Send;

    /// Whether [`Disk::changed_extents`] answers.
    fn tracks_changes(&self) -> bool;
}
