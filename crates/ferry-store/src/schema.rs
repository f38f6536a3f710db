//! Versioned schema migrations, one list per backend, applied in order and recorded in
//! `schema_migrations`. On PostgreSQL an advisory lock keeps two appliances starting at
//! once from applying the same version twice.

use crate::{now_ms, Backend, Result, Store, StoreError};
use sqlx::{Executor, Row};

struct Version {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const VERSIONS: &[Version] = &[
    Version {
        version: 1,
        name: "inventory, profiles, migrations, jobs, tokens",
        sqlite: include_str!("schema/common.sql"),
        postgres: include_str!("schema/common.sql"),
    },
    Version {
        version: 2,
        name: "events and logs",
        sqlite: include_str!("schema/sqlite_0002.sql"),
        postgres: include_str!("schema/postgres_0002.sql"),
    },
    Version {
        version: 3,
        name: "named leases (one scheduler at a time)",
        sqlite: include_str!("schema/common_0003.sql"),
        postgres: include_str!("schema/common_0003.sql"),
    },
    Version {
        version: 4,
        name: "indexes for listing migrations in creation order",
        sqlite: include_str!("schema/common_0004.sql"),
        postgres: include_str!("schema/common_0004.sql"),
    },
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = 4;

const PG_LOCK_KEY: i64 = 0x6665_7272_7930; // "ferry0"

pub(crate) async fn migrate(store: &Store) -> Result<()> {
    let mut conn = store.pool().acquire().await?;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut *conn)
            .await?;
    }
    let result = migrate_locked(store, &mut conn).await;
    if store.backend == Backend::Postgres {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut *conn)
            .await;
    }
    result
}

async fn migrate_locked(store: &Store, conn: &mut sqlx::AnyConnection) -> Result<()> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        .fetch_one(&mut *conn)
        .await?
        .get::<i64, _>(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    for v in VERSIONS.iter().filter(|v| v.version > current) {
        let sql = match store.backend {
            Backend::Sqlite => v.sqlite,
            Backend::Postgres => v.postgres,
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            (&mut *tx).execute(stmt).await?;
        }
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(v.version)
        .bind(v.name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            version = v.version,
            name = v.name,
            "applied schema migration"
        );
    }
    Ok(())
}

impl Store {
    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(self.pool())
                .await?
                .get::<i64, _>(0),
        )
    }
}
