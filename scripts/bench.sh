#!/usr/bin/env bash
# Usage: scripts/bench.sh [--quick] [--rows N] [--baseline REV] [other packenvd-bench flags]
#
# Builds packenvd and packenvd-bench in release mode and runs the benchmark against a
# throwaway PostgreSQL (or the one in DATABASE_URL). Prints one table, then the same table as
# Markdown for docs/benchmarks.md. --quick is the smoke run for CI (well under a minute).
#
# --baseline REV: also builds REV's packenvd (release, in a temporary git worktree, with its own
# target directory target/baseline-REV, kept and reused) and passes it to packenvd-bench as
# --baseline, whose nodes row then measures it beside this build.
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
rev=
while (($#)); do
    case $1 in
        --baseline) [[ $# -ge 2 ]] || { echo "bench.sh: --baseline needs a revision" >&2; exit 2; }
                    rev=$2; shift 2 ;;
        --baseline=*) rev=${1#--baseline=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

cargo build --release -p packenvd -p packenvd-bench

if [[ -n $rev ]]; then
    short=$(git rev-parse --short "$rev^{commit}")
    target=$PWD/target/baseline-$short
    if [[ ! -x $target/release/packenvd ]]; then
        echo "bench.sh: building packenvd at $short into $target" >&2
        tmp=$(mktemp -d "${TMPDIR:-/tmp}/packenvd-baseline-XXXXXX")
        # The worktree goes again however the build ends; the target directory stays.
        trap 'git worktree remove --force "$tmp/src" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
        git worktree add --quiet --detach "$tmp/src" "$short"
        (cd "$tmp/src" && cargo build --release --quiet --locked -p packenvd --target-dir "$target")
        git worktree remove --force "$tmp/src"
        rm -rf "$tmp"
        trap - EXIT
    fi
    args+=(--baseline "$target/release/packenvd")
fi

exec scripts/with-postgres.sh target/release/packenvd-bench ${args[@]+"${args[@]}"}
