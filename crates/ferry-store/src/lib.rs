//! Ferry's persistence: the only code that writes SQL.
//!
//! One implementation serves SQLite (embedded default) and PostgreSQL (several appliances
//! sharing one state) through sqlx's `Any` driver with runtime queries. Schema migrations
//! are versioned per backend. The durable job queue hands a step to exactly one worker at
//! a time with a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, a single-writer
//! transaction on SQLite); every state change is stored in one transaction with the jobs
//! it enqueues or cancels and the events it records.

mod jobs;
mod rows;
mod schema;

pub use jobs::{ClaimedJob, Job, JobStatus};
pub use schema::SCHEMA_VERSION;

use ferry_model::*;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool, Row, Transaction};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, MutexGuard};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{what} '{key}' already exists")]
    Duplicate { what: &'static str, key: String },
    #[error("{what} {id} is still in use: other records (workloads, profiles, migrations) refer to it; delete or change those first")]
    InUse { what: &'static str, id: String },
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    #[error("migration {0} was changed concurrently; try again")]
    Conflict(Uuid),
    #[error("the lease on job {0} was lost (cancelled or taken over)")]
    LeaseLost(Uuid),
    #[error("corrupt row in the database: {0}")]
    Corrupt(String),
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://USER@HOST/DB")]
    BadUrl(String),
    #[error("the database schema is at version {found}, newer than this Ferry understands ({known}); upgrade Ferry")]
    SchemaTooNew { found: i64, known: i64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The persistence handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite allows one writer: writes take this lock so they never fail with "busy".
    write_lock: Option<Arc<Mutex<()>>>,
}

/// Limit/offset pagination.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}

impl Default for Page {
    fn default() -> Self {
        Page {
            limit: 50,
            offset: 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WorkloadFilter {
    pub name_contains: Option<String>,
    pub move_group_id: Option<Uuid>,
    pub source_id: Option<Uuid>,
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct MigrationFilter {
    pub state: Option<State>,
    pub workload_id: Option<Uuid>,
    pub move_group_id: Option<Uuid>,
}

/// An API token as stored: only its hash.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: Uuid,
    pub name: String,
    pub admin: bool,
    pub created_at: i64,
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub step: Step,
    pub run_at: i64,
    pub max_attempts: i64,
}

/// Everything one state change writes, atomically.
#[derive(Debug, Clone)]
pub struct Change {
    pub migration_id: Uuid,
    /// The version read before deciding; the write fails with `Conflict` if it moved.
    pub expected_version: i64,
    pub status: Status,
    pub last_error: Option<Option<String>>,
    pub next_sync_at: Option<Option<i64>>,
    pub schedule: Option<DeltaSchedule>,
    pub cancel_running: bool,
    pub enqueue: Vec<NewJob>,
    /// The job whose completion caused this change, fenced by its lease token.
    pub complete_job: Option<(Uuid, Uuid)>,
    /// The completed job failed (stored as `failed` rather than `done`).
    pub job_failed: bool,
    pub events: Vec<NewEvent>,
    pub sync_run: Option<SyncRun>,
}

impl Change {
    pub fn new(m: &Migration, status: Status) -> Change {
        Change {
            migration_id: m.id,
            expected_version: m.version,
            status,
            last_error: None,
            next_sync_at: None,
            schedule: None,
            cancel_running: false,
            enqueue: vec![],
            complete_job: None,
            job_failed: false,
            events: vec![],
            sync_run: None,
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn map_unique(e: sqlx::Error, what: &'static str, key: &str) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        if db.kind() == sqlx::error::ErrorKind::UniqueViolation {
            return StoreError::Duplicate {
                what,
                key: key.to_string(),
            };
        }
        if db.kind() == sqlx::error::ErrorKind::ForeignKeyViolation {
            return StoreError::NotFound {
                what: "referenced record",
                id: format!("for {what} '{key}'"),
            };
        }
    }
    StoreError::Db(e)
}

pub(crate) fn opt_uuid(u: Option<Uuid>) -> Option<String> {
    u.map(|u| u.to_string())
}

pub(crate) struct WriteTx<'a> {
    pub tx: Transaction<'static, Any>,
    _guard: Option<MutexGuard<'a, ()>>,
}

impl WriteTx<'_> {
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    /// `url` is `sqlite://PATH` or `postgres://…`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::BadUrl(url.to_string()));
        };
        let pool = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            use sqlx::Executor;
                            conn.execute("PRAGMA journal_mode=WAL").await?;
                            conn.execute("PRAGMA synchronous=NORMAL").await?;
                            conn.execute("PRAGMA busy_timeout=10000").await?;
                            conn.execute("PRAGMA foreign_keys=ON").await?;
                            conn.execute("PRAGMA cache_size=-16384").await?;
                            conn.execute("PRAGMA temp_store=MEMORY").await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await?
            }
        };
        let store = Store {
            pool,
            backend,
            write_lock: (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(()))),
        };
        schema::migrate(&store).await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) async fn write(&self) -> Result<WriteTx<'_>> {
        let guard = match &self.write_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        // BEGIN IMMEDIATE takes SQLite's write lock up front, waiting (busy_timeout) for a
        // transaction still being rolled back, instead of failing later with "database is
        // locked" when a read would have to be upgraded.
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _guard: guard })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- settings and tokens -------------------------------------------------------

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Sets `key` only if it is not set yet; returns whether this call set it.
    pub async fn set_setting_once(&self, key: &str, value: &str) -> Result<bool> {
        let mut w = self.write().await?;
        let n = sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        Ok(n == 1)
    }

    pub async fn insert_token(&self, name: &str, token_hash: &str, admin: bool) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let mut w = self.write().await?;
        sqlx::query("INSERT INTO api_tokens (id, name, token_hash, admin, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(id.to_string())
            .bind(name)
            .bind(token_hash)
            .bind(admin as i64)
            .bind(now_ms())
            .execute(&mut *w.tx)
            .await
            .map_err(|e| map_unique(e, "token", name))?;
        w.commit().await?;
        Ok(id)
    }

    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<TokenRecord>> {
        let row =
            sqlx::query("SELECT id, name, admin, created_at FROM api_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| rows::token(&r)).transpose()
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows =
            sqlx::query("SELECT id, name, admin, created_at FROM api_tokens ORDER BY created_at")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(rows::token).collect()
    }

    // ---- credentials ---------------------------------------------------------------

    pub async fn insert_credential(
        &self,
        name: &str,
        kind: CredentialKind,
        username: Option<&str>,
        secret_enc: &str,
    ) -> Result<Credential> {
        let mut w = self.write().await?;
        let c = insert_credential_tx(&mut w.tx, name, kind, username, secret_enc).await?;
        w.commit().await?;
        Ok(c)
    }

    pub async fn list_credentials(&self, page: Page) -> Result<(Vec<Credential>, i64)> {
        let rows = sqlx::query("SELECT id, name, kind, username, created_at FROM credentials ORDER BY name LIMIT $1 OFFSET $2")
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let total = self.count("SELECT COUNT(*) FROM credentials").await?;
        Ok((
            rows.iter().map(rows::credential).collect::<Result<_>>()?,
            total,
        ))
    }

    /// A credential's public face and its sealed secret, by id or name.
    pub async fn credential_with_secret(&self, key: &str) -> Result<(Credential, String)> {
        let row = sqlx::query(
            "SELECT id, name, kind, username, created_at, secret_enc FROM credentials WHERE id = $1 OR name = $2",
        )
        .bind(key)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound {
            what: "credential",
            id: key.to_string(),
        })?;
        Ok((rows::credential(&row)?, row.try_get("secret_enc")?))
    }

    pub async fn credential_secret(&self, id: Uuid) -> Result<String> {
        self.credential_secret_by_key(&id.to_string()).await
    }

    /// The sealed secret of the credential named `key` (its name or id).
    pub async fn credential_secret_by_key(&self, key: &str) -> Result<String> {
        let row = sqlx::query("SELECT secret_enc FROM credentials WHERE id = $1 OR name = $2")
            .bind(key)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound {
                what: "credential",
                id: key.to_string(),
            })?;
        Ok(row.get(0))
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query(sql)
            .fetch_one(&self.pool)
            .await?
            .get::<i64, _>(0))
    }

    // ---- sources and targets -------------------------------------------------------

    pub async fn insert_source(&self, s: &NewSource) -> Result<Source> {
        let src = Source {
            id: Uuid::new_v4(),
            name: s.name.clone(),
            kind: s.kind,
            endpoint: s.endpoint.clone(),
            credential_id: s.credential_id,
            config: s.config.clone(),
            created_at: now_ms(),
        };
        self.insert_endpoint(
            "sources",
            "source",
            EndpointRow {
                id: src.id,
                name: &src.name,
                kind: src.kind.as_str(),
                endpoint: &src.endpoint,
                credential_id: src.credential_id,
                config: &src.config,
                created_at: src.created_at,
            },
        )
        .await?;
        Ok(src)
    }

    pub async fn list_sources(&self, page: Page) -> Result<(Vec<Source>, i64)> {
        self.list_endpoints("sources", page, rows::source).await
    }

    /// By id, or by name when `key` is not a UUID.
    pub async fn get_source(&self, key: &str) -> Result<Source> {
        self.get_endpoint("sources", "source", key, rows::source)
            .await
    }

    // Sources and targets share one shape; these serve both tables.

    async fn insert_endpoint(
        &self,
        table: &str,
        what: &'static str,
        e: EndpointRow<'_>,
    ) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(&format!("INSERT INTO {table} (id, name, kind, endpoint, credential_id, config, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"))
            .bind(e.id.to_string())
            .bind(e.name)
            .bind(e.kind)
            .bind(e.endpoint.clone())
            .bind(opt_uuid(e.credential_id))
            .bind(e.config.to_string())
            .bind(e.created_at)
            .execute(&mut *w.tx)
            .await
            .map_err(|err| map_unique(err, what, e.name))?;
        w.commit().await
    }

    async fn list_endpoints<T>(
        &self,
        table: &str,
        page: Page,
        map: fn(&sqlx::any::AnyRow) -> Result<T>,
    ) -> Result<(Vec<T>, i64)> {
        let rows = sqlx::query(&format!("SELECT id, name, kind, endpoint, credential_id, config, created_at FROM {table} ORDER BY name LIMIT $1 OFFSET $2"))
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let total = self.count(&format!("SELECT COUNT(*) FROM {table}")).await?;
        Ok((rows.iter().map(map).collect::<Result<_>>()?, total))
    }

    async fn get_endpoint<T>(
        &self,
        table: &str,
        what: &'static str,
        key: &str,
        map: fn(&sqlx::any::AnyRow) -> Result<T>,
    ) -> Result<T> {
        let row = sqlx::query(&format!("SELECT id, name, kind, endpoint, credential_id, config, created_at FROM {table} WHERE id = $1 OR name = $2"))
            .bind(key)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what, id: key.to_string() })?;
        map(&row)
    }

    pub async fn delete_source(&self, id: Uuid) -> Result<()> {
        self.delete("sources", "source", id).await
    }

    async fn delete(&self, table: &str, what: &'static str, id: Uuid) -> Result<()> {
        let mut w = self.write().await?;
        let n = sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
            .bind(id.to_string())
            .execute(&mut *w.tx)
            .await
            .map_err(|e| match map_unique(e, what, &id.to_string()) {
                StoreError::NotFound { .. } => StoreError::InUse {
                    what,
                    id: id.to_string(),
                },
                other => other,
            })?
            .rows_affected();
        w.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what,
                id: id.to_string(),
            });
        }
        Ok(())
    }

    pub async fn insert_target(&self, t: &NewTarget) -> Result<Target> {
        let tgt = Target {
            id: Uuid::new_v4(),
            name: t.name.clone(),
            kind: t.kind,
            endpoint: t.endpoint.clone(),
            credential_id: t.credential_id,
            config: t.config.clone(),
            created_at: now_ms(),
        };
        self.insert_endpoint(
            "targets",
            "target",
            EndpointRow {
                id: tgt.id,
                name: &tgt.name,
                kind: tgt.kind.as_str(),
                endpoint: &tgt.endpoint,
                credential_id: tgt.credential_id,
                config: &tgt.config,
                created_at: tgt.created_at,
            },
        )
        .await?;
        Ok(tgt)
    }

    pub async fn list_targets(&self, page: Page) -> Result<(Vec<Target>, i64)> {
        self.list_endpoints("targets", page, rows::target).await
    }

    pub async fn get_target(&self, key: &str) -> Result<Target> {
        self.get_endpoint("targets", "target", key, rows::target)
            .await
    }

    /// Replaces a target's endpoint, credential and config.
    /// Replaces a source's endpoint, credential and config (its name and kind stay).
    pub async fn update_source(&self, src: &Source) -> Result<Source> {
        self.update_endpoint(
            "sources",
            "source",
            src.id,
            &src.endpoint,
            src.credential_id,
            &src.config,
        )
        .await?;
        Ok(src.clone())
    }

    /// The shared update of a source's or target's endpoint, credential and config.
    async fn update_endpoint(
        &self,
        table: &str,
        what: &'static str,
        id: Uuid,
        endpoint: &Option<String>,
        credential_id: Option<Uuid>,
        config: &serde_json::Value,
    ) -> Result<()> {
        let mut w = self.write().await?;
        let n = sqlx::query(&format!(
            "UPDATE {table} SET endpoint = $1, credential_id = $2, config = $3 WHERE id = $4"
        ))
        .bind(endpoint.clone())
        .bind(opt_uuid(credential_id))
        .bind(config.to_string())
        .bind(id.to_string())
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        w.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what,
                id: id.to_string(),
            });
        }
        Ok(())
    }

    /// Replaces a profile's spec (its name stays: migrations refer to the profile).
    pub async fn update_profile(&self, id: Uuid, spec: &ProfileSpec) -> Result<Profile> {
        let mut w = self.write().await?;
        let n = sqlx::query("UPDATE profiles SET spec = $1 WHERE id = $2")
            .bind(serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            .bind(id.to_string())
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        w.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "profile",
                id: id.to_string(),
            });
        }
        self.get_profile(&id.to_string()).await
    }

    pub async fn update_target(&self, t: &Target) -> Result<Target> {
        self.update_endpoint(
            "targets",
            "target",
            t.id,
            &t.endpoint,
            t.credential_id,
            &t.config,
        )
        .await?;
        Ok(t.clone())
    }

    pub async fn delete_target(&self, id: Uuid) -> Result<()> {
        self.delete("targets", "target", id).await
    }

    // ---- move groups ---------------------------------------------------------------

    pub async fn insert_group(&self, g: &NewMoveGroup) -> Result<MoveGroup> {
        let mut w = self.write().await?;
        let grp = insert_group_tx(&mut w.tx, g).await?;
        w.commit().await?;
        Ok(grp)
    }

    pub async fn list_groups(&self, page: Page) -> Result<(Vec<MoveGroup>, i64)> {
        let rows = sqlx::query("SELECT id, name, target_date, concurrency, cutover_window, cutover_requested, created_at FROM move_groups ORDER BY name LIMIT $1 OFFSET $2")
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let total = self.count("SELECT COUNT(*) FROM move_groups").await?;
        Ok((rows.iter().map(rows::group).collect::<Result<_>>()?, total))
    }

    pub async fn get_group(&self, key: &str) -> Result<MoveGroup> {
        let row = sqlx::query("SELECT id, name, target_date, concurrency, cutover_window, cutover_requested, created_at FROM move_groups WHERE id = $1 OR name = $2")
            .bind(key)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "move group", id: key.to_string() })?;
        rows::group(&row)
    }

    pub async fn set_group_cutover(&self, id: Uuid, requested: bool) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE move_groups SET cutover_requested = $1 WHERE id = $2")
            .bind(requested as i64)
            .bind(id.to_string())
            .execute(&mut *w.tx)
            .await?;
        w.commit().await?;
        Ok(())
    }

    pub async fn groups_with_cutover(&self) -> Result<Vec<MoveGroup>> {
        let rows = sqlx::query("SELECT id, name, target_date, concurrency, cutover_window, cutover_requested, created_at FROM move_groups WHERE cutover_requested = 1")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::group).collect()
    }

    // ---- workloads -----------------------------------------------------------------

    pub async fn insert_workload(&self, w: &NewWorkload) -> Result<Workload> {
        let mut tx = self.write().await?;
        let wl = insert_workload_tx(&mut tx.tx, w).await?;
        tx.commit().await?;
        Ok(wl)
    }

    /// Imports rows all-or-nothing: each row's credential, move group (created by name if
    /// missing) and workload. Returns the workloads created.
    pub async fn import_workloads(&self, rows: Vec<ImportRow>) -> Result<Vec<Workload>> {
        let mut w = self.write().await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut groups: std::collections::HashMap<String, Uuid> = Default::default();
        for row in rows {
            let mut nw = row.workload;
            if let Some(gname) = row.move_group_name {
                let gid = match groups.get(&gname) {
                    Some(id) => *id,
                    None => {
                        let existing = sqlx::query("SELECT id FROM move_groups WHERE name = $1")
                            .bind(&gname)
                            .fetch_optional(&mut *w.tx)
                            .await?;
                        let id = match existing {
                            Some(r) => rows::uuid(&r, "id")?,
                            None => {
                                insert_group_tx(
                                    &mut w.tx,
                                    &NewMoveGroup {
                                        name: gname.clone(),
                                        target_date: row.group_target_date.clone(),
                                        concurrency: 1,
                                        cutover_window: None,
                                    },
                                )
                                .await?
                                .id
                            }
                        };
                        groups.insert(gname, id);
                        id
                    }
                };
                nw.move_group_id = Some(gid);
            }
            if let Some((kind, username, secret_enc)) = row.credential {
                let name = format!("{}-{}", nw.name, kind.as_str());
                let c =
                    insert_credential_tx(&mut w.tx, &name, kind, username.as_deref(), &secret_enc)
                        .await?;
                nw.credential_id = Some(c.id);
            }
            out.push(insert_workload_tx(&mut w.tx, &nw).await?);
        }
        w.commit().await?;
        Ok(out)
    }

    pub async fn workload_names_existing(&self, names: &[String]) -> Result<Vec<String>> {
        let mut found = vec![];
        for chunk in names.chunks(200) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT name FROM workloads WHERE name IN ({})",
                placeholders.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for n in chunk {
                q = q.bind(n.as_str());
            }
            for r in q.fetch_all(&self.pool).await? {
                found.push(r.get::<String, _>(0));
            }
        }
        Ok(found)
    }

    pub async fn list_workloads(
        &self,
        f: &WorkloadFilter,
        page: Page,
    ) -> Result<(Vec<Workload>, i64)> {
        let mut clauses = vec![];
        let mut binds: Vec<String> = vec![];
        if let Some(n) = &f.name_contains {
            binds.push(format!("%{}%", n.replace(['%', '_'], "")));
            clauses.push(format!("name LIKE ${}", binds.len()));
        }
        if let Some(g) = f.move_group_id {
            binds.push(g.to_string());
            clauses.push(format!("move_group_id = ${}", binds.len()));
        }
        if let Some(s) = f.source_id {
            binds.push(s.to_string());
            clauses.push(format!("source_id = ${}", binds.len()));
        }
        if let Some(t) = &f.tag {
            binds.push(format!("%{}%", serde_json::Value::String(t.clone())));
            clauses.push(format!("data LIKE ${}", binds.len()));
        }
        let wh = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let n = binds.len();
        let sql = format!(
            "SELECT id, name, source_id, move_group_id, group_order, data, created_at FROM workloads{wh} ORDER BY name LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        let rows = q
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let csql = format!("SELECT COUNT(*) FROM workloads{wh}");
        let mut cq = sqlx::query(&csql);
        for b in &binds {
            cq = cq.bind(b.as_str());
        }
        let total: i64 = cq.fetch_one(&self.pool).await?.get(0);
        Ok((
            rows.iter().map(rows::workload).collect::<Result<_>>()?,
            total,
        ))
    }

    pub async fn get_workload(&self, key: &str) -> Result<Workload> {
        let row = sqlx::query("SELECT id, name, source_id, move_group_id, group_order, data, created_at FROM workloads WHERE id = $1 OR name = $2")
            .bind(key)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "workload", id: key.to_string() })?;
        rows::workload(&row)
    }

    /// Stores a changed workload (its name is fixed).
    pub async fn update_workload(&self, w: &Workload) -> Result<Workload> {
        let mut tx = self.write().await?;
        let n = sqlx::query("UPDATE workloads SET source_id = $1, move_group_id = $2, group_order = $3, data = $4 WHERE id = $5")
            .bind(opt_uuid(w.source_id))
            .bind(opt_uuid(w.move_group_id))
            .bind(w.group_order as i64)
            .bind(rows::to_json(w)?)
            .bind(w.id.to_string())
            .execute(&mut *tx.tx)
            .await
            .map_err(|e| map_unique(e, "workload", &w.name))?
            .rows_affected();
        tx.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "workload",
                id: w.id.to_string(),
            });
        }
        Ok(w.clone())
    }

    // ---- profiles ------------------------------------------------------------------

    pub async fn insert_profile(&self, spec: &ProfileSpec) -> Result<Profile> {
        let p = Profile {
            id: Uuid::new_v4(),
            spec: spec.clone(),
            created_at: now_ms(),
        };
        let mut w = self.write().await?;
        sqlx::query("INSERT INTO profiles (id, name, spec, created_at) VALUES ($1, $2, $3, $4)")
            .bind(p.id.to_string())
            .bind(&spec.name)
            .bind(serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            .bind(p.created_at)
            .execute(&mut *w.tx)
            .await
            .map_err(|e| map_unique(e, "profile", &spec.name))?;
        w.commit().await?;
        Ok(p)
    }

    pub async fn list_profiles(&self, page: Page) -> Result<(Vec<Profile>, i64)> {
        let rows = sqlx::query(
            "SELECT id, spec, created_at FROM profiles ORDER BY name LIMIT $1 OFFSET $2",
        )
        .bind(page.limit)
        .bind(page.offset)
        .fetch_all(&self.pool)
        .await?;
        let total = self.count("SELECT COUNT(*) FROM profiles").await?;
        Ok((
            rows.iter().map(rows::profile).collect::<Result<_>>()?,
            total,
        ))
    }

    pub async fn get_profile(&self, key: &str) -> Result<Profile> {
        let row =
            sqlx::query("SELECT id, spec, created_at FROM profiles WHERE id = $1 OR name = $2")
                .bind(key)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound {
                    what: "profile",
                    id: key.to_string(),
                })?;
        rows::profile(&row)
    }

    // ---- migrations ----------------------------------------------------------------

    /// Creates a migration in `onboarded` with its first event.
    pub async fn insert_migration(
        &self,
        workload_id: Uuid,
        profile_id: Uuid,
        target_id: Uuid,
        status: Status,
        schedule: DeltaSchedule,
    ) -> Result<Migration> {
        let now = now_ms();
        let mut w = self.write().await?;
        let workload_name: String = sqlx::query("SELECT name FROM workloads WHERE id = $1")
            .bind(workload_id.to_string())
            .fetch_optional(&mut *w.tx)
            .await?
            .ok_or(StoreError::NotFound {
                what: "workload",
                id: workload_id.to_string(),
            })?
            .get(0);
        let m = Migration {
            id: Uuid::new_v4(),
            workload_id,
            workload_name,
            profile_id,
            target_id,
            status,
            schedule,
            next_sync_at: None,
            last_error: None,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        let active = sqlx::query("SELECT id FROM migrations WHERE workload_id = $1 AND state NOT IN ('completed', 'rolled_back', 'cancelled')")
            .bind(workload_id.to_string())
            .fetch_optional(&mut *w.tx)
            .await?;
        if let Some(r) = active {
            let id: String = r.get(0);
            return Err(StoreError::Duplicate {
                what: "active migration for this workload",
                key: id,
            });
        }
        sqlx::query("INSERT INTO migrations (id, workload_id, workload_name, profile_id, target_id, state, status, schedule, next_sync_at, last_error, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, 1, $9, $10)")
            .bind(m.id.to_string())
            .bind(workload_id.to_string())
            .bind(&m.workload_name)
            .bind(profile_id.to_string())
            .bind(target_id.to_string())
            .bind(m.status.state.as_str())
            .bind(rows::to_json(&m.status)?)
            .bind(rows::to_json(&m.schedule)?)
            .bind(now)
            .bind(now)
            .execute(&mut *w.tx)
            .await
            .map_err(|e| map_unique(e, "migration", &m.id.to_string()))?;
        let mut ev = NewEvent::new(Some(m.id), "migration.created", "migration created");
        ev.data = serde_json::json!({"workload_id": workload_id, "profile_id": profile_id});
        insert_event_tx(&mut w.tx, &ev, now).await?;
        w.commit().await?;
        Ok(m)
    }

    pub async fn get_migration(&self, id: Uuid) -> Result<Migration> {
        let row = sqlx::query(&format!("{MIGRATION_COLS} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound {
                what: "migration",
                id: id.to_string(),
            })?;
        rows::migration(&row)
    }

    pub async fn list_migrations(
        &self,
        f: &MigrationFilter,
        page: Page,
    ) -> Result<(Vec<Migration>, i64)> {
        let mut clauses = vec![];
        let mut binds: Vec<String> = vec![];
        if let Some(s) = f.state {
            binds.push(s.as_str().to_string());
            clauses.push(format!("state = ${}", binds.len()));
        }
        if let Some(w) = f.workload_id {
            binds.push(w.to_string());
            clauses.push(format!("workload_id = ${}", binds.len()));
        }
        if let Some(g) = f.move_group_id {
            binds.push(g.to_string());
            clauses.push(format!(
                "workload_id IN (SELECT id FROM workloads WHERE move_group_id = ${})",
                binds.len()
            ));
        }
        let wh = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        let n = binds.len();
        let sql = format!(
            "{MIGRATION_COLS}{wh} ORDER BY created_at, id LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        let rows = q
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let csql = format!("SELECT COUNT(*) FROM migrations{wh}");
        let mut cq = sqlx::query(&csql);
        for b in &binds {
            cq = cq.bind(b.as_str());
        }
        let total: i64 = cq.fetch_one(&self.pool).await?.get(0);
        Ok((
            rows.iter().map(rows::migration).collect::<Result<_>>()?,
            total,
        ))
    }

    /// Migrations whose scheduled delta is due.
    pub async fn due_syncs(&self, now: i64, limit: i64) -> Result<Vec<Migration>> {
        let rows = sqlx::query(&format!(
            "{MIGRATION_COLS} WHERE next_sync_at IS NOT NULL AND next_sync_at <= $1 ORDER BY next_sync_at LIMIT $2"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::migration).collect()
    }

    /// Stores a state change with its jobs and events in one transaction.
    pub async fn apply(&self, c: Change) -> Result<Migration> {
        let now = now_ms();
        let mut w = self.write().await?;
        let id = c.migration_id.to_string();
        if let Some((job_id, token)) = c.complete_job {
            let n = sqlx::query("UPDATE jobs SET status = $1, lease_token = NULL, lease_owner = NULL, updated_at = $2 WHERE id = $3 AND status = 'running' AND lease_token = $4")
                .bind(if c.job_failed { "failed" } else { "done" })
                .bind(now)
                .bind(job_id.to_string())
                .bind(token.to_string())
                .execute(&mut *w.tx)
                .await?
                .rows_affected();
            if n != 1 {
                return Err(StoreError::LeaseLost(job_id));
            }
        }
        let mut sets = vec![
            "state = $1".to_string(),
            "status = $2".to_string(),
            "version = version + 1".to_string(),
            "updated_at = $3".to_string(),
        ];
        let mut extra: Vec<Option<String>> = vec![];
        let mut extra_i: Vec<Option<i64>> = vec![];
        if let Some(le) = &c.last_error {
            extra.push(le.clone());
            sets.push(format!("last_error = ${}", 3 + extra.len()));
        }
        if let Some(s) = &c.schedule {
            extra.push(Some(rows::to_json(s)?));
            sets.push(format!("schedule = ${}", 3 + extra.len()));
        }
        let base = 3 + extra.len();
        if let Some(ns) = c.next_sync_at {
            extra_i.push(ns);
            sets.push(format!("next_sync_at = ${}", base + extra_i.len()));
        }
        let n_all = base + extra_i.len();
        let sql = format!(
            "UPDATE migrations SET {} WHERE id = ${} AND version = ${}",
            sets.join(", "),
            n_all + 1,
            n_all + 2
        );
        let mut q = sqlx::query(&sql)
            .bind(c.status.state.as_str())
            .bind(rows::to_json(&c.status)?)
            .bind(now);
        for e in extra {
            q = q.bind(e);
        }
        for e in extra_i {
            q = q.bind(e);
        }
        let n = q
            .bind(&id)
            .bind(c.expected_version)
            .execute(&mut *w.tx)
            .await?
            .rows_affected();
        if n != 1 {
            return Err(StoreError::Conflict(c.migration_id));
        }
        if c.cancel_running {
            sqlx::query("UPDATE jobs SET status = 'cancelled', lease_token = NULL, updated_at = $1 WHERE migration_id = $2 AND status IN ('queued', 'running')")
                .bind(now)
                .bind(&id)
                .execute(&mut *w.tx)
                .await?;
        }
        for j in &c.enqueue {
            jobs::enqueue_tx(&mut w.tx, c.migration_id, j, now).await?;
        }
        for e in &c.events {
            insert_event_tx(&mut w.tx, e, now).await?;
        }
        if let Some(s) = &c.sync_run {
            sqlx::query("INSERT INTO syncs (id, migration_id, kind, generation, bytes_total, bytes_sent, started_at, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(s.id.to_string())
                .bind(s.migration_id.to_string())
                .bind(s.kind.as_str())
                .bind(s.generation as i64)
                .bind(s.bytes_total as i64)
                .bind(s.bytes_sent as i64)
                .bind(s.started_at)
                .bind(s.finished_at)
                .execute(&mut *w.tx)
                .await?;
        }
        let row = sqlx::query(&format!("{MIGRATION_COLS} WHERE id = $1"))
            .bind(&id)
            .fetch_one(&mut *w.tx)
            .await?;
        w.commit().await?;
        rows::migration(&row)
    }

    pub async fn list_syncs(&self, migration_id: Uuid) -> Result<Vec<SyncRun>> {
        let rows = sqlx::query("SELECT id, migration_id, kind, generation, bytes_total, bytes_sent, started_at, finished_at FROM syncs WHERE migration_id = $1 ORDER BY generation")
            .bind(migration_id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::sync_run).collect()
    }

    /// Counts of migrations per state.
    pub async fn count_by_state(&self) -> Result<Vec<(State, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM migrations GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut out = vec![];
        for r in rows {
            let s: String = r.get(0);
            let st = State::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("state {s}")))?;
            out.push((st, r.get::<i64, _>(1)));
        }
        Ok(out)
    }

    // ---- events and logs -----------------------------------------------------------

    /// How many events of `kind` each migration has (migrations with none are absent).
    pub async fn count_events_by_migration(&self, kind: &str) -> Result<HashMap<Uuid, i64>> {
        let rows = sqlx::query(
            "SELECT migration_id, COUNT(*) FROM events WHERE kind = $1 AND migration_id IS NOT NULL GROUP BY migration_id",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for r in rows {
            let id: String = r.get(0);
            let id = Uuid::parse_str(&id)
                .map_err(|_| StoreError::Corrupt(format!("migration id {id}")))?;
            out.insert(id, r.get::<i64, _>(1));
        }
        Ok(out)
    }

    pub async fn insert_event(&self, e: &NewEvent) -> Result<()> {
        let mut w = self.write().await?;
        insert_event_tx(&mut w.tx, e, now_ms()).await?;
        w.commit().await
    }

    /// Events with id greater than `after`, oldest first.
    pub async fn list_events(
        &self,
        migration_id: Option<Uuid>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let rows = match migration_id {
            Some(m) => sqlx::query("SELECT id, migration_id, kind, step, job_id, message, data, at FROM events WHERE migration_id = $1 AND id > $2 ORDER BY id LIMIT $3")
                .bind(m.to_string())
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
            None => sqlx::query("SELECT id, migration_id, kind, step, job_id, message, data, at FROM events WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        };
        rows.iter().map(rows::event).collect()
    }

    /// The id of the newest event (0 when there is none): where a live view starts.
    pub async fn last_event_id(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) AS last FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(sqlx::Row::try_get::<i64, _>(&row, "last")?)
    }

    /// The newest event of `kind` for a migration (facts a later step reads back).
    pub async fn latest_event(&self, migration_id: Uuid, kind: &str) -> Result<Option<Event>> {
        let row = sqlx::query("SELECT id, migration_id, kind, step, job_id, message, data, at FROM events WHERE migration_id = $1 AND kind = $2 ORDER BY id DESC LIMIT 1")
            .bind(migration_id.to_string())
            .bind(kind)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::event).transpose()
    }

    pub async fn insert_log(
        &self,
        migration_id: Option<Uuid>,
        origin: &str,
        level: &str,
        message: &str,
    ) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query(
            "INSERT INTO logs (migration_id, origin, level, message, at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(opt_uuid(migration_id))
        .bind(origin)
        .bind(level)
        .bind(message)
        .bind(now_ms())
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    pub async fn list_logs(
        &self,
        migration_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LogLine>> {
        let rows = sqlx::query("SELECT id, migration_id, origin, level, message, at FROM logs WHERE migration_id = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(migration_id.to_string())
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::log_line).collect()
    }
}

pub(crate) const MIGRATION_COLS: &str = "SELECT id, workload_id, workload_name, profile_id, target_id, status, schedule, next_sync_at, last_error, version, created_at, updated_at FROM migrations";

/// One valid CSV row, ready to store.
#[derive(Debug, Clone)]
pub struct ImportRow {
    pub workload: NewWorkload,
    pub move_group_name: Option<String>,
    pub group_target_date: Option<String>,
    /// (kind, username, encrypted secret)
    pub credential: Option<(CredentialKind, Option<String>, String)>,
}

async fn insert_event_tx(tx: &mut Transaction<'static, Any>, e: &NewEvent, now: i64) -> Result<()> {
    sqlx::query("INSERT INTO events (migration_id, kind, step, job_id, message, data, at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(opt_uuid(e.migration_id))
        .bind(&e.kind)
        .bind(e.step.map(|s| s.as_str()))
        .bind(opt_uuid(e.job_id))
        .bind(&e.message)
        .bind(e.data.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_credential_tx(
    tx: &mut Transaction<'static, Any>,
    name: &str,
    kind: CredentialKind,
    username: Option<&str>,
    secret_enc: &str,
) -> Result<Credential> {
    let c = Credential {
        id: Uuid::new_v4(),
        name: name.to_string(),
        kind,
        username: username.map(str::to_string),
        created_at: now_ms(),
    };
    sqlx::query("INSERT INTO credentials (id, name, kind, username, secret_enc, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(c.id.to_string())
        .bind(&c.name)
        .bind(kind.as_str())
        .bind(c.username.clone())
        .bind(secret_enc)
        .bind(c.created_at)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_unique(e, "credential", name))?;
    Ok(c)
}

async fn insert_group_tx(
    tx: &mut Transaction<'static, Any>,
    g: &NewMoveGroup,
) -> Result<MoveGroup> {
    let grp = MoveGroup {
        id: Uuid::new_v4(),
        name: g.name.clone(),
        target_date: g.target_date.clone(),
        concurrency: g.concurrency,
        cutover_window: g.cutover_window.clone(),
        cutover_requested: false,
        created_at: now_ms(),
    };
    sqlx::query("INSERT INTO move_groups (id, name, target_date, concurrency, cutover_window, cutover_requested, created_at) VALUES ($1, $2, $3, $4, $5, 0, $6)")
        .bind(grp.id.to_string())
        .bind(&grp.name)
        .bind(grp.target_date.clone())
        .bind(grp.concurrency as i64)
        .bind(grp.cutover_window.clone())
        .bind(grp.created_at)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_unique(e, "move group", &g.name))?;
    Ok(grp)
}

async fn insert_workload_tx(
    tx: &mut Transaction<'static, Any>,
    w: &NewWorkload,
) -> Result<Workload> {
    let wl = Workload {
        id: Uuid::new_v4(),
        name: w.name.clone(),
        source_id: w.source_id,
        os: w.os.clone(),
        cpus: w.cpus,
        memory_mib: w.memory_mib,
        disks: w.disks.clone(),
        nics: w.nics.clone(),
        services: w.services.clone(),
        hardware: w.hardware.clone(),
        move_group_id: w.move_group_id,
        group_order: w.group_order,
        credential_id: w.credential_id,
        agent: w.agent,
        domain: w.domain.clone(),
        assigned_email: w.assigned_email.clone(),
        cloud_sizing: w.cloud_sizing.clone(),
        target_migration_date: w.target_migration_date.clone(),
        tags: w.tags.clone(),
        created_at: now_ms(),
    };
    sqlx::query("INSERT INTO workloads (id, name, source_id, move_group_id, group_order, data, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(wl.id.to_string())
        .bind(&wl.name)
        .bind(opt_uuid(wl.source_id))
        .bind(opt_uuid(wl.move_group_id))
        .bind(wl.group_order as i64)
        .bind(rows::to_json(&wl)?)
        .bind(wl.created_at)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_unique(e, "workload", &w.name))?;
    Ok(wl)
}

/// The columns sources and targets share, for writing either.
struct EndpointRow<'a> {
    id: Uuid,
    name: &'a str,
    kind: &'a str,
    endpoint: &'a Option<String>,
    credential_id: Option<Uuid>,
    config: &'a serde_json::Value,
    created_at: i64,
}
