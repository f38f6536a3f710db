//! One module per top-level subcommand.

pub mod bench;
mod bench_replication;
pub mod disk;
pub mod pki;
pub mod quickstart;
pub mod quickstart_disk;
pub mod util;
pub mod worker;
// Control plane.
pub mod appliance;
pub mod bench_api;
pub mod client;
pub mod credential;
pub mod inventory;
pub mod migration;
pub mod profile;
pub mod source;
pub mod target_iam;
