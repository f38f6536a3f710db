//! Writes that bypass the page cache (`O_DIRECT`), for the first generation of a target.
//!
//! A full copy writes gigabytes the receiver never reads back. Through the page cache each
//! byte is copied into a freshly allocated page (on a virtual machine whose host takes
//! back free memory, every new page is a fault into the host), the connections' writers
//! queue on the file's lock while one of them copies, and the checkpoints then wait for
//! all of it to be written back. Written directly, the bytes go from one reused, aligned
//! buffer to the disk, and a checkpoint's flush only has the disk's cache left to empty.
//!
//! Direct I/O needs the offset, the length and the buffer aligned to the disk's block. A
//! run that is not (the last chunk of a disk whose size is not a multiple of 4 KiB) is
//! written through the page cache; a file system that refuses direct I/O gets every
//! write through the page cache, as before.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Alignment every direct write keeps: the largest logical block size in use.
const ALIGN: usize = 4096;

/// Aligned buffers kept for reuse: about one per connection writing at a time.
const SPARE_BUFFERS: usize = 8;

/// A second descriptor of a target, opened for direct writes.
pub(crate) struct DirectWriter {
    file: File,
    /// Cleared when the file system refuses a direct write: from then on, none is tried.
    usable: AtomicBool,
    spare: Mutex<Vec<Vec<u8>>>,
}

impl DirectWriter {
    /// Opens `path` for direct writes; `None` where the file system has no direct I/O.
    pub(crate) fn open(path: &Path) -> Option<DirectWriter> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| tracing::debug!(path = %path.display(), "no direct I/O: {e}"))
            .ok()?;
        Some(DirectWriter {
            file,
            usable: AtomicBool::new(true),
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Writes `bufs`, back to back, at `offset` directly. Returns `false` when the run is
    /// to go through the page cache instead, all of it (a direct write refused part-way
    /// through is simply written again by the caller).
    pub(crate) fn write(&self, bufs: &[IoSlice<'_>], offset: u64) -> std::io::Result<bool> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !self.usable.load(Ordering::Relaxed)
            || len == 0
            || !offset.is_multiple_of(ALIGN as u64)
            || !len.is_multiple_of(ALIGN)
        {
            return Ok(false);
        }
        // The received bytes sit after frame headers, unaligned: one copy into an aligned
        // buffer (reused, so its pages are mapped already) replaces the copy into the page
        // cache.
        let mut buf = self.spare.lock().unwrap().pop().unwrap_or_default();
        if buf.len() < len + ALIGN {
            buf = vec![0u8; len + ALIGN];
        }
        let start = buf.as_ptr().align_offset(ALIGN);
        let aligned = &mut buf[start..start + len];
        let mut at = 0;
        for b in bufs {
            aligned[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        let result = self.file.write_all_at(aligned, offset);
        {
            let mut spare = self.spare.lock().unwrap();
            if spare.len() < SPARE_BUFFERS {
                spare.push(buf);
            }
        }
        match result {
            Ok(()) => Ok(true),
            // Alignment or a file system without direct I/O for this file: the page cache
            // takes this write and every later one.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("direct write refused ({e}): writing through the page cache");
                self.usable.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether direct writes are still in use.
    #[cfg(test)]
    fn in_use(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_runs_go_direct_and_the_rest_is_left_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let Some(w) = DirectWriter::open(&path) else {
            return; // no direct I/O on this file system: nothing to test
        };
        let a = vec![7u8; 8192];
        let b = vec![9u8; 4096];
        // Unaligned in memory, aligned on disk: written.
        let parts = [IoSlice::new(&a[..]), IoSlice::new(&b[..])];
        assert!(w.write(&parts, 65536).unwrap() || !w.in_use());
        // Unaligned offset or length: left to the caller.
        assert!(!w.write(&[IoSlice::new(&a[..100])], 0).unwrap());
        assert!(!w.write(&[IoSlice::new(&a[..])], 512).unwrap());
        if w.in_use() {
            let mut got = vec![0u8; 12288];
            f.read_exact_at(&mut got, 65536).unwrap();
            assert_eq!(&got[..8192], &a[..]);
            assert_eq!(&got[8192..], &b[..]);
        }
    }
}
