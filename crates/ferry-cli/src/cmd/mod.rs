//! One module per top-level subcommand.

pub mod bench;
mod bench_replication;
pub mod disk;
pub mod pki;
pub mod util;
