#!/usr/bin/env bash
# The whole test suite, against a throwaway PostgreSQL unless DATABASE_URL is set. Each test
# gets its own fresh database (#[sqlx::test]); no test reaches the network.
set -euo pipefail
cd "$(dirname "$0")/.."
# uv installed by check-prereqs.sh (when the host has none) lives here.
export PATH="$PWD/target/tools/bin:$PATH"
scripts/check-prereqs.sh --tests
echo "==> building packenvd and its tests (the first build takes a few minutes)"
cargo build --workspace --all-targets
if cargo nextest --version >/dev/null 2>&1; then
    exec scripts/with-postgres.sh cargo nextest run --workspace --no-fail-fast "$@"
else
    echo "cargo-nextest not found; using cargo test (slower: install it with 'cargo install cargo-nextest --locked')" >&2
    exec scripts/with-postgres.sh cargo test --workspace --no-fail-fast "$@"
fi
