//! Any NBD export as a disk: reads, `base:allocation` for holes and zeros, and
//! `qemu:dirty-bitmap:NAME` for changed ranges.

use std::sync::Arc;

use ferry_nbd::{ConnectOptions, NbdClient, NbdTarget, QemuNbd, STATE_DIRTY, STATE_ZERO};

use crate::extent::coalesce;
use crate::{Disk, DiskError, Extent, ExtentKind};

const BASE_ALLOCATION: &str = "base:allocation";

/// A disk read through NBD. When Ferry started the server itself (`qemu-nbd` on an image
/// file), the server lives as long as the last clone of this value.
#[derive(Clone)]
pub struct NbdDisk {
    name: String,
    client: NbdClient,
    bitmap_context: Option<String>,
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
            _server: server.map(Arc::new),
        })
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
        let ext = self
            .client
            .block_status(context, offset, ask)
            .await
            .map_err(|e| self.nbd(e))?;
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
        if offset.saturating_add(len as u64) > self.size() {
            return Err(DiskError::OutOfRange {
                disk: self.name.clone(),
                offset,
                len: len as u64,
                size: self.size(),
            });
        }
        self.client
            .read_into(offset, len, Vec::new())
            .await
            .map_err(|e| self.nbd(e))
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
        self.client
            .read_into(offset, len, buf)
            .await
            .map_err(|e| self.nbd(e))
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
        self.bitmap_context.is_some()
    }
}
