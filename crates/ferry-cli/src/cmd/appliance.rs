//! `ferry appliance`: the control plane (REST API, orchestrator, scheduler).

use anyhow::{Context, Result};
use clap::Args;
use ferry_appliance::{Appliance, Config};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ApplianceArgs {
    /// Where the appliance keeps its state (SQLite database, keys, admin token).
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "/var/lib/ferry")]
    pub data_dir: PathBuf,
    /// Address to serve the API on.
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:7878")]
    pub listen: String,
    /// PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DB) to share state between
    /// appliances; SQLite in the data directory when unset.
    #[arg(long, env = "FERRY_DATABASE_URL", hide_env_values = true)]
    pub database: Option<String>,
    /// Key encrypting stored credentials (default DATA_DIR/secret.key). Appliances sharing
    /// a database must use the same key.
    #[arg(long, env = "FERRY_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Steps run at once by this appliance.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Lease on a running step, in milliseconds; renewed every third of it.
    #[arg(long, default_value_t = 15_000)]
    pub lease_ms: i64,
    /// Attempts per step before the migration fails.
    #[arg(long, default_value_t = 5)]
    pub max_attempts: i64,
    /// First retry delay in milliseconds (doubles each attempt, at most a minute).
    #[arg(long, default_value_t = 1_000)]
    pub backoff_ms: i64,
    /// Extra time every step takes (simulated work, for tests and demonstrations).
    #[arg(long, default_value_t = 0, hide = true)]
    pub step_delay_ms: u64,
}

pub fn run(a: ApplianceArgs) -> Result<ExitCode> {
    if a.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    if a.lease_ms < 300 {
        anyhow::bail!("--lease-ms must be at least 300");
    }
    let mut cfg = Config::new(a.data_dir.clone(), a.listen.clone());
    cfg.database = a.database.clone();
    cfg.secret_key_file = a.secret_key_file.clone();
    cfg.workers = a.workers;
    cfg.lease_ms = a.lease_ms;
    cfg.max_attempts = a.max_attempts.max(1);
    cfg.backoff_base_ms = a.backoff_ms.max(1);
    cfg.step_delay_ms = a.step_delay_ms;
    let rt = super::util::runtime()?;
    rt.block_on(async move {
        let app = Appliance::start(cfg)
            .await
            .with_context(|| format!("starting the appliance in {}", a.data_dir.display()))?;
        let s = &app.started;
        println!("Ferry appliance {} listening on http://{}", s.owner, s.addr);
        println!("database: {}", s.database);
        match &s.admin_token_file {
            Some(p) => println!(
                "admin token written to {} (mode 0600); use it with --token or FERRY_TOKEN",
                p.display()
            ),
            None => println!(
                "admin token: already created (see {}/admin-token on the appliance that created it)",
                a.data_dir.display()
            ),
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        app.serve(shutdown_signal()).await?;
        eprintln!("appliance stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
