//! The verifier's statements: take stale ready rows, record what the checks found.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::EnvRow;

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
) -> Result<Vec<EnvRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH c AS MATERIALIZED (
             SELECT id, last_verified AS previous_verified, last_verify_result AS previous_result
             FROM pack_environment
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
                   p.storage_path, r.installers::text AS installers, pe.fingerprint,
                   pe.metadata::text AS metadata, NULL::uuid AS claim_token, pe.attempts,
                   false AS skip_if_current, 0::float8 AS pickup_secs,
                   pe.last_verified AS checked_at, NULL::text AS problem,
                   c.previous_verified, c.previous_result",
    )
    .bind(cutoff)
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(limit)
    .bind(instance)
    .fetch_all(pool)
    .await
}

/// Gives rows taken by [`claim_verification`] back unchecked (a pass that could not finish):
/// their `last_verified` and result are what they were, so the next pass takes them again
/// instead of their counting as checked for `verify_max_age`.
pub async fn release_verification(pool: &PgPool, rows: &[&EnvRow]) -> Result<u64, sqlx::Error> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let checked: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.checked_at).collect();
    let previous: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.previous_verified).collect();
    let results: Vec<Option<String>> = rows.iter().map(|r| r.previous_result.clone()).collect();
    let r = sqlx::query(
        "UPDATE pack_environment pe
         SET last_verified = u.previous, last_verify_result = u.result
         FROM unnest($1::int8[], $2::timestamptz[], $3::timestamptz[], $4::text[])
              AS u(id, checked, previous, result)
         WHERE pe.id = u.id AND pe.last_verified = u.checked",
    )
    .bind(ids)
    .bind(checked)
    .bind(previous)
    .bind(results)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Records a verification. A failure sends the row to `outdated` with the reason, which
/// rebuilds it from scratch while the old build stays served. Written only if the row is still
/// the ready row that was checked (`checked_at` is the `last_verified` the claim set); false
/// otherwise.
pub async fn finish_verification(
    pool: &PgPool,
    id: i64,
    checked_at: DateTime<Utc>,
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
    .bind(checked_at)
    .bind(failure)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}
