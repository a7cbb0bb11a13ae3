//! Every SQL statement of packenvd, one function each. Queries are checked at run time
//! (`sqlx::query_as`), and the integration tests run each of them against a real PostgreSQL.
//!
//! Fencing (DESIGN §3): every write for a claimed row says `WHERE id = $1 AND claim_token = $2`
//! and reports whether it matched, so a stale build never overwrites a reset or another claim.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use uuid::Uuid;

/// Migrations embedded from the workspace's `migrations/` directory.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The channel the NOTIFY trigger sends on.
pub const WAKEUP_CHANNEL: &str = "packenvd_wakeup";

/// Opens a pool of `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // The default pings every connection taken from the pool: a round trip per statement.
        // A connection that died with the server fails its statement instead, and every
        // caller retries (claims, heartbeats and write-backs back off and try again).
        .test_before_acquire(false)
        .connect_with(options.application_name("packenvd"))
        .await
}

/// A row this instance has just claimed, with what a build needs from `pack` and `runtime`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub runtime_name: String,
    pub env_path: Option<String>,
    pub storage_path: Option<String>,
    pub installers: serde_json::Value,
    pub claim_token: Uuid,
    pub attempts: i32,
    /// The fingerprint and metadata of the current build, for the request fast path.
    pub fingerprint: Option<String>,
    pub metadata: serde_json::Value,
    /// Set by `request_pack_environment()`: a matching fingerprint may skip the rebuild.
    pub skip_if_current: bool,
    /// Seconds from the row becoming claimable (its last write, or its run_after) to this claim.
    pub pickup_secs: f64,
}

/// Claims up to `limit` claimable rows in one statement and commits before returning. A row
/// without `env_path` gets `<envs_root>/<pack_ref>/<runtime name, lower-cased>` (DESIGN §1: the
/// SQL side cannot know the daemon's envs root); the build still checks it before any write.
pub async fn claim(
    pool: &PgPool,
    instance: &str,
    lease: Duration,
    limit: i64,
    envs_root: &std::path::Path,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "WITH c AS MATERIALIZED (
             SELECT id, greatest(run_after, updated) AS claimable_since FROM pack_environment
             WHERE status IN ('pending', 'outdated') AND run_after <= now()
             ORDER BY run_after, id
             LIMIT $3
             FOR UPDATE SKIP LOCKED)
         UPDATE pack_environment pe
         SET status = 'installing', claimed_by = $1, claim_token = gen_random_uuid(),
             lease_expires_at = now() + make_interval(secs => $2), attempts = pe.attempts + 1,
             env_path = CASE
                 WHEN pe.env_path IS NOT NULL
                      OR r.installers->'requires_environment' = 'false'::jsonb THEN pe.env_path
                 ELSE $4 || '/' || pe.pack_ref || '/' || lower(r.name) END
         FROM c, pack p, runtime r
         WHERE pe.id = c.id AND p.id = pe.pack AND r.id = pe.runtime
         RETURNING pe.id, pe.pack_ref, pe.runtime_ref, r.name AS runtime_name, pe.env_path,
                   p.storage_path, r.installers, pe.claim_token, pe.attempts,
                   pe.fingerprint, pe.metadata, pe.skip_if_current,
                   extract(epoch FROM clock_timestamp() - c.claimable_since)::float8 AS pickup_secs",
    )
    .bind(instance)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .bind(envs_root.display().to_string())
    .fetch_all(pool)
    .await
}

/// Renews the leases of the given claims in one statement; returns the tokens still ours.
pub async fn heartbeat(
    pool: &PgPool,
    tokens: &[Uuid],
    lease: Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE pack_environment SET lease_expires_at = now() + make_interval(secs => $2)
         WHERE claim_token = ANY($1) AND status = 'installing'
         RETURNING claim_token",
    )
    .bind(tokens)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Writes the running build's log so an operator can watch it. False when the row is no
/// longer ours.
pub async fn flush_log(
    pool: &PgPool,
    id: i64,
    token: Uuid,
    log: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pack_environment SET install_log = $3 WHERE id = $1 AND claim_token = $2",
    )
    .bind(id)
    .bind(token)
    .bind(log)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Marks a build `ready`. False when the claim was lost (the result is discarded).
pub async fn finish_ready(
    pool: &PgPool,
    id: i64,
    token: Uuid,
    env_path: Option<&str>,
    log: &str,
    metadata: &serde_json::Value,
    fingerprint: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pack_environment
         SET status = 'ready', env_path = $3, install_log = $4, metadata = $5, fingerprint = $6,
             install_error = NULL, installed_at = now(), last_verified = now(), skip_if_current = false,
             claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
         WHERE id = $1 AND claim_token = $2",
    )
    .bind(id)
    .bind(token)
    .bind(env_path)
    .bind(log)
    .bind(metadata)
    .bind(fingerprint)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// One finished build for [`finish_ready_batch`].
#[derive(Debug, Clone)]
pub struct ReadyRow {
    pub id: i64,
    pub token: Uuid,
    pub env_path: Option<String>,
    pub log: String,
    pub metadata: serde_json::Value,
    pub fingerprint: Option<String>,
}

/// Marks many builds `ready` in one statement, each fenced by its own claim token (the
/// same write as [`finish_ready`]); returns the ids written. A row missing from the answer had
/// lost its claim, and its result is discarded.
pub async fn finish_ready_batch(pool: &PgPool, rows: &[ReadyRow]) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let tokens: Vec<Uuid> = rows.iter().map(|r| r.token).collect();
    let paths: Vec<Option<String>> = rows.iter().map(|r| r.env_path.clone()).collect();
    let logs: Vec<String> = rows.iter().map(|r| r.log.clone()).collect();
    let metadata: Vec<String> = rows.iter().map(|r| r.metadata.to_string()).collect();
    let fingerprints: Vec<Option<String>> = rows.iter().map(|r| r.fingerprint.clone()).collect();
    sqlx::query_scalar(
        "UPDATE pack_environment pe
         SET status = 'ready', env_path = u.env_path, install_log = u.log,
             metadata = u.metadata::jsonb, fingerprint = u.fingerprint,
             install_error = NULL, installed_at = now(), last_verified = now(), skip_if_current = false,
             claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
         FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
              AS u(id, token, env_path, log, metadata, fingerprint)
         WHERE pe.id = u.id AND pe.claim_token = u.token
         RETURNING pe.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(paths)
    .bind(logs)
    .bind(metadata)
    .bind(fingerprints)
    .fetch_all(pool)
    .await
}

/// Answers a request whose inputs did not change: `ready` again with the current build,
/// which was just checked. False when the claim was lost.
pub async fn finish_unchanged(
    pool: &PgPool,
    id: i64,
    token: Uuid,
    log: &str,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pack_environment
         SET status = 'ready', install_log = $3, install_error = NULL, last_verified = now(),
             skip_if_current = false, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
         WHERE id = $1 AND claim_token = $2",
    )
    .bind(id)
    .bind(token)
    .bind(log)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Records a failed attempt: back to `pending` after `retry_in`, or `failed` when `None`.
/// The error stays in `install_error` while the row waits. False when the claim was lost.
pub async fn finish_failed(
    pool: &PgPool,
    id: i64,
    token: Uuid,
    error: &str,
    log: &str,
    retry_in: Option<Duration>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pack_environment
         SET status = CASE WHEN $5::float8 IS NULL THEN 'failed' ELSE 'pending' END::pack_environment_status_enum,
             run_after = CASE WHEN $5::float8 IS NULL THEN run_after
                              ELSE now() + make_interval(secs => $5::float8) END,
             install_error = $3, install_log = $4,
             claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
         WHERE id = $1 AND claim_token = $2",
    )
    .bind(id)
    .bind(token)
    .bind(error)
    .bind(log)
    .bind(retry_in.map(|d| d.as_secs_f64()))
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Hands a row back to `pending` without spending an attempt (shutdown). False when the
/// claim was lost.
pub async fn release(pool: &PgPool, id: i64, token: Uuid, log: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pack_environment
         SET status = 'pending', attempts = greatest(attempts - 1, 0), run_after = now(),
             install_log = $3, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
         WHERE id = $1 AND claim_token = $2",
    )
    .bind(id)
    .bind(token)
    .bind(log)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Sends `installing` rows whose lease expired back to `pending`, or to `failed` when their
/// attempts are spent. Status and lease are checked again under the row lock, so a build that
/// finished a moment earlier is never overwritten. Returns how many rows were rescued.
pub async fn rescue_expired(pool: &PgPool, max_attempts: u32) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "WITH c AS MATERIALIZED (
             SELECT id FROM pack_environment
             WHERE status = 'installing' AND lease_expires_at < now()
             FOR UPDATE SKIP LOCKED)
         UPDATE pack_environment pe
         SET status = CASE WHEN pe.attempts >= $1 THEN 'failed' ELSE 'pending' END::pack_environment_status_enum,
             install_error = 'the build by ' || coalesce(pe.claimed_by, '?')
                 || ' stopped renewing its lease (daemon killed or cut off) on attempt '
                 || pe.attempts
                 || CASE WHEN pe.attempts >= $1 THEN '; no attempts left' ELSE '; it will be retried' END,
             run_after = now(), claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
         FROM c
         WHERE pe.id = c.id AND pe.status = 'installing' AND pe.lease_expires_at < now()",
    )
    .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// One row of `packenvd status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StatusRow {
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub status: String,
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
    status: Option<&str>,
) -> Result<Vec<StatusRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, pack_ref, runtime_ref, status::text AS status, env_path, attempts, run_after,
                claimed_by, installed_at, last_verified, needs_verification, health, install_error, updated,
                last_verify_result
         FROM v_pack_environment_status
         WHERE ($1::text IS NULL OR pack_ref = $1) AND ($2::text IS NULL OR status::text = $2)
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
) -> Result<(i64, String), sqlx::Error> {
    sqlx::query_as("SELECT id, status::text FROM request_pack_environment($1, $2)")
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
    pub status: String,
    pub install_log: Option<String>,
    pub install_error: Option<String>,
}

pub async fn logs(
    pool: &PgPool,
    pack_ref: &str,
    runtime_ref: &str,
) -> Result<Option<Logs>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status::text AS status, install_log, install_error FROM pack_environment
         WHERE pack_ref = $1 AND runtime_ref = $2",
    )
    .bind(pack_ref)
    .bind(runtime_ref)
    .fetch_optional(pool)
    .await
}

/// Counts rows by status (for the demo's wait and the daemon's status line).
pub async fn count_by_status(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status::text, count(*) FROM pack_environment GROUP BY 1 ORDER BY 1")
        .fetch_all(pool)
        .await
}

/// Registers a pack directory (used by the demo and `packenvd register`): upserts the pack.
pub async fn upsert_pack(
    pool: &PgPool,
    pack_ref: &str,
    label: &str,
    storage_path: Option<&str>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO pack (ref, label, storage_path) VALUES ($1, $2, $3)
         ON CONFLICT (ref) DO UPDATE SET label = EXCLUDED.label, storage_path = EXCLUDED.storage_path
         RETURNING id",
    )
    .bind(pack_ref)
    .bind(label)
    .bind(storage_path)
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

pub async fn live_environments(pool: &PgPool) -> Result<Vec<LiveEnv>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pack_ref, env_path, metadata->>'build_dir' AS build_dir,
                CASE WHEN status = 'installing' THEN claim_token END AS building_token
         FROM pack_environment",
    )
    .fetch_all(pool)
    .await
}

/// Deletes environments on purpose (`packenvd remove`); returns their env paths.
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

/// A ready row taken for verification.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ToVerify {
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub runtime_name: String,
    pub env_path: Option<String>,
    pub storage_path: Option<String>,
    pub installers: serde_json::Value,
    pub metadata: serde_json::Value,
    pub fingerprint: Option<String>,
    /// The `last_verified` the claim set; the result is written only if it is unchanged.
    pub claimed_at: DateTime<Utc>,
}

/// The cut-off of a verification pass: rows last verified before it are taken. `max_age` None
/// means "all ready rows" (this pass's start, so a row is not taken twice in one pass).
pub async fn verify_cutoff(
    pool: &PgPool,
    max_age: Option<Duration>,
) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
        .bind(max_age.map_or(0.0, |d| d.as_secs_f64()))
        .fetch_one(pool)
        .await
}

/// Takes up to `limit` ready rows last verified before `cutoff` (or never), marking them
/// verified now, in one statement with SKIP LOCKED: each row is checked by one instance only.
pub async fn claim_verification(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
    limit: i64,
    instance: &str,
) -> Result<Vec<ToVerify>, sqlx::Error> {
    sqlx::query_as(
        "WITH c AS MATERIALIZED (
             SELECT id FROM pack_environment
             WHERE status = 'ready' AND (last_verified IS NULL OR last_verified < $1)
               AND ($2::text IS NULL OR pack_ref = $2) AND ($3::text IS NULL OR runtime_ref = $3)
             ORDER BY last_verified NULLS FIRST, id
             LIMIT $4
             FOR UPDATE SKIP LOCKED)
         UPDATE pack_environment pe
         SET last_verified = now(), last_verify_result = 'being checked by ' || $5
         FROM c, pack p, runtime r
         WHERE pe.id = c.id AND p.id = pe.pack AND r.id = pe.runtime
         RETURNING pe.id, pe.pack_ref, pe.runtime_ref, r.name AS runtime_name, pe.env_path,
                   p.storage_path, r.installers, pe.metadata, pe.fingerprint,
                   pe.last_verified AS claimed_at",
    )
    .bind(cutoff)
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(limit)
    .bind(instance)
    .fetch_all(pool)
    .await
}

/// Records a verification. A failure sends the row to `outdated` with the reason, which
/// rebuilds it from scratch while the old build stays served. Written only if the row is still
/// the ready row that was checked; false otherwise.
pub async fn finish_verification(
    pool: &PgPool,
    id: i64,
    claimed_at: DateTime<Utc>,
    failure: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE pack_environment
         SET last_verify_result = coalesce($3, 'ok'),
             status = CASE WHEN $3 IS NULL THEN status ELSE 'outdated' END,
             install_error = CASE WHEN $3 IS NULL THEN install_error
                                  ELSE 'verification failed: ' || $3 END
         WHERE id = $1 AND status = 'ready' AND last_verified = $2",
    )
    .bind(id)
    .bind(claimed_at)
    .bind(failure)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
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
