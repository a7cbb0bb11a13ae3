//! What the commands that wait and watch read (`request --wait`, `rebuild --wait`,
//! `logs --follow`, `status`'s liveness): an environment with its nodes' rows, and the daemons'
//! last heartbeats.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::Status;

/// An environment as a command that waits for it sees it: the summary, and each of its nodes'
/// rows.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Watched {
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub status: Status,
    pub install_error: Option<String>,
}

/// One node's row of a watched environment.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WatchedNode {
    pub env_id: i64,
    pub node: String,
    pub status: Status,
    /// Whether the summary waits for it.
    pub required: bool,
    pub attempts: i32,
    /// Seconds until its next attempt (a retry's backoff); negative when due.
    pub retry_in_secs: f64,
    /// Seconds since its last change: for an `installing` row, since its claim.
    pub since_secs: f64,
    /// Whether it changed at or after the watch began (else its log is an older build's).
    pub fresh: bool,
    pub install_error: Option<String>,
    /// packenvd's own `==>` lines of its log.
    pub marks: Vec<String>,
    /// The end of its log: its last line of output.
    pub tail: Option<String>,
    pub node_gone: bool,
}

/// The database's clock: the moment a watch begins.
pub async fn now(pool: &PgPool) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

/// The summaries of environments `ids`.
pub async fn watched(pool: &PgPool, ids: &[i64]) -> Result<Vec<Watched>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, pack_ref, runtime_ref, status, install_error FROM pack_environment
         WHERE id = ANY($1) ORDER BY pack_ref, runtime_ref",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// The node rows of environments `ids`, with what a watch shows of their logs; `since` is when
/// the watch began.
pub async fn watched_nodes(
    pool: &PgPool,
    ids: &[i64],
    since: DateTime<Utc>,
) -> Result<Vec<WatchedNode>, sqlx::Error> {
    sqlx::query_as(
        "SELECT n.env_id, n.node, n.status, n.required, n.attempts,
                extract(epoch FROM n.run_after - now())::float8 AS retry_in_secs,
                extract(epoch FROM now() - n.updated)::float8 AS since_secs,
                n.updated >= $2 AS fresh, n.install_error,
                ARRAY(SELECT m[1] FROM regexp_matches(coalesce(n.install_log, ''),
                                                     '^(==> [^\n]*)$', 'gn') m) AS marks,
                right(n.install_log, 4096) AS tail,
                nd.gone OR nd.last_seen + nd.ttl < now() AS node_gone
         FROM pack_environment_node n JOIN packenvd_node nd ON nd.name = n.node
         WHERE n.env_id = ANY($1)
         ORDER BY n.env_id, n.node",
    )
    .bind(ids)
    .bind(since)
    .fetch_all(pool)
    .await
}

/// What the liveness line of `status` says about a node.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Liveness {
    pub name: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub seen_secs_ago: f64,
    pub gone: bool,
}

/// Every node's last heartbeat, by name.
pub async fn liveness(pool: &PgPool) -> Result<Vec<Liveness>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, extract(epoch FROM now() - last_seen)::float8 AS seen_secs_ago,
                gone OR last_seen + ttl < now() AS gone
         FROM packenvd_node ORDER BY name",
    )
    .fetch_all(pool)
    .await
}
