//! The sender's memory of what each chunk of a source hashed to, from one sync to the next.
//!
//! A hash-compare delta reads every allocated byte of the source to find the few chunks
//! that changed, and hashing them with BLAKE3 was most of its time. For each chunk the
//! memo keeps a keyed fingerprint of its bytes (HighwayHash, 128 bits, about three times
//! as fast as BLAKE3) beside their BLAKE3 digest. A chunk whose fingerprint is the one
//! remembered has the digest remembered; only the others are hashed with BLAKE3. The
//! digests, and everything the receiver checks against them, are unchanged.
//!
//! Why it cannot make a sync wrong:
//! - An entry says "bytes with this fingerprint hash to this digest". That is true of
//!   the bytes, whatever happened to the target since, so an entry never goes stale.
//! - The fingerprint is keyed with a secret random key, kept in the memo (readable only
//!   by its owner): nobody who writes to the source disk can make two contents that
//!   collide without the key. By chance, two contents collide with probability 2^-128.
//! - Each entry carries a tag over its chunk number, fingerprint and digest, under the
//!   same key: an entry torn by a crash, damaged on the disk, or moved is not used.
//! - The memo is locked for the sync: a second sender of the same source works without
//!   it rather than interleave entries.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use highway::{HighwayHash, HighwayHasher, Key};

use crate::chunk::{self, Digest, ZERO};

const MAGIC: &[u8; 8] = b"FERRYM01";
/// Magic, chunk size, key.
const HEADER: u64 = 64;
/// Fingerprint 16, digest 32, tag 16.
const ENTRY: usize = 64;

/// A memo no sync has opened for this long is removed (its source is likely migrated
/// and gone; keeping it would only take space, about 0.1% of the disk's size).
const UNUSED_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// One chunk's remembered fingerprint and digest, as stored.
pub(crate) type Entry = [u8; ENTRY];

/// An open memo, locked for this process until it is dropped.
pub(crate) struct DigestMemo {
    path: PathBuf,
    file: File,
    key: Key,
}

impl DigestMemo {
    /// The memo of `source` in chunks of `chunk_size`, under `root`; created when there is
    /// none. `None` (and the sync hashes every chunk) when it cannot be opened, or another
    /// sender of the same source holds it.
    pub(crate) fn open(root: &Path, source: &str, chunk_size: u32) -> Option<DigestMemo> {
        let key = blake3::hash(format!("{source}\n{chunk_size}").as_bytes()).to_hex();
        let path = root.join(format!("{}.memo", &key[..32]));
        prune(root);
        match Self::open_path(&path, chunk_size) {
            Ok(Some(m)) => Some(m),
            Ok(None) => {
                tracing::debug!(path = %path.display(), "digest memo in use by another sender: hashing every chunk");
                None
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "no digest memo ({e}): hashing every chunk");
                None
            }
        }
    }

    fn open_path(path: &Path, chunk_size: u32) -> std::io::Result<Option<DigestMemo>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // SAFETY: flock on a descriptor this function owns.
        let rc = unsafe {
            libc::flock(
                std::os::unix::io::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(e),
            };
        }
        let mut header = [0u8; HEADER as usize];
        let whole = file.read(&mut header)? == header.len();
        let key = if whole
            && &header[..8] == MAGIC
            && u32::from_le_bytes(header[8..12].try_into().unwrap()) == chunk_size
        {
            key_of(&header[32..64])
        } else {
            // New, or not a memo of this chunk size: start again with a fresh key (which
            // also makes every entry left in the file unusable).
            let fresh: [u8; 32] = rand::random();
            header = [0u8; HEADER as usize];
            header[..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&chunk_size.to_le_bytes());
            header[32..64].copy_from_slice(&fresh);
            // At offset 0: the read above moved the file's position past what it read.
            file.set_len(0)?;
            file.write_all_at(&header, 0)?;
            key_of(&fresh)
        };
        // Marks it as in use (see `prune`).
        file.set_modified(std::time::SystemTime::now())?;
        Ok(Some(DigestMemo {
            path: path.to_path_buf(),
            file,
            key,
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The stored entries of chunks `first..first + count` (zeros past the end).
    pub(crate) fn read(&self, first: u64, count: u64) -> std::io::Result<Vec<Entry>> {
        let mut entries = vec![[0u8; ENTRY]; count as usize];
        let bytes = entries.as_flattened_mut();
        let mut at = 0;
        while at < bytes.len() {
            match self
                .file
                .read_at(&mut bytes[at..], HEADER + first * ENTRY as u64 + at as u64)?
            {
                0 => break,
                n => at += n,
            }
        }
        Ok(entries)
    }

    /// Stores the entries of chunks `first..`.
    pub(crate) fn write(&self, first: u64, entries: &[Entry]) -> std::io::Result<()> {
        self.file
            .write_all_at(entries.as_flattened(), HEADER + first * ENTRY as u64)
    }

    /// The digest of chunk `c`, whose bytes are `bytes` and whose stored entry is `entry`:
    /// the remembered one when the fingerprint matches, else BLAKE3's (and `entry` is
    /// updated; the return says so).
    pub(crate) fn digest(&self, c: u64, entry: &mut Entry, bytes: &[u8]) -> (Digest, bool) {
        if chunk::is_zero(bytes) {
            return (ZERO, false);
        }
        let fp = self.fingerprint(bytes);
        if entry[..16] == fp && entry[48..] == self.tag(c, &entry[..48]) {
            return (entry[16..48].try_into().unwrap(), false);
        }
        let digest = *blake3::hash(bytes).as_bytes();
        entry[..16].copy_from_slice(&fp);
        entry[16..48].copy_from_slice(&digest);
        let tag = self.tag(c, &entry[..48]);
        entry[48..].copy_from_slice(&tag);
        (digest, true)
    }

    fn fingerprint(&self, bytes: &[u8]) -> [u8; 16] {
        to_bytes(HighwayHasher::new(self.key).hash128(bytes))
    }

    fn tag(&self, c: u64, fp_and_digest: &[u8]) -> [u8; 16] {
        let mut h = HighwayHasher::new(self.key);
        h.append(b"entry");
        h.append(&c.to_le_bytes());
        h.append(fp_and_digest);
        to_bytes(h.finalize128())
    }
}

/// Removes the memos of `root` not opened for [`UNUSED_FOR`]. Best effort.
fn prune(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNUSED_FOR);
        if old && path.extension().is_some_and(|x| x == "memo") {
            tracing::debug!(path = %path.display(), "removing a digest memo unused for 30 days");
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn key_of(bytes: &[u8]) -> Key {
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    Key([word(0), word(1), word(2), word(3)])
}

fn to_bytes(h: [u64; 2]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&h[0].to_le_bytes());
    out[8..].copy_from_slice(&h[1].to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(seed: u8) -> Vec<u8> {
        (0..65536u32).map(|i| (i as u8) ^ seed).collect()
    }

    #[test]
    fn a_remembered_chunk_gives_its_digest_and_anything_else_is_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let memo = DigestMemo::open(dir.path(), "src", 65536).unwrap();
        let (a, b) = (bytes(1), bytes(2));
        let mut e = memo.read(5, 1).unwrap();
        assert_eq!(memo.digest(5, &mut e[0], &a), (chunk::digest(&a), true));
        memo.write(5, &e).unwrap();
        drop(memo);

        let memo = DigestMemo::open(dir.path(), "src", 65536).unwrap();
        let mut e = memo.read(5, 1).unwrap();
        // Remembered: no new entry.
        assert_eq!(memo.digest(5, &mut e[0], &a), (chunk::digest(&a), false));
        // Changed bytes: hashed.
        assert_eq!(memo.digest(5, &mut e[0], &b), (chunk::digest(&b), true));
        // Zeros are zeros.
        assert_eq!(memo.digest(5, &mut e[0], &[0u8; 4096]), (ZERO, false));
        // Another chunk's entry does not count for this one.
        let mut moved = memo.read(5, 1).unwrap();
        let mut e6 = e;
        e6[0] = moved[0];
        assert!(memo.digest(6, &mut e6[0], &a).1);
        // A damaged entry is not used: its digest would be wrong.
        moved[0][20] ^= 1;
        let (d, fresh) = memo.digest(5, &mut moved[0], &a);
        assert_eq!((d, fresh), (chunk::digest(&a), true));
    }

    #[test]
    fn a_memo_is_one_senders_at_a_time_and_another_chunk_size_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let memo = DigestMemo::open(dir.path(), "src", 65536).unwrap();
        assert!(DigestMemo::open(dir.path(), "src", 65536).is_none());
        drop(memo);
        // A damaged header starts a fresh memo, which then works as any other.
        std::fs::write(
            DigestMemo::open(dir.path(), "src", 65536).unwrap().path(),
            [0xAB; 200],
        )
        .unwrap();
        let memo = DigestMemo::open(dir.path(), "src", 65536).unwrap();
        let a0 = bytes(4);
        let mut e = memo.read(0, 1).unwrap();
        assert!(memo.digest(0, &mut e[0], &a0).1);
        memo.write(0, &e).unwrap();
        drop(memo);
        let memo = DigestMemo::open(dir.path(), "src", 65536).unwrap();
        let mut e = memo.read(0, 1).unwrap();
        assert!(
            !memo.digest(0, &mut e[0], &a0).1,
            "the fresh memo did not keep its entry"
        );
        let a = bytes(3);
        let mut e = memo.read(0, 1).unwrap();
        memo.digest(0, &mut e[0], &a);
        memo.write(0, &e).unwrap();
        let path = memo.path().to_path_buf();
        drop(memo);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
        // Other chunk size, other file; the same size again finds the entry.
        let other = DigestMemo::open(dir.path(), "src", 4096).unwrap();
        assert_ne!(other.path(), path);
        let memo = DigestMemo::open(dir.path(), "src", 65536).unwrap();
        let mut e = memo.read(0, 1).unwrap();
        assert!(!memo.digest(0, &mut e[0], &a).1);
        drop((memo, other));
        // One left unused for long is removed when a sender opens another.
        let long_ago = std::time::SystemTime::now() - UNUSED_FOR * 2;
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(long_ago).unwrap();
        DigestMemo::open(dir.path(), "other source", 65536).unwrap();
        assert!(!path.exists());
    }
}
