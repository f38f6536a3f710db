//! zstd on the wire, only where it pays. Contexts are kept per thread: creating one per
//! chunk would cost more than compressing a 64 KiB chunk.

use std::cell::RefCell;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// zstd level 1: fast enough to keep up with the disk on one core.
const LEVEL: i32 = 1;

/// Bytes of each sample [`compress_if_worth_it`] tries first.
const SAMPLE: usize = 4096;

/// Compresses `raw` into `out` if that saves at least an eighth; returns whether it did.
/// Incompressible chunks (already compressed or encrypted data) travel as they are, and
/// are recognised cheaply: two small samples (start and middle) are compressed first,
/// and only if one of them shrinks is the whole chunk tried.
pub fn compress_if_worth_it(raw: &[u8], out: &mut Vec<u8>) -> bool {
    if raw.len() >= 4 * SAMPLE {
        let mid = raw.len() / 2;
        if !shrinks(&raw[..SAMPLE], out) && !shrinks(&raw[mid..mid + SAMPLE], out) {
            return false;
        }
    }
    compress_limited(raw, out)
}

/// Whether `sample` compresses by at least an eighth (`out` is scratch space).
fn shrinks(sample: &[u8], out: &mut Vec<u8>) -> bool {
    compress_limited(sample, out)
}

fn compress_limited(raw: &[u8], out: &mut Vec<u8>) -> bool {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(LEVEL).ok();
        }
        let Some(c) = c.as_mut() else { return false };
        let limit = raw.len() - raw.len() / 8;
        out.clear();
        out.reserve(limit);
        // Compressing into a buffer of the limit fails early when the data does not fit,
        // which is also the cheapest way to give up on incompressible data.
        let spare = out.spare_capacity_mut();
        let spare = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr() as *mut u8, limit) };
        match c.compress_to_buffer(raw, spare) {
            Ok(n) if n < limit => {
                unsafe { out.set_len(n) };
                true
            }
            _ => false,
        }
    })
}

/// Decompresses a chunk that must be exactly `len` bytes.
pub fn decompress(bytes: &[u8], len: usize) -> Result<Vec<u8>, String> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let out = d
            .as_mut()
            .unwrap()
            .decompress(bytes, len)
            .map_err(|e| e.to_string())?;
        if out.len() != len {
            return Err(format!("{} bytes, expected {len}", out.len()));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_shrinks_random_is_left_alone() {
        let text: Vec<u8> = b"ferry moves disks "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let mut out = Vec::new();
        assert!(compress_if_worth_it(&text, &mut out));
        assert!(out.len() < 8192);
        assert_eq!(decompress(&out, text.len()).unwrap(), text);
        let mut x = 0x9e3779b97f4a7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!compress_if_worth_it(&random, &mut out));
        // Random at the start and in the middle, compressible elsewhere: the samples miss
        // it, which only costs ratio. Compressible at the start: found.
        let mut mixed = random.clone();
        mixed[..32768].copy_from_slice(&text[..32768]);
        assert!(compress_if_worth_it(&mixed, &mut out));
        assert_eq!(decompress(&out, mixed.len()).unwrap(), mixed);
        assert!(decompress(b"garbage", 100).is_err());
    }
}
