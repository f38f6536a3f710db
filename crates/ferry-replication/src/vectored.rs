//! Positioned vectored writes: many buffers in one system call, so a batch of chunks
//! takes the file's write lock once instead of once per chunk (writers on several
//! connections otherwise spend their time waiting for each other).

use std::fs::File;
use std::io::IoSlice;
use std::os::unix::io::AsRawFd;

/// Most buffers one call takes (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// Writes every byte of `bufs`, back to back, from `offset` on.
pub(crate) fn pwritev_all(
    file: &File,
    mut bufs: &mut [IoSlice<'_>],
    mut offset: u64,
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(MAX_IOV);
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the slices
        // outlive the call.
        let rc = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                bufs.as_ptr() as *const libc::iovec,
                n as libc::c_int,
                offset as libc::off_t,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        offset += rc as u64;
        IoSlice::advance_slices(&mut bufs, rc as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn writes_many_buffers_back_to_back() {
        let f = tempfile::tempfile().unwrap();
        let parts: Vec<Vec<u8>> = (0..2000u32)
            .map(|i| vec![i as u8; 1 + i as usize % 7])
            .collect();
        let mut slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        pwritev_all(&f, &mut slices, 10).unwrap();
        let want: Vec<u8> = parts.concat();
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, 10).unwrap();
        assert_eq!(got, want);
    }
}
