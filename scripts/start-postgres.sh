#!/usr/bin/env bash
# Starts (idempotently) a throwaway PostgreSQL 15 cluster for Ferry's tests and prints its URL.
#
#   export FERRY_TEST_PG_URL=$(scripts/start-postgres.sh)
#
# The cluster lives outside the repository (FERRY_PG_DIR, default /tmp/ferry-pg), runs as
# the `postgres` user on 127.0.0.1:FERRY_PG_PORT (default 55432), and has a `ferry` role
# (allowed to create databases: each store test makes its own) owning a `ferry` database.
# Stop it with: scripts/start-postgres.sh stop
set -euo pipefail

DIR=${FERRY_PG_DIR:-/tmp/ferry-pg}
PORT=${FERRY_PG_PORT:-55432}
BIN=${FERRY_PG_BIN:-}
if [ -z "$BIN" ]; then
  for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then BIN=$d; break; fi
  done
fi
[ -n "$BIN" ] && [ -x "$BIN/initdb" ] || { echo "start-postgres: no initdb found; install postgresql (scripts/install-deps.sh)" >&2; exit 1; }

as_pg() {
  if [ "$(id -un)" = postgres ]; then "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
}

if [ "${1:-}" = stop ]; then
  [ -f "$DIR/data/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
  exit 0
fi

mkdir -p "$DIR"
chown postgres:postgres "$DIR" 2>/dev/null || true
if [ ! -f "$DIR/data/PG_VERSION" ]; then
  as_pg "$BIN/initdb" -D "$DIR/data" -U postgres -A trust --no-sync >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
fi
if ! as_pg "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
    start >&2 || { tail -20 "$DIR/postgres.log" >&2; exit 1; }
fi

psql_pg() { as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_pg -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = 'ferry'")" != 1 ]; then
  psql_pg -d postgres -c "CREATE ROLE ferry LOGIN CREATEDB PASSWORD 'ferry'" >&2
fi
if [ "$(psql_pg -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'ferry'")" != 1 ]; then
  psql_pg -d postgres -c "CREATE DATABASE ferry OWNER ferry" >&2
fi
echo "postgres://ferry:ferry@127.0.0.1:$PORT/ferry"
