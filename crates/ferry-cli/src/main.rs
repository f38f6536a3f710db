//! `ferry`: one binary, one subcommand per component (see ARCHITECTURE.md).
//!
//! This is the only crate that prints for humans: tables, progress bars, `--json`.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move workloads from VMware and KVM into HPE Morpheus VM Essentials"
)]
struct Cli {
    /// Log filter, e.g. `info`, `ferry_replication=debug` (also FERRY_LOG).
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy and keep disks in sync (the replication engine on its own).
    #[command(subcommand)]
    Disk(cmd::disk::DiskCommand),
    /// Create the certificate authority and certificates for mutual TLS between Ferry's parts.
    #[command(subcommand)]
    Pki(cmd::pki::PkiCommand),
    /// Benchmarks against the tools a user would otherwise use.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    // Control-plane commands (appliance, source, target, inventory, group, profile, migration)
    // are added below this line.
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Disk(c) => cmd::disk::run(c),
        Command::Pki(c) => cmd::pki::run(c),
        Command::Bench(c) => cmd::bench::run(c),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
