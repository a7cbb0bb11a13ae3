#!/usr/bin/env bash
# Checks deploy/packenvd.service with `systemd-analyze verify`, and that its exposure score
# from `systemd-analyze security` stays at or under 2.7. Works without a running systemd (in CI
# containers PID 1 is something else): verify only needs systemd-analyze and the unit file.
#
# Usage: .ci/systemd-verify.sh [PACKENVD_BINARY]   (default: target/debug/packenvd; build first)
#
# verify refuses a unit whose ExecStart binary does not exist, and /usr/local/bin/packenvd is
# not installed on a CI machine, so a copy of the unit with ExecStart pointing at the freshly
# built binary is checked; every other line is the file as shipped.
set -euo pipefail
cd "$(dirname "$0")/.."

unit_src=deploy/packenvd.service
binary=${1:-target/debug/packenvd}

if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-verify: systemd-analyze not found; install it with 'apt-get install systemd'" \
        "(Debian/Ubuntu) or 'dnf install systemd' (Fedora)" >&2
    exit 1
fi
if [[ ! -x $binary ]]; then
    echo "systemd-verify: $binary is not an executable; run 'cargo build' first" >&2
    exit 1
fi
binary=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")

tmp=$(mktemp -d -t packenvd-systemd-verify.XXXXXXXX)
trap 'rm -rf "$tmp"' EXIT
unit=$tmp/packenvd.service
# ExecStart must name /usr/local/bin/packenvd exactly once: fail loudly if that changes rather
# than verify a unit that no longer points at our binary.
if [[ $(grep -c '^ExecStart=/usr/local/bin/packenvd ' "$unit_src") != 1 ]]; then
    echo "systemd-verify: $unit_src: expected one 'ExecStart=/usr/local/bin/packenvd ...' line" >&2
    exit 1
fi
sed "s|^ExecStart=/usr/local/bin/packenvd |ExecStart=$binary |" "$unit_src" >"$unit"

echo "==> systemd-analyze verify $unit_src ($(systemd-analyze --version | head -n 1))"
# --man=no: Documentation= is not checked against installed man pages; --generators=no: no
# generators run (they need a booted system); --recursive-errors=no: a warning about this unit
# (not about the units it is ordered after) makes the exit status non-zero.
status=0
out=$(systemd-analyze --no-pager verify --man=no --generators=no --recursive-errors=no "$unit" 2>&1) ||
    status=$?
# Older systemd versions print warnings (an unknown key, a value that does not parse) and
# still exit 0: any line about our unit counts as a failure too.
ours=$(grep -E "packenvd" <<<"$out" || true)
others=$(grep -vE "packenvd" <<<"$out" || true)
if [[ -n $others ]]; then
    echo "(about other units, not counted:)"
    echo "$others"
fi
if [[ $status -ne 0 || -n $ours ]]; then
    report=${ours:-$out}
    echo "${report//$tmp\//deploy/}" >&2
    echo "systemd-verify: $unit_src has problems (exit status $status)" >&2
    exit 1
fi
echo "ok"

# The exposure score must not grow: docs/operations.md explains each relaxation it counts
# (mostly the three capabilities that running steps as a separate build user needs).
max_exposure=2.7
line=$(systemd-analyze --no-pager security --offline=yes "$unit" | grep -F "Overall exposure level" || true)
echo "${line:-(systemd-analyze security --offline=yes gave no exposure line)}"
score=$(grep -oE '[0-9]+\.[0-9]+' <<<"$line" | head -n 1)
if [[ -n $score ]] && awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s > m) }'; then
    echo "systemd-verify: exposure $score is above $max_exposure: a hardening directive was dropped?" >&2
    exit 1
fi
