//! The chunk index: one file per disk generation, a fixed header followed by one 32-byte
//! digest per chunk (the layout of Proxmox Backup's fixed index). Entries are read and
//! written in place by chunk number, so no caller ever holds a whole index in memory: a
//! 2 TiB disk at 64 KiB chunks has a 1 GiB index, read in small windows.
//!
//! Header (64 bytes, little endian): magic `FERRYIDX`, version u32, chunk size u32, disk
//! size u64, generation u64, 24 reserved bytes, and the first 8 bytes of the BLAKE3 of the
//! 56 bytes before them.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunk::{Digest, Geometry};

const MAGIC: &[u8; 8] = b"FERRYIDX";
const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
const ENTRY: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path}: {source}{}", crate::what_to_do(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("index {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// An open index file.
pub struct IndexFile {
    path: PathBuf,
    file: File,
    geometry: Geometry,
    generation: u64,
}

impl IndexFile {
    /// Creates an index in which every chunk is [`crate::chunk::ZERO`] (a sparse file).
    pub fn create(path: &Path, geometry: Geometry, generation: u64) -> Result<Self, IndexError> {
        Self::lay_out(path, geometry, generation, 0)
    }

    /// Opens or creates `path` as an index with a new header, keeping the first `kept`
    /// entries' space as it is and cutting the rest, which then reads as zeros.
    ///
    /// Not truncated whole: when `path` exists (a spare kept from an earlier generation)
    /// and is about to be written over, freeing and allocating again every block of a
    /// large index costs more than the copy (deleting 128 MiB takes 44 ms on a file
    /// system that discards).
    fn lay_out(
        path: &Path,
        geometry: Geometry,
        generation: u64,
        kept: u64,
    ) -> Result<Self, IndexError> {
        let io = io_err(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(&io)?;
        file.set_len(HEADER_LEN + kept * ENTRY).map_err(&io)?;
        file.set_len(HEADER_LEN + geometry.chunk_count() * ENTRY)
            .map_err(&io)?;
        file.write_all_at(&header(geometry, generation), 0)
            .map_err(&io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            geometry,
            generation,
        })
    }

    /// Opens and validates an index.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let corrupt = |reason: String| IndexError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| corrupt(format!("header unreadable ({e})")))?;
        if &h[..8] != MAGIC {
            return Err(corrupt("not a Ferry index (bad magic)".into()));
        }
        if blake3::hash(&h[..56]).as_bytes()[..8] != h[56..64] {
            return Err(corrupt("header checksum mismatch".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(corrupt(format!(
                "version {version}, this Ferry reads {VERSION}"
            )));
        }
        let chunk_size = u32::from_le_bytes(h[12..16].try_into().unwrap());
        let disk_size = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let generation = u64::from_le_bytes(h[24..32].try_into().unwrap());
        crate::chunk::check_chunk_size(chunk_size).map_err(corrupt)?;
        let geometry = Geometry::new(disk_size, chunk_size);
        let want = HEADER_LEN + geometry.chunk_count() * ENTRY;
        let len = file.metadata().map_err(io_err(path))?.len();
        if len != want {
            return Err(corrupt(format!(
                "{len} bytes, expected {want} (truncated or overwritten)"
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            geometry,
            generation,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn chunk_count(&self) -> u64 {
        self.geometry.chunk_count()
    }

    /// Entries `first .. first + count` (clamped to the index).
    pub fn read(&self, first: u64, count: u64) -> Result<Vec<Digest>, IndexError> {
        let count = count.min(self.chunk_count().saturating_sub(first));
        let mut entries = vec![[0u8; ENTRY as usize]; count as usize];
        self.file
            .read_exact_at(entries.as_flattened_mut(), HEADER_LEN + first * ENTRY)
            .map_err(io_err(&self.path))?;
        Ok(entries)
    }

    /// The raw entries from `first` on (at most `count`), into `buf` (whatever it held
    /// is replaced): a caller that passes the buffer back in reuses its memory.
    pub fn read_raw_into(
        &self,
        first: u64,
        count: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), IndexError> {
        let count = count.min(self.chunk_count().saturating_sub(first));
        buf.resize((count * ENTRY) as usize, 0);
        self.file
            .read_exact_at(buf, HEADER_LEN + first * ENTRY)
            .map_err(io_err(&self.path))
    }

    pub fn get(&self, n: u64) -> Result<Digest, IndexError> {
        Ok(self.read(n, 1)?[0])
    }

    pub fn set(&self, n: u64, digest: &Digest) -> Result<(), IndexError> {
        self.file
            .write_all_at(digest, HEADER_LEN + n * ENTRY)
            .map_err(io_err(&self.path))
    }

    /// Writes many entries; consecutive chunk numbers go out in one write.
    pub fn set_many(&self, entries: &mut [(u64, Digest)]) -> Result<(), IndexError> {
        entries.sort_unstable_by_key(|e| e.0);
        let mut i = 0;
        while i < entries.len() {
            let mut j = i + 1;
            while j < entries.len() && entries[j].0 == entries[j - 1].0 + 1 {
                j += 1;
            }
            let buf: Vec<u8> = entries[i..j].iter().flat_map(|e| e.1).collect();
            self.file
                .write_all_at(&buf, HEADER_LEN + entries[i].0 * ENTRY)
                .map_err(io_err(&self.path))?;
            i = j;
        }
        Ok(())
    }

    /// Gives every entry its space on the disk now (still reading as zero where not
    /// written), so recording what a sync received never fails for want of space, even
    /// after the sync filled the file system. A file system without `fallocate` is left
    /// as it is.
    pub fn reserve(&self) -> Result<(), IndexError> {
        use std::os::unix::io::AsRawFd;
        let len = self.chunk_count() * ENTRY;
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                HEADER_LEN as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(()),
            _ => Err(io_err(&self.path)(e)),
        }
    }

    pub fn sync(&self) -> Result<(), IndexError> {
        self.file.sync_all().map_err(io_err(&self.path))
    }

    /// The open file, for writing it back ahead of a flush.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// BLAKE3 over all entries in chunk order: two indexes with the same entries digest
    /// describe byte-identical disks.
    pub fn entries_digest(&self) -> Result<Digest, IndexError> {
        let mut hasher = blake3::Hasher::new();
        self.for_each_window(|_, window| {
            hasher.update(window);
            Ok(())
        })?;
        Ok(*hasher.finalize().as_bytes())
    }

    /// Calls `f(first_chunk, raw_entries)` over the whole index in 64 KiB windows: small
    /// enough that the allocator hands the same memory back call after call (a
    /// megabyte-sized buffer is mapped afresh each time, a page fault per 4 KiB).
    pub fn for_each_window(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), IndexError>,
    ) -> Result<(), IndexError> {
        const WINDOW: u64 = 2 * 1024;
        let mut buf = vec![0u8; (WINDOW * ENTRY) as usize];
        let mut first = 0;
        while first < self.chunk_count() {
            let n = WINDOW.min(self.chunk_count() - first);
            let raw = &mut buf[..(n * ENTRY) as usize];
            self.file
                .read_exact_at(raw, HEADER_LEN + first * ENTRY)
                .map_err(io_err(&self.path))?;
            f(first, raw)?;
            first += n;
        }
        Ok(())
    }

    /// Writes a copy at `path` for a disk of `geometry` (same chunk size): entries beyond
    /// the old end are zero (a grown disk reads zeros there), entries past the new end
    /// are dropped.
    pub fn copy_to(
        &self,
        path: &Path,
        geometry: Geometry,
        generation: u64,
    ) -> Result<IndexFile, IndexError> {
        // Over a spare's blocks, when there is one (see `lay_out`).
        let keep = self.chunk_count().min(geometry.chunk_count());
        let out = IndexFile::lay_out(path, geometry, generation, keep)?;
        self.for_each_window(|first, raw| {
            if first >= keep {
                return Ok(());
            }
            let n = (keep - first).min(raw.len() as u64 / ENTRY);
            out.file
                .write_all_at(&raw[..(n * ENTRY) as usize], HEADER_LEN + first * ENTRY)
                .map_err(io_err(path))
        })?;
        Ok(out)
    }

    /// A reader over the raw entries, for streaming an index to a peer.
    pub fn entries_reader(&self) -> Result<impl Read + '_, IndexError> {
        let f = self.file.try_clone().map_err(io_err(&self.path))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(HEADER_LEN))
            .map_err(io_err(&self.path))?;
        Ok(r.take(self.chunk_count() * ENTRY))
    }

    /// Fills entries from raw bytes received from a peer, starting at entry `first`.
    pub fn write_raw(&self, first: u64, raw: &[u8]) -> Result<(), IndexError> {
        if !(raw.len() as u64).is_multiple_of(ENTRY)
            || first + raw.len() as u64 / ENTRY > self.chunk_count()
        {
            return Err(IndexError::Corrupt {
                path: self.path.clone(),
                reason: format!("{} entry bytes at entry {first} do not fit", raw.len()),
            });
        }
        self.file
            .write_all_at(raw, HEADER_LEN + first * ENTRY)
            .map_err(io_err(&self.path))
    }
}

fn header(g: Geometry, generation: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&g.chunk_size.to_le_bytes());
    h[16..24].copy_from_slice(&g.disk_size.to_le_bytes());
    h[24..32].copy_from_slice(&generation.to_le_bytes());
    let sum = blake3::hash(&h[..56]);
    h[56..64].copy_from_slice(&sum.as_bytes()[..8]);
    h
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename, fsync of the directory. Readers see the old contents or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ZERO;

    #[test]
    fn create_set_reopen_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.idx");
        let g = Geometry::new(100 * 65536 + 1, 65536);
        let idx = IndexFile::create(&p, g, 3).unwrap();
        assert_eq!(idx.chunk_count(), 101);
        assert_eq!(idx.get(100).unwrap(), ZERO);
        idx.set_many(&mut [(5, [1; 32]), (4, [2; 32]), (100, [3; 32])])
            .unwrap();
        let d1 = idx.entries_digest().unwrap();
        drop(idx);
        let idx = IndexFile::open(&p).unwrap();
        assert_eq!(idx.generation(), 3);
        assert_eq!(idx.geometry(), g);
        assert_eq!(idx.read(4, 2).unwrap(), vec![[2; 32], [1; 32]]);
        assert_eq!(idx.entries_digest().unwrap(), d1);
        let grown = idx
            .copy_to(
                &dir.path().join("b.idx"),
                Geometry::new(200 * 65536, 65536),
                4,
            )
            .unwrap();
        assert_eq!(grown.get(100).unwrap(), [3; 32]);
        assert_eq!(grown.get(199).unwrap(), ZERO);
        // Copied over a spare full of other entries: those past the copy read as zeros.
        grown
            .set_many(&mut [(150, [7; 32]), (199, [8; 32])])
            .unwrap();
        drop(grown);
        let copy_a_to = |name: &str| {
            IndexFile::open(&p)
                .unwrap()
                .copy_to(&dir.path().join(name), Geometry::new(160 * 65536, 65536), 5)
                .unwrap()
        };
        let over = copy_a_to("b.idx");
        assert_eq!(over.chunk_count(), 160);
        assert_eq!(over.get(5).unwrap(), [1; 32]);
        assert_eq!(over.get(150).unwrap(), ZERO);
        drop(over);
        let over = IndexFile::open(&dir.path().join("b.idx")).unwrap();
        assert_eq!(over.generation(), 5);
        // The same entries as a copy into a new file.
        assert_eq!(
            over.entries_digest().unwrap(),
            copy_a_to("c.idx").entries_digest().unwrap()
        );
    }

    #[test]
    fn damaged_indexes_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.idx");
        IndexFile::create(&p, Geometry::new(1 << 20, 65536), 1).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(100).unwrap();
        let err = IndexFile::open(&p).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        f.write_all_at(b"X", 20).unwrap();
        let err = IndexFile::open(&p).err().unwrap().to_string();
        assert!(err.contains("checksum"), "{err}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(IndexFile::open(&p).is_err());
    }
}
