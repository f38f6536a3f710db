//! Fixed-size chunks and their digests.
//!
//! A disk is cut into chunks of `chunk_size` bytes (the last one may be shorter). Each
//! chunk is named by its BLAKE3 digest; a chunk that reads as all zeros is named by
//! [`ZERO`] instead, so zero chunks are recognised without hashing and never travel.

/// A chunk's name: BLAKE3 of its bytes, or [`ZERO`].
pub type Digest = [u8; 32];

/// The digest of an all-zero chunk. All-zero bytes make a fresh (sparse) index file mean
/// "every chunk is zero", which is exactly what a new, empty target holds.
pub const ZERO: Digest = [0u8; 32];

/// Default chunk size: 64 KiB, the default qcow2 cluster size and dirty-bitmap
/// granularity, and VMware CBT's usual block size. Smaller chunks would make the index
/// larger than the memory budget allows at 2 TiB; larger ones would send more than what
/// changed for scattered writes.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// The digest of one chunk's bytes.
pub fn digest(bytes: &[u8]) -> Digest {
    if is_zero(bytes) {
        ZERO
    } else {
        *blake3::hash(bytes).as_bytes()
    }
}

/// Whether every byte is zero. Word-at-a-time; far cheaper than hashing.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, body, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0)
}

/// How a disk is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub disk_size: u64,
    pub chunk_size: u32,
}

impl Geometry {
    pub fn new(disk_size: u64, chunk_size: u32) -> Self {
        Self {
            disk_size,
            chunk_size,
        }
    }

    pub fn chunk_count(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size as u64)
    }

    /// Byte offset and length of chunk `n`.
    pub fn chunk(&self, n: u64) -> (u64, usize) {
        let offset = n * self.chunk_size as u64;
        let len = (self.disk_size - offset).min(self.chunk_size as u64);
        (offset, len as usize)
    }

    /// Byte offset and length of the `count` chunks from chunk `first` (count ≥ 1).
    pub fn run(&self, first: u64, count: u64) -> (u64, u64) {
        let (offset, _) = self.chunk(first);
        let (last, last_len) = self.chunk(first + count - 1);
        (offset, last + last_len as u64 - offset)
    }

    /// The chunks that overlap [offset, offset+len).
    pub fn chunks_overlapping(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let cs = self.chunk_size as u64;
        let end = (offset + len).min(self.disk_size);
        (offset / cs)..end.div_ceil(cs)
    }
}

/// Valid chunk sizes: powers of two from 4 KiB to 4 MiB.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), String> {
    if chunk_size.is_power_of_two() && (4096..=4 << 20).contains(&chunk_size) {
        Ok(())
    } else {
        Err(format!(
            "chunk size {chunk_size} is not a power of two between 4 KiB and 4 MiB"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_have_the_zero_digest() {
        assert_eq!(digest(&[0u8; 65536]), ZERO);
        assert_eq!(digest(&[0u8; 3]), ZERO);
        let mut v = vec![0u8; 65536];
        v[65535] = 1;
        assert_ne!(digest(&v), ZERO);
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..65535]));
    }

    #[test]
    fn geometry_handles_a_short_last_chunk() {
        let g = Geometry::new(10 * 65536 + 100, 65536);
        assert_eq!(g.chunk_count(), 11);
        assert_eq!(g.chunk(10), (10 * 65536, 100));
        assert_eq!(g.chunks_overlapping(65535, 2), 0..2);
        assert_eq!(g.chunks_overlapping(10 * 65536, 1000), 10..11);
        assert_eq!(g.chunks_overlapping(5, 0), 0..0);
        assert_eq!(g.run(2, 3), (2 * 65536, 3 * 65536));
        assert_eq!(g.run(9, 2), (9 * 65536, 65536 + 100));
    }
}
