//! Property test of the whole data plane: random disks, random writes over several
//! generations, both change-detection modes; after every sync the target must equal the
//! source's snapshot byte for byte.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use ferry_disk::{Disk, DiskError, Extent, ExtentKind};
use ferry_replication::{send, sync_local, Endpoint, Mode, Progress, Receiver, SendOptions};
use proptest::prelude::*;

/// A disk in memory that, like a QEMU dirty bitmap, remembers which 4 KiB blocks were
/// written since the last `clear_dirty`.
#[derive(Clone)]
struct MemDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    dirty: Arc<Mutex<BTreeSet<u64>>>,
    track: bool,
}

const GRAIN: u64 = 4096;

impl MemDisk {
    /// A disk of `size` zero bytes that tracks its changes.
    fn zeroed(size: u64) -> Self {
        MemDisk {
            bytes: Arc::new(Mutex::new(vec![0; size as usize])),
            dirty: Arc::new(Mutex::new(BTreeSet::new())),
            track: true,
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut b = self.bytes.lock().unwrap();
        b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        let mut d = self.dirty.lock().unwrap();
        for g in offset / GRAIN..(offset + data.len() as u64).div_ceil(GRAIN) {
            d.insert(g);
        }
    }
}

impl Disk for MemDisk {
    fn name(&self) -> &str {
        "memory"
    }
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        Ok(self.bytes.lock().unwrap()[offset as usize..offset as usize + len].to_vec())
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        // 512-byte granularity, so zero runs start and end inside chunks.
        let b = self.bytes.lock().unwrap();
        let end = (offset + len).min(b.len() as u64);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = 512.min(end - pos);
            let kind = if b[pos as usize..(pos + n) as usize].iter().all(|&x| x == 0) {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(l) if l.kind == kind => l.length += n,
                _ => out.push(Extent {
                    offset: pos,
                    length: n,
                    kind,
                }),
            }
            pos += n;
        }
        Ok(out)
    }
    async fn changed_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<Extent>>, DiskError> {
        if !self.track {
            return Ok(None);
        }
        let d = self.dirty.lock().unwrap();
        let end = (offset + len).min(self.size());
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos / GRAIN;
            let next = ((g + 1) * GRAIN).min(end);
            let kind = if d.contains(&g) {
                ExtentKind::Dirty
            } else {
                ExtentKind::Clean
            };
            match out.last_mut() {
                Some(l) if l.kind == kind => l.length += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: next - pos,
                    kind,
                }),
            }
            pos = next;
        }
        Ok(Some(out))
    }
    fn tracks_changes(&self) -> bool {
        self.track
    }
}

#[derive(Debug, Clone)]
enum Fill {
    Zero,
    Byte(u8),
    Random(u64),
}

fn write_strategy(size: u64) -> impl Strategy<Value = (u64, u64, Fill)> {
    (
        0..size,
        1..=(size / 3).max(1),
        prop_oneof![
            Just(Fill::Zero),
            any::<u8>().prop_map(Fill::Byte),
            any::<u64>().prop_map(Fill::Random),
        ],
    )
        .prop_map(move |(off, len, fill)| (off, len.min(size - off), fill))
}

fn bytes_of(len: u64, fill: &Fill) -> Vec<u8> {
    match fill {
        Fill::Zero => vec![0; len as usize],
        Fill::Byte(b) => vec![*b; len as usize],
        Fill::Random(seed) => {
            let mut x = seed | 1;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }
    }
}

/// One write: offset, length, contents.
type Write = (u64, u64, Fill);
/// A disk size and, per generation, whether to sync with the dirty bitmap and the writes
/// before it.
type Scenario = (u64, Vec<(bool, Vec<Write>)>);

fn scenario() -> impl Strategy<Value = Scenario> {
    // Sizes that end inside a chunk, to exercise the short last chunk.
    (1u64..40, 0u64..4096).prop_flat_map(|(chunks, tail)| {
        let size = chunks * 4096 + tail;
        (
            Just(size),
            prop::collection::vec(
                (
                    any::<bool>(),
                    prop::collection::vec(write_strategy(size), 0..6),
                ),
                5..8,
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn target_equals_source_after_every_generation((size, generations) in scenario()) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("target.raw");
        let disk = MemDisk::zeroed(size);
        for (i, (use_bitmap, writes)) in generations.iter().enumerate() {
            for (off, len, fill) in writes {
                disk.write(*off, &bytes_of(*len, fill));
            }
            let mode = if *use_bitmap { Mode::DirtyBitmap } else { Mode::HashCompare };
            // The digest memo in most generations: one left out lets the source change
            // under entries the memo still holds.
            let opts = SendOptions {
                chunk_size: 4096,
                streams: 1 + i % 3,
                compress: i % 2 == 0,
                mode,
                retries: 0,
                digest_memo: (i % 3 != 1).then(|| dir.path().join("memo")),
                ..Default::default()
            };
            let report = rt
                .block_on(sync_local(&disk, &dst, &opts, Arc::new(Progress::default())))
                .unwrap();
            disk.dirty.lock().unwrap().clear();
            let expected = disk.bytes.lock().unwrap().clone();
            let actual = std::fs::read(&dst).unwrap();
            prop_assert_eq!(actual.len(), expected.len());
            prop_assert!(actual == expected, "generation {} ({:?}) differs", i + 1, mode);
            prop_assert_eq!(report.generation, i as u64 + 1);
        }
    }

    /// The same through a volume written in place (what a target worker does): it
    /// starts full of garbage and larger than the disk, its sidecar elsewhere.
    #[test]
    fn volume_equals_source_after_every_generation((size, generations) in scenario()) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("volume");
        let slack = 3 * 4096 + 512;
        std::fs::write(&vol, vec![0xAB; (size + slack) as usize]).unwrap();
        let receiver = Receiver::device(vol.clone(), dir.path().join("state"));
        let endpoint = Endpoint::in_process(receiver);
        let disk = MemDisk::zeroed(size);
        for (i, (use_bitmap, writes)) in generations.iter().enumerate() {
            for (off, len, fill) in writes {
                disk.write(*off, &bytes_of(*len, fill));
            }
            let mode = if *use_bitmap && i > 0 { Mode::DirtyBitmap } else { Mode::HashCompare };
            let opts = SendOptions {
                chunk_size: 4096,
                streams: 1 + i % 2,
                mode,
                retries: 0,
                digest_memo: (i % 3 != 2).then(|| dir.path().join("memo")),
                // The target's index kept between syncs, as the appliance keeps a
                // worker's: a generation without it leaves the kept one behind.
                index_cache: (i % 4 != 2).then(|| dir.path().join("indexes")),
                ..Default::default()
            };
            let report = rt
                .block_on(send(&disk, &endpoint, &opts, Arc::new(Progress::default())))
                .unwrap();
            disk.dirty.lock().unwrap().clear();
            let mut expected = disk.bytes.lock().unwrap().clone();
            expected.resize((size + slack) as usize, 0);
            let actual = std::fs::read(&vol).unwrap();
            prop_assert!(actual == expected, "generation {} ({:?}) differs", i + 1, mode);
            prop_assert_eq!(report.generation, i as u64 + 1);
        }
    }
}

/// The target's index reaches the sender in windows (32 Ki entries each), and a unit is
/// compared as soon as its window is in: changes on both sides of a window boundary,
/// in both modes, must still come out exact.
#[test]
fn changes_across_index_windows_are_synced_exactly() {
    const CHUNKS: u64 = 32 * 1024 + 1000;
    let size = CHUNKS * 4096;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("target.raw");
    let disk = MemDisk::zeroed(size);
    let boundary = 32 * 1024 * 4096;
    // Per round: chunks written with new random bytes, chunks zeroed, and the mode. A
    // chunk compared against an entry that has not arrived yet would be wrong both ways:
    // new data sent for nothing, or a zeroed chunk taken for unchanged.
    let rounds: [(&[u64], &[u64], Mode); 4] = [
        (
            &[0, boundary - 4096, boundary, size - 4096],
            &[],
            Mode::HashCompare,
        ),
        (
            &[4096, boundary - 8192, boundary + 4096],
            &[],
            Mode::DirtyBitmap,
        ),
        (
            &[boundary - 4096],
            &[boundary, size - 4096],
            Mode::HashCompare,
        ),
        (&[0, boundary], &[boundary + 4096], Mode::DirtyBitmap),
    ];
    for (i, (written, zeroed, mode)) in rounds.iter().enumerate() {
        for (k, &off) in written.iter().enumerate() {
            disk.write(off, &bytes_of(4096, &Fill::Random((i * 16 + k) as u64 + 1)));
        }
        for &off in zeroed.iter() {
            disk.write(off, &bytes_of(4096, &Fill::Zero));
        }
        let opts = SendOptions {
            chunk_size: 4096,
            streams: 3,
            mode: *mode,
            retries: 0,
            ..Default::default()
        };
        let report = rt
            .block_on(sync_local(
                &disk,
                &dst,
                &opts,
                Arc::new(Progress::default()),
            ))
            .unwrap();
        disk.dirty.lock().unwrap().clear();
        let expected = disk.bytes.lock().unwrap().clone();
        assert!(
            std::fs::read(&dst).unwrap() == expected,
            "generation {} ({mode:?}) differs",
            i + 1
        );
        assert_eq!(report.generation, i as u64 + 1);
        if i > 0 {
            assert_eq!(report.chunks_changed, (written.len() + zeroed.len()) as u64);
        }
    }
}
