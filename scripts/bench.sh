#!/usr/bin/env bash
# Usage: scripts/bench.sh [--quick] [--rows N] [other packenvd-bench flags]
#
# Builds packenvd and packenvd-bench in release mode and runs the benchmark against a
# throwaway PostgreSQL (or the one in DATABASE_URL). Prints one table, then the same table as
# Markdown for docs/benchmarks.md. --quick is the smoke run for CI (well under a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p packenvd -p packenvd-bench
exec scripts/with-postgres.sh target/release/packenvd-bench "$@"
