//! The verifier's statements: take stale ready rows, record what the checks found.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::summary::{parents_cte, MIRROR_ERROR};
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

/// Takes up to `limit` ready rows of `node` last verified before `cutoff` (or never), marking
/// them verified now, in one statement with SKIP LOCKED: each row is checked by one instance
/// only. Reads `pack_environment_node_verify_idx`, which leads with the node.
pub async fn claim_verification(
    pool: &PgPool,
    node: &str,
    cutoff: DateTime<Utc>,
    pack_ref: Option<&str>,
    runtime_ref: Option<&str>,
    limit: i64,
    instance: &str,
) -> Result<Vec<EnvRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH c AS MATERIALIZED (
             SELECT n.id, n.last_verified AS previous_verified,
                    n.last_verify_result AS previous_result
             FROM pack_environment_node n
             WHERE n.node = $6 AND n.status = 'ready'
               AND (n.last_verified IS NULL OR n.last_verified < $1)
               AND ($2::text IS NULL OR EXISTS (
                     SELECT 1 FROM pack_environment pe WHERE pe.id = n.env_id
                       AND pe.pack_ref = $2 AND ($3::text IS NULL OR pe.runtime_ref = $3)))
             ORDER BY n.last_verified NULLS FIRST, n.id
             LIMIT $4
             FOR UPDATE OF n SKIP LOCKED)
         UPDATE pack_environment_node n
         SET last_verified = now(), last_verify_result = 'being checked by ' || $5
         FROM c, pack_environment pe, pack p, runtime r
         WHERE n.id = c.id AND pe.id = n.env_id AND p.id = pe.pack AND r.id = pe.runtime
         RETURNING n.id, n.env_id, pe.pack_ref, pe.runtime_ref, r.name AS runtime_name,
                   n.env_path, p.storage_path,
                   (to_jsonb(p) -> 'runtime_dependencies')::text AS pack_dependencies,
                   coalesce(r.installers, '[]')::text AS installers, n.fingerprint,
                   coalesce(n.metadata, '{}')::text AS metadata, NULL::uuid AS claim_token, n.attempts,
                   false AS skip_if_current, 0::float8 AS pickup_secs,
                   n.last_verified AS checked_at, NULL::text AS problem,
                   c.previous_verified, c.previous_result",
    )
    .bind(cutoff)
    .bind(pack_ref)
    .bind(runtime_ref)
    .bind(limit)
    .bind(instance)
    .bind(node)
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
        "UPDATE pack_environment_node n
         SET last_verified = x.previous, last_verify_result = x.result
         FROM unnest($1::int8[], $2::timestamptz[], $3::timestamptz[], $4::text[])
              AS x(id, checked, previous, result)
         WHERE n.id = x.id AND n.last_verified = x.checked",
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
/// rebuilds it from scratch while the old build stays served. A pass clears what an earlier
/// failure left: the node row's error, and the parent's when no node it counts is anything but
/// ready (another node's failure stays named there). Written only if the row is still
/// the ready row that was checked (`checked_at` is the `last_verified` the claim set); false
/// otherwise. The parent's summary and its single-host mirror move in the same statement.
pub async fn finish_verification(
    pool: &PgPool,
    id: i64,
    checked_at: DateTime<Utc>,
    failure: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(FINISH_VERIFICATION_SQL.as_str())
        .bind(id)
        .bind(checked_at)
        .bind(failure)
        .fetch_one(pool)
        .await?;
    Ok(n == 1)
}

static FINISH_VERIFICATION_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required
             FROM pack_environment_node
             WHERE id = $1 AND status = 'ready' AND last_verified = $2
             FOR UPDATE),
         u AS (
             UPDATE pack_environment_node n
             SET last_verify_result = coalesce($3, 'ok'),
                 status = CASE WHEN $3 IS NULL THEN n.status ELSE 'outdated' END,
                 skip_if_current = CASE WHEN $3 IS NULL THEN n.skip_if_current ELSE false END,
                 run_after = CASE WHEN $3 IS NULL THEN n.run_after ELSE now() END,
                 install_error = CASE WHEN $3 IS NULL THEN NULL
                                      ELSE 'verification failed: ' || $3 END,
                 updated = now()
             FROM c WHERE n.id = c.id
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required, n.install_error, n.last_verified, n.last_verify_result),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte(
            ", last_verified = u.last_verified, last_verify_result = u.last_verify_result",
            Some(&format!(
                "CASE WHEN u.status = 'outdated' THEN {MIRROR_ERROR}
                      WHEN pe.nodes_pending + pe.nodes_installing + pe.nodes_failed
                           + pe.nodes_outdated = 0 THEN NULL
                      ELSE pe.install_error END"
            ))
        )
    )
});
