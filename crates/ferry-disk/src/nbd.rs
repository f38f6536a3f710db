//! Any NBD export as a disk: reads, `base:allocation` for holes and zeros, and
//! `qemu:dirty-bitmap:NAME` for changed ranges.

use std::sync::Arc;
use std::time::Duration;

use ferry_nbd::{ConnectOptions, NbdClient, NbdTarget, QemuNbd, STATE_DIRTY, STATE_ZERO};

use crate::extent::coalesce;
use crate::{Disk, DiskError, Extent, ExtentKind};

const BASE_ALLOCATION: &str = "base:allocation";

/// Longest wait for the answer to one request: far more than any read of at most 32 MiB
/// needs, even over a slow link. A server that takes longer is stuck (QEMU has been seen
/// to hang on reads with io_uring), and a sync that waits for it forever helps no one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// `request` bounded by [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    disk: &str,
    what: impl FnOnce() -> String,
    request: impl std::future::Future<Output = Result<T, DiskError>>,
) -> Result<T, DiskError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| DiskError::TimedOut {
            disk: disk.to_string(),
            what: format!("{} (the NBD server did not answer)", what()),
            timeout: REQUEST_TIMEOUT,
        })?
}

/// A disk read through NBD. When Ferry started the server itself (`qemu-nbd` on an image
/// file), the server lives as long as the last clone of this value.
#[derive(Clone)]
pub struct NbdDisk {
    name: String,
    client: NbdClient,
    bitmap_context: Option<String>,
    /// Changed areas the platform listed (VMware CBT), sorted and merged.
    listed_changes: Option<Arc<Vec<(u64, u64)>>>,
    _server: Option<Arc<QemuNbd>>,
}

impl NbdDisk {
    /// Connects to `target`; with `bitmap`, also negotiates `qemu:dirty-bitmap:BITMAP` and
    /// fails clearly when the server does not export it.
    pub async fn connect(
        name: String,
        target: &NbdTarget,
        bitmap: Option<&str>,
        server: Option<QemuNbd>,
    ) -> Result<Self, DiskError> {
        let bitmap_context = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut meta_contexts = vec![BASE_ALLOCATION.to_string()];
        meta_contexts.extend(bitmap_context.clone());
        let client = NbdClient::connect(target, ConnectOptions { meta_contexts })
            .await
            .map_err(|source| DiskError::Nbd {
                disk: name.clone(),
                source,
            })?;
        if let (Some(ctx), Some(b)) = (&bitmap_context, bitmap) {
            if !client.supports(ctx) {
                return Err(DiskError::NoBitmap {
                    disk: name,
                    bitmap: b.to_string(),
                });
            }
        }
        Ok(Self {
            name,
            client,
            bitmap_context,
            listed_changes: None,
            _server: server.map(Arc::new),
        })
    }

    /// Takes the changed areas `(offset, length)` from a list the platform gave (VMware's
    /// changed block tracking) instead of a dirty bitmap on the export.
    pub fn with_changed_areas(mut self, mut areas: Vec<(u64, u64)>) -> Self {
        areas.retain(|a| a.1 > 0);
        areas.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(areas.len());
        for (o, l) in areas {
            match merged.last_mut() {
                Some(last) if o <= last.0 + last.1 => {
                    last.1 = last.1.max(o + l - last.0);
                }
                _ => merged.push((o, l)),
            }
        }
        self.listed_changes = Some(Arc::new(merged));
        self
    }

    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    fn nbd(&self, source: ferry_nbd::NbdError) -> DiskError {
        DiskError::Nbd {
            disk: self.name.clone(),
            source,
        }
    }

    async fn status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        kind: impl Fn(u32) -> ExtentKind,
    ) -> Result<Vec<Extent>, DiskError> {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        // Block status lengths are 32-bit on the wire.
        let ask = len.min(u32::MAX as u64 & !0xfff);
        let ext = bounded(
            &self.name,
            || format!("a block status request at byte {offset}"),
            async {
                self.client
                    .block_status(context, offset, ask)
                    .await
                    .map_err(|e| self.nbd(e))
            },
        )
        .await?;
        Ok(coalesce(
            ext.into_iter()
                .map(|e| Extent {
                    offset: e.offset,
                    length: e.length.min(offset + len - e.offset.min(offset + len)),
                    kind: kind(e.flags),
                })
                .collect(),
        ))
    }
}

impl Disk for NbdDisk {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        self.read_into(offset, len, Vec::new()).await
    }

    async fn read_into(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        if offset.saturating_add(len as u64) > self.size() {
            return Err(DiskError::OutOfRange {
                disk: self.name.clone(),
                offset,
                len: len as u64,
                size: self.size(),
            });
        }
        bounded(
            &self.name,
            || format!("a read of {len} bytes at byte {offset}"),
            async {
                self.client
                    .read_into(offset, len, buf)
                    .await
                    .map_err(|e| self.nbd(e))
            },
        )
        .await
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        if !self.client.supports(BASE_ALLOCATION) {
            let len = len.min(self.size().saturating_sub(offset));
            return Ok(vec![Extent {
                offset,
                length: len,
                kind: ExtentKind::Data,
            }]);
        }
        self.status(BASE_ALLOCATION, offset, len, |flags| {
            if flags & STATE_ZERO != 0 {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            }
        })
        .await
    }

    async fn changed_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<Extent>>, DiskError> {
        if let Some(areas) = &self.listed_changes {
            return Ok(Some(listed_extents(
                areas,
                offset,
                len.min(self.size().saturating_sub(offset)),
            )));
        }
        let Some(ctx) = &self.bitmap_context else {
            return Ok(None);
        };
        let ext = self
            .status(ctx, offset, len, |flags| {
                if flags & STATE_DIRTY != 0 {
                    ExtentKind::Dirty
                } else {
                    ExtentKind::Clean
                }
            })
            .await?;
        Ok(Some(ext))
    }

    fn tracks_changes(&self) -> bool {
        self.bitmap_context.is_some() || self.listed_changes.is_some()
    }
}

/// [offset, offset+len) as Dirty and Clean extents from sorted, merged areas.
fn listed_extents(areas: &[(u64, u64)], offset: u64, len: u64) -> Vec<Extent> {
    let end = offset + len;
    let mut out = vec![];
    let mut pos = offset;
    // The first area that ends after `offset`.
    let first = areas.partition_point(|a| a.0 + a.1 <= offset);
    for &(o, l) in &areas[first..] {
        if o >= end {
            break;
        }
        let (s, e) = (o.max(pos), (o + l).min(end));
        if s > pos {
            out.push(Extent {
                offset: pos,
                length: s - pos,
                kind: ExtentKind::Clean,
            });
        }
        out.push(Extent {
            offset: s,
            length: e - s,
            kind: ExtentKind::Dirty,
        });
        pos = e;
    }
    if pos < end {
        out.push(Extent {
            offset: pos,
            length: end - pos,
            kind: ExtentKind::Clean,
        });
    }
    coalesce(out)
}

#[cfg(test)]
mod listed_tests {
    use super::*;

    #[test]
    fn listed_areas_cover_the_range() {
        let areas = [(100, 50), (200, 100), (1000, 10)];
        let kinds = |v: Vec<Extent>| -> Vec<(u64, u64, bool)> {
            v.iter()
                .map(|e| (e.offset, e.length, e.kind == ExtentKind::Dirty))
                .collect()
        };
        assert_eq!(
            kinds(listed_extents(&areas, 0, 400)),
            vec![
                (0, 100, false),
                (100, 50, true),
                (150, 50, false),
                (200, 100, true),
                (300, 100, false)
            ]
        );
        assert_eq!(
            kinds(listed_extents(&areas, 220, 30)),
            vec![(220, 30, true)]
        );
        assert_eq!(
            kinds(listed_extents(&areas, 400, 100)),
            vec![(400, 100, false)]
        );
        assert!(listed_extents(&areas, 5, 0).is_empty());
    }
}
