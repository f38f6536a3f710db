#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what the tests need,
# starts the services they use, then runs formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing dependencies"
bash scripts/install-deps.sh

if [ -x scripts/start-postgres.sh ]; then
  echo "== starting PostgreSQL"
  FERRY_TEST_PG_URL="$(bash scripts/start-postgres.sh | tail -n 1)"
  export FERRY_TEST_PG_URL
fi

echo "== starting libvirt"
FERRY_TEST_LIBVIRT="$(bash scripts/start-libvirt.sh | tail -n 1)"
export FERRY_TEST_LIBVIRT
# The vSphere tests build govmomi's simulator (scripts/testbed/build-vcsim.sh); here they
# must run, not skip.
export FERRY_TEST_VCSIM=1
# The browser test must run (not skip), and keeps its screenshots outside the repository.
export FERRY_TEST_BROWSER=1
export FERRY_UI_SCREENSHOTS="${FERRY_UI_SCREENSHOTS:-/var/cache/ferry/ui-screenshots}"

# Build artefacts live outside the clone so repeated runs on one machine reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/ferry/target}"
mkdir -p "$CARGO_TARGET_DIR"
export CARGO_TERM_COLOR=never

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
# Release mode: the data-plane tests move gigabytes.
cargo test --workspace --release --locked --no-fail-fast 2>&1 | tee /tmp/ferry-test.log
