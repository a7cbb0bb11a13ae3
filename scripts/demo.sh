#!/usr/bin/env bash
# The demo: builds real environments for the packs under examples/packs.
#
# With DATABASE_URL unset it starts a throwaway PostgreSQL (scripts/with-postgres.sh); with it
# set, it uses that database and removes its demo_* packs at the end. Environments and caches go
# to a temp dir that is removed at the end. Needs network access to PyPI and npm (the demo
# installs `six` and `is-number`); the test suite does not.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} != --inner ]]; then
    scripts/check-prereqs.sh
    echo "==> building packenvd (the first build takes a few minutes)"
    cargo build --bin packenvd
    cargo build -p packenv-client --example run_action
    exec scripts/with-postgres.sh "$0" --inner
fi

bin=$PWD/target/debug/packenvd
runner=$PWD/target/debug/examples/run_action
work=$(mktemp -d -t packenvd-demo.XXXXXXXX)
# As root the daemon runs steps as an unprivileged build id, which must reach the envs below.
chmod 755 "$work"
cleanup() {
    if [[ -z ${PACKENVD_PG_DATA:-} ]]; then
        # Someone else's database: take our demo packs out again (rows cascade).
        psql "$DATABASE_URL" -qc "DELETE FROM pack WHERE ref IN ('demo_python','demo_node','demo_shell','demo_broken')" >/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

export PACKENVD_ENVS_ROOT=$work/envs PACKENVD_CACHE_DIR=$work/cache
export PACKENVD_PACKS_DIR=$PWD/examples/packs PACKENVD_POLL_INTERVAL=1s PACKENVD_CONCURRENCY=4

echo "==> migrating"
"$bin" migrate

echo "==> registering the example packs, as a pack install would (plain SQL)"
psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q <<'SQL'
INSERT INTO pack (ref, label) VALUES
    ('demo_python', 'Demo: Python'), ('demo_node', 'Demo: Node.js'),
    ('demo_shell', 'Demo: shell'), ('demo_broken', 'Demo: uninstallable requirement')
ON CONFLICT (ref) DO NOTHING;
SQL
for pair in "demo_python core.python" "demo_node core.nodejs" "demo_shell core.shell" "demo_broken core.python"; do
    "$bin" request $pair
done

echo "==> running the daemon until every environment is ready or failed"
"$bin" run --until-done || echo "(one environment failed, as demo_broken should)"

echo "==> status"
"$bin" status || true

echo "==> using the environments as a platform's worker does (examples/run_action.rs, through"
echo "    packenv-client): this host's resolved build, its interpreter and variables"
"$runner" --timeout 60 examples/packs/demo_python core.python actions/hello.py
"$runner" --timeout 60 examples/packs/demo_node core.nodejs actions/hello.js
"$runner" --timeout 60 examples/packs/demo_shell core.shell actions/hello.sh

echo "==> why demo_broken failed (packenvd logs demo_broken core.python, without the full log)"
# logs prints the install log, then the error; it exits 1 for a failed environment.
{ "$bin" logs demo_broken core.python || true; } | sed -n '1p; /^--- error ---$/,$p'

echo "==> environments on disk"
ls -la "$work/envs"/*/

want="demo_broken:failed demo_node:ready demo_python:ready demo_shell:ready"
got=$(psql "$DATABASE_URL" -Atc "SELECT string_agg(pack_ref || ':' || status, ' ' ORDER BY pack_ref) FROM pack_environment WHERE pack_ref LIKE 'demo\_%'")
if [[ $got != "$want" ]]; then
    echo "demo: expected '$want', got '$got'" >&2
    exit 1
fi
echo "==> demo finished as expected: $got"
