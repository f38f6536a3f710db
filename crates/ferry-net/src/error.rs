use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong while building networks or probing them.
///
/// Failures of the `ip` tool quote its stderr verbatim and add what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A Linux interface name that the kernel would refuse (or that would be truncated).
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfName { name: String, reason: String },

    /// A network name that yields no usable namespace name.
    #[error("invalid network name {name:?}: {reason}")]
    InvalidNetworkName { name: String, reason: String },

    /// An address that is not `ADDR/PREFIX`.
    #[error("invalid address {value:?}: {reason} (expected e.g. 10.200.1.1/24)")]
    InvalidCidr { value: String, reason: String },

    /// `ip` is not installed.
    #[error("the `ip` tool (iproute2) was not found on PATH: install iproute2 (apt-get install iproute2)")]
    IpNotFound,

    /// `ip` was refused for lack of privilege.
    #[error("{action} needs root (CAP_SYS_ADMIN for namespaces, CAP_NET_ADMIN for links): run ferry as root or grant those capabilities; `{command}` said: {stderr}")]
    PermissionDenied {
        action: String,
        command: String,
        stderr: String,
    },

    /// The namespace a call refers to does not exist.
    #[error("network namespace {namespace:?} does not exist: create it first with Network::ensure (or ensure_namespace)")]
    NoSuchNamespace { namespace: String },

    /// Any other failure of `ip`.
    #[error("{action} failed: `{command}` exited with {status}: {stderr}")]
    Ip {
        action: String,
        command: String,
        status: String,
        stderr: String,
    },

    /// An I/O error outside the `ip` tool (spawning it, opening a namespace file, ...).
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },

    /// `setns(2)` into a namespace failed.
    #[error("entering network namespace {namespace:?} (setns CLONE_NEWNET) failed: {source}; this needs root (CAP_SYS_ADMIN)")]
    Setns {
        namespace: String,
        #[source]
        source: std::io::Error,
    },

    /// A TCP connect from inside a namespace did not succeed.
    #[error("cannot reach {addr} from network namespace {namespace:?}: {source}")]
    Unreachable {
        namespace: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// A probe took longer than its timeout.
    #[error("no answer from {addr} in network namespace {namespace:?} within {timeout:?}")]
    Timeout {
        namespace: String,
        addr: String,
        timeout: Duration,
    },

    /// A URL `http_get` cannot handle or an answer that is not HTTP.
    #[error("HTTP GET {url}: {reason}")]
    Http { url: String, reason: String },
}

/// Result alias of this crate.
pub type Result<T, E = NetError> = std::result::Result<T, E>;
