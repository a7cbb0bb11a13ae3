//! What operators and the platform ask: status, request, rebuild, logs, counts, removal, and
//! the collector's and the migration check's reads.

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
                     WHERE n > 0) AS nodes
             FROM v_pack_environment_status v JOIN pack_environment pe ON pe.id = v.id
             WHERE ($1::text IS NULL OR v.pack_ref = $1)
               AND ($2::pack_environment_status_enum IS NULL OR v.status = $2)
             ORDER BY v.pack_ref, v.runtime_ref"
        }
        Some(_) => {
            "SELECT env_id AS id, pack_ref, runtime_ref, status, env_path, attempts, run_after,
                    claimed_by, installed_at, last_verified,
                    status = 'ready' AND (last_verified IS NULL
                        OR last_verified < now() - interval '7 days') AS needs_verification,
                    CASE WHEN status = 'ready' AND last_verified >= now() - interval '7 days'
                           THEN 'healthy'
                         WHEN status = 'ready' THEN 'stale'
                         WHEN status = 'failed' THEN 'unhealthy'
                         WHEN status = 'installing' THEN 'installing'
                         ELSE 'waiting' END AS health,
                    install_error, updated, last_verify_result, node, NULL::jsonb AS nodes
             FROM v_pack_environment_node
             WHERE node = $3 AND ($1::text IS NULL OR pack_ref = $1)
               AND ($2::pack_environment_status_enum IS NULL OR status = $2)
             ORDER BY pack_ref, runtime_ref"
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
/// rebuilds from scratch; returns the rows reset.
pub async fn rebuild(
    pool: &PgPool,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
    only_failed: bool,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE pack_environment SET status = 'pending'
         WHERE ($1::text IS NULL OR pack_ref = $1) AND ($2::text IS NULL OR runtime_ref = $2)
           AND (NOT $3 OR status = 'failed')
         RETURNING pack_ref, runtime_ref",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(only_failed)
    .fetch_all(pool)
    .await
}

/// A reset on one node only: its rows of the pack (and runtime) rebuild from scratch there,
/// and the parents wait for them. Returns the rows reset.
pub async fn rebuild_on_node(
    pool: &PgPool,
    node: &str,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
    only_failed: bool,
) -> Result<Vec<(String, String)>, sqlx::Error> {
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
         SELECT pack_ref, runtime_ref FROM u ORDER BY pack_ref, runtime_ref",
        p = super::summary::parents_cte("")
    )
});

/// The stored log and error of one environment.
#[derive(Debug, sqlx::FromRow)]
pub struct Logs {
    pub status: Status,
    pub install_log: Option<String>,
    pub install_error: Option<String>,
}

/// The log and error of one (pack, runtime).
pub async fn logs(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
    node: Option<&str>,
) -> Result<Option<Logs>, sqlx::Error> {
    sqlx::query_as(
        "SELECT coalesce(n.status, pe.status) AS status,
                coalesce(n.install_log, pe.install_log) AS install_log,
                CASE WHEN n.id IS NULL THEN pe.install_error ELSE n.install_error END AS install_error
         FROM pack_environment pe
         LEFT JOIN pack_environment_node n ON n.env_id = pe.id AND n.node = $3
         WHERE pe.pack_ref = $1 AND pe.runtime_ref = $2",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(node)
    .fetch_optional(pool)
    .await
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

/// Deletes environments on purpose (`packenvd remove`), on every node; returns their runtimes
/// and where `node` keeps them (its row's env_path; the platform's where it has none). The
/// other nodes' copies are their collectors' to remove: their rows go with the environment.
pub async fn remove(
    pool: &PgPool,
    node: &str,
    pack_ref: &str,
    runtime_ref: Option<&str>,
) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
    // The statement's parts share one snapshot: the join still sees the node rows the
    // delete's cascade removes.
    sqlx::query_as(
        "WITH d AS (DELETE FROM pack_environment
                    WHERE pack_ref = $1 AND ($2::text IS NULL OR runtime_ref = $2)
                    RETURNING id, runtime_ref, env_path)
         SELECT d.runtime_ref, coalesce(n.env_path, d.env_path)
         FROM d LEFT JOIN pack_environment_node n ON n.env_id = d.id AND n.node = $3
         ORDER BY d.runtime_ref",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(node)
    .fetch_all(pool)
    .await
}

/// The versions of this binary's migrations that the database has not applied. Read-only: it
/// needs SELECT on `_sqlx_migrations` and nothing else, so a daemon whose role may not create
/// tables can tell "nothing to do" from "the owner must migrate". A missing table means
/// nothing was applied. Failed, changed or unknown migrations are left to `MIGRATOR.run`,
/// which reports them, so they count as pending here.
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
    let foreign = applied
        .iter()
        .any(|(v, _, ok)| !ok || !known.iter().any(|m| m.version == *v));
    let mut pending: Vec<i64> = known
        .iter()
        .filter(|m| {
            foreign
                || !applied
                    .iter()
                    .any(|(v, sum, ok)| *ok && *v == m.version && sum.as_slice() == &*m.checksum)
        })
        .map(|m| m.version)
        .collect();
    pending.dedup();
    Ok(pending)
}
