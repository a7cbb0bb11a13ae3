//! Row 1, queue throughput: rows per second from one bulk insert until the queue is empty,
//! for packenvd's daemons, for its own claim and write-back statements in a tight loop (the
//! raw limit) and for the peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{elapsed, insert_packs, rate, start_peers, stop_all, wait_empty, Build, Ctx};
use crate::procs::{self, DaemonDirs, PeerOptions};
use crate::proxy;

/// Inserts a `pending` core.shell row for every pack in one transaction; returns the server's
/// clock just before the commit (the rows become visible, and the NOTIFY goes out, at commit).
async fn insert_shell_rows(pool: &PgPool) -> anyhow::Result<DateTime<Utc>> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO pack_environment (pack, runtime)
         SELECT p.id, r.id FROM pack p, runtime r WHERE r.ref = 'core.shell' ORDER BY p.id",
    )
    .execute(&mut *tx)
    .await?;
    let t0 = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(t0)
}

/// Whether the queue is empty: two lookups that each read the first entry of one of the
/// queue's partial indexes. They ask for the index's order with LIMIT 1, so the planner takes
/// the index whatever its statistics say (with an EXISTS, statistics that say most rows are
/// pending make it choose a sequential scan, which reads every row once the queue is empty).
/// The queue is the node rows since the nodes migration, whose parents lost their queue
/// indexes; a build from before it queues on the parents.
pub(super) const NODE_ROWS_EMPTY: &str = "SELECT clock_timestamp(),
    (SELECT id FROM pack_environment_node WHERE status IN ('pending', 'outdated')
     ORDER BY node, run_after, id LIMIT 1) IS NULL
    AND (SELECT id FROM pack_environment_node WHERE status = 'installing'
         ORDER BY node, lease_expires_at LIMIT 1) IS NULL";
const PARENTS_EMPTY: &str = "SELECT clock_timestamp(),
    (SELECT id FROM pack_environment WHERE status IN ('pending', 'outdated')
     ORDER BY run_after, id LIMIT 1) IS NULL
    AND (SELECT id FROM pack_environment WHERE status = 'installing'
         ORDER BY lease_expires_at LIMIT 1) IS NULL";

/// The empty check for the schema in `pool`'s database.
async fn empty_check(pool: &PgPool) -> anyhow::Result<&'static str> {
    let nodes: bool = sqlx::query_scalar("SELECT to_regclass('pack_environment_node') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    Ok(if nodes {
        NODE_ROWS_EMPTY
    } else {
        PARENTS_EMPTY
    })
}

const PEER_EMPTY: &str =
    "SELECT clock_timestamp(), NOT EXISTS (SELECT 1 FROM graphile_worker._private_jobs)";

fn throughput_limit(rows: u64) -> Duration {
    Duration::from_secs(60 + rows / 50)
}

/// Rows per second from the insert's commit until every row is `ready`, with `processes`
/// daemons of `concurrency` each, started and idle before the insert.
pub async fn packenvd_throughput(
    ctx: &Ctx,
    rows: u64,
    concurrency: usize,
    processes: usize,
) -> anyhow::Result<Run> {
    daemon_throughput(ctx, Build::This, rows, concurrency, processes).await
}

/// One throughput run: its rate, and the CPU it cost per row in the daemons and in the server
/// (every `postgres` process: the daemon's backends, the harness's looks, autovacuum). CPU is
/// the figure that holds on a busy machine, where the rate follows whoever else is running.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub rows_per_s: f64,
    pub daemon_cpu_us: f64,
    pub server_cpu_us: f64,
}

/// [`packenvd_throughput`] of `build`: another build migrates its fresh database itself.
pub(super) async fn daemon_throughput(
    ctx: &Ctx,
    build: Build<'_>,
    rows: u64,
    concurrency: usize,
    processes: usize,
) -> anyhow::Result<Run> {
    let (db, dirs) = match build {
        Build::This => (
            ctx.cluster.packenvd_db("tp", 2).await?,
            ctx.daemon_dirs("tp")?,
        ),
        Build::Other(exe) => (
            ctx.cluster.fresh_db("tpother", 2).await?,
            DaemonDirs::new(exe.to_owned(), &ctx.dir("tpother")?)?,
        ),
    };
    let result = async {
        if let Build::Other(_) = build {
            procs::migrate(&dirs, &db.url).await?;
        }
        let empty = empty_check(&db.pool).await?;
        insert_packs(&db.pool, "tp", rows).await?;
        let proxy = match ctx.count_statements {
            true => Some(proxy::start(&db.url, &ctx.dir("proxy")?)?),
            false => None,
        };
        let url = proxy.as_ref().map_or(db.url.as_str(), |p| p.url.as_str());
        let mut daemons = Vec::new();
        for i in 0..processes {
            let mut d = procs::spawn_packenvd(
                &dirs,
                url,
                &format!("bench-{i}"),
                Some(concurrency),
                false,
            )?;
            d.wait_ready().await?;
            daemons.push(d);
        }
        let before = proxy.as_ref().map(|p| p.counts.snapshot());
        let cpu0: f64 = daemons.iter().filter_map(|d| procs::cpu_seconds(d.pid()).ok()).sum();
        let inserting = Instant::now();
        let t0 = insert_shell_rows(&db.pool).await?;
        let insert = inserting.elapsed();
        // After the insert, so the request's own cost (since nodes, a fan-out per row) stays
        // out of the server's CPU per row; it is `insert` instead.
        let server0 = procs::server_cpu_seconds();
        let t1 = wait_empty(&db.pool, empty, throughput_limit(rows)).await;
        let server1 = procs::server_cpu_seconds();
        let cpu1: f64 = daemons.iter().filter_map(|d| procs::cpu_seconds(d.pid()).ok()).sum();
        let per_row_us = |secs: f64| secs * 1e6 / rows as f64;
        let costs = format!(
            "daemon CPU {:.0} µs, server CPU {:.0} µs per row; the insert took {:.0} µs per row",
            per_row_us(cpu1 - cpu0),
            per_row_us(server1 - server0),
            per_row_us(insert.as_secs_f64()),
        );
        if let (Some(p), Some(before)) = (&proxy, before) {
            let d = p.counts.snapshot() - before;
            let per_row = |n: u64| n as f64 / rows as f64;
            eprintln!(
                "packenvd-bench: statements: concurrency {concurrency} × {processes}: {:.2} statements and {:.2} pool pings per row; {costs}",
                per_row(d.statements),
                per_row(d.syncs.saturating_sub(d.executes)),
            );
        } else {
            eprintln!("packenvd-bench: {costs}");
        }
        stop_all(daemons).await;
        let t1 = t1?;
        let ready: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'ready'")
                .fetch_one(&db.pool)
                .await?;
        ensure!(
            ready as u64 == rows,
            "only {ready} of {rows} rows are ready"
        );
        Ok(Run {
            rows_per_s: rate(rows, t0, t1),
            daemon_cpu_us: per_row_us(cpu1 - cpu0),
            server_cpu_us: per_row_us(server1 - server0),
        })
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

/// The node of the raw-limit loops.
const RAW_NODE: &str = "bench-raw";

/// The raw limit: packenvd's own claim and write-back statements in a tight loop, no daemon.
/// `tasks` loops run at once, each claiming up to `concurrency` rows and writing each back.
pub async fn raw_throughput(
    ctx: &Ctx,
    rows: u64,
    concurrency: usize,
    tasks: usize,
) -> anyhow::Result<f64> {
    let db = ctx.cluster.packenvd_db("raw", 2).await?;
    let result = async {
        insert_packs(&db.pool, "raw", rows).await?;
        // The daemon's own pool settings, so raw and daemon pay the same per statement.
        let pool =
            packenvd::store::connect(&db.url, tasks as u32, packenvd::store::Workload::Daemon)
                .await?;
        let envs_root = Arc::new(ctx.dir("raw-envs")?);
        // The node the loops work for, registered as a daemon's start would: the requests
        // below fan out to it, as they would to a daemon's.
        packenvd::store::register_node(
            &pool,
            &packenvd::store::NodeInfo {
                name: RAW_NODE.into(),
                envs_root: envs_root.display().to_string(),
                version: "bench".into(),
                runtimes: serde_json::json!({}),
                tools: serde_json::json!({}),
                protections: serde_json::json!([]),
                ttl: Duration::from_secs(600),
            },
        )
        .await?;
        let t0 = insert_shell_rows(&db.pool).await?;
        let metadata =
            Arc::new(serde_json::json!({"requires_environment": false, "runtime": "core.shell"}));
        let mut loops = tokio::task::JoinSet::new();
        for i in 0..tasks {
            let pool = pool.clone();
            let metadata = metadata.clone();
            let envs_root = envs_root.clone();
            loops.spawn(async move {
                let name = format!("raw-{i}");
                loop {
                    let claimed = packenvd::store::claim(
                        &pool,
                        RAW_NODE,
                        &name,
                        Duration::from_secs(60),
                        concurrency as i64,
                        &envs_root,
                    )
                    .await?;
                    if claimed.is_empty() {
                        return Ok::<_, sqlx::Error>(());
                    }
                    for claim in claimed {
                        let ready = packenvd::store::Transition::Ready {
                            env_path: None,
                            metadata: (*metadata).clone(),
                            fingerprint: None,
                            log: "runtime core.shell needs no environment\n".into(),
                        };
                        packenvd::store::finish(&pool, claim.fence, ready).await?;
                    }
                }
            });
        }
        while let Some(r) = loops.join_next().await {
            r??;
        }
        pool.close().await;
        let t1 = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&db.pool)
            .await?;
        let ready: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'ready'")
                .fetch_one(&db.pool)
                .await?;
        ensure!(
            ready as u64 == rows,
            "only {ready} of {rows} rows are ready"
        );
        Ok(rate(rows, t0, t1))
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

/// A peer's rate; `partial` when the queue was not empty after the time cap, and the rate is
/// that of the rows done by then.
#[derive(Debug, Clone, Copy)]
pub struct PeerRate {
    pub rows_per_s: f64,
    pub partial: Option<(u64, Duration)>,
}

/// The peer's rows/s for `rows` no-op jobs added in one call of its `add_jobs()`. Its default
/// mode runs one job per slot per wake-up (one NOTIFY for the batch, then its 1 s poll), so a
/// bulk insert drains at about `concurrency` rows per second; `cap` bounds that wait.
pub async fn peer_throughput(
    ctx: &Ctx,
    rows: u64,
    processes: usize,
    options: &PeerOptions,
    cap: Duration,
) -> anyhow::Result<PeerRate> {
    let db = ctx.cluster.fresh_db("peertp", 2).await?;
    let result = async {
        let peers = start_peers(ctx, &db, processes, options).await?;
        let mut tx = db.pool.begin().await?;
        sqlx::query(
            "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
                 SELECT ROW('noop', '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
                 FROM generate_series(1, $1::bigint)))",
        )
        .bind(rows as i64)
        .execute(&mut *tx)
        .await?;
        let t0 = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let t1 = wait_empty(&db.pool, PEER_EMPTY, cap.min(throughput_limit(rows))).await;
        let out = match t1 {
            Ok(t1) => PeerRate {
                rows_per_s: rate(rows, t0, t1),
                partial: None,
            },
            Err(_) => {
                let (now, left): (DateTime<Utc>, i64) = sqlx::query_as(
                    "SELECT clock_timestamp(), count(*) FROM graphile_worker._private_jobs",
                )
                .fetch_one(&db.pool)
                .await?;
                let done = rows.saturating_sub(left as u64);
                PeerRate {
                    rows_per_s: rate(done, t0, now),
                    partial: Some((done, elapsed(t0, now))),
                }
            }
        };
        stop_all(peers).await;
        Ok(out)
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}
