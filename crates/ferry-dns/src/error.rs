//! Errors. Each message says what went wrong and what to check; none contains a TSIG secret.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong while reading or updating DNS records.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A TSIG key could not be parsed or used.
    #[error("invalid TSIG key: {0}")]
    InvalidKey(String),

    /// A name could not be parsed.
    #[error("'{name}' is not a valid DNS name: {reason}")]
    InvalidName { name: String, reason: String },

    /// The name is not inside the zone: nothing was sent.
    #[error(
        "'{name}' is not inside the zone '{zone}' that Ferry updates on {addr}: \
         use a name ending in '{zone}' or configure the zone that holds it"
    )]
    OutsideZone {
        addr: SocketAddr,
        zone: String,
        name: String,
    },

    /// The server did not accept the TSIG key (NOTAUTH with BADSIG/BADKEY/BADTIME, or no key).
    #[error(
        "the DNS server {addr} refused the update for {name}: TSIG key '{key}' not accepted \
         ({code}); {hint}"
    )]
    KeyRejected {
        addr: SocketAddr,
        name: String,
        /// The key's name, or `(none)` when the update was not signed.
        key: String,
        /// What the server said, e.g. `NOTAUTH/BADSIG`.
        code: String,
        hint: &'static str,
    },

    /// REFUSED: the server's policy does not allow this update.
    #[error(
        "the DNS server {addr} refused the update for {name} (REFUSED): is the zone '{zone}' \
         configured to allow updates from key '{key}'?"
    )]
    Refused {
        addr: SocketAddr,
        name: String,
        zone: String,
        key: String,
    },

    /// NOTAUTH in an answer correctly signed with our key: the key is fine, the update is not
    /// allowed (the server is not the zone's primary, or its ACL does not allow this key).
    #[error(
        "the DNS server {addr} did not accept the update for {name} (NOTAUTH; TSIG key '{key}' \
         was accepted): is it the primary server of zone '{zone}', and does the zone's ACL \
         allow updates with this key?"
    )]
    UpdateNotAllowed {
        addr: SocketAddr,
        name: String,
        zone: String,
        key: String,
    },

    /// The server does not serve the zone (NOTZONE, or REFUSED / no AA flag on a query).
    #[error(
        "the DNS server {addr} is not authoritative for zone '{zone}' ({code}): check the zone \
         name and that {addr} is its primary server"
    )]
    NotAuthoritative {
        addr: SocketAddr,
        zone: String,
        code: String,
    },

    /// Any other error code from the server.
    #[error("the DNS server {addr} answered {code} to the {what} for {name}")]
    Server {
        addr: SocketAddr,
        what: &'static str,
        name: String,
        code: String,
    },

    /// No answer within the timeout.
    #[error("no answer from DNS server {addr} within {secs}s: is it running and reachable?")]
    Timeout { addr: SocketAddr, secs: String },

    /// The connection failed (refused, unreachable, reset...).
    #[error(
        "could not talk to DNS server {addr}: {source}: is it running and listening on that \
         address and port?"
    )]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The answer could not be decoded or did not belong to our request.
    #[error("bad answer from DNS server {addr}: {reason}")]
    Protocol { addr: SocketAddr, reason: String },

    /// The answer to a signed update carried a missing or wrong TSIG signature.
    #[error(
        "the answer of DNS server {addr} to the update for {name} is not correctly signed with \
         TSIG key '{key}' ({reason}): the update may or may not have been applied; query the \
         record, and check that nothing sits between Ferry and the server"
    )]
    ResponseNotAuthentic {
        addr: SocketAddr,
        name: String,
        key: String,
        reason: String,
    },

    /// Knot DNS is not installed.
    #[error(
        "knotd (Knot DNS) is not installed: looked in PATH and /usr/sbin; install Debian's knot \
         package (scripts/install-deps.sh does)"
    )]
    KnotNotInstalled,

    /// Knot DNS did not start or did not answer.
    #[error("could not run the local Knot DNS server ({dir}): {reason}")]
    Knot { dir: PathBuf, reason: String },
}
