#!/usr/bin/env bash
# The whole test suite, against a throwaway PostgreSQL unless DATABASE_URL is set. Each test
# gets its own fresh database (#[sqlx::test]); no test reaches the network.
set -euo pipefail
cd "$(dirname "$0")/.."
# uv installed by check-prereqs.sh (when the host has none) lives here.
export PATH="$PWD/target/tools/bin:$PATH"
scripts/check-prereqs.sh --tests
# As root, packenvd runs steps as an unprivileged build id of its own (64900, DESIGN §6), which
# must be able to run the interpreters the tests find on PATH. pyenv keeps them under root's
# home, which is often mode 0700: let others search it (not list it), as an operator of a root
# daemon must too (docs/operations.md, "The build user").
if [[ $(id -u) -eq 0 ]] && command -v python3 >/dev/null; then
    real=$(python3 -c 'import sys; print(sys.executable)')
    if ! setpriv --reuid=64900 --regid=64900 --clear-groups -- test -x "$real" 2>/dev/null; then
        echo "==> the build id 64900 cannot run $real: chmod o+x ${HOME:-/root}"
        chmod o+x "${HOME:-/root}"
    fi
fi
echo "==> building packenvd and its tests (the first build takes a few minutes)"
cargo build --workspace --all-targets
if cargo nextest --version >/dev/null 2>&1; then
    exec scripts/with-postgres.sh cargo nextest run --workspace --no-fail-fast "$@"
else
    echo "cargo-nextest not found; using cargo test (slower: install it with 'cargo install cargo-nextest --locked')" >&2
    exec scripts/with-postgres.sh cargo test --workspace --no-fail-fast "$@"
fi
