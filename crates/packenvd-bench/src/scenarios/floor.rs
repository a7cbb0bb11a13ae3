//! Row 7's floor (issue 12): what the nodes model costs at the least, whoever implements it.
//! The same claim-and-write-back loop runs on two minimal schemas. One table is the queue,
//! the shape before nodes. In the other, the queue is a node table, and each of its writes
//! moves its parent's counts and status in the same statement, the least DESIGN §8 asks
//! (the summary current in the transaction of each node's write, `installing` shown at the
//! claim). Neither has triggers, mirrored columns or checks. packenvd's own extra cost per row
//! over the pre-nodes build (the lines above it in the table) reads against this one's.

use std::time::Instant;

use anyhow::ensure;
use sqlx::PgPool;
use uuid::Uuid;

use super::Ctx;
use crate::procs;

/// Which schema a floor run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    OneTable,
    TwoTables,
}

const SCHEMA: &str = "
    CREATE TABLE q1 (
        id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
        run_after timestamptz NOT NULL DEFAULT now(), claimed_by text, claim_token uuid,
        lease_expires_at timestamptz, updated timestamptz NOT NULL DEFAULT now());
    CREATE INDEX ON q1 (run_after, id) WHERE status = 'pending';
    CREATE INDEX ON q1 (lease_expires_at) WHERE status = 'installing';
    CREATE TABLE p (
        id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
        n_pending int NOT NULL DEFAULT 1, n_installing int NOT NULL DEFAULT 0,
        n_ready int NOT NULL DEFAULT 0, updated timestamptz NOT NULL DEFAULT now())
        WITH (fillfactor = 70);
    CREATE TABLE q (
        id bigserial PRIMARY KEY, env_id bigint NOT NULL REFERENCES p ON DELETE CASCADE,
        node text NOT NULL, status text NOT NULL DEFAULT 'pending',
        run_after timestamptz NOT NULL DEFAULT now(), claimed_by text, claim_token uuid,
        lease_expires_at timestamptz, updated timestamptz NOT NULL DEFAULT now(),
        UNIQUE (env_id, node));
    CREATE INDEX ON q (node, run_after, id) WHERE status = 'pending';
    CREATE INDEX ON q (node, lease_expires_at) WHERE status = 'installing'";

const CLAIM_ONE: &str = "
    UPDATE q1 SET status = 'installing', claimed_by = $1, claim_token = gen_random_uuid(),
        lease_expires_at = now() + interval '1 minute', updated = now()
    WHERE id IN (SELECT id FROM q1 WHERE status = 'pending' AND run_after <= now()
                 ORDER BY run_after, id LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING id, claim_token";

const READY_ONE: &str = "
    UPDATE q1 SET status = 'ready', claimed_by = NULL, claim_token = NULL,
        lease_expires_at = NULL, updated = now()
    FROM unnest($1::int8[], $2::uuid[]) AS f(id, token)
    WHERE q1.id = f.id AND q1.claim_token = f.token";

const CLAIM_TWO: &str = "
    WITH c AS (
        UPDATE q SET status = 'installing', claimed_by = $1, claim_token = gen_random_uuid(),
            lease_expires_at = now() + interval '1 minute', updated = now()
        WHERE id IN (SELECT id FROM q WHERE node = 'n' AND status = 'pending'
                       AND run_after <= now()
                     ORDER BY run_after, id LIMIT $2 FOR UPDATE SKIP LOCKED)
        RETURNING id, env_id, claim_token),
    s AS (
        UPDATE p SET n_pending = p.n_pending - 1, n_installing = p.n_installing + 1,
            status = 'installing', updated = now()
        FROM c WHERE p.id = c.env_id)
    SELECT id, claim_token FROM c";

const READY_TWO: &str = "
    WITH c AS (
        UPDATE q SET status = 'ready', claimed_by = NULL, claim_token = NULL,
            lease_expires_at = NULL, updated = now()
        FROM unnest($1::int8[], $2::uuid[]) AS f(id, token)
        WHERE q.id = f.id AND q.claim_token = f.token
        RETURNING q.env_id)
    UPDATE p SET n_installing = p.n_installing - 1, n_ready = p.n_ready + 1,
        status = CASE WHEN p.n_installing = 1 AND p.n_pending = 0 THEN 'ready'
                      ELSE 'installing' END,
        updated = now()
    FROM c WHERE p.id = c.env_id";

/// One floor run.
#[derive(Debug, Clone, Copy)]
pub struct FloorRun {
    pub rows_per_s: f64,
    /// Every `postgres` process's CPU over the run ÷ rows.
    pub server_cpu_us: f64,
}

/// `rows` rows in `shape`, drained by `tasks` loops that each claim up to `batch` rows and
/// write them back in one statement, on a pool with the daemon's session settings.
pub async fn floor(
    ctx: &Ctx,
    shape: Shape,
    rows: u64,
    batch: usize,
    tasks: usize,
) -> anyhow::Result<FloorRun> {
    let db = ctx.cluster.fresh_db("floor", 2).await?;
    let result = async {
        sqlx::raw_sql(SCHEMA).execute(&db.pool).await?;
        let fill = match shape {
            Shape::OneTable => {
                "INSERT INTO q1 (run_after) SELECT now() FROM generate_series(1, $1)"
            }
            Shape::TwoTables => {
                "WITH e AS (INSERT INTO p (id) SELECT g FROM generate_series(1, $1) g RETURNING id)
                 INSERT INTO q (env_id, node) SELECT id, 'n' FROM e ORDER BY id"
            }
        };
        sqlx::query(fill)
            .bind(rows as i64)
            .execute(&db.pool)
            .await?;
        let pool =
            packenvd::store::connect(&db.url, tasks as u32, packenvd::store::Workload::Daemon)
                .await?;
        let (claim, ready) = match shape {
            Shape::OneTable => (CLAIM_ONE, READY_ONE),
            Shape::TwoTables => (CLAIM_TWO, READY_TWO),
        };
        let server0 = procs::server_cpu_seconds();
        let started = Instant::now();
        let mut loops = tokio::task::JoinSet::new();
        for i in 0..tasks {
            let pool = pool.clone();
            loops.spawn(drain(pool, format!("floor-{i}"), claim, ready, batch));
        }
        while let Some(r) = loops.join_next().await {
            r??;
        }
        let took = started.elapsed().as_secs_f64();
        let server1 = procs::server_cpu_seconds();
        pool.close().await;
        let check = match shape {
            Shape::OneTable => "SELECT count(*) FROM q1 WHERE status = 'ready'",
            Shape::TwoTables => {
                "SELECT count(*) FROM q JOIN p ON p.id = q.env_id
                 WHERE q.status = 'ready' AND p.status = 'ready' AND p.n_ready = 1"
            }
        };
        let ready: i64 = sqlx::query_scalar(check).fetch_one(&db.pool).await?;
        ensure!(
            ready as u64 == rows,
            "only {ready} of {rows} rows are ready"
        );
        Ok(FloorRun {
            rows_per_s: rows as f64 / took.max(1e-9),
            server_cpu_us: (server1 - server0) * 1e6 / rows as f64,
        })
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

/// One loop: claim, write back what it claimed, until a claim finds nothing.
async fn drain(
    pool: PgPool,
    name: String,
    claim: &'static str,
    ready: &'static str,
    batch: usize,
) -> Result<(), sqlx::Error> {
    loop {
        let claimed: Vec<(i64, Uuid)> = sqlx::query_as(claim)
            .bind(&name)
            .bind(batch as i64)
            .fetch_all(&pool)
            .await?;
        if claimed.is_empty() {
            return Ok(());
        }
        let (ids, tokens): (Vec<i64>, Vec<Uuid>) = claimed.into_iter().unzip();
        sqlx::query(ready)
            .bind(ids)
            .bind(tokens)
            .execute(&pool)
            .await?;
    }
}

/// Both shapes `samples` times each, alternating, so drift in the machine's speed falls on both.
#[derive(Debug, Clone)]
pub struct Floor {
    pub batch: usize,
    pub tasks: usize,
    pub one: Vec<FloorRun>,
    pub two: Vec<FloorRun>,
}

pub async fn floors(
    ctx: &Ctx,
    rows: u64,
    batch: usize,
    tasks: usize,
    samples: usize,
) -> anyhow::Result<Floor> {
    let mut f = Floor {
        batch,
        tasks,
        one: Vec::new(),
        two: Vec::new(),
    };
    for i in 1..=samples {
        for shape in [Shape::OneTable, Shape::TwoTables] {
            let r = floor(ctx, shape, rows, batch, tasks).await?;
            eprintln!(
                "packenvd-bench: floor, {tasks} loops × {batch} rows, {shape:?}, run {i}: {:.0} rows/s, server {:.0} µs per row",
                r.rows_per_s, r.server_cpu_us
            );
            match shape {
                Shape::OneTable => f.one.push(r),
                Shape::TwoTables => f.two.push(r),
            }
        }
    }
    Ok(f)
}
