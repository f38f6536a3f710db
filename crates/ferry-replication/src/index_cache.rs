//! The sender's copy of a target's index, kept from one sync to the next.
//!
//! Each sync compares against the target's index. Between machines the receiver would
//! send it whole every time: 32 bytes per chunk, 1 GiB for a 2 TiB disk, on the final
//! delta of a cutover too. A sender that committed the last generation itself already
//! has that index: it is the one it compared against, with its own changes applied, and
//! the commit checked it against the receiver's. The sender keeps it with that
//! generation and its entries digest, and the receiver sends nothing when both match its
//! base.
//!
//! Nothing here is trusted blindly: a kept index that is wrong (damaged on disk, another
//! target's) makes the commit's comparison of the two indexes fail, the failed attempt
//! has consumed the kept copy, and the retry fetches the index from the receiver.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chunk::{Digest, Geometry};
use crate::index::{write_atomic, IndexFile};
use crate::proto::KnownIndex;

/// The kept index of one (source, target) pair: `DIR/<key>/index.idx` and `meta.json`.
pub(crate) struct IndexCache {
    dir: PathBuf,
    /// This sync's working index, unique to the process (two senders of one pair must
    /// not write into each other's).
    work: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    generation: u64,
    digest: String,
    disk_size: u64,
    chunk_size: u32,
}

impl IndexCache {
    /// The cache of `source` synced to `target`, under `root`.
    pub(crate) fn new(root: &Path, source: &str, target: &str) -> Self {
        let key = blake3::hash(format!("{source}\n{target}").as_bytes()).to_hex();
        let dir = root.join(&key[..32]);
        let work = dir.join(format!(
            "work-{}-{}.idx",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        Self { dir, work }
    }

    /// Where this sync's index is built.
    pub(crate) fn work_path(&self) -> Result<&Path, std::io::Error> {
        std::fs::create_dir_all(&self.dir)?;
        Ok(&self.work)
    }

    /// Takes the kept index of `generation` as this sync's working index, when there is
    /// one for this geometry. Taken, it is no longer kept: should the sync fail, the next
    /// one starts without it.
    pub(crate) fn take(
        &self,
        generation: u64,
        geometry: Geometry,
    ) -> Option<(IndexFile, KnownIndex)> {
        let meta_path = self.dir.join("meta.json");
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
        let _ = std::fs::remove_file(&meta_path);
        let kept = self.dir.join("index.idx");
        if meta.generation != generation
            || meta.disk_size != geometry.disk_size
            || meta.chunk_size != geometry.chunk_size
        {
            let _ = std::fs::remove_file(&kept);
            return None;
        }
        std::fs::rename(&kept, &self.work).ok()?;
        match IndexFile::open(&self.work) {
            Ok(idx) if idx.geometry() == geometry => Some((
                idx,
                KnownIndex {
                    generation,
                    digest: meta.digest,
                },
            )),
            _ => None,
        }
    }

    /// Keeps this sync's working index as the target's committed `generation`, whose
    /// entries digest the commit confirmed.
    pub(crate) fn keep(&self, generation: u64, geometry: Geometry, digest: &Digest) {
        let meta = Meta {
            generation,
            digest: crate::proto::hex(digest),
            disk_size: geometry.disk_size,
            chunk_size: geometry.chunk_size,
        };
        let kept = std::fs::rename(&self.work, self.dir.join("index.idx")).and_then(|()| {
            write_atomic(
                &self.dir.join("meta.json"),
                &serde_json::to_vec(&meta).expect("plain data"),
            )
        });
        if let Err(e) = kept {
            tracing::debug!(dir = %self.dir.display(), "the target's index is not kept: {e}");
        }
    }
}

impl Drop for IndexCache {
    /// A working index that was not kept (the sync failed) is of no further use.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.work);
    }
}
