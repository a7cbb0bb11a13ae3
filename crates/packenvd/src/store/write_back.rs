//! The fenced write-back of finished builds: ready results and answered requests in batches,
//! every other outcome one row at a time, and the lock that keeps a ready build's switch on
//! disk inside its row's transaction.

use std::collections::HashMap;
use std::sync::LazyLock;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::summary::{parents_cte, MIRROR_ERROR};
use super::{Fence, Transition};

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
pub(super) const MIRROR_DONE: &str =
    ", claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL,
     attempts = u.attempts,
     env_path = CASE WHEN pe.env_path IS NULL OR pe.env_path_by_packenvd
                     THEN coalesce(u.env_path, pe.env_path) ELSE pe.env_path END,
     env_path_by_packenvd = (pe.env_path IS NULL OR pe.env_path_by_packenvd)
                            AND coalesce(u.env_path, pe.env_path) IS NOT NULL";

/// Every outcome but `Ready` and `Unchanged` (written in batches), one row.
async fn write_other(
    conn: &mut PgConnection,
    fence: Fence,
    t: &Transition,
) -> Result<bool, sqlx::Error> {
    let q = match t {
        Transition::Ready { .. } | Transition::Unchanged { .. } => {
            unreachable!("written in batches by finish_all")
        }
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
