//! The queue's statements: claim, heartbeat, log flush, fenced write-back, rescue.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{Claim, EnvRow, Fence, Transition};

/// The claim (DESIGN §3): up to `$3` claimable rows, oldest `run_after` first, in one statement
/// that commits before any build starts. Its CTE reads `pack_environment_claimable_idx`, whose
/// `WHERE` is the CTE's, so a claim never walks finished rows. A row without `env_path` gets
/// `<envs_root>/<pack's ref>/<runtime name, lower-cased>` (`$4` is the envs root: the SQL side
/// cannot know the daemon's config); the build still checks it before any write. `problem`
/// says what the row contradicts: a `pack_ref` or `runtime_ref` that is not its pack's or
/// runtime's ref, or a runtime whose directory name an older row of the same pack already has
/// (names that differ only in case); the build then fails the row before anything runs.
pub const CLAIM_SQL: &str = "WITH c AS MATERIALIZED (
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
             ELSE $4 || '/' || p.ref || '/' || lower(r.name) END
     FROM c, pack p, runtime r
     WHERE pe.id = c.id AND p.id = pe.pack AND r.id = pe.runtime
     RETURNING pe.id, pe.pack_ref, pe.runtime_ref, r.name AS runtime_name, pe.env_path,
               p.storage_path, r.installers::text AS installers, pe.fingerprint,
               pe.metadata::text AS metadata, pe.claim_token, pe.attempts, pe.skip_if_current,
               extract(epoch FROM clock_timestamp() - c.claimable_since)::float8 AS pickup_secs,
               NULL::timestamptz AS checked_at,
               CASE
                 WHEN pe.pack_ref IS DISTINCT FROM p.ref THEN format(
                   'the row''s pack_ref %L is not the ref %L of its pack (id %s)',
                   pe.pack_ref, p.ref, p.id)
                 WHEN pe.runtime_ref IS DISTINCT FROM r.ref THEN format(
                   'the row''s runtime_ref %L is not the ref %L of its runtime (id %s)',
                   pe.runtime_ref, r.ref, r.id)
                 ELSE (SELECT format(
                   'runtime %s and runtime %s of pack %s would share the directory %L (their names differ only in case); rename one of them',
                   r.ref, ro.ref, p.ref, lower(r.name))
                   FROM pack_environment o JOIN runtime ro ON ro.id = o.runtime
                   WHERE o.pack = pe.pack AND o.id < pe.id AND lower(ro.name) = lower(r.name)
                     AND r.installers->'requires_environment' IS DISTINCT FROM 'false'::jsonb
                     AND ro.installers->'requires_environment' IS DISTINCT FROM 'false'::jsonb
                   LIMIT 1)
               END AS problem,
               NULL::timestamptz AS previous_verified, NULL::text AS previous_result";

/// Claims up to `limit` claimable rows for `instance` with a lease of `lease`.
pub async fn claim(
    pool: &PgPool,
    instance: &str,
    lease: Duration,
    limit: i64,
    envs_root: &std::path::Path,
) -> Result<Vec<Claim>, sqlx::Error> {
    let rows: Vec<EnvRow> = sqlx::query_as(CLAIM_SQL)
        .bind(instance)
        .bind(lease.as_secs_f64())
        .bind(limit)
        .bind(envs_root.display().to_string())
        .fetch_all(pool)
        .await?;
    // The claim sets a token on every row it returns.
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let token = row.claim_token?;
            Some(Claim {
                fence: Fence { id: row.id, token },
                row,
            })
        })
        .collect())
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

/// Writes running builds' logs so an operator can watch them, in one statement; returns the
/// ids still ours (a build whose id is missing lost its claim).
pub async fn flush_logs(pool: &PgPool, logs: &[(Fence, String)]) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = logs.iter().map(|(f, _)| f.id).collect();
    let tokens: Vec<Uuid> = logs.iter().map(|(f, _)| f.token).collect();
    let texts: Vec<&str> = logs.iter().map(|(_, l)| l.as_str()).collect();
    sqlx::query_scalar(
        "UPDATE pack_environment pe SET install_log = u.log
         FROM unnest($1::int8[], $2::uuid[], $3::text[]) AS u(id, token, log)
         WHERE pe.id = u.id AND pe.claim_token = u.token
         RETURNING pe.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(texts)
    .fetch_all(pool)
    .await
}

/// Writes one build's outcome, fenced. False when the claim was lost (the result is
/// discarded).
pub async fn finish(
    pool: &PgPool,
    fence: Fence,
    transition: Transition,
) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let written = finish_all(&mut conn, &[(fence, transition)]).await?;
    Ok(written.first().copied().unwrap_or(false))
}

/// Writes many outcomes, each fenced by its own claim token: one statement for all `Ready`
/// ones (group commit), one per other outcome. Returns, per item, whether it was written.
pub async fn finish_all(
    conn: &mut PgConnection,
    items: &[(Fence, Transition)],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut written = vec![false; items.len()];
    let ready: Vec<usize> = (0..items.len())
        .filter(|&i| matches!(items[i].1, Transition::Ready { .. }))
        .collect();
    if !ready.is_empty() {
        let ids = write_ready(conn, ready.iter().map(|&i| &items[i])).await?;
        for &i in &ready {
            written[i] = ids.contains(&items[i].0.id);
        }
    }
    for (i, (fence, t)) in items.iter().enumerate() {
        if !matches!(t, Transition::Ready { .. }) {
            written[i] = write_other(conn, *fence, t).await?;
        }
    }
    Ok(written)
}

async fn write_ready<'a>(
    conn: &mut PgConnection,
    items: impl Iterator<Item = &'a (Fence, Transition)>,
) -> Result<Vec<i64>, sqlx::Error> {
    let (mut ids, mut tokens, mut paths, mut logs, mut metadata, mut fingerprints) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (fence, t) in items {
        if let Transition::Ready {
            env_path,
            metadata: m,
            fingerprint,
            log,
        } = t
        {
            ids.push(fence.id);
            tokens.push(fence.token);
            paths.push(env_path.clone());
            logs.push(log.clone());
            metadata.push(m.to_string());
            fingerprints.push(fingerprint.clone());
        }
    }
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
    .fetch_all(&mut *conn)
    .await
}

/// Every outcome but `Ready`, one row.
async fn write_other(
    conn: &mut PgConnection,
    fence: Fence,
    t: &Transition,
) -> Result<bool, sqlx::Error> {
    let q = match t {
        Transition::Ready { .. } => unreachable!("written by write_ready"),
        Transition::Unchanged { log } => sqlx::query(
            "UPDATE pack_environment
             SET status = 'ready', install_log = $3, install_error = NULL, last_verified = now(),
                 skip_if_current = false, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
             WHERE id = $1 AND claim_token = $2",
        )
        .bind(fence.id)
        .bind(fence.token)
        .bind(log),
        Transition::Retry { after, error, log } => sqlx::query(
            "UPDATE pack_environment
             SET status = 'pending', run_after = now() + make_interval(secs => $5),
                 install_error = $3, install_log = $4,
                 claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
             WHERE id = $1 AND claim_token = $2",
        )
        .bind(fence.id)
        .bind(fence.token)
        .bind(error)
        .bind(log)
        .bind(after.as_secs_f64()),
        Transition::Failed { error, log } => sqlx::query(
            "UPDATE pack_environment
             SET status = 'failed', install_error = $3, install_log = $4,
                 claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
             WHERE id = $1 AND claim_token = $2",
        )
        .bind(fence.id)
        .bind(fence.token)
        .bind(error)
        .bind(log),
        Transition::Released { log } => sqlx::query(
            "UPDATE pack_environment
             SET status = 'pending', attempts = greatest(attempts - 1, 0), run_after = now(),
                 install_log = $3, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL
             WHERE id = $1 AND claim_token = $2",
        )
        .bind(fence.id)
        .bind(fence.token)
        .bind(log),
    };
    Ok(q.execute(&mut *conn).await?.rows_affected() == 1)
}

/// Opens a transaction and locks the rows whose claims are still held; returns it and the
/// fences that hold. Until it ends, a reset of those rows waits: what is done on disk inside it
/// (the switch of a ready build) can never land after a newer build's (DESIGN §6).
pub async fn lock_fenced(
    pool: &PgPool,
    fences: &[Fence],
) -> Result<(Transaction<'static, Postgres>, Vec<Fence>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids: Vec<i64> = fences.iter().map(|f| f.id).collect();
    let tokens: Vec<Uuid> = fences.iter().map(|f| f.token).collect();
    let held: Vec<(i64, Uuid)> = sqlx::query_as(
        "SELECT pe.id, pe.claim_token FROM pack_environment pe
         JOIN unnest($1::int8[], $2::uuid[]) AS u(id, token)
           ON pe.id = u.id AND pe.claim_token = u.token
         ORDER BY pe.id
         FOR UPDATE OF pe",
    )
    .bind(ids)
    .bind(tokens)
    .fetch_all(&mut *tx)
    .await?;
    let held: HashMap<i64, Uuid> = held.into_iter().collect();
    let fences = fences
        .iter()
        .filter(|f| held.get(&f.id) == Some(&f.token))
        .copied()
        .collect();
    Ok((tx, fences))
}

/// Sends `installing` rows whose lease expired back to `pending`, or to `failed` when their
/// attempts are spent. Status and lease are checked again under the row lock, so a build that
/// finished a moment earlier is never overwritten. Returns how many rows were rescued.
pub async fn rescue_expired(pool: &PgPool, max_attempts: u32) -> Result<u64, sqlx::Error> {
    rescue(pool, max_attempts, None).await
}

/// The rows whose lease expired, for rescuing them one by one when the database refuses to
/// rescue them together (a constraint or trigger that refuses one of them).
pub async fn expired_leases(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM pack_environment WHERE status = 'installing' AND lease_expires_at < now()
         ORDER BY id LIMIT 1000",
    )
    .fetch_all(pool)
    .await
}

/// [`rescue_expired`] for one row.
pub async fn rescue_row(pool: &PgPool, max_attempts: u32, id: i64) -> Result<u64, sqlx::Error> {
    rescue(pool, max_attempts, Some(id)).await
}

async fn rescue(pool: &PgPool, max_attempts: u32, only: Option<i64>) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "WITH c AS MATERIALIZED (
             SELECT id FROM pack_environment
             WHERE status = 'installing' AND lease_expires_at < now()
               AND ($2::int8 IS NULL OR id = $2)
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
    .bind(only)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
