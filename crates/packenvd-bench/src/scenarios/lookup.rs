//! Lookups (issue 15): what an action runner asks before every action,
//! `packenv_client::Client::lookup` (the build, the executables and the variables of a pack's
//! environment on the runner's node, in one statement), per second, from several tasks at
//! once, against many ready environments on several nodes. No daemon runs: the rows are
//! written as builds would leave them, and only the reads are measured.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use super::Ctx;

#[derive(Debug, Clone)]
pub struct Lookups {
    pub environments: usize,
    pub nodes: usize,
    pub tasks: usize,
    pub lookups: u64,
    pub took: Duration,
    /// Every lookup's time, sorted.
    pub latencies: Vec<Duration>,
}

impl Lookups {
    pub fn per_second(&self) -> f64 {
        self.lookups as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// The node the runner is on; the others' rows are there to be skipped by the index.
const NODE: &str = "bench-node-2";

/// `environments` ready environments of core.python, each on `nodes` nodes; then `tasks`
/// tasks sharing one client (a pool of `tasks` connections) look up random ones for `window`.
pub async fn lookups(ctx: &Ctx, quick: bool) -> anyhow::Result<Lookups> {
    let environments = if quick { 1_000 } else { 10_000 };
    let nodes = 3;
    let window = Duration::from_secs(if quick { 2 } else { 10 });
    let tasks = std::thread::available_parallelism().map_or(2, |n| n.get()) * 4;
    let db = ctx.cluster.packenvd_db("lookup", 2).await?;
    let result = async {
        sqlx::raw_sql(&format!(
            "INSERT INTO pack (ref, label) SELECT 'lk' || i, '' FROM generate_series(1, {environments}) i;
             INSERT INTO pack_environment (pack, runtime, status, env_path, installed_at)
             SELECT p.id, r.id, 'ready', '/srv/envs/' || p.ref || '/python', now()
             FROM pack p, runtime r WHERE r.ref = 'core.python';
             INSERT INTO packenvd_node (name, envs_root)
             SELECT 'bench-node-' || i, '/srv/envs' FROM generate_series(1, {nodes}) i;
             INSERT INTO pack_environment_node (env_id, node, status, env_path, metadata)
             SELECT pe.id, nd.name, 'ready', pe.env_path, jsonb_build_object(
                        'build_dir', b.dir,
                        'executables', jsonb_build_object('python', b.dir || '/bin/python'),
                        'env_vars', jsonb_build_object('VIRTUAL_ENV', b.dir))
             FROM pack_environment pe, packenvd_node nd,
                  LATERAL (SELECT '/srv/envs/' || pe.pack_ref || '/.python-' || md5(nd.name) AS dir) b;
             ANALYZE;"
        ))
        .execute(&db.pool)
        .await
        .context("writing the environments")?;

        // The statement must read indexes only on the tables that grow.
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", packenv_client::LOOKUP_SQL))
            .bind("lk1")
            .bind("core.python")
            .bind(NODE)
            .fetch_all(&db.pool)
            .await?;
        let plan = plan.join("\n");
        ensure!(
            !plan.contains("Seq Scan on pack ")
                && !plan.contains("Seq Scan on pack_environment"),
            "the lookup scans a table:\n{plan}"
        );

        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(tasks).unwrap_or(8))
            .min_connections(u32::try_from(tasks).unwrap_or(8))
            .connect(&db.url)
            .await?;
        let client = packenv_client::Client::new(pool.clone()).with_node(NODE);
        let first = client.lookup("lk1", "core.python").await?;
        ensure!(
            first.executable("python").is_ok(),
            "the lookup did not resolve: {first:?}"
        );

        let started = Instant::now();
        let deadline = started + window;
        let mut joins = Vec::new();
        for t in 0..tasks {
            let client = client.clone();
            joins.push(tokio::spawn(async move {
                // xorshift: a cheap spread over the environments, different per task.
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1);
                let mut times = Vec::new();
                while Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let pack = format!("lk{}", x % environments as u64 + 1);
                    let at = Instant::now();
                    client.lookup(&pack, "core.python").await?;
                    times.push(at.elapsed());
                }
                Ok::<_, packenv_client::Error>(times)
            }));
        }
        let mut latencies = Vec::new();
        for j in joins {
            latencies.extend(j.await??);
        }
        let took = started.elapsed();
        pool.close().await;
        latencies.sort();
        Ok(Lookups {
            environments,
            nodes,
            tasks,
            lookups: latencies.len() as u64,
            took,
            latencies,
        })
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}
