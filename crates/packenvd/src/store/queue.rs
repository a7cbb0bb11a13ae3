//! The queue's statements: claim, heartbeat, log flush, fenced write-back, rescue.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::summary::{parents_cte, MIRROR_ERROR};
use super::{Claim, EnvRow, Fence, Transition};

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
pub static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH b AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required,
                    greatest(run_after, updated) AS claimable_since
             FROM pack_environment_node
             WHERE node = $5 AND status IN ('pending', 'outdated') AND run_after <= now()
             ORDER BY run_after, id
             LIMIT $3
             FOR UPDATE SKIP LOCKED),
         a AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required,
                    greatest(run_after, updated) AS claimable_since
             FROM pack_environment_node
             WHERE node = $5 AND status IN ('pending', 'outdated') AND run_after <= now()
               AND skip_if_current AND fingerprint IS NOT NULL AND id <> ALL($7::int8[])
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
    let unchanged: Vec<usize> = (0..items.len())
        .filter(|&i| matches!(items[i].1, Transition::Unchanged { .. }))
        .collect();
    if !unchanged.is_empty() {
        let ids = write_unchanged(conn, unchanged.iter().map(|&i| &items[i])).await?;
        for &i in &unchanged {
            written[i] = ids.contains(&items[i].0.id);
        }
    }
    for (i, (fence, t)) in items.iter().enumerate() {
        if !matches!(t, Transition::Ready { .. } | Transition::Unchanged { .. }) {
            written[i] = write_other(conn, *fence, t).await?;
        }
    }
    Ok(written)
}

/// Requests answered by their current builds, many at once, each fenced by its own token: a
/// platform that asks again for every pack at start-up gets one statement per batch.
async fn write_unchanged<'a>(
    conn: &mut PgConnection,
    items: impl Iterator<Item = &'a (Fence, Transition)>,
) -> Result<Vec<i64>, sqlx::Error> {
    let rows = items
        .filter_map(|(fence, t)| match t {
            Transition::Unchanged { log } => Some((*fence, vec![Some(log.clone())])),
            _ => None,
        })
        .collect();
    write_fenced(conn, &UNCHANGED_MANY_SQL, rows).await
}

static UNCHANGED_MANY_SQL: LazyLock<[String; 2]> = LazyLock::new(|| {
    fenced_batch_sql(
        &["log"],
        "status = 'ready', required = true, built_generation = n.generation,
         install_log = c.log, install_error = NULL, last_verified = now(),
         last_verify_result = NULL, skip_if_current = false",
        "n.env_path, n.install_log, n.install_error, n.attempts, n.last_verified",
        &format!(
            "{MIRROR_DONE}, install_log = u.install_log,
             last_verified = u.last_verified, last_verify_result = NULL,
             skip_if_current = false"
        ),
    )
});

async fn write_ready<'a>(
    conn: &mut PgConnection,
    items: impl Iterator<Item = &'a (Fence, Transition)>,
) -> Result<Vec<i64>, sqlx::Error> {
    let rows = items
        .filter_map(|(fence, t)| match t {
            Transition::Ready {
                env_path,
                metadata,
                fingerprint,
                log,
            } => Some((
                *fence,
                vec![
                    env_path.clone(),
                    Some(log.clone()),
                    Some(metadata.to_string()),
                    fingerprint.clone(),
                ],
            )),
            _ => None,
        })
        .collect();
    write_fenced(conn, &WRITE_READY_SQL, rows).await
}

/// `ready`, for many builds at once, each fenced by its own token. A catch-up row becomes
/// required once ready: from now on the parent counts it. Public for the test of its plans.
pub static WRITE_READY_SQL: LazyLock<[String; 2]> = LazyLock::new(|| {
    fenced_batch_sql(
        &["env_path", "log", "metadata", "fingerprint"],
        "status = 'ready', required = true, built_generation = n.generation,
         env_path = c.env_path, install_log = c.log, metadata = c.metadata::jsonb,
         fingerprint = c.fingerprint, install_error = NULL, installed_at = now(),
         last_verified = now(), last_verify_result = NULL, skip_if_current = false",
        "n.env_path, n.install_log, n.metadata, n.fingerprint, n.install_error,
         n.installed_at, n.last_verified, n.attempts",
        &format!(
            "{MIRROR_DONE}, install_log = u.install_log, metadata = u.metadata,
             fingerprint = u.fingerprint, installed_at = u.installed_at,
             last_verified = u.last_verified, last_verify_result = NULL,
             skip_if_current = false"
        ),
    )
});

/// A batch write-back of claimed rows, each fenced by its own token (`$1` ids, `$2` tokens,
/// then a text array per name in `inputs`, which `set` reads as `c.<name>`): `set` on the
/// node rows, `mirror` on their parents, the parents' counts moved; returns the ids written.
/// `returning` lists what `mirror` reads of the node rows besides the summary's columns.
///
/// Two statements. The first is for the common case, a row its parent counts as
/// `installing`: its WHERE says so, and PostgreSQL checks the WHERE again on a row's newest
/// version before updating it, so what the parent counted is known without reading the row
/// first. The second locks each row to read what its parent counts, for the rest: a row that
/// stopped counting while it was built (its node was gone for a while), or a claim lost.
fn fenced_batch_sql(inputs: &[&str], set: &str, returning: &str, mirror: &str) -> [String; 2] {
    let arrays = (0..inputs.len() + 2)
        .map(|i| match i {
            0 => "$1::int8[]".to_string(),
            1 => "$2::uuid[]".to_string(),
            i => format!("${}::text[]", i + 1),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let names = inputs.join(", ");
    let p = parents_cte(mirror, Some("NULL"));
    let counted = format!(
        "WITH u AS (
             UPDATE pack_environment_node n
             SET {set}, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
                 updated = now()
             FROM unnest({arrays}) AS c(id, token, {names})
             WHERE n.id = c.id AND n.claim_token = c.token
               AND n.status = 'installing' AND n.required
             RETURNING n.id, n.env_id, n.node, n.status, n.required,
                       'installing'::pack_environment_status_enum AS old_status,
                       true AS old_required, {returning}),
         {p}
         SELECT id FROM u"
    );
    let any = format!(
        "WITH c AS MATERIALIZED (
             SELECT n.id, n.status AS old_status, n.required AS old_required, {x_names}
             FROM unnest({arrays}) AS x(id, token, {names})
             JOIN pack_environment_node n ON n.id = x.id AND n.claim_token = x.token
             FOR UPDATE OF n),
         u AS (
             UPDATE pack_environment_node n
             SET {set}, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
                 updated = now()
             FROM c WHERE n.id = c.id
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required, {returning}),
         {p}
         SELECT id FROM u",
        x_names = inputs
            .iter()
            .map(|n| format!("x.{n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    [counted, any]
}

/// Runs the statements of [`fenced_batch_sql`]: the first for every row, the second for the
/// rows the first did not write.
async fn write_fenced(
    conn: &mut PgConnection,
    sql: &[String; 2],
    rows: Vec<(Fence, Vec<Option<String>>)>,
) -> Result<Vec<i64>, sqlx::Error> {
    async fn run(
        conn: &mut PgConnection,
        sql: &str,
        rows: &[&(Fence, Vec<Option<String>>)],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let width = rows.first().map_or(0, |(_, cols)| cols.len());
        let mut q = sqlx::query_scalar(sql)
            .bind(rows.iter().map(|(f, _)| f.id).collect::<Vec<i64>>())
            .bind(rows.iter().map(|(f, _)| f.token).collect::<Vec<Uuid>>());
        for i in 0..width {
            q = q.bind(
                rows.iter()
                    .map(|(_, cols)| cols[i].clone())
                    .collect::<Vec<Option<String>>>(),
            );
        }
        q.fetch_all(&mut *conn).await
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let all: Vec<&(Fence, Vec<Option<String>>)> = rows.iter().collect();
    let mut written = run(conn, &sql[0], &all).await?;
    let rest: Vec<&(Fence, Vec<Option<String>>)> = rows
        .iter()
        .filter(|(f, _)| !written.contains(&f.id))
        .collect();
    if !rest.is_empty() {
        written.extend(run(conn, &sql[1], &rest).await?);
    }
    Ok(written)
}

/// What every finished build mirrors to its parent: the claim is over, and where the build is.
const MIRROR_DONE: &str = ", claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
     attempts = u.attempts,
     env_path = CASE WHEN pe.env_path IS NULL OR pe.env_path_by_packenvd
                     THEN coalesce(u.env_path, pe.env_path) ELSE pe.env_path END,
     env_path_by_packenvd = (pe.env_path IS NULL OR pe.env_path_by_packenvd)
                            AND coalesce(u.env_path, pe.env_path) IS NOT NULL";

/// Every outcome but `Ready`, one row.
async fn write_other(
    conn: &mut PgConnection,
    fence: Fence,
    t: &Transition,
) -> Result<bool, sqlx::Error> {
    let q = match t {
        Transition::Ready { .. } => unreachable!("written by write_ready"),
        Transition::Unchanged { log } => sqlx::query_scalar(UNCHANGED_SQL.as_str())
            .bind(fence.id)
            .bind(fence.token)
            .bind(log),
        Transition::Retry { after, error, log } => sqlx::query_scalar(RETRY_SQL.as_str())
            .bind(fence.id)
            .bind(fence.token)
            .bind(error)
            .bind(log)
            .bind(after.as_secs_f64()),
        Transition::Failed { error, log } => sqlx::query_scalar(FAILED_SQL.as_str())
            .bind(fence.id)
            .bind(fence.token)
            .bind(error)
            .bind(log),
        Transition::Released { log } => sqlx::query_scalar(RELEASED_SQL.as_str())
            .bind(fence.id)
            .bind(fence.token)
            .bind(log),
        Transition::Deferred => sqlx::query_scalar(DEFERRED_SQL.as_str())
            .bind(fence.id)
            .bind(fence.token),
    };
    let written: i64 = q.fetch_one(&mut *conn).await?;
    Ok(written == 1)
}

/// One node row's write-back, fenced by `$1` (id) and `$2` (claim token): `set` on the node
/// row, `mirror` on its parent, the parent's counts moved.
fn finish_one_sql(set: &str, mirror: &str, error: Option<&str>) -> String {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id, status AS old_status, required AS old_required
             FROM pack_environment_node WHERE id = $1 AND claim_token = $2 FOR UPDATE),
         u AS (
             UPDATE pack_environment_node n
             SET {set}, claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
                 updated = now()
             FROM c WHERE n.id = c.id
             RETURNING n.id, n.env_id, n.node, n.status, n.required, c.old_status,
                       c.old_required, n.env_path, n.install_log, n.install_error, n.attempts,
                       n.run_after, n.last_verified),
         {p}
         SELECT count(*) FROM u",
        p = parents_cte(&format!("{MIRROR_DONE}{mirror}"), error)
    )
}

/// A request answered by the current build.
static UNCHANGED_SQL: LazyLock<String> = LazyLock::new(|| {
    finish_one_sql(
        "status = 'ready', required = true, built_generation = n.generation,
         install_log = $3, install_error = NULL, last_verified = now(),
         last_verify_result = NULL, skip_if_current = false",
        ", install_log = u.install_log, last_verified = u.last_verified,
         last_verify_result = NULL, skip_if_current = false",
        Some("NULL"),
    )
});

/// A retryable failure with attempts left: pending again after `$5` seconds.
static RETRY_SQL: LazyLock<String> = LazyLock::new(|| {
    finish_one_sql(
        "status = 'pending', run_after = now() + make_interval(secs => $5),
         install_error = $3, install_log = $4",
        ", run_after = u.run_after, install_log = u.install_log",
        Some(MIRROR_ERROR),
    )
});

/// A permanent failure, or the last attempt.
static FAILED_SQL: LazyLock<String> = LazyLock::new(|| {
    finish_one_sql(
        "status = 'failed', install_error = $3, install_log = $4",
        ", install_log = u.install_log",
        Some(MIRROR_ERROR),
    )
});

/// Handed back by shutdown: pending at once, the attempt not counted.
static RELEASED_SQL: LazyLock<String> = LazyLock::new(|| {
    finish_one_sql(
        "status = 'pending', attempts = greatest(n.attempts - 1, 0), run_after = now(),
         install_log = $3",
        ", run_after = u.run_after, install_log = u.install_log",
        None,
    )
});

static DEFERRED_SQL: LazyLock<String> = LazyLock::new(|| {
    finish_one_sql(
        "status = 'pending', attempts = greatest(n.attempts - 1, 0), run_after = now()",
        ", run_after = u.run_after",
        None,
    )
});

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
        "SELECT n.id, n.claim_token FROM pack_environment_node n
         JOIN unnest($1::int8[], $2::uuid[]) AS x(id, token)
           ON n.id = x.id AND n.claim_token = x.token
         ORDER BY n.id
         FOR UPDATE OF n",
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
