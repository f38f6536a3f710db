//! `ferry bench`: benchmarks side by side with the tools a user would otherwise use.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Full and delta sync against `qemu-img convert` and `rsync`.
    Replication(crate::cmd::bench_replication::Args),
    /// API latency under concurrent clients with many migrations in one appliance.
    Api(crate::cmd::bench_api::BenchApiArgs),
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Replication(args) => crate::cmd::bench_replication::run(args),
        BenchCommand::Api(args) => crate::cmd::bench_api::run(args),
    }
}
