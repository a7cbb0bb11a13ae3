//! What operators and the platform ask: status, request, rebuild, logs, counts, removal, and
//! the collector's and the migration check's reads.

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
}

/// Rows of the status view, filtered by pack and status when given.
pub async fn status(
    pool: &PgPool,
    pack: Option<&str>,
    status: Option<Status>,
) -> Result<Vec<StatusRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, pack_ref, runtime_ref, status, env_path, attempts, run_after,
                claimed_by, installed_at, last_verified, needs_verification, health, install_error, updated,
                last_verify_result
         FROM v_pack_environment_status
         WHERE ($1::text IS NULL OR pack_ref = $1)
           AND ($2::pack_environment_status_enum IS NULL OR status = $2)
         ORDER BY pack_ref, runtime_ref",
    )
    .bind(pack)
    .bind(status)
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

/// An operator's reset to `pending` (the same plain UPDATE an operator would type); returns the
/// rows reset.
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
) -> Result<Option<Logs>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, install_log, install_error FROM pack_environment
         WHERE pack_ref = $1 AND runtime_ref = $2",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .fetch_optional(pool)
    .await
}

/// Counts rows by status (the daemon's status line, metrics, `run --until-done`).
pub async fn count_by_status(pool: &PgPool) -> Result<Vec<(Status, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status, count(*) FROM pack_environment GROUP BY 1 ORDER BY 1")
        .fetch_all(pool)
        .await
}

/// Whether any row is pending, outdated or installing (`run --until-done`). Each EXISTS reads
/// one partial index.
pub async fn work_left(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pack_environment WHERE status IN ('pending', 'outdated'))
             OR EXISTS (SELECT 1 FROM pack_environment WHERE status = 'installing')",
    )
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
pub async fn live_environments(pool: &PgPool) -> Result<Vec<LiveEnv>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pack_ref, env_path, metadata->>'build_dir' AS build_dir,
                CASE WHEN status = 'installing' THEN claim_token END AS building_token
         FROM pack_environment",
    )
    .fetch_all(pool)
    .await
}

/// Deletes environments on purpose (`packenvd remove`); returns their runtimes and env paths.
pub async fn remove(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: Option<&str>,
) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "DELETE FROM pack_environment WHERE pack_ref = $1 AND ($2::text IS NULL OR runtime_ref = $2)
         RETURNING runtime_ref, env_path",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
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
