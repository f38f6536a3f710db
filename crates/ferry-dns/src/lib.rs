//! Ferry's post-cutover DNS update.
//!
//! - [`DnsServer`] reads the A records of a name from the zone's primary server
//!   ([`DnsServer::query_a`]) and replaces them with one RFC 2136 UPDATE signed with TSIG
//!   (RFC 8945) ([`DnsServer::replace_a`]); [`DnsServer::restore`] puts back what was read
//!   before, for a rollback.
//! - [`TsigKey`] holds the key; its `Debug` never shows the secret.
//! - [`knot::KnotServer`] runs a real local Knot DNS server for tests and `ferry quickstart`.

pub mod action;
mod client;
mod error;
mod key;
pub mod knot;

pub use client::{parse_name, DnsServer, RecordSet, DEFAULT_TIMEOUT};
pub use error::DnsError;
pub use hickory_proto::rr::Name;
pub use key::{TsigAlgorithm, TsigKey, TSIG_FUDGE};

/// Result of this crate's operations.
pub type Result<T, E = DnsError> = std::result::Result<T, E>;
