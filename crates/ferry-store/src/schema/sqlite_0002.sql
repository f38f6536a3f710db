CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT,
    kind TEXT NOT NULL,
    step TEXT,
    job_id TEXT,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX events_migration ON events (migration_id, id);
CREATE TABLE logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT,
    origin TEXT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX logs_migration ON logs (migration_id, id);
