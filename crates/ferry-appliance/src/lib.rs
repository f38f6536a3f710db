//! The appliance: REST API, orchestrator and scheduler over one store.
//!
//! Depends on ferry-model (decisions) and ferry-store (persistence); never writes SQL and
//! never prints for humans (the CLI does). Steps reach platforms only through the traits
//! in [`adapters`].

pub mod adapters;
pub mod api;
pub mod csv_import;
pub mod engine;
pub mod error;
pub mod secrets;
pub mod step_log;
pub mod ui;

use engine::{Engine, EngineConfig};
use ferry_store::Store;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] ferry_store::StoreError),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("the HTTP server stopped: {0}")]
    Serve(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: String,
    /// `postgres://…`; SQLite in the data directory when unset.
    pub database: Option<String>,
    /// Credential encryption key; `DATA_DIR/secret.key` when unset. Appliances sharing a
    /// PostgreSQL database must share this key.
    pub secret_key_file: Option<PathBuf>,
    pub workers: usize,
    pub lease_ms: i64,
    pub step_delay_ms: u64,
    pub max_attempts: i64,
    pub backoff_base_ms: i64,
}

impl Config {
    pub fn new(data_dir: PathBuf, listen: String) -> Config {
        Config {
            data_dir,
            listen,
            database: None,
            secret_key_file: None,
            workers: 8,
            lease_ms: 15_000,
            step_delay_ms: 0,
            max_attempts: 5,
            backoff_base_ms: 1_000,
        }
    }
}

/// What a start did, for the operator.
#[derive(Debug, Clone)]
pub struct Started {
    pub addr: SocketAddr,
    /// Set when this start created the admin token (written to this file, mode 0600).
    pub admin_token_file: Option<PathBuf>,
    pub database: String,
    pub owner: String,
}

pub struct Appliance {
    pub started: Started,
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    state: api::AppState,
}

fn io_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> ApplianceError + '_ {
    move |source| ApplianceError::DataDir {
        path: path.display().to_string(),
        source,
    }
}

impl Appliance {
    /// Opens the store (creating the schema), creates the admin token at first start, and
    /// binds the listener.
    pub async fn start(cfg: Config) -> Result<Appliance, ApplianceError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(io_err(&cfg.data_dir))?;
        // As a service, without a home directory, the private keys of the workers' PKI
        // are sealed with a passphrase kept beside the appliance's other secrets.
        ferry_pki::keyfile::set_fallback_passphrase_file(cfg.data_dir.join("pki-passphrase"));
        let url = match &cfg.database {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", cfg.data_dir.join("ferry.db").display()),
        };
        let store = Store::open(&url).await?;
        let key_path = cfg
            .secret_key_file
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("secret.key"));
        let secrets = secrets::SecretBox::load_or_create(&key_path)?;

        // A stable owner id per data directory, so a restart reclaims its own leases at once.
        let owner_path = cfg.data_dir.join("appliance-id");
        let owner = match std::fs::read_to_string(&owner_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let id = format!(
                    "appliance-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                );
                std::fs::write(&owner_path, &id).map_err(io_err(&owner_path))?;
                id
            }
        };

        let mut admin_token_file = None;
        let token_path = cfg.data_dir.join("admin-token");
        let has_admin = store.list_tokens().await?.iter().any(|t| t.admin);
        if !has_admin {
            let token = secrets::new_token();
            secrets::write_private(&token_path, &format!("{token}\n"))?;
            match store
                .insert_token("admin", &secrets::hash_token(&token), true)
                .await
            {
                Ok(_) => admin_token_file = Some(token_path),
                Err(ferry_store::StoreError::Duplicate { .. }) => {
                    // Another appliance on the same database made it first.
                    let _ = std::fs::remove_file(&token_path);
                }
                Err(e) => return Err(e.into()),
            }
        }

        let engine = Arc::new(Engine {
            store,
            secrets: secrets.clone(),
            adapters: adapters::Adapters::default().keeping_state_in(&cfg.data_dir.join("cache")),
            running: Default::default(),
            config: EngineConfig {
                owner: owner.clone(),
                lease_ms: cfg.lease_ms,
                workers: cfg.workers,
                max_attempts: cfg.max_attempts,
                backoff_base_ms: cfg.backoff_base_ms,
                backoff_max_ms: 60_000,
                step_delay_ms: cfg.step_delay_ms,
                poll_ms: 100,
                work_dir: cfg.data_dir.join("work"),
            },
            wake: tokio::sync::Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|source| ApplianceError::Listen {
                addr: cfg.listen.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApplianceError::Listen {
                addr: cfg.listen.clone(),
                source,
            })?;
        let state = api::AppState {
            engine: engine.clone(),
            secrets,
            tokens: Default::default(),
        };
        let database = match &cfg.database {
            Some(u) => redact_url(u),
            None => url,
        };
        Ok(Appliance {
            started: Started {
                addr,
                admin_token_file,
                database,
                owner,
            },
            listener,
            engine,
            state,
        })
    }

    /// Serves the API and runs the orchestrator and scheduler until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ApplianceError> {
        let (tx, rx) = watch::channel(false);
        let tx = Arc::new(tx);
        let orch = tokio::spawn(self.engine.clone().run(rx.clone()));
        let sched = tokio::spawn(self.engine.clone().run_scheduler(rx.clone()));
        let app = api::router(self.state);
        let mut rx2 = rx.clone();
        let server = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            let _ = rx2.wait_for(|v| *v).await;
        });
        let stopper = {
            let tx = tx.clone();
            tokio::spawn(async move {
                shutdown.await;
                let _ = tx.send(true);
            })
        };
        let r = server.await.map_err(ApplianceError::Serve);
        stopper.abort();
        let _ = tx.send(true);
        let _ = orch.await;
        let _ = sched.await;
        self.engine.store.close().await;
        r
    }
}

/// Hides the password of a database URL.
pub fn redact_url(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &u[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &u[..s + 3], &u[at..]),
                None => u.to_string(),
            }
        }
        _ => u.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://ferry:secret@127.0.0.1:5432/ferry"),
            "postgres://ferry:***@127.0.0.1:5432/ferry"
        );
        assert_eq!(
            super::redact_url("sqlite:///tmp/x.db"),
            "sqlite:///tmp/x.db"
        );
    }
}
