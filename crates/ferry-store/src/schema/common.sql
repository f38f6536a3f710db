CREATE TABLE credentials (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    username TEXT,
    secret_enc TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE sources (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    endpoint TEXT,
    credential_id TEXT REFERENCES credentials(id),
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE targets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    endpoint TEXT,
    credential_id TEXT REFERENCES credentials(id),
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE move_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    target_date TEXT,
    concurrency BIGINT NOT NULL,
    cutover_window TEXT,
    cutover_requested BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE workloads (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    source_id TEXT REFERENCES sources(id),
    move_group_id TEXT REFERENCES move_groups(id),
    group_order BIGINT NOT NULL DEFAULT 0,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX workloads_group ON workloads (move_group_id);
CREATE TABLE profiles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE migrations (
    id TEXT PRIMARY KEY,
    workload_id TEXT NOT NULL REFERENCES workloads(id),
    workload_name TEXT NOT NULL,
    profile_id TEXT NOT NULL REFERENCES profiles(id),
    target_id TEXT NOT NULL REFERENCES targets(id),
    state TEXT NOT NULL,
    status TEXT NOT NULL,
    schedule TEXT NOT NULL,
    next_sync_at BIGINT,
    last_error TEXT,
    version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX migrations_state ON migrations (state);
CREATE INDEX migrations_workload ON migrations (workload_id);
CREATE INDEX migrations_next_sync ON migrations (next_sync_at);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    migration_id TEXT NOT NULL REFERENCES migrations(id),
    step TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    run_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX jobs_ready ON jobs (status, run_at);
CREATE INDEX jobs_migration ON jobs (migration_id);
CREATE TABLE syncs (
    id TEXT PRIMARY KEY,
    migration_id TEXT NOT NULL REFERENCES migrations(id),
    kind TEXT NOT NULL,
    generation BIGINT NOT NULL,
    bytes_total BIGINT NOT NULL,
    bytes_sent BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NOT NULL
);
CREATE INDEX syncs_migration ON syncs (migration_id);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    admin BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
