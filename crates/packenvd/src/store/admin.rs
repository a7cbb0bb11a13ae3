//! What operators and the platform ask: status, request, rebuild, logs, counts, removal, and
//! the collector's and the migration check's reads. What waiting commands watch is in `watch`.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Status, MIGRATOR};

/// One row of `packenvd status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StatusRow {
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub status: Status,
    pub env_path: Option<String>,
    pub attempts: i32,
    pub run_after: DateTime<Utc>,
    pub claimed_by: Option<String>,
    pub installed_at: Option<DateTime<Utc>>,
    pub last_verified: Option<DateTime<Utc>>,
    pub needs_verification: bool,
    pub health: String,
    pub install_error: Option<String>,
    pub updated: DateTime<Utc>,
    pub last_verify_result: Option<String>,
    /// The node, for a node's rows (`status --node`); `None` for the summary over nodes.
    pub node: Option<String>,
    /// For the summary: the nodes it counts, by status (`{"ready": 2, "pending": 1}`).
    pub nodes: Option<serde_json::Value>,
    /// A node building it now (the longest-running one, for the summary).
    pub building_node: Option<String>,
    /// Seconds since that build was claimed, by the database's clock.
    pub building_secs: Option<f64>,
    /// packenvd's own `==>` lines of that build's log so far: which step it is at.
    #[serde(skip)]
    pub marks: Option<Vec<String>>,
}

/// Rows of the status view, filtered by pack and status when given.
pub async fn status(
    pool: &PgPool,
    pack: Option<&str>,
    status: Option<Status>,
    node: Option<&str>,
) -> Result<Vec<StatusRow>, sqlx::Error> {
    let sql = match node {
        None => {
            "SELECT v.id, v.pack_ref, v.runtime_ref, v.status, v.env_path, v.attempts,
                    v.run_after, v.claimed_by, v.installed_at, v.last_verified,
                    v.needs_verification, v.health, v.install_error, v.updated,
                    v.last_verify_result, NULL::text AS node,
                    (SELECT jsonb_object_agg(k, n) FROM (VALUES
                         ('pending', pe.nodes_pending), ('installing', pe.nodes_installing),
                         ('ready', pe.nodes_ready), ('failed', pe.nodes_failed),
                         ('outdated', pe.nodes_outdated)) c(k, n)
                     WHERE n > 0) AS nodes,
                    b.node AS building_node, b.secs AS building_secs, b.marks
             FROM v_pack_environment_status v JOIN pack_environment pe ON pe.id = v.id
             -- The flusher writes a build's log to its node row only; the summary's is the
             -- last finished build's. Only the `==>` lines travel, not a log of megabytes.
             LEFT JOIN LATERAL (
                 SELECT n.node, extract(epoch FROM now() - n.updated)::float8 AS secs,
                        ARRAY(SELECT m[1] FROM regexp_matches(coalesce(n.install_log, ''),
                                                              '^(==> [^\n]*)$', 'gn') m) AS marks
                 FROM pack_environment_node n
                 WHERE pe.nodes_installing > 0 AND n.env_id = pe.id AND n.status = 'installing'
                 ORDER BY n.updated LIMIT 1) b ON true
             WHERE ($1::text IS NULL OR v.pack_ref = $1)
               AND ($2::pack_environment_status_enum IS NULL OR v.status = $2)
             ORDER BY v.pack_ref, v.runtime_ref"
        }
        Some(_) => {
            "SELECT n.env_id AS id, pe.pack_ref, pe.runtime_ref, n.status, n.env_path,
                    n.attempts, n.run_after, n.claimed_by, n.installed_at, n.last_verified,
                    n.status = 'ready' AND (n.last_verified IS NULL
                        OR n.last_verified < now() - interval '7 days') AS needs_verification,
                    CASE WHEN n.status = 'ready' AND n.last_verified >= now() - interval '7 days'
                           THEN 'healthy'
                         WHEN n.status = 'ready' THEN 'stale'
                         WHEN n.status = 'failed' THEN 'unhealthy'
                         WHEN n.status = 'installing' THEN 'installing'
                         ELSE 'waiting' END AS health,
                    n.install_error, n.updated, n.last_verify_result, n.node, NULL::jsonb AS nodes,
                    CASE WHEN n.status = 'installing' THEN n.node END AS building_node,
                    CASE WHEN n.status = 'installing'
                         THEN extract(epoch FROM now() - n.updated)::float8 END AS building_secs,
                    CASE WHEN n.status = 'installing' THEN
                        ARRAY(SELECT m[1] FROM regexp_matches(coalesce(n.install_log, ''),
                                                             '^(==> [^\n]*)$', 'gn') m)
                    END AS marks
             FROM pack_environment_node n JOIN pack_environment pe ON pe.id = n.env_id
             WHERE n.node = $3 AND ($1::text IS NULL OR pe.pack_ref = $1)
               AND ($2::pack_environment_status_enum IS NULL OR n.status = $2)
             ORDER BY pe.pack_ref, pe.runtime_ref"
        }
    };
    sqlx::query_as(sql)
        .bind(pack)
        .bind(status)
        .bind(node)
        .fetch_all(pool)
        .await
}

/// Calls `request_pack_environment()`; returns the row's id and status.
pub async fn request(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<(i64, Status), sqlx::Error> {
    sqlx::query_as("SELECT id, status FROM request_pack_environment($1, $2)")
        .bind(pack_ref)
        .bind(runtime_ref)
        .fetch_one(pool)
        .await
}

/// An operator's reset to `pending` (the same plain UPDATE an operator would type): every node
/// rebuilds from scratch; returns the rows reset (id, pack, runtime).
pub async fn rebuild(
    pool: &PgPool,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
    only_failed: bool,
) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE pack_environment SET status = 'pending'
         WHERE ($1::text IS NULL OR pack_ref = $1) AND ($2::text IS NULL OR runtime_ref = $2)
           AND (NOT $3 OR status = 'failed')
         RETURNING id, pack_ref, runtime_ref",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(only_failed)
    .fetch_all(pool)
    .await
}

/// A reset on one node only: its rows of the pack (and runtime) rebuild from scratch there,
/// and the parents wait for them. Returns the rows reset (environment id, pack, runtime).
pub async fn rebuild_on_node(
    pool: &PgPool,
    node: &str,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
    only_failed: bool,
) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
    sqlx::query_as(REBUILD_ON_NODE_SQL.as_str())
        .bind(node)
        .bind(pack_ref)
        .bind(runtime_ref)
        .bind(only_failed)
        .fetch_all(pool)
        .await
}

static REBUILD_ON_NODE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT n.id, n.status AS old_status, n.required AS old_required,
                    pe.pack_ref, pe.runtime_ref
             FROM pack_environment_node n JOIN pack_environment pe ON pe.id = n.env_id
             WHERE n.node = $1 AND ($2::text IS NULL OR pe.pack_ref = $2)
               AND ($3::text IS NULL OR pe.runtime_ref = $3)
               AND (NOT $4 OR n.status = 'failed')
             FOR UPDATE OF n),
         u AS (
             UPDATE pack_environment_node n
             SET status = 'pending', required = true, skip_if_current = false, attempts = 0,
                 run_after = now(), claimed_by = NULL, claim_token = NULL,
                 lease_expires_at = NULL, updated = now()
             FROM c WHERE n.id = c.id
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required, c.pack_ref, c.runtime_ref),
         {p}
         SELECT env_id, pack_ref, runtime_ref FROM u ORDER BY pack_ref, runtime_ref",
        p = super::summary::parents_cte("", None)
    )
});

/// The stored log and error of one environment on one node, or the summary's (`node` is then
/// `None`: the last node's, as mirrored to `pack_environment`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Logs {
    pub node: Option<String>,
    pub status: Status,
    pub attempts: i32,
    pub install_log: Option<String>,
    pub install_error: Option<String>,
    /// A hash of `install_log`, to tell whether it changed without reading it.
    pub log_md5: Option<String>,
}

/// The summary's log and error of one (pack, runtime) first (its `node` is the last node that
/// wrote it), then each node's, by node name.
pub async fn logs(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<Vec<Logs>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM (
             SELECT 0 AS k, pe.last_node AS node, pe.status, pe.attempts, pe.install_log,
                    pe.install_error, md5(pe.install_log) AS log_md5
             FROM pack_environment pe WHERE pe.pack_ref = $1 AND pe.runtime_ref = $2
             UNION ALL
             SELECT 1, n.node, n.status, n.attempts, n.install_log, n.install_error,
                    md5(n.install_log)
             FROM pack_environment pe JOIN pack_environment_node n ON n.env_id = pe.id
             WHERE pe.pack_ref = $1 AND pe.runtime_ref = $2) x
         ORDER BY k, node",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .fetch_all(pool)
    .await
}

/// One node's log of one environment, read again only when its hash is not `known_md5`
/// (`install_log` is then `None`): what `logs --follow` polls.
pub async fn node_log(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
    node: &str,
    known_md5: Option<&str>,
) -> Result<Option<Logs>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.node, n.status, n.attempts,
                CASE WHEN md5(n.install_log) IS DISTINCT FROM $4 THEN n.install_log END
                    AS install_log,
                n.install_error, md5(n.install_log) AS log_md5
         FROM pack_environment pe JOIN pack_environment_node n ON n.env_id = pe.id
         WHERE pe.pack_ref = $1 AND pe.runtime_ref = $2 AND n.node = $3",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(node)
    .bind(known_md5)
    .fetch_optional(pool)
    .await
}

/// The runtimes of a pack's environments, by ref.
pub async fn runtimes_of(pool: &PgPool, pack_ref: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT runtime_ref FROM pack_environment WHERE pack_ref = $1 ORDER BY runtime_ref",
    )
    .bind(pack_ref)
    .fetch_all(pool)
    .await
}

/// Up to `limit` refs of packs that have environments, and how many there are.
pub async fn packs_with_environments(
    pool: &PgPool,
    limit: i64,
) -> Result<(Vec<String>, i64), sqlx::Error> {
    refs(
        pool,
        "SELECT pack_ref, count(*) OVER () FROM (SELECT DISTINCT pack_ref FROM pack_environment) p
         ORDER BY 1 LIMIT $1",
        limit,
    )
    .await
}

/// Up to `limit` refs of the `pack` table (what a request may name), and how many there are.
pub async fn pack_refs(pool: &PgPool, limit: i64) -> Result<(Vec<String>, i64), sqlx::Error> {
    refs(
        pool,
        "SELECT ref, count(*) OVER () FROM pack ORDER BY 1 LIMIT $1",
        limit,
    )
    .await
}

/// Up to `limit` refs of the `runtime` table, and how many there are.
pub async fn runtime_refs(pool: &PgPool, limit: i64) -> Result<(Vec<String>, i64), sqlx::Error> {
    refs(
        pool,
        "SELECT ref, count(*) OVER () FROM runtime ORDER BY 1 LIMIT $1",
        limit,
    )
    .await
}

async fn refs(pool: &PgPool, sql: &str, limit: i64) -> Result<(Vec<String>, i64), sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sql).bind(limit).fetch_all(pool).await?;
    let total = rows.first().map_or(0, |(_, n)| *n);
    Ok((rows.into_iter().map(|(r, _)| r).collect(), total))
}

/// Counts a node's rows by status (the daemon's status line and metrics).
pub async fn count_by_status(pool: &PgPool, node: &str) -> Result<Vec<(Status, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, count(*) FROM pack_environment_node WHERE node = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(node)
    .fetch_all(pool)
    .await
}

/// Whether any row of `node` is pending, outdated or installing (`run --until-done`). Each
/// EXISTS reads one partial index that leads with the node.
pub async fn work_left(pool: &PgPool, node: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pack_environment_node
                        WHERE node = $1 AND status IN ('pending', 'outdated'))
             OR EXISTS (SELECT 1 FROM pack_environment_node
                        WHERE node = $1 AND status = 'installing')",
    )
    .bind(node)
    .fetch_one(pool)
    .await
}

/// What the garbage collector must not remove: every row's environment and current build,
/// and the claim tokens of builds in progress.
#[derive(Debug, sqlx::FromRow)]
pub struct LiveEnv {
    pub pack_ref: String,
    pub env_path: Option<String>,
    pub build_dir: Option<String>,
    pub building_token: Option<Uuid>,
}

/// Every row's environment, for the collector.
/// Every environment `node` keeps, for its collector. An environment with no row of the node
/// yet (just requested) keeps its pack's links too.
pub async fn live_environments(pool: &PgPool, node: &str) -> Result<Vec<LiveEnv>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pe.pack_ref, n.env_path, n.metadata->>'build_dir' AS build_dir,
                CASE WHEN n.status = 'installing' THEN n.claim_token END AS building_token
         FROM pack_environment pe
         LEFT JOIN pack_environment_node n ON n.env_id = pe.id AND n.node = $1",
    )
    .bind(node)
    .fetch_all(pool)
    .await
}

/// The builds of `node` that ended since `since`, built (ready) or failed: what `run
/// --until-done` reports. (status, pack, runtime, the first line of the error.)
pub async fn ended_since(
    pool: &PgPool,
    node: &str,
    since: DateTime<Utc>,
) -> Result<Vec<(String, String, String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.status::text, pe.pack_ref, pe.runtime_ref,
                split_part(n.install_error, E'\n', 1)
         FROM pack_environment_node n JOIN pack_environment pe ON pe.id = n.env_id
         WHERE n.node = $1
           AND ((n.status = 'ready' AND n.installed_at >= $2)
                OR (n.status = 'failed' AND n.updated >= $2))
         ORDER BY n.status DESC, pe.pack_ref, pe.runtime_ref",
    )
    .bind(node)
    .bind(since)
    .fetch_all(pool)
    .await
}

/// An environment `packenvd remove` would delete.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RemovalTarget {
    pub id: i64,
    pub runtime_ref: String,
    pub status: Status,
    /// How many nodes have a row of it (each node's collector removes its own copy).
    pub node_rows: i64,
    /// Where `node` keeps it (its row's env_path; the platform's where it has none).
    pub env_path: Option<String>,
}

/// The environments of a pack (or of one runtime of it) that `packenvd remove` would delete,
/// and where `node` keeps them.
pub async fn removal_targets(
    pool: &PgPool,
    node: &str,
    pack_ref: &str,
    runtime_ref: Option<&str>,
) -> Result<Vec<RemovalTarget>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pe.id, pe.runtime_ref, pe.status,
                (SELECT count(*) FROM pack_environment_node c WHERE c.env_id = pe.id) AS node_rows,
                coalesce(n.env_path, pe.env_path) AS env_path
         FROM pack_environment pe
         LEFT JOIN pack_environment_node n ON n.env_id = pe.id AND n.node = $3
         WHERE pe.pack_ref = $1 AND ($2::text IS NULL OR pe.runtime_ref = $2)
         ORDER BY pe.runtime_ref",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(node)
    .fetch_all(pool)
    .await
}

/// Deletes environments on purpose (`packenvd remove`), on every node, by id; returns their
/// runtimes and where `node` keeps them (its row's env_path; the platform's where it has none).
/// The other nodes' copies are their collectors' to remove: their rows go with the environment.
pub async fn remove(
    pool: &PgPool,
    node: &str,
    ids: &[i64],
) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
    // The statement's parts share one snapshot: the join still sees the node rows the
    // delete's cascade removes.
    sqlx::query_as(
        "WITH d AS (DELETE FROM pack_environment WHERE id = ANY($1)
                    RETURNING id, runtime_ref, env_path)
         SELECT d.runtime_ref, coalesce(n.env_path, d.env_path)
         FROM d LEFT JOIN pack_environment_node n ON n.env_id = d.id AND n.node = $2
         ORDER BY d.runtime_ref",
    )
    .bind(ids)
    .bind(node)
    .fetch_all(pool)
    .await
}

/// The versions of this binary's migrations that the database has not applied. Read-only: it
/// needs SELECT on `_sqlx_migrations` and nothing else, so a daemon whose role may not create
/// tables can tell "nothing to do" from "the owner must migrate". A missing table means
/// nothing was applied. Failed or changed migrations are left to `MIGRATOR.run`, which
/// reports them, so they count as pending here; versions that are not ours are a platform's
/// own migrations in the same table, which `MIGRATOR` ignores.
pub async fn unapplied_migrations(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let applied: Vec<(i64, Vec<u8>, bool)> =
        match sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations")
            .fetch_all(pool)
            .await
        {
            Ok(rows) => rows,
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
    let known: Vec<&sqlx::migrate::Migration> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let failed = applied.iter().any(|(_, _, ok)| !ok);
    let mut pending: Vec<i64> = known
        .iter()
        .filter(|m| {
            failed
                || !applied
                    .iter()
                    .any(|(v, sum, ok)| *ok && *v == m.version && sum.as_slice() == &*m.checksum)
        })
        .map(|m| m.version)
        .collect();
    pending.dedup();
    Ok(pending)
}

/// The rights the daemon's role needs (docs/operations.md, "The database role"; the same as
/// deploy/db-role.sql grants) that the connected role lacks, as `DELETE on pack_environment`.
/// Objects that do not exist are reported as missing: the schema is then not migrated.
pub async fn missing_privileges(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH needed(kind, object, privilege) AS (VALUES
             ('t', 'pack', 'SELECT'), ('t', 'runtime', 'SELECT'),
             ('t', 'pack_environment', 'SELECT'), ('t', 'pack_environment', 'INSERT'),
             ('t', 'pack_environment', 'UPDATE'), ('t', 'pack_environment', 'DELETE'),
             ('t', 'pack_environment_node', 'SELECT'), ('t', 'pack_environment_node', 'INSERT'),
             ('t', 'pack_environment_node', 'UPDATE'), ('t', 'pack_environment_node', 'DELETE'),
             ('t', 'packenvd_node', 'SELECT'), ('t', 'packenvd_node', 'INSERT'),
             ('t', 'packenvd_node', 'UPDATE'), ('t', 'packenvd_node', 'DELETE'),
             ('t', 'v_pack_environment_status', 'SELECT'),
             ('t', 'v_pack_environment_node', 'SELECT'),
             ('t', '_sqlx_migrations', 'SELECT'),
             ('s', 'pack_environment_id_seq', 'USAGE'),
             ('s', 'pack_environment_node_id_seq', 'USAGE'),
             ('f', 'request_pack_environment', 'EXECUTE'),
             ('f', 'get_pack_environment_path', 'EXECUTE'),
             ('f', 'runtime_requires_environment', 'EXECUTE'),
             ('f', 'pack_environment_for_node', 'EXECUTE'),
             ('f', 'pack_environment_summary', 'EXECUTE'),
             ('f', 'packenvd_node_builds', 'EXECUTE'),
             ('f', 'packenvd_node_takes', 'EXECUTE'))
         SELECT privilege || ' on ' || object
                || CASE WHEN kind = 'f' THEN '()' ELSE '' END
                || CASE WHEN ok IS NULL THEN ' (does not exist)' ELSE '' END
         FROM (SELECT kind, object, privilege,
                      CASE kind
                          WHEN 't' THEN (SELECT has_table_privilege(c, privilege)
                                         FROM to_regclass(object) c WHERE c IS NOT NULL)
                          WHEN 's' THEN (SELECT has_sequence_privilege(c, privilege)
                                         FROM to_regclass(object) c WHERE c IS NOT NULL)
                          ELSE (SELECT bool_or(has_function_privilege(p.oid, privilege))
                                FROM pg_proc p
                                WHERE p.proname = object AND pg_function_is_visible(p.oid))
                      END AS ok
               FROM needed) r
         WHERE ok IS NOT TRUE
         ORDER BY object, privilege",
    )
    .fetch_all(pool)
    .await
}

/// The server's version, as `SHOW server_version` has it.
pub async fn server_version(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await
}
