//! The delta journal: where a sync into an existing target keeps the chunks it received
//! until the commit copies them in.
//!
//! Fixed-size records (a 64-byte header and a chunk's worth of space), appended by any
//! number of connections at once. Appending keeps the file contiguous: a sparse file with
//! chunks at their own offsets costs one extent per chunk, and freeing thousands of
//! extents (on a filesystem that discards) takes seconds — at every commit.
//!
//! A record is only trusted if its header is intact and its bytes hash to its digest, so
//! a torn or never-written record (a crash mid-write) is simply skipped.
//!
//! A committed delta's journal is kept and the next delta writes over it from the start
//! ([`Journal::reuse`]): overwriting blocks that exist, whose pages are usually still in
//! the cache, costs a copy, where appending to a new file costs allocating pages, blocks
//! and extents for every record. The earlier records still past the end of what a
//! session wrote are harmless: a record is trusted only if its bytes hash to its digest,
//! and a commit takes only records whose chunk and digest the new index wants, so any
//! record it takes holds exactly the bytes that index asks for.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunk::{self, Digest};
use crate::vectored::pwritev_all;

const MAGIC: &[u8; 8] = b"FERRYJ01";
const HEADER: u64 = 64;

pub struct Journal {
    path: PathBuf,
    file: File,
    record: u64,
    next: AtomicU64,
}

/// One intact record found by [`Journal::scan`].
pub struct Record {
    pub chunk: u64,
    pub digest: Digest,
    pub bytes: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) the journal, continuing after its last whole record.
    pub fn open(path: &Path, chunk_size: u32) -> std::io::Result<Self> {
        let file = Self::open_file(path)?;
        let record = HEADER + chunk_size as u64;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            record,
            // A partial last record is left behind, never overwritten.
            next: AtomicU64::new(len.div_ceil(record)),
        })
    }

    /// Opens an earlier session's journal (or creates one) to write over it from the
    /// first record on.
    pub fn reuse(path: &Path, chunk_size: u32) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: Self::open_file(path)?,
            record: HEADER + chunk_size as u64,
            next: AtomicU64::new(0),
        })
    }

    fn open_file(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record; returns its slot (see [`Journal::data_offset`]).
    #[cfg(test)]
    pub fn append(&self, chunk: u64, digest: &Digest, bytes: &[u8]) -> std::io::Result<u64> {
        self.append_many(&[(chunk, *digest, bytes)])
    }

    /// Appends records to consecutive slots with one write; returns the first slot.
    ///
    /// Nothing orders a record's header after its bytes on the disk (only a flush
    /// would), so a crash can leave either without the other: the scan trusts a record
    /// only when its bytes hash to the digest in its header.
    pub fn append_many(&self, records: &[(u64, Digest, &[u8])]) -> std::io::Result<u64> {
        let first = self.next.fetch_add(records.len() as u64, Ordering::Relaxed);
        let headers: Vec<[u8; HEADER as usize]> = records
            .iter()
            .map(|(chunk, digest, bytes)| {
                let mut h = [0u8; HEADER as usize];
                h[..8].copy_from_slice(MAGIC);
                h[8..16].copy_from_slice(&chunk.to_le_bytes());
                h[16..20].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
                h[24..56].copy_from_slice(digest);
                h
            })
            .collect();
        // A record shorter than a chunk (the disk's last) still takes a whole slot.
        let gap = records
            .iter()
            .map(|r| (self.record - HEADER) as usize - r.2.len())
            .max()
            .unwrap_or(0);
        let pad = vec![0u8; gap];
        let mut slices = Vec::with_capacity(records.len() * 3);
        for (h, (_, _, bytes)) in headers.iter().zip(records) {
            slices.push(IoSlice::new(h));
            slices.push(IoSlice::new(bytes));
            let short = (self.record - HEADER) as usize - bytes.len();
            if short > 0 {
                slices.push(IoSlice::new(&pad[..short]));
            }
        }
        pwritev_all(&self.file, &mut slices, first * self.record)?;
        Ok(first)
    }

    /// Where the bytes of the record in `slot` start in the file.
    pub fn data_offset(&self, slot: u64) -> u64 {
        slot * self.record + HEADER
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Calls `f` for every intact record, in the order they were written.
    #[cfg(test)]
    pub fn scan(&self, f: impl FnMut(Record) -> std::io::Result<()>) -> std::io::Result<()> {
        self.scan_some(|_, _| true, f)
    }

    /// Like [`Journal::scan`], but only for records whose header (chunk, digest) `wanted`
    /// accepts: the others are neither read nor hashed, so a commit that already wrote
    /// most chunks from memory reads back only what it still lacks.
    pub fn scan_some(
        &self,
        mut wanted: impl FnMut(u64, &Digest) -> bool,
        mut f: impl FnMut(Record) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let len = self.file.metadata()?.len();
        let mut h = [0u8; HEADER as usize];
        let mut k = 0;
        while k * self.record + HEADER <= len {
            let at = k * self.record;
            k += 1;
            if self.file.read_exact_at(&mut h, at).is_err() || &h[..8] != MAGIC {
                continue;
            }
            let n = u32::from_le_bytes(h[16..20].try_into().unwrap()) as u64;
            if n > self.record - HEADER {
                continue;
            }
            let chunk = u64::from_le_bytes(h[8..16].try_into().unwrap());
            let digest: Digest = h[24..56].try_into().unwrap();
            if !wanted(chunk, &digest) {
                continue;
            }
            let mut bytes = vec![0u8; n as usize];
            if self.file.read_exact_at(&mut bytes, at + HEADER).is_err() {
                continue;
            }
            // The header may have reached the disk without its bytes (a crash between
            // the two writes): only bytes that hash to the digest are trusted.
            if chunk::digest(&bytes) != digest {
                continue;
            }
            f(Record {
                chunk,
                digest,
                bytes,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_torn_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::open(&p, 4096).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 100];
        j.append(3, &chunk::digest(&a), &a).unwrap();
        j.append(9, &chunk::digest(&b), &b).unwrap();
        // A record whose bytes do not match its digest (torn write).
        j.append(5, &chunk::digest(&a), &b).unwrap();
        drop(j);
        let j = Journal::open(&p, 4096).unwrap();
        let c = vec![3u8; 4096];
        j.append(4, &chunk::digest(&c), &c).unwrap();
        let mut seen = Vec::new();
        j.scan(|r| {
            seen.push((r.chunk, r.bytes.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(3, 4096), (9, 100), (4, 4096)]);
        // Only the records asked for are read; a torn one is still refused.
        let mut some = Vec::new();
        j.scan_some(
            |c, _| c == 4 || c == 5,
            |r| {
                some.push(r.chunk);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(some, vec![4]);
        // A record's bytes start where data_offset says.
        let slot = j.append(7, &chunk::digest(&b), &b).unwrap();
        let mut back = vec![0u8; b.len()];
        j.file()
            .read_exact_at(&mut back, j.data_offset(slot))
            .unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn a_reused_journal_is_written_over_from_its_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let j = Journal::open(&p, 4096).unwrap();
        let (a, b, c) = (vec![1u8; 4096], vec![2u8; 4096], vec![3u8; 4096]);
        j.append(3, &chunk::digest(&a), &a).unwrap();
        j.append(9, &chunk::digest(&b), &b).unwrap();
        drop(j);
        let j = Journal::reuse(&p, 4096).unwrap();
        assert_eq!(j.append(4, &chunk::digest(&c), &c).unwrap(), 0);
        let mut seen = Vec::new();
        j.scan(|r| {
            seen.push((r.chunk, r.bytes[0]));
            Ok(())
        })
        .unwrap();
        // The earlier session's second record is still there, intact: the commit only
        // takes it if the new index wants exactly those bytes for chunk 9.
        assert_eq!(seen, vec![(4, 3), (9, 2)]);
    }
}
