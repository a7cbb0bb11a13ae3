//! The nodes' statements (DESIGN §8): registration, catch-up, liveness, gone nodes, forgetting
//! a node, and the rows a node finds missing on its disk.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::summary::parents_cte;

/// What a node says about itself when it registers.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub envs_root: String,
    pub version: String,
    /// Per runtime ref: whether this node can build it, and what it found.
    pub runtimes: serde_json::Value,
    /// Interpreters and installers found, with their versions.
    pub tools: serde_json::Value,
    /// What confines steps on this node.
    pub protections: serde_json::Value,
    /// Not seen for this long: gone.
    pub ttl: Duration,
}

/// Registers (or refreshes) a node. An error when another live node already has the name with
/// another envs root: two filesystems cannot be one node.
pub async fn register_node(pool: &PgPool, node: &NodeInfo) -> Result<(), RegisterError> {
    let other: Option<(String, bool)> = sqlx::query_as(
        "SELECT envs_root, NOT gone AND last_seen + ttl >= now() FROM packenvd_node WHERE name = $1",
    )
    .bind(&node.name)
    .fetch_optional(pool)
    .await?;
    if let Some((root, true)) = other.filter(|(root, _)| *root != node.envs_root) {
        return Err(RegisterError::NameTaken {
            name: node.name.clone(),
            root,
        });
    }
    sqlx::query(
        "INSERT INTO packenvd_node (name, envs_root, version, runtimes, tools, protections, ttl)
         VALUES ($1, $2, $3, $4, $7, $5, make_interval(secs => $6))
         ON CONFLICT (name) DO UPDATE SET
             envs_root = EXCLUDED.envs_root, version = EXCLUDED.version,
             runtimes = EXCLUDED.runtimes, tools = EXCLUDED.tools,
             protections = EXCLUDED.protections, ttl = EXCLUDED.ttl, last_seen = now(),
             gone = false",
    )
    .bind(&node.name)
    .bind(&node.envs_root)
    .bind(&node.version)
    .bind(&node.runtimes)
    .bind(&node.protections)
    .bind(node.ttl.as_secs_f64())
    .bind(&node.tools)
    .execute(pool)
    .await?;
    Ok(())
}

/// A registration that cannot be.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "node name {name:?} is in use by a live node whose envs root is {root}: give this host its own node_name"
    )]
    NameTaken { name: String, root: String },
    #[error("registering the node")]
    Db(#[from] sqlx::Error),
}

/// Environments that no node has yet become rows of `node` as they are (status, build,
/// fingerprint, log), when their `env_path` lies under its envs root or is unset: an upgrade
/// from a single-host database rebuilds nothing, and what the platform asked for before any
/// node existed is this node's to build, when it takes the runtime (`packenvd_node_takes`;
/// other nodes get theirs by catching up). Returns how many.
pub async fn adopt(pool: &PgPool, node: &str, envs_root: &str) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(ADOPT_SQL.as_str())
        .bind(node)
        .bind(envs_root)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

static ADOPT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH u AS (
             INSERT INTO pack_environment_node (env_id, node, status, required, generation,
                 built_generation, skip_if_current, env_path, installed_at, last_verified,
                 last_verify_result, install_log, install_error, metadata, fingerprint,
                 attempts, run_after)
             SELECT pe.id, $1,
                    CASE WHEN pe.status = 'installing' THEN 'pending' ELSE pe.status END,
                    true, pe.generation,
                    CASE WHEN pe.status = 'ready' THEN pe.generation ELSE 0 END,
                    pe.skip_if_current, pe.env_path, pe.installed_at, pe.last_verified,
                    pe.last_verify_result, pe.install_log, pe.install_error,
                    coalesce(pe.metadata, '{{}}'::jsonb), pe.fingerprint,
                    CASE WHEN pe.status = 'installing' THEN greatest(pe.attempts - 1, 0)
                         ELSE pe.attempts END,
                    pe.run_after
             FROM pack_environment pe JOIN packenvd_node nd ON nd.name = $1
             WHERE NOT EXISTS (SELECT 1 FROM pack_environment_node n WHERE n.env_id = pe.id)
               AND (pe.env_path IS NULL OR pe.env_path = $2
                    OR left(pe.env_path, length($2) + 1) = $2 || '/')
               -- A build it has is kept; what it would still have to build, only if it takes
               -- the runtime.
               AND (pe.status = 'ready' OR packenvd_node_takes(nd, pe.runtime_ref))
             ON CONFLICT (env_id, node) DO NOTHING
             RETURNING id, env_id, node, status, required,
                       NULL::pack_environment_status_enum AS old_status,
                       NULL::boolean AS old_required),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte("", None)
    )
});

/// Brings `node`'s rows up to date with what was asked while it was away or before it
/// existed (catch-up, DESIGN §8): a reset it missed rebuilds from scratch, a request it missed
/// checks its build, and an environment it lacks is built. Such rows count for their parent
/// only when the parent is not ready anyway, so a node catching up never turns a ready parent
/// back; they count once ready. Rows another instance of the node is working on are left
/// alone. Returns how many rows changed or were added.
pub async fn catch_up(pool: &PgPool, node: &str) -> Result<u64, sqlx::Error> {
    let changed: i64 = sqlx::query_scalar(RECONCILE_SQL.as_str())
        .bind(node)
        .fetch_one(pool)
        .await?;
    let added: i64 = sqlx::query_scalar(CATCH_UP_SQL.as_str())
        .bind(node)
        .fetch_one(pool)
        .await?;
    sqlx::query(WITHDRAW_SQL.as_str())
        .bind(node)
        .execute(pool)
        .await?;
    Ok((changed + added) as u64)
}

/// Rows that other nodes got only because no live node could build their runtime
/// (`packenvd_node_takes`), and whose node lacks the runtime's commands: now that `$1` can
/// build it, they are withdrawn (unless a build of theirs runs), so a failure there for want of
/// a command no longer holds the environment back. Several rows of one parent may go, so the
/// counts move by aggregate here, not through `parents_cte`.
static WITHDRAW_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT n.id
             FROM pack_environment_node n
             JOIN pack_environment pe ON pe.id = n.env_id
             JOIN packenvd_node nd ON nd.name = n.node
             JOIN packenvd_node me ON me.name = $1
             WHERE n.node <> $1 AND n.status IN ('pending', 'outdated', 'failed')
               AND (nd.runtimes -> pe.runtime_ref ->> 'buildable')::boolean = false
               AND packenvd_node_builds(me, pe.runtime_ref)
             FOR UPDATE OF n SKIP LOCKED),
         d AS (
             DELETE FROM pack_environment_node n USING c WHERE n.id = c.id
             RETURNING n.env_id, n.status, n.required),
         agg AS (
             SELECT env_id,
                    count(*) FILTER (WHERE required AND status = 'pending') AS pending,
                    count(*) FILTER (WHERE required AND status = 'failed') AS failed,
                    count(*) FILTER (WHERE required AND status = 'outdated') AS outdated
             FROM d GROUP BY env_id)
         UPDATE pack_environment pe
         SET nodes_pending = pe.nodes_pending - agg.pending,
             nodes_failed = pe.nodes_failed - agg.failed,
             nodes_outdated = pe.nodes_outdated - agg.outdated,
             status = pack_environment_summary((pe.nodes_pending - agg.pending)::int,
                 pe.nodes_installing, pe.nodes_ready, (pe.nodes_failed - agg.failed)::int,
                 (pe.nodes_outdated - agg.outdated)::int, pe.status),
             summary_seq = pe.summary_seq + 1,
             updated = now()
         FROM agg WHERE pe.id = agg.env_id
         RETURNING {notified}",
        notified = super::summary::notify_finished(
            [
                "pe.nodes_pending + agg.pending",
                "pe.nodes_installing",
                "pe.nodes_ready",
                "pe.nodes_failed + agg.failed",
                "pe.nodes_outdated + agg.outdated",
            ]
            .map(|c| format!("({c})::int"))
        )
    )
});

static RECONCILE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT n.id, n.status AS old_status, n.required AS old_required,
                    pe.status AS parent_status, pe.generation AS parent_generation,
                    CASE WHEN n.status = 'ready' AND n.built_generation < pe.forced_generation
                           THEN 'outdated'
                         WHEN n.status = 'ready' AND n.built_generation < pe.generation
                           THEN 'pending'
                         ELSE n.status END::pack_environment_status_enum AS new_status,
                    n.status = 'ready' AND n.built_generation < pe.generation AS asked
             FROM pack_environment_node n JOIN pack_environment pe ON pe.id = n.env_id
             WHERE n.node = $1 AND n.status <> 'installing'
             FOR UPDATE OF n SKIP LOCKED),
         u AS (
             UPDATE pack_environment_node n
             SET status = c.new_status,
                 required = c.new_status = 'ready' OR c.parent_status <> 'ready',
                 skip_if_current = CASE WHEN c.asked THEN c.new_status = 'pending'
                                        ELSE n.skip_if_current END,
                 generation = CASE WHEN c.asked THEN c.parent_generation ELSE n.generation END,
                 attempts = CASE WHEN c.asked THEN 0 ELSE n.attempts END,
                 run_after = CASE WHEN c.asked THEN now() ELSE n.run_after END,
                 updated = now()
             FROM c
             WHERE n.id = c.id AND (c.asked OR n.required IS DISTINCT FROM
                   (c.new_status = 'ready' OR c.parent_status <> 'ready'))
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte("", None)
    )
});

static CATCH_UP_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH u AS (
             INSERT INTO pack_environment_node (env_id, node, status, required, generation)
             SELECT pe.id, nd.name, 'pending', pe.status <> 'ready', pe.generation
             FROM pack_environment pe JOIN packenvd_node nd ON nd.name = $1
             WHERE packenvd_node_takes(nd, pe.runtime_ref)
               AND NOT EXISTS (SELECT 1 FROM pack_environment_node n
                               WHERE n.env_id = pe.id AND n.node = $1)
             ON CONFLICT (env_id, node) DO NOTHING
             RETURNING id, env_id, node, status, required,
                       NULL::pack_environment_status_enum AS old_status,
                       NULL::boolean AS old_required),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte("", None)
    )
});

/// The node heartbeat: one small UPDATE per node per lease third. True when the node had been
/// declared gone meanwhile (then it must catch up).
pub async fn touch_node(pool: &PgPool, node: &str) -> Result<bool, sqlx::Error> {
    let was_gone: Option<bool> = sqlx::query_scalar(
        "UPDATE packenvd_node nd SET last_seen = now(), gone = false
         FROM (SELECT gone FROM packenvd_node WHERE name = $1 FOR UPDATE) old
         WHERE nd.name = $1
         RETURNING old.gone",
    )
    .bind(node)
    .fetch_optional(pool)
    .await?;
    Ok(was_gone.unwrap_or(true))
}

/// Declares gone the nodes not seen for their ttl, and stops counting their rows, so the
/// environments they were building go ready without them. Returns their names. Through
/// `packenvd_reap_gone_nodes()` (migration 9), which runs with the owner's rights: a node's own
/// role may not write other nodes' rows, and this is the one write of theirs every node makes.
pub async fn reap_gone_nodes(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT packenvd_reap_gone_nodes()")
        .fetch_all(pool)
        .await
}

/// Stops counting a node's rows for their parents (`packenvd node forget`).
static UNCOUNT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required
             FROM pack_environment_node WHERE node = $1 AND required FOR UPDATE),
         u AS (
             UPDATE pack_environment_node n SET required = false
             FROM c WHERE n.id = c.id
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte("", None)
    )
});

/// `packenvd node forget`: the node and its rows go; environments stop waiting for it. Nothing
/// on any disk is touched. False when there is no such node.
pub async fn forget_node(pool: &PgPool, node: &str) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let exists: Option<String> =
        sqlx::query_scalar("SELECT name FROM packenvd_node WHERE name = $1 FOR UPDATE")
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Ok(false);
    }
    sqlx::query_scalar::<_, i64>(UNCOUNT_SQL.as_str())
        .bind(node)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM packenvd_node WHERE name = $1")
        .bind(node)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// A ready row of a node and the build it records, for the start-up check of the disk.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedBuild {
    pub id: i64,
    pub env_path: String,
    pub build_dir: Option<String>,
}

/// The ready rows of `node` that have a build on disk.
pub async fn recorded_builds(pool: &PgPool, node: &str) -> Result<Vec<RecordedBuild>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, env_path, metadata ->> 'build_dir' AS build_dir
         FROM pack_environment_node
         WHERE node = $1 AND status = 'ready' AND env_path IS NOT NULL",
    )
    .bind(node)
    .fetch_all(pool)
    .await
}

/// Rows whose build is gone from the node's disk (a wiped envs root): outdated, rebuilt from
/// scratch. Where other nodes serve the environment the row stops counting until it is ready
/// again (a node catching up); where it was the only one, the parent is outdated too.
pub async fn builds_missing(pool: &PgPool, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(MISSING_SQL.as_str())
        .bind(ids)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

static MISSING_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT n.id, n.status AS old_status, n.required AS old_required,
                    pe.nodes_ready > 1 AS served_elsewhere
             FROM pack_environment_node n JOIN pack_environment pe ON pe.id = n.env_id
             WHERE n.id = ANY($1) AND n.status = 'ready'
             FOR UPDATE OF n),
         u AS (
             UPDATE pack_environment_node n
             SET status = 'outdated', skip_if_current = false, run_after = now(),
                 required = n.required AND NOT c.served_elsewhere,
                 install_error = 'the build ' || coalesce(n.metadata ->> 'build_dir', '?')
                     || ' is missing from this node''s disk; rebuilding',
                 last_verify_result = 'build missing from disk', updated = now()
             FROM c WHERE n.id = c.id
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte("", None)
    )
});

/// One row of `packenvd nodes`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct NodeRow {
    pub name: String,
    pub envs_root: String,
    pub version: String,
    pub runtimes: serde_json::Value,
    pub tools: serde_json::Value,
    pub protections: serde_json::Value,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub gone: bool,
    /// Its rows by status.
    pub rows: serde_json::Value,
}

/// Every node with its rows by status (a count over all node rows: an operator's command).
pub async fn nodes(pool: &PgPool) -> Result<Vec<NodeRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT nd.name, nd.envs_root, nd.version, nd.runtimes, nd.tools, nd.protections,
                nd.first_seen,
                nd.last_seen, nd.gone OR nd.last_seen + nd.ttl < now() AS gone,
                coalesce((SELECT jsonb_object_agg(s.status, s.n)
                          FROM (SELECT status, count(*) AS n FROM pack_environment_node
                                WHERE node = nd.name GROUP BY status) s), '{}') AS rows
         FROM packenvd_node nd ORDER BY nd.name",
    )
    .fetch_all(pool)
    .await
}

/// Every runtime's ref and installers JSON (text: a spec that does not parse is that
/// runtime's problem; NULL, which a platform's column may hold, reads as no steps), for a
/// node's detection of what it can build.
pub async fn runtimes(pool: &PgPool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT ref, coalesce(installers, '[]')::text FROM runtime ORDER BY ref")
        .fetch_all(pool)
        .await
}
