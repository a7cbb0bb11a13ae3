#!/usr/bin/env bash
# Usage: scripts/with-postgres.sh COMMAND [ARGS...]
#
# Runs COMMAND with DATABASE_URL pointing at a PostgreSQL server. If
# DATABASE_URL is already set (and non-empty) COMMAND is exec'd unchanged.
# Otherwise a throwaway cluster (unix socket only, no TCP, fsync off) is
# created in a private temp dir under ${TMPDIR:-/tmp}, and stopped and deleted
# when COMMAND exits. COMMAND also gets PGHOST/PGPORT/PGUSER/PGDATABASE (for
# psql) and:
#   PACKENVD_PG_DATA  the cluster's data directory
#   PACKENVD_PG_CTL   pg_ctl for this cluster, run as the right user with -D/-l
#                     already set, so a test can restart the server with
#                       "$PACKENVD_PG_CTL" stop -m fast   # or -m immediate
#                       "$PACKENVD_PG_CTL" start          # waits until ready
#                     (-D "$PACKENVD_PG_DATA" may be passed again; harmless).
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
if [[ -n ${DATABASE_URL:-} ]]; then
    exec "$@"
fi

die() { echo "with-postgres.sh: $*" >&2; exit 1; }

# PATH first, then Debian/Ubuntu (/usr/lib/postgresql/N/bin) and PGDG RPM
# (/usr/pgsql-N/bin) layouts, newest version first. Unmatched globs fail -x.
IFS=: read -ra dirs <<<"$PATH"
mapfile -t -O "${#dirs[@]}" dirs < <(printf '%s\n' /usr/lib/postgresql/*/bin /usr/pgsql-*/bin | sort -rV)
bindir=
for d in "${dirs[@]}"; do
    if [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then bindir=$d; break; fi
done
[[ -n $bindir ]] || die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in PATH or /usr/lib/postgresql/*/bin.
Install them, e.g. 'apt-get install postgresql' (Debian/Ubuntu) or 'dnf install postgresql-server' (Fedora),
or set DATABASE_URL to use an existing server."

# PostgreSQL refuses to run as root, so root runs the server as 'postgres'.
as_pg=()
if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the server as (useradd -r postgres)"
    # runuser lives in /usr/sbin, which root's PATH sometimes lacks (su without -).
    runuser=$(PATH=$PATH:/usr/sbin:/sbin command -v runuser) || die "runuser (util-linux) not found"
    as_pg=("$runuser" -u postgres --)
fi

# Everything lives in a fresh private dir: nothing is created directly in a
# shared /tmp (protected_regular & co. do not bite), and removal is one rm -rf.
tmp=$(mktemp -d -t packenvd-pg.XXXXXXXX)
data=$tmp/data
pgctl=$tmp/pgctl

# shellcheck disable=SC2317  # only reached through the trap
cleanup() {
    trap '' INT TERM  # a second Ctrl-C must not leave the server running
    if [[ -f $data/postmaster.pid ]]; then
        "$pgctl" stop -m immediate >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ ${#as_pg[@]} -gt 0 ]]; then
    # Root itself still reaches the socket and files through CAP_DAC_OVERRIDE.
    chown postgres "$tmp"
    "${as_pg[@]}" test -w "$tmp" -a -x "$tmp" ||
        die "user 'postgres' cannot access $tmp; point TMPDIR at a directory it can reach"
fi

# Runs pg_ctl as the cluster owner. cd first: the caller's cwd may be
# unreadable for 'postgres', and pg_ctl/initdb dislike that.
{
    echo '#!/usr/bin/env bash'
    printf 'cd %q || exit 1\nexec' "$tmp"
    printf ' %q' "${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -l "$tmp/postgres.log" -w -t 60
    printf ' "$@"\n'
} >"$pgctl"
chmod 755 "$pgctl"

(cd "$tmp" && "${as_pg[@]}" "$bindir/initdb" -D "$data" --auth=trust -U postgres \
    --encoding=UTF8 --locale=C --no-sync --no-instructions >"$tmp/initdb.log" 2>&1) || {
    cat "$tmp/initdb.log" >&2
    die "initdb failed"
}
# Settings go into postgresql.conf (not pg_ctl -o) so that any restart keeps
# them. The port is pinned because the server would otherwise honour PGPORT.
cat >>"$data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$tmp'
port = 5432
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
shared_buffers = 128MB
EOF

"$pgctl" start >/dev/null 2>&1 || {
    rc=$?
    [[ $rc -ne 126 ]] || die "cannot execute $pgctl (is ${TMPDIR:-/tmp} mounted noexec? set TMPDIR elsewhere)"
    tail -n 30 "$tmp/postgres.log" >&2 || true
    die "PostgreSQL failed to start (log above)"
}

# sqlx takes a socket directory via ?host=/dir; the port (default 5432, hence
# socket .s.PGSQL.5432) comes from PGPORT if absent, so export it too.
export DATABASE_URL="postgres://postgres@localhost/postgres?host=$tmp"
export PGHOST=$tmp PGPORT=5432 PGUSER=postgres PGDATABASE=postgres
export PACKENVD_PG_DATA=$data PACKENVD_PG_CTL=$pgctl

# Run COMMAND in the background and wait, so a SIGTERM/SIGINT sent to this
# script is handled at once (a foreground child would defer the trap until it
# exits); the signal is forwarded and we still wait for COMMAND to finish.
# The subshell undoes bash's SIG_IGN of INT/QUIT for background jobs, and
# <&0 keeps stdin (background jobs otherwise get /dev/null).
(trap - INT QUIT; exec "$@") <&0 &
child=$!
got_signal=
# shellcheck disable=SC2317  # only reached through the traps
forward() { got_signal=1; kill -s "$1" "$child" 2>/dev/null || true; }
trap 'forward INT' INT
trap 'forward TERM' TERM
while :; do
    got_signal=
    wait "$child" && status=0 || status=$?
    [[ -n $got_signal ]] || break  # wait was interrupted by a signal, not the child exiting
done
exit "$status"
