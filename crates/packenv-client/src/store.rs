//! Every statement the client sends, one function each. Checked at run time
//! (`sqlx::query_as`), against a real database by the tests in `crates/packenvd/tests/client.rs`.

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::PgPool;

/// The channel packenvd's migrations notify on when an environment's summary becomes ready or
/// failed; the payload is `"<id> <status>"`. Daemons do not listen on it.
pub const STATUS_CHANNEL: &str = "pack_environment_status";

/// One environment on one node, with what tells the errors apart when something is missing.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LookupRow {
    pub pack_found: bool,
    pub runtime_found: bool,
    pub env_status: Option<String>,
    pub env_error: Option<String>,
    pub status: Option<String>,
    pub build_dir: Option<String>,
    pub executables: Option<Json<BTreeMap<String, String>>>,
    pub env_vars: Option<Json<BTreeMap<String, String>>>,
    pub install_error: Option<String>,
    pub step: Option<String>,
    /// Only for a copy packenvd did not build (taken over from the original design): its
    /// directory, and the runtime's templates to find its executables in it.
    pub legacy_dir: Option<String>,
    pub runtime_name: Option<String>,
    pub legacy_executables: Option<Json<BTreeMap<String, String>>>,
    pub legacy_env_vars: Option<Json<BTreeMap<String, String>>>,
    /// The node's envs root (None: no node of that name), which every path of its row must
    /// lie under.
    pub envs_root: Option<String>,
    /// What the platform decided, which no node writes: the runtime's executable templates
    /// and variables.
    pub executable_templates: Option<Json<BTreeMap<String, String>>>,
    pub env_templates: Option<Json<BTreeMap<String, String>>>,
    /// Where the node found each bare command of the runtime (its own `packenvd_node` row).
    pub host_commands: Option<Json<BTreeMap<String, Option<String>>>>,
}

/// The runner's lookup, one statement: the pack and the runtime by their unique refs, the
/// environment by its unique (pack, runtime), the node's copy by its unique (env_id, node).
/// Five index probes (the node's own row for its envs root), whatever the number of
/// environments or nodes. The step is read out of
/// the log only while a build runs.
pub(crate) async fn lookup(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
    node: &str,
) -> Result<LookupRow, sqlx::Error> {
    sqlx::query_as(LOOKUP_SQL)
        .bind(pack_ref)
        .bind(runtime_ref)
        .bind(node)
        .fetch_one(pool)
        .await
}

/// [`Client::lookup`](crate::Client::lookup)'s statement (`$1` pack ref, `$2` runtime ref,
/// `$3` node), public for the tests and the benchmark that check its plan.
pub const LOOKUP_SQL: &str =
    "SELECT p.id IS NOT NULL AS pack_found, r.id IS NOT NULL AS runtime_found,
                pe.status::text AS env_status, pe.install_error AS env_error,
                n.status::text AS status, n.metadata ->> 'build_dir' AS build_dir,
                coalesce(n.metadata -> 'executables', '{}') AS executables,
                coalesce(n.metadata -> 'env_vars', '{}') AS env_vars,
                n.install_error,
                CASE WHEN n.status = 'installing'
                     THEN substring(n.install_log FROM '.*==> step ([0-9]+/[0-9]+)') END AS step,
                l.dir AS legacy_dir, r.name AS runtime_name,
                CASE WHEN l.dir IS NOT NULL
                     THEN coalesce(r.installers -> 'executable_templates', '{}') END
                    AS legacy_executables,
                CASE WHEN l.dir IS NOT NULL
                     THEN coalesce(r.installers -> 'env_vars', '{}') END AS legacy_env_vars,
                nd.envs_root,
                CASE WHEN jsonb_typeof(r.installers -> 'executable_templates') = 'object'
                     THEN r.installers -> 'executable_templates' END AS executable_templates,
                CASE WHEN jsonb_typeof(r.installers -> 'env_vars') = 'object'
                     THEN r.installers -> 'env_vars' END AS env_templates,
                CASE WHEN jsonb_typeof(nd.runtimes -> $2 -> 'commands') = 'object'
                     THEN nd.runtimes -> $2 -> 'commands' END AS host_commands
         FROM (SELECT 1) one
         LEFT JOIN pack p ON p.ref = $1
         LEFT JOIN runtime r ON r.ref = $2
         LEFT JOIN pack_environment pe ON pe.pack = p.id AND pe.runtime = r.id
         LEFT JOIN pack_environment_node n ON n.env_id = pe.id AND n.node = $3
         LEFT JOIN packenvd_node nd ON nd.name = $3
         -- packenvd records every build it makes (or that none is needed) in the metadata.
         LEFT JOIN LATERAL (SELECT n.env_path AS dir
                            WHERE NOT n.metadata ?| ARRAY['build_dir', 'requires_environment']
                           ) l ON true";

/// An environment with every node's copy, as the database sends it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EnvRow {
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub status: String,
    pub install_error: Option<String>,
    pub nodes: Json<Vec<crate::NodeEnvironment>>,
}

/// The environments of `pack_ref` (all packs when `None`), of `runtime_ref` when given, each
/// with its nodes' copies, by pack and runtime.
pub(crate) async fn environments(
    pool: &PgPool,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
) -> Result<Vec<EnvRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pe.id, pe.pack_ref, pe.runtime_ref, pe.status::text AS status, pe.install_error,
                coalesce((
                    SELECT jsonb_agg(jsonb_build_object(
                               'node', n.node, 'status', n.status, 'env_path', n.env_path,
                               'build_dir', n.metadata ->> 'build_dir',
                               'executables', coalesce(n.metadata -> 'executables', '{}'),
                               'env_vars', coalesce(n.metadata -> 'env_vars', '{}'),
                               'install_error', n.install_error,
                               'step', CASE WHEN n.status = 'installing' THEN substring(
                                   n.install_log FROM '.*==> step ([0-9]+/[0-9]+)') END,
                               'installed_at', extract(epoch FROM n.installed_at),
                               'last_verified', extract(epoch FROM n.last_verified),
                               'last_verify_result', n.last_verify_result,
                               'node_gone', nd.gone OR nd.last_seen + nd.ttl < now())
                           ORDER BY n.node)
                    FROM pack_environment_node n JOIN packenvd_node nd ON nd.name = n.node
                    WHERE n.env_id = pe.id), '[]') AS nodes
         FROM pack_environment pe
         WHERE ($1::text IS NULL OR pe.pack_ref = $1)
           AND ($2::text IS NULL OR pe.runtime_ref = $2)
         ORDER BY pe.pack_ref, pe.runtime_ref",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .fetch_all(pool)
    .await
}

/// Whether a pack and a runtime of these refs exist (to name what is missing).
pub(crate) async fn refs_exist(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<(bool, bool), sqlx::Error> {
    sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pack WHERE ref = $1),
                EXISTS (SELECT 1 FROM runtime WHERE ref = $2)",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .fetch_one(pool)
    .await
}

/// `request_pack_environment()`: creates the environment, or sends it back to pending (a
/// request: a node whose build matches today's inputs answers it without rebuilding).
pub(crate) async fn request(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM request_pack_environment($1, $2)")
        .bind(pack_ref)
        .bind(runtime_ref)
        .fetch_one(pool)
        .await
}

/// `request_pack_environment_verification()`: the node rows' `last_verified` to NULL, which
/// each node's verifier takes first in its next pass. Returns how many node rows.
pub(crate) async fn request_verification(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT request_pack_environment_verification($1, $2)")
        .bind(pack_ref)
        .bind(runtime_ref)
        .fetch_one(pool)
        .await
}

/// Deletes the environment; its node rows go with it (the foreign key cascades), and each
/// node's collector removes its directories. False when there was none.
pub(crate) async fn remove(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM pack_environment WHERE pack_ref = $1 AND runtime_ref = $2")
        .bind(pack_ref)
        .bind(runtime_ref)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// The environment a notification on [`STATUS_CHANNEL`] is about.
pub(crate) fn notified_id(payload: &str) -> Option<i64> {
    payload.split(' ').next()?.parse().ok()
}
