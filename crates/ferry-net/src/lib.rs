//! Networks of Ferry's local target, where instances are QEMU processes.
//!
//! A network is a Linux network namespace holding one bridge ([`BRIDGE`], `br0`), optionally
//! with an address of its own; instances attach with tap devices that are ports of that
//! bridge, QEMU running inside the namespace (`ip netns exec NS qemu-system-x86_64 ...
//! -netdev tap,ifname=IF,script=no,downscript=no`). The *production* network and each
//! isolated *migration* (UAT) network are separate namespaces: nothing routes or bridges
//! between them unless [`Network::link_to`] is called, so a test instance can carry the same
//! addresses as production without ever reaching it.
//!
//! Everything is done by running the standard `ip` tool (iproute2): each step can be
//! repeated by hand. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
//!
//! The API is blocking and cheap (each call runs one to a few short `ip` processes). From
//! tokio code, wrap calls in `tokio::task::spawn_blocking`; the probes have `*_async`
//! versions and [`Network::tokio_command`] builds the QEMU command line.
//!
//! Code runs inside a namespace with [`in_netns`]: a fresh thread `setns`es into it, so
//! sockets created there belong to that namespace. [`tcp_check`] and [`http_get`] build on
//! it.

mod error;
mod ip;
mod names;
mod netns;
mod network;

pub use error::{NetError, Result};
pub use ip::{netns_exists, netns_path, LinkInfo, NETNS_RUN_DIR};
pub use names::{sanitize_netns_name, validate_ifname, Cidr, MAX_IFNAME_LEN, MAX_NETNS_LEN};
pub use netns::{
    delete_namespace, ensure_namespace, http_get, http_get_async, in_netns, in_netns_async,
    tcp_check, tcp_check_async, tcp_connect_async, HttpResponse,
};
pub use network::{Link, Network, NetworkSpec, Tap, BRIDGE};
