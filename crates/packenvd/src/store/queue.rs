//! The queue's statements: claim, heartbeat, log flush, rescue (the write-backs are in
//! `write_back.rs`).

use std::sync::LazyLock;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::summary::{parents_cte, MIRROR_ERROR};
use super::write_back::MIRROR_DONE;
use super::{Claim, EnvRow, Fence};

/// The claim (DESIGN §3, §8): up to `$3` claimable rows of node `$5`, oldest `run_after` first,
/// in one statement that commits before any build starts. Its first CTE reads
/// `pack_environment_node_claimable_idx`, which leads with the node and whose `WHERE` is the
/// CTE's, so a claim never walks finished rows or other nodes' rows. A row without `env_path`
/// gets the platform's `env_path` if it set one, else `<envs_root>/<pack's ref>/<runtime name,
/// lower-cased>` (`$4` is this node's envs root); the build still checks it before any write.
/// `problem` says what the row contradicts: a `pack_ref` or `runtime_ref` that is not its
/// pack's or runtime's ref, or a runtime whose directory name an older row of the same pack
/// already has (names that differ only in case); the build then fails the row before anything
/// runs. The parent's counts and the single-host mirror move in the same statement.
/// `metadata` and `installers` are read as '{}' and '[]' when NULL (a platform's columns may
/// allow it): one such row must build or fail alone, never fail the decoding of the batch.
/// `$8` are rows this daemon keeps out of its claims (the database refused them, see
/// [`Lanes::refused`]); `$9`, when not NULL, the only rows it may take (the isolation of a
/// refused row claims part of the candidates at a time).
pub static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH b AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required,
                    greatest(run_after, updated) AS claimable_since
             FROM pack_environment_node
             WHERE node = $5 AND status IN ('pending', 'outdated') AND run_after <= now()
               AND id <> ALL($8::int8[]) AND ($9::int8[] IS NULL OR id = ANY($9::int8[]))
             ORDER BY run_after, id
             LIMIT $3
             FOR UPDATE SKIP LOCKED),
         a AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required,
                    greatest(run_after, updated) AS claimable_since
             FROM pack_environment_node
             WHERE node = $5 AND status IN ('pending', 'outdated') AND run_after <= now()
               AND skip_if_current AND fingerprint IS NOT NULL AND id <> ALL($7::int8[])
               AND id <> ALL($8::int8[]) AND ($9::int8[] IS NULL OR id = ANY($9::int8[]))
               AND id NOT IN (SELECT id FROM b)
             ORDER BY run_after, id
             LIMIT $6
             FOR UPDATE SKIP LOCKED),
         -- The lanes' rows as they were locked: no second lookup of each.
         c AS (
             SELECT id, old_status, old_required, claimable_since, false AS answer FROM b
             UNION ALL
             SELECT id, old_status, old_required, claimable_since, true FROM a),
         u AS (
             UPDATE pack_environment_node n
             SET status = 'installing', claimed_by = $1, claim_token = gen_random_uuid(),
                 lease_expires_at = now() + make_interval(secs => $2),
                 attempts = n.attempts + 1, updated = now(),
                 env_path = CASE
                     WHEN r.installers->'requires_environment' = 'false'::jsonb THEN NULL
                     WHEN n.env_path IS NOT NULL THEN n.env_path
                     WHEN pe.env_path IS NOT NULL AND NOT pe.env_path_by_packenvd THEN pe.env_path
                     ELSE $4 || '/' || p.ref || '/' || lower(r.name) END
             FROM c, pack_environment pe, pack p, runtime r
             WHERE n.id = c.id AND pe.id = n.env_id AND p.id = pe.pack AND r.id = pe.runtime
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status, c.old_required,
                 pe.pack_ref, pe.runtime_ref, r.name AS runtime_name, n.env_path, p.storage_path,
                 (to_jsonb(p) -> 'runtime_dependencies')::text AS pack_dependencies,
                 coalesce(r.installers, '[]')::text AS installers, n.fingerprint,
                 coalesce(n.metadata, '{{}}')::text AS metadata,
                 n.claim_token, n.claimed_by, n.lease_expires_at, n.attempts, n.skip_if_current,
                 c.answer,
                 CASE WHEN n.skip_if_current THEN n.install_log END AS previous_log,
                 extract(epoch FROM clock_timestamp() - c.claimable_since)::float8 AS pickup_secs,
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
                 END AS problem),
         {p}
         SELECT id, env_id, pack_ref, runtime_ref, runtime_name, env_path, storage_path,
                pack_dependencies,
                installers, fingerprint, metadata, claim_token, attempts, skip_if_current,
                pickup_secs, NULL::timestamptz AS checked_at, problem,
                NULL::timestamptz AS previous_verified, NULL::text AS previous_result,
                answer, previous_log
         FROM u",
        p = parents_cte(
            ", claimed_by = u.claimed_by, claim_token = u.claim_token,
             lease_expires_at = u.lease_expires_at, attempts = u.attempts,
             env_path = CASE WHEN pe.env_path IS NULL OR pe.env_path_by_packenvd
                             THEN u.env_path ELSE pe.env_path END,
             env_path_by_packenvd = (pe.env_path IS NULL OR pe.env_path_by_packenvd)
                                    AND u.env_path IS NOT NULL",
            None
        )
    )
});

/// Claims up to `limit` claimable rows of `node` for `instance` with a lease of `lease`.
pub async fn claim(
    pool: &PgPool,
    node: &str,
    instance: &str,
    lease: Duration,
    limit: i64,
    envs_root: &std::path::Path,
) -> Result<Vec<Claim>, sqlx::Error> {
    let lanes = Lanes {
        build: limit,
        answer: 0,
        deferred: &[],
        refused: &[],
        only: None,
    };
    claim_lanes(pool, node, instance, lease, lanes, envs_root).await
}

/// How many rows a claim takes for each lane.
#[derive(Debug, Clone, Copy)]
pub struct Lanes<'a> {
    /// Rows of any kind, for the build slots.
    pub build: i64,
    /// More rows, requests only (`skip_if_current`), for the answer lane: answering one from
    /// its current build takes no build slot ([`EnvRow::answer`] marks them).
    pub answer: i64,
    /// Requests the answer lane deferred to the build lane: it does not take them again.
    pub deferred: &'a [i64],
    /// Rows the database refused to claim or record, which this daemon leaves alone until
    /// their backoff is over.
    pub refused: &'a [i64],
    /// When set, the claim takes only these rows: the isolation of a refused row claims the
    /// candidates part by part ([`claimable`] lists them).
    pub only: Option<&'a [i64]>,
}

/// [`claim`] for both lanes in one statement.
pub async fn claim_lanes(
    pool: &PgPool,
    node: &str,
    instance: &str,
    lease: Duration,
    lanes: Lanes<'_>,
    envs_root: &std::path::Path,
) -> Result<Vec<Claim>, sqlx::Error> {
    let rows: Vec<EnvRow> = sqlx::query_as(CLAIM_SQL.as_str())
        .bind(instance)
        .bind(lease.as_secs_f64())
        .bind(lanes.build)
        .bind(envs_root.display().to_string())
        .bind(node)
        .bind(lanes.answer)
        .bind(lanes.deferred)
        .bind(lanes.refused)
        .bind(lanes.only)
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

/// A row a claim would take, named for the isolation of a row the database refuses to claim.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Candidate {
    /// The node row.
    pub id: i64,
    pub env_id: i64,
    pub pack_ref: Option<String>,
    pub runtime_ref: Option<String>,
}

/// The rows of node `$1` a claim of `$3` rows would take first, without `$2` (rows kept out),
/// in the claim's order and without locking them: the candidates among which a refused claim
/// looks for the row the database refuses.
const CLAIMABLE_SQL: &str = "SELECT n.id, n.env_id, pe.pack_ref, pe.runtime_ref
     FROM pack_environment_node n JOIN pack_environment pe ON pe.id = n.env_id
     WHERE n.node = $1 AND n.status IN ('pending', 'outdated') AND n.run_after <= now()
       AND n.id <> ALL($2::int8[])
     ORDER BY n.run_after, n.id
     LIMIT $3";

/// The first `limit` claimable rows of `node` but `refused`, in the claim's order.
pub async fn claimable(
    pool: &PgPool,
    node: &str,
    refused: &[i64],
    limit: i64,
) -> Result<Vec<Candidate>, sqlx::Error> {
    sqlx::query_as(CLAIMABLE_SQL)
        .bind(node)
        .bind(refused)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Fails node row `$1` of node `$2`, still claimable (never claimed, so there is no claim to
/// fence), with `$3` as its error: the row the database refused to claim. The parent's counts
/// are recounted by [`RECOUNT_SQL`] in the same transaction.
const FAIL_REFUSED_SQL: &str = "UPDATE pack_environment_node
     SET status = 'failed', install_error = $3, claimed_by = NULL, claim_token = NULL,
         lease_expires_at = NULL, updated = now()
     WHERE id = $1 AND node = $2 AND status IN ('pending', 'outdated')
     RETURNING env_id";

/// Recounts environment `$1`'s node rows into its summary (a write outside the statements
/// that move the counts themselves).
const RECOUNT_SQL: &str = "SELECT pack_environment_recount($1)";

/// Gives failed environment `$1` the error `$2` of its refused node row; `summary_seq` moves
/// so the platform's triggers take it for packenvd's own write.
const PARENT_ERROR_SQL: &str = "UPDATE pack_environment
     SET install_error = $2, summary_seq = summary_seq + 1, updated = now()
     WHERE id = $1 AND status = 'failed'";

/// Records a row the database refused to claim as failed with `error`, in a statement of its
/// own; false when the row was no longer claimable (another instance took it, an operator
/// changed it).
pub async fn fail_refused(
    pool: &PgPool,
    node: &str,
    id: i64,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let env: Option<i64> = sqlx::query_scalar(FAIL_REFUSED_SQL)
        .bind(id)
        .bind(node)
        .bind(error)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(env) = env else {
        return Ok(false);
    };
    sqlx::query(RECOUNT_SQL).bind(env).execute(&mut *tx).await?;
    sqlx::query(PARENT_ERROR_SQL)
        .bind(env)
        .bind(error)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Replaces instance `$2`'s entries in node `$1`'s `refused_rows` with `$3` (a JSON array),
/// keeping the other instances' of the same node whose backoff is not over (those of an
/// instance that stopped go once their backoff is).
const RECORD_REFUSED_SQL: &str = "UPDATE packenvd_node
     SET refused_rows = coalesce((SELECT jsonb_agg(e) FROM jsonb_array_elements(refused_rows) e
                                  WHERE e->>'instance' IS DISTINCT FROM $2
                                    AND (e->>'retry_at')::timestamptz > now()), '[]')
                        || $3::jsonb
     WHERE name = $1";

/// Records on this node's row the rows `instance` keeps out of its claims because the
/// database refused them (and refused to fail them): what `packenvd status` shows.
pub async fn record_refused(
    pool: &PgPool,
    node: &str,
    instance: &str,
    rows: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(RECORD_REFUSED_SQL)
        .bind(node)
        .bind(instance)
        .bind(rows)
        .execute(pool)
        .await?;
    Ok(())
}

/// A node and the rows its daemons keep out of their claims because the database refused them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefusedRows {
    pub node: String,
    pub rows: serde_json::Value,
}

/// Every node's refused rows, for nodes that have any.
const REFUSED_ROWS_SQL: &str = "SELECT name AS node, refused_rows AS rows FROM packenvd_node
     WHERE refused_rows <> '[]'::jsonb ORDER BY name";

/// The rows daemons keep out of their claims because the database refused them, by node.
pub async fn refused_rows(pool: &PgPool) -> Result<Vec<RefusedRows>, sqlx::Error> {
    sqlx::query_as(REFUSED_ROWS_SQL).fetch_all(pool).await
}

/// Renews the leases of the given claims in one statement; returns the tokens still ours.
pub async fn heartbeat(
    pool: &PgPool,
    fences: &[Fence],
    lease: Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let ids: Vec<i64> = fences.iter().map(|f| f.id).collect();
    let tokens: Vec<Uuid> = fences.iter().map(|f| f.token).collect();
    sqlx::query_scalar(
        "UPDATE pack_environment_node n SET lease_expires_at = now() + make_interval(secs => $3)
         FROM unnest($1::int8[], $2::uuid[]) AS h(id, token)
         WHERE n.id = h.id AND n.claim_token = h.token AND n.status = 'installing'
         RETURNING n.claim_token",
    )
    .bind(ids)
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
        "UPDATE pack_environment_node n SET install_log = x.log
         FROM unnest($1::int8[], $2::uuid[], $3::text[]) AS x(id, token, log)
         WHERE n.id = x.id AND n.claim_token = x.token
         RETURNING n.id",
    )
    .bind(ids)
    .bind(tokens)
    .bind(texts)
    .fetch_all(pool)
    .await
}

/// Sends `installing` rows of `node` whose lease expired back to `pending`, or to `failed`
/// when their attempts are spent. Status and lease are checked again under the row lock, so a
/// build that finished a moment earlier is never overwritten. Returns how many rows were
/// rescued.
pub async fn rescue_expired(
    pool: &PgPool,
    node: &str,
    max_attempts: u32,
) -> Result<u64, sqlx::Error> {
    rescue(pool, node, max_attempts, None).await
}

/// The rows of `node` whose lease expired, for rescuing them one by one when the database
/// refuses to rescue them together (a constraint or trigger that refuses one of them).
pub async fn expired_leases(pool: &PgPool, node: &str) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM pack_environment_node
         WHERE node = $1 AND status = 'installing' AND lease_expires_at < now()
         ORDER BY id LIMIT 1000",
    )
    .bind(node)
    .fetch_all(pool)
    .await
}

/// [`rescue_expired`] for one row.
pub async fn rescue_row(
    pool: &PgPool,
    node: &str,
    max_attempts: u32,
    id: i64,
) -> Result<u64, sqlx::Error> {
    rescue(pool, node, max_attempts, Some(id)).await
}

static RESCUE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required
             FROM pack_environment_node
             WHERE node = $3 AND status = 'installing' AND lease_expires_at < now()
               AND ($2::int8 IS NULL OR id = $2)
             FOR UPDATE SKIP LOCKED),
         u AS (
             UPDATE pack_environment_node n
             SET status = CASE WHEN n.attempts >= $1 THEN 'failed' ELSE 'pending' END::pack_environment_status_enum,
                 install_error = 'the build by ' || coalesce(n.claimed_by, '?')
                     || ' stopped renewing its lease (daemon killed or cut off) on attempt '
                     || n.attempts
                     || CASE WHEN n.attempts >= $1 THEN '; no attempts left' ELSE '; it will be retried' END,
                 run_after = now(), claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
                 updated = now()
             FROM c
             WHERE n.id = c.id AND n.status = 'installing' AND n.lease_expires_at < now()
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required, n.env_path, n.install_error, n.attempts, n.run_after),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte(
            &format!("{MIRROR_DONE}, run_after = u.run_after"),
            Some(MIRROR_ERROR)
        )
    )
});

async fn rescue(
    pool: &PgPool,
    node: &str,
    max_attempts: u32,
    only: Option<i64>,
) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(RESCUE_SQL.as_str())
        .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
        .bind(only)
        .bind(node)
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}
