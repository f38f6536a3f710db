//! Raw files and block devices, read with pread and mapped with SEEK_DATA/SEEK_HOLE.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::extent::coalesce;
use crate::{Disk, DiskError, Extent, ExtentKind};

/// A raw image file or block device.
#[derive(Clone)]
pub struct RawDisk {
    name: String,
    file: Arc<File>,
    size: u64,
}

impl RawDisk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let name = path.display().to_string();
        let io = |source| DiskError::Io {
            disk: name.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = device_or_file_size(&file).map_err(io)?;
        Ok(Self {
            name,
            file: Arc::new(file),
            size,
        })
    }

    fn io(&self, source: std::io::Error) -> DiskError {
        DiskError::Io {
            disk: self.name.clone(),
            source,
        }
    }

    /// Blocking read into a new buffer, without first zeroing it (that would cost as much
    /// as the read itself).
    pub fn read_into_blocking(
        &self,
        offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, DiskError> {
        if offset.saturating_add(len as u64) > self.size {
            return Err(DiskError::OutOfRange {
                disk: self.name.clone(),
                offset,
                len: len as u64,
                size: self.size,
            });
        }
        buf.clear();
        buf.reserve(len);
        let fd = self.file.as_raw_fd();
        while buf.len() < len {
            let done = buf.len();
            // SAFETY: pread writes at most `len - done` bytes into the spare capacity,
            // and only the bytes it reports are marked initialised.
            let n = unsafe {
                libc::pread(
                    fd,
                    buf.as_mut_ptr().add(done) as *mut libc::c_void,
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io(err));
            }
            if n == 0 {
                return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            unsafe { buf.set_len(done + n as usize) };
        }
        Ok(buf)
    }

    /// Blocking extent map from SEEK_DATA / SEEK_HOLE. Where the filesystem or device
    /// cannot answer, everything is data (correct, only slower).
    pub fn extents_blocking(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        let end = offset.saturating_add(len).min(self.size);
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    // No data from here to the end of the file.
                    Some(libc::ENXIO) => {
                        out.push(zero(pos, end - pos));
                        break;
                    }
                    // SEEK_DATA unsupported here: treat as all data.
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        out.push(data_ext(pos, end - pos));
                        break;
                    }
                    _ => return Err(self.io(err)),
                }
            }
            let data = (data as u64).min(end);
            if data > pos {
                out.push(zero(pos, data - pos));
            }
            if data >= end {
                break;
            }
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            out.push(data_ext(data, hole - data));
            pos = hole;
        }
        Ok(coalesce(out))
    }
}

fn zero(offset: u64, length: u64) -> Extent {
    Extent {
        offset,
        length,
        kind: ExtentKind::Zero,
    }
}

fn data_ext(offset: u64, length: u64) -> Extent {
    Extent {
        offset,
        length,
        kind: ExtentKind::Data,
    }
}

/// The size of a regular file, or of a block device (whose metadata says 0).
pub(crate) fn device_or_file_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file.try_clone()?;
    f.seek(std::io::SeekFrom::End(0))
}

impl Disk for RawDisk {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_into_blocking(offset, len, Vec::new()))
            .await
            .map_err(|e| self.io(std::io::Error::other(e)))?
    }

    async fn read_into(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_into_blocking(offset, len, buf))
            .await
            .map_err(|e| self.io(std::io::Error::other(e)))?
    }

    fn reads_block(&self) -> bool {
        true
    }

    fn read_blocking(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        self.read_into_blocking(offset, len, buf)
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.extents_blocking(offset, len))
            .await
            .map_err(|e| self.io(std::io::Error::other(e)))?
    }

    async fn changed_extents(
        &self,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<Vec<Extent>>, DiskError> {
        Ok(None)
    }

    fn tracks_changes(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_file_maps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let disk = RawDisk::open(&path).unwrap();
        let ext = disk.extents_blocking(0, 16 << 20).unwrap();
        let data: u64 = ext
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| e.length)
            .sum();
        // Filesystems may round allocation up, never down.
        assert!((1 << 20..16 << 20).contains(&data), "{ext:?}");
        assert_eq!(ext.last().unwrap().end(), 16 << 20);
        let buf = disk.read_into_blocking(4 << 20, 4096, Vec::new()).unwrap();
        assert_eq!(buf.len(), 4096);
        assert!(buf.iter().all(|&b| b == 7));
        assert!(matches!(
            disk.read_into_blocking(16 << 20, 4096, buf),
            Err(DiskError::OutOfRange { .. })
        ));
    }
}
