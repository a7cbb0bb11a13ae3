//! Row 7, nodes (issue 12): how long one request for N environments takes to converge on one
//! node and on three, each node a real `packenvd run` with its own envs root; and single-node
//! queue throughput of this build beside another build's (`--baseline`).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::throughput::{daemon_throughput, Run, NODE_ROWS_EMPTY};
use super::{elapsed, insert_packs, stop_all, wait_empty, Build, Ctx};
use crate::procs::{self, DaemonDirs};

/// The runtime every node builds: one step, a real directory with a file in it, so a build
/// costs what any build's overhead costs (claim, build directory, supervised step, switch,
/// write-back) and nothing more.
const RUNTIME: &str = "bench.mark";

fn mark_runtime() -> serde_json::Value {
    serde_json::json!({"installers": [
        {"name": "mark", "command": "sh", "args": ["-c", "echo ok > {env_path}/ok"]}
    ]})
}

/// One request for `envs` environments, converged on `nodes` nodes.
#[derive(Debug, Clone)]
pub struct Converge {
    pub envs: u64,
    /// Request commit → every parent and every node row `ready`.
    pub took: Duration,
    /// Per node: request commit → its last row `ready` (`installed_at`).
    pub per_node: Vec<(String, Duration)>,
}

/// Converge with `nodes` nodes: the packs and a shell runtime are registered and the daemons
/// started (and idle) first; then one transaction requests every pack.
pub async fn converge(ctx: &Ctx, nodes: usize, envs: u64) -> anyhow::Result<Converge> {
    let db = ctx.cluster.packenvd_db("nodes", 2).await?;
    let result = async {
        sqlx::query("INSERT INTO runtime (ref, name, installers) VALUES ($1, $1, $2)")
            .bind(RUNTIME)
            .bind(mark_runtime())
            .execute(&db.pool)
            .await?;
        insert_packs(&db.pool, "n", envs).await?;
        let root = ctx.dir(&format!("nodes{nodes}"))?;
        let packs = root.join("packs");
        for i in 1..=envs {
            std::fs::create_dir_all(packs.join(format!("n{i}")))?;
        }
        let mut daemons = Vec::new();
        for i in 0..nodes {
            let name = format!("node-{i}");
            let dirs =
                DaemonDirs::node(ctx.packenvd_exe.clone(), &root.join(&name), &packs, &name)?;
            daemons.push(procs::spawn_packenvd(&dirs, &db.url, &name, None, false)?);
        }
        // A node registers before it says it started, so the request below reaches all.
        for d in &mut daemons {
            d.wait_ready().await?;
        }
        let t0 = request_all(&db.pool, envs).await?;
        let t1 = wait_empty(
            &db.pool,
            NODE_ROWS_EMPTY,
            Duration::from_secs(60 + envs / 5),
        )
        .await;
        stop_all(daemons).await;
        let t1 = t1?;
        check_converged(&db.pool, nodes as u64, envs).await?;
        check_on_disk(&db.pool).await?;
        let last: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT node, max(installed_at) FROM pack_environment_node GROUP BY node ORDER BY node",
        )
        .fetch_all(&db.pool)
        .await?;
        Ok(Converge {
            envs,
            took: elapsed(t0, t1),
            per_node: last
                .into_iter()
                .map(|(node, at)| (node, elapsed(t0, at)))
                .collect(),
        })
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

/// Requests packs `n1`…`n{envs}` in one transaction, as the platform would
/// (`request_pack_environment`); returns the server's clock just before the commit.
async fn request_all(pool: &PgPool, envs: u64) -> anyhow::Result<DateTime<Utc>> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT count(r.id) FROM generate_series(1, $1::bigint) g,
                LATERAL request_pack_environment('n' || g, $2) r",
    )
    .bind(envs as i64)
    .bind(RUNTIME)
    .execute(&mut *tx)
    .await?;
    let t0 = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(t0)
}

/// Once no node row is open: every parent and every node row is `ready`, one row per node
/// and environment. The parents' summary moves in the same statement as each node row, so
/// the moment the node rows closed is the moment the parents were final.
async fn check_converged(pool: &PgPool, nodes: u64, envs: u64) -> anyhow::Result<()> {
    let (parents, node_rows, error): (i64, i64, Option<String>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pack_environment WHERE status = 'ready'),
                (SELECT count(*) FROM pack_environment_node WHERE status = 'ready'),
                (SELECT node || ': ' || status || ': ' || coalesce(install_error, '')
                 FROM pack_environment_node WHERE status <> 'ready' LIMIT 1)",
    )
    .fetch_one(pool)
    .await?;
    ensure!(
        parents as u64 == envs && node_rows as u64 == envs * nodes,
        "{parents} of {envs} environments and {node_rows} of {} node rows ready{}",
        envs * nodes,
        error.map_or_else(String::new, |e| format!("; {e}"))
    );
    Ok(())
}

/// Every node row's environment is on its own node's disk, with the step's file in it.
async fn check_on_disk(pool: &PgPool) -> anyhow::Result<()> {
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT n.node, n.env_path, nd.envs_root
         FROM pack_environment_node n JOIN packenvd_node nd ON nd.name = n.node",
    )
    .fetch_all(pool)
    .await?;
    for (node, env_path, root) in rows {
        let env_path =
            env_path.with_context(|| format!("a ready row of {node} has no env_path"))?;
        let env = Path::new(&env_path);
        ensure!(
            env.starts_with(&root) && env.join("ok").is_file(),
            "{node}: {env_path}/ok is missing or not under {root}"
        );
    }
    Ok(())
}

/// Single-node queue throughput (row 1's method, one process) of this build and of another,
/// `samples` runs each, alternating (other, this) so drift in the machine's speed falls on both.
#[derive(Debug, Clone)]
pub struct Versus {
    pub this: Vec<Run>,
    /// Empty without `--baseline`.
    pub other: Vec<Run>,
}

pub async fn versus(
    ctx: &Ctx,
    other: Option<&Path>,
    rows: u64,
    concurrency: usize,
    samples: usize,
) -> anyhow::Result<Versus> {
    let mut v = Versus {
        this: Vec::new(),
        other: Vec::new(),
    };
    for i in 1..=samples {
        if let Some(exe) = other {
            let r = daemon_throughput(ctx, Build::Other(exe), rows, concurrency, 1)
                .await
                .with_context(|| format!("{}", exe.display()))?;
            eprintln!(
                "packenvd-bench: baseline, concurrency {concurrency}, run {i}: {:.0} rows/s",
                r.rows_per_s
            );
            v.other.push(r);
        }
        let r = daemon_throughput(ctx, Build::This, rows, concurrency, 1).await?;
        eprintln!(
            "packenvd-bench: this build, concurrency {concurrency}, run {i}: {:.0} rows/s",
            r.rows_per_s
        );
        v.this.push(r);
    }
    Ok(v)
}
