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
    /// A real disk through the replication workflow on the embedded defaults.
    Quickstart(cmd::quickstart::Args),
    /// The target worker: receives syncs into the volumes of the instance it boots on.
    Worker(cmd::worker::WorkerArgs),
    // Control-plane commands (appliance, source, target, inventory, group, profile, migration)
    // are added below this line.
    /// The control plane: REST API, orchestrator and scheduler.
    Appliance(cmd::appliance::ApplianceArgs),
    /// Where workloads come from (vSphere, KVM hosts, agents, disk images).
    Source(cmd::source::SourceArgs),
    /// Where workloads go (VM Essentials, QEMU on this appliance, a local directory).
    Target(cmd::source::TargetArgs),
    /// Secrets the appliance keeps encrypted: accounts, keys, tokens.
    Credential(cmd::credential::CredentialArgs),
    /// Workloads: list, show, add, import from CSV.
    Inventory(cmd::inventory::InventoryArgs),
    /// Move groups (waves).
    Group(cmd::inventory::GroupArgs),
    /// Migration profiles from TOML files.
    Profile(cmd::profile::ProfileArgs),
    /// Start, watch and steer migrations.
    Migration(cmd::migration::MigrationArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Disk(c) => cmd::disk::run(c),
        Command::Pki(c) => cmd::pki::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Quickstart(a) => cmd::quickstart::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Appliance(c) => cmd::appliance::run(c),
        Command::Source(c) => cmd::source::run_source(c),
        Command::Target(c) => cmd::source::run_target(c),
        Command::Credential(c) => cmd::credential::run(c),
        Command::Inventory(c) => cmd::inventory::run_inventory(c),
        Command::Group(c) => cmd::inventory::run_group(c),
        Command::Profile(c) => cmd::profile::run(c),
        Command::Migration(c) => cmd::migration::run(c),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", cmd::util::error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // The filter is the log output's own: a step's warnings reach its migration's events
    // whatever --log says.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(ferry_appliance::step_log::StepWarnings::layer())
        .init();
}
