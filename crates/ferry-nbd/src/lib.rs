//! An asynchronous NBD client (fixed newstyle handshake, structured replies,
//! block status with meta contexts such as `base:allocation` and
//! `qemu:dirty-bitmap:NAME`, pipelined requests on one connection) and
//! launchers for `qemu-nbd` and `nbdkit`, so that every image format QEMU knows, and
//! every remote store nbdkit has a plugin for (HTTPS, VMware VDDK), is read and
//! written the same way.
//!
//! The client does not time out by itself; callers wrap calls in their own
//! timeouts. Cancelling a call while its request is half written closes the
//! connection (the stream could not be resynchronised).
//!
//! ```no_run
//! # async fn example() -> Result<(), ferry_nbd::NbdError> {
//! use ferry_nbd::*;
//!
//! let nbd = QemuNbd::start(
//!     std::path::Path::new("disk.qcow2"),
//!     QemuNbdOptions { read_only: true, bitmap: Some("bm0".into()), ..QemuNbdOptions::new("qcow2") },
//! )
//! .await?;
//! let dirty = dirty_bitmap_context("bm0");
//! let client = NbdClient::connect(
//!     &nbd.target(),
//!     ConnectOptions { meta_contexts: vec![CONTEXT_BASE_ALLOCATION.into(), dirty.clone()] },
//! )
//! .await?;
//! let mut buf = vec![0u8; 1 << 20];
//! for extent in client.block_status(&dirty, 0, client.size()).await? {
//!     if extent.flags & STATE_DIRTY != 0 {
//!         let n = extent.length.min(buf.len() as u64) as usize;
//!         client.read(extent.offset, &mut buf[..n]).await?;
//!     }
//! }
//! client.disconnect().await?;
//! nbd.stop().await?;
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod handshake;
mod nbdkit;
mod proto;
mod qemu_nbd;
mod server;
mod uri;

pub use client::{ConnectOptions, Extent, NbdClient, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
pub use error::NbdError;
pub use nbdkit::{Nbdkit, NbdkitOptions};
pub use qemu_nbd::{QemuNbd, QemuNbdOptions};
pub use uri::{NbdAddr, NbdTarget, DEFAULT_PORT};

/// The `base:allocation` meta context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// The meta context name of a qemu dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>(_: &T) {}

    /// The replication engine spawns these futures onto a multi-threaded runtime.
    #[allow(dead_code)]
    async fn futures_are_send(c: NbdClient, mut buf: Vec<u8>) {
        send_sync(&c.clone());
        fn send<F: std::future::Future + Send>(_: F) {}
        send(c.read(0, &mut buf));
        send(c.write(0, &buf));
        send(c.write_zeroes(0, 1, true));
        send(c.trim(0, 1));
        send(c.flush());
        send(c.block_status("base:allocation", 0, 1));
        send(c.block_status_all("base:allocation", 0, 1));
        send(c.disconnect());
        send(NbdClient::connect(
            &NbdTarget::parse_uri("nbd://h/").unwrap(),
            ConnectOptions::default(),
        ));
        send(QemuNbd::start(
            std::path::Path::new("x"),
            QemuNbdOptions::new("raw"),
        ));
    }

    #[test]
    fn errors_and_launcher_are_send_sync() {
        send_sync(&NbdError::Protocol(String::new()));
        fn is_send_sync<T: Send + Sync>() {}
        is_send_sync::<QemuNbd>();
        is_send_sync::<NbdTarget>();
    }
}
