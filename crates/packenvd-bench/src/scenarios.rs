//! One function per measurement. Each makes its own database and processes and removes them.
//!
//! Times are taken from one clock: PostgreSQL's `clock_timestamp()` for the moment a request
//! or a batch commits and for the moment the harness sees the queue empty, and the system
//! clock (the same CLOCK_REALTIME on this machine) in the worker's own log lines for the
//! moment it starts or finishes a row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::pg::{Cluster, Db};
use crate::procs::{self, DaemonDirs, Event, PeerOptions, Proc};
use crate::proxy;

/// What every scenario needs.
#[derive(Debug)]
pub struct Ctx {
    pub cluster: Cluster,
    pub packenvd_exe: PathBuf,
    pub peer_exe: PathBuf,
    pub scratch: tempfile::TempDir,
    /// Route throughput daemons through the counting proxy and print statements per row
    /// (a diagnosis: the proxy's hop slows the daemon down).
    pub count_statements: bool,
}

impl Ctx {
    /// A new directory under the run's scratch directory.
    fn dir(&self, tag: &str) -> anyhow::Result<PathBuf> {
        let d = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir_in(self.scratch.path())?
            .keep();
        Ok(d)
    }

    fn daemon_dirs(&self, tag: &str) -> anyhow::Result<DaemonDirs> {
        DaemonDirs::new(self.packenvd_exe.clone(), &self.dir(tag)?)
    }
}

/// How long the harness waits between two looks at the queue. Small against the runs (seconds),
/// large enough that the look costs the server little.
const DONE_POLL: Duration = Duration::from_millis(10);

fn elapsed(from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    (to - from).to_std().unwrap_or_default()
}

fn rate(rows: u64, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    rows as f64 / elapsed(from, to).as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------------------------
// 1. Queue throughput

/// One pack per row, registered before the clock starts.
async fn insert_packs(pool: &PgPool, prefix: &str, n: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO pack (ref, label) SELECT $1 || g, '' FROM generate_series(1, $2::bigint) g",
    )
    .bind(prefix)
    .bind(n as i64)
    .execute(pool)
    .await?;
    Ok(())
}

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

/// Polls `sql` (returning the server clock and whether the queue is empty) until it says
/// empty; returns that moment.
async fn wait_empty(pool: &PgPool, sql: &str, limit: Duration) -> anyhow::Result<DateTime<Utc>> {
    let started = Instant::now();
    loop {
        let (at, done): (DateTime<Utc>, bool) = sqlx::query_as(sql).fetch_one(pool).await?;
        if done {
            return Ok(at);
        }
        ensure!(
            started.elapsed() < limit,
            "the queue is not empty after {limit:?}"
        );
        tokio::time::sleep(DONE_POLL).await;
    }
}

/// Each EXISTS matches one partial index, so a look costs a few index pages, not a scan.
const PACKENVD_EMPTY: &str = "SELECT clock_timestamp(),
    NOT EXISTS (SELECT 1 FROM pack_environment WHERE status IN ('pending', 'outdated'))
    AND NOT EXISTS (SELECT 1 FROM pack_environment WHERE status = 'installing')";
const PEER_EMPTY: &str =
    "SELECT clock_timestamp(), NOT EXISTS (SELECT 1 FROM graphile_worker._private_jobs)";

fn throughput_limit(rows: u64) -> Duration {
    Duration::from_secs(60 + rows / 50)
}

async fn stop_all(procs: Vec<Proc>) {
    futures::future::join_all(procs.into_iter().map(|p| p.stop(Duration::from_secs(15)))).await;
}

/// Rows per second from the insert's commit until every row is `ready`, with `processes`
/// daemons of `concurrency` each, started and idle before the insert.
pub async fn packenvd_throughput(
    ctx: &Ctx,
    rows: u64,
    concurrency: usize,
    processes: usize,
) -> anyhow::Result<f64> {
    let db = ctx.cluster.packenvd_db("tp", 2).await?;
    let result = async {
        insert_packs(&db.pool, "tp", rows).await?;
        let dirs = ctx.daemon_dirs("tp")?;
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
        let t0 = insert_shell_rows(&db.pool).await?;
        let t1 = wait_empty(&db.pool, PACKENVD_EMPTY, throughput_limit(rows)).await;
        let cpu1: f64 = daemons.iter().filter_map(|d| procs::cpu_seconds(d.pid()).ok()).sum();
        if let (Some(p), Some(before)) = (&proxy, before) {
            let d = p.counts.snapshot() - before;
            let per_row = |n: u64| n as f64 / rows as f64;
            eprintln!(
                "packenvd-bench: statements: concurrency {concurrency} × {processes}: {:.2} statements and {:.2} pool pings per row; daemon CPU {:.0} µs per row",
                per_row(d.statements),
                per_row(d.syncs.saturating_sub(d.executes)),
                (cpu1 - cpu0) * 1e6 / rows as f64,
            );
        } else {
            eprintln!(
                "packenvd-bench: daemon CPU {:.0} µs per row",
                (cpu1 - cpu0) * 1e6 / rows as f64
            );
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
        Ok(rate(rows, t0, t1))
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

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
        let pool = packenvd::store::connect(&db.url, tasks as u32).await?;
        let t0 = insert_shell_rows(&db.pool).await?;
        let metadata =
            Arc::new(serde_json::json!({"requires_environment": false, "runtime": "core.shell"}));
        let envs_root = Arc::new(ctx.dir("raw-envs")?);
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
                        &name,
                        Duration::from_secs(60),
                        concurrency as i64,
                        &envs_root,
                    )
                    .await?;
                    if claimed.is_empty() {
                        return Ok::<_, sqlx::Error>(());
                    }
                    for row in claimed {
                        packenvd::store::finish_ready(
                            &pool,
                            row.id,
                            row.claim_token,
                            None,
                            "runtime core.shell needs no environment\n",
                            &metadata,
                            None,
                        )
                        .await?;
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

/// Starts `processes` peers one after another (the first creates the peer's schema).
async fn start_peers(
    ctx: &Ctx,
    db: &Db,
    processes: usize,
    options: &PeerOptions,
) -> anyhow::Result<Vec<Proc>> {
    let mut peers = Vec::new();
    for i in 0..processes {
        let mut p = procs::spawn_peer(&ctx.peer_exe, &db.url, &format!("peer-{i}"), options)?;
        p.wait_ready().await?;
        peers.push(p);
    }
    Ok(peers)
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

// ---------------------------------------------------------------------------------------------
// 2. Pickup latency

/// Per request: commit → the worker starts it, and commit → its result is committed.
#[derive(Debug, Default)]
pub struct Latencies {
    pub pickup: Vec<Duration>,
    pub ready: Vec<Duration>,
    /// packenvd only: the largest gap between the `build finished` line and `installed_at`
    /// (a check that the log's clock and the server's agree).
    pub max_clock_gap: Option<Duration>,
}

/// Pause between a result and the next request, so each request meets an idle worker.
const REQUEST_GAP: Duration = Duration::from_millis(10);

/// When a row was seen starting and finishing.
type Seen = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Waits for `id`'s Started and Done events; events of other ids are kept for later.
async fn await_row(
    p: &mut Proc,
    id: i64,
    seen: &mut HashMap<i64, Seen>,
    limit: Duration,
) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((Some(s), Some(d))) = seen.get(&id) {
            return Ok((*s, *d));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "row {id} not done after {limit:?}");
        match p.next_event(left).await? {
            Event::Started { id, at } => seen.entry(id).or_default().0 = Some(at),
            Event::Done { id, at } => seen.entry(id).or_default().1 = Some(at),
            Event::Ready => {}
        }
    }
}

pub async fn packenvd_latency(ctx: &Ctx, samples: usize) -> anyhow::Result<Latencies> {
    let db = ctx.cluster.packenvd_db("lat", 2).await?;
    let result = async {
        insert_packs(&db.pool, "lat", samples as u64).await?;
        let dirs = ctx.daemon_dirs("lat")?;
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-lat", None, true)?;
        d.wait_ready().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut out = Latencies::default();
        let mut seen = HashMap::new();
        let mut commits = Vec::new();
        for i in 1..=samples {
            tokio::time::sleep(REQUEST_GAP).await;
            let (id, committed): (i64, DateTime<Utc>) = sqlx::query_as(
                "SELECT r.id, clock_timestamp() FROM request_pack_environment($1, 'core.shell') r",
            )
            .bind(format!("lat{i}"))
            .fetch_one(&db.pool)
            .await?;
            let (started, done) = await_row(&mut d, id, &mut seen, Duration::from_secs(30)).await?;
            out.pickup.push(elapsed(committed, started));
            out.ready.push(elapsed(committed, done));
            commits.push((id, done));
        }
        d.stop(Duration::from_secs(15)).await;
        let installed: HashMap<i64, DateTime<Utc>> =
            sqlx::query_as("SELECT id, installed_at FROM pack_environment WHERE status = 'ready'")
                .fetch_all(&db.pool)
                .await?
                .into_iter()
                .collect();
        out.max_clock_gap = commits
            .iter()
            .filter_map(|(id, done)| installed.get(id).map(|i| (*done - *i).abs()))
            .max()
            .and_then(|g| g.to_std().ok());
        Ok(out)
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

pub async fn peer_latency(
    ctx: &Ctx,
    samples: usize,
    options: &PeerOptions,
) -> anyhow::Result<Latencies> {
    let db = ctx.cluster.fresh_db("peerlat", 2).await?;
    let result = async {
        let options = PeerOptions {
            record_times: true,
            ..options.clone()
        };
        let mut peers = start_peers(ctx, &db, 1, &options).await?;
        let mut p = peers.pop().context("peer")?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut out = Latencies::default();
        let mut seen = HashMap::new();
        for _ in 0..samples {
            tokio::time::sleep(REQUEST_GAP).await;
            let (id, committed): (i64, DateTime<Utc>) = sqlx::query_as(
                "SELECT j.id, clock_timestamp() FROM graphile_worker.add_job('noop', '{}'::json) j",
            )
            .fetch_one(&db.pool)
            .await?;
            let (started, done) = await_row(&mut p, id, &mut seen, Duration::from_secs(30)).await?;
            out.pickup.push(elapsed(committed, started));
            out.ready.push(elapsed(committed, done));
        }
        p.stop(Duration::from_secs(15)).await;
        Ok(out)
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

// ---------------------------------------------------------------------------------------------
// 3. Build overhead

#[derive(Debug, Default)]
pub struct BuildTimes {
    pub daemon: Vec<Duration>,
    pub direct: Vec<Duration>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Three tiny wheels and a requirements.txt that installs them with no index.
fn wheelhouse(dir: &Path) -> anyhow::Result<String> {
    let mut req = format!("--no-index\n--find-links {}\n", dir.display());
    for name in ["bench-alpha", "bench-beta", "bench-gamma"] {
        let out = std::process::Command::new("python3")
            .arg(fixtures().join("make_wheel.py"))
            .arg(dir)
            .args([name, "1.0.0"])
            .output()
            .context("python3 tests/fixtures/make_wheel.py")?;
        ensure!(
            out.status.success(),
            "make_wheel.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        req.push_str(&format!("{name}==1.0.0\n"));
    }
    Ok(req)
}

/// The environment packenvd gives its steps (README: scrubbed, caches under cache_dir, no
/// prompts, no version checks, no bytecode), so the direct run differs only by the daemon.
fn step_env(cache_dir: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut keep = vec!["PATH", "HOME", "LANG"];
    keep.extend(packenvd::config::DEFAULT_PASSTHROUGH);
    for key in keep {
        if let Ok(v) = std::env::var(key) {
            env.push((key.to_owned(), v));
        }
    }
    if !env.iter().any(|(k, _)| k == "LANG") {
        env.push(("LANG".into(), "C.UTF-8".into()));
    }
    for (k, sub) in [
        ("PIP_CACHE_DIR", "pip"),
        ("npm_config_cache", "npm"),
        ("UV_CACHE_DIR", "uv"),
    ] {
        env.push((k.into(), cache_dir.join(sub).display().to_string()));
    }
    for (k, v) in [
        ("PIP_NO_INPUT", "1"),
        ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        ("npm_config_update_notifier", "false"),
        ("npm_config_fund", "false"),
        ("npm_config_audit", "false"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
    ] {
        env.push((k.into(), v.into()));
    }
    env
}

/// The core.python steps and executable checks, run by the harness itself.
async fn direct_build(
    venv: &Path,
    pack_dir: &Path,
    env: &[(String, String)],
) -> anyhow::Result<Duration> {
    let python = venv.join("bin/python");
    let venv_text = venv.display().to_string();
    let req = pack_dir.join("requirements.txt").display().to_string();
    let steps: Vec<(PathBuf, Vec<&str>)> = vec![
        ("python3".into(), vec!["-m", "venv", &venv_text]),
        (
            python.clone(),
            vec!["-m", "pip", "install", "--no-input", "-r", &req],
        ),
        (python.clone(), vec!["--version"]),
        (venv.join("bin/pip"), vec!["--version"]),
    ];
    let started = Instant::now();
    for (program, args) in &steps {
        let out = tokio::process::Command::new(program)
            .args(args)
            .current_dir(pack_dir)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", program.display()))?;
        ensure!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed())
}

/// `samples` builds by the daemon and as many direct runs, interleaved, after one untimed
/// pair when `warm_up` (the first venv of a run reads the interpreter from disk).
pub async fn build_overhead(
    ctx: &Ctx,
    samples: usize,
    warm_up: bool,
) -> anyhow::Result<BuildTimes> {
    let db = ctx.cluster.packenvd_db("build", 2).await?;
    let result = async {
        let dirs = ctx.daemon_dirs("build")?;
        let work = ctx.dir("direct")?;
        let req = wheelhouse(&work.join("wheels"))?;
        let runs = samples + usize::from(warm_up);
        for i in 1..=runs {
            let pack = dirs.packs_dir.join(format!("py{i}"));
            std::fs::create_dir_all(&pack)?;
            std::fs::write(pack.join("requirements.txt"), &req)?;
        }
        insert_packs(&db.pool, "py", runs as u64).await?;
        let env = step_env(&work.join("cache"));
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-build", None, true)?;
        d.wait_ready().await?;
        let mut out = BuildTimes::default();
        let mut seen = HashMap::new();
        for i in 1..=runs {
            let (id, committed): (i64, DateTime<Utc>) = sqlx::query_as(
                "SELECT r.id, clock_timestamp() FROM request_pack_environment($1, 'core.python') r",
            )
            .bind(format!("py{i}"))
            .fetch_one(&db.pool)
            .await?;
            let (_, done) = await_row(&mut d, id, &mut seen, Duration::from_secs(600)).await?;
            let (status, error): (String, Option<String>) = sqlx::query_as(
                "SELECT status::text, install_error FROM pack_environment WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
            if status != "ready" {
                bail!(
                    "the daemon's build of py{i} ended {status}: {}",
                    error.unwrap_or_default()
                );
            }
            let direct = direct_build(
                &work.join(format!("venv{i}")),
                &dirs.packs_dir.join(format!("py{i}")),
                &env,
            )
            .await?;
            let daemon = elapsed(committed, done);
            eprintln!(
                "packenvd-bench: build {i}{}: daemon {:.3} s, direct {:.3} s",
                if i == 1 && warm_up { " (warm-up)" } else { "" },
                daemon.as_secs_f64(),
                direct.as_secs_f64()
            );
            if i > 1 || !warm_up {
                out.daemon.push(daemon);
                out.direct.push(direct);
            }
        }
        d.stop(Duration::from_secs(15)).await;
        Ok(out)
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

// ---------------------------------------------------------------------------------------------
// 4. Caches

/// Request → ready times of one runtime: cold (fresh cache dir) and warm (an operator's reset of
/// the same row, so a new build directory with the same cache dir).
#[derive(Debug, Default)]
pub struct CacheTimes {
    pub cold: Vec<Duration>,
    pub warm: Vec<Duration>,
    /// Requests for wheel files (GET or HEAD) the index saw during warm builds (0 when the cache
    /// did its job).
    pub warm_downloads: usize,
}

/// The core.python and core.python-uv measurements; uv is `Err` (with the reason) when missing.
#[derive(Debug)]
pub struct Caches {
    pub pip: CacheTimes,
    pub uv: Result<CacheTimes, String>,
}

/// `tests/fixtures/index_server.py` on loopback: the process and its port.
async fn start_index(wheels: &Path, log: &Path) -> anyhow::Result<(tokio::process::Child, u16)> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("python3")
        .arg(fixtures().join("index_server.py"))
        .arg(wheels)
        .arg(log)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("python3 tests/fixtures/index_server.py")?;
    let out = child.stdout.take().context("index stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("index_server.py printed no port")??
        .context("index_server.py exited")?;
    let port = line.trim().parse().context("index_server.py's port")?;
    Ok((child, port))
}

fn make_wheels(dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let out = std::process::Command::new("python3")
            .arg(fixtures().join("make_wheel.py"))
            .arg(dir)
            .args([name, "1.0"])
            .output()
            .context("python3 tests/fixtures/make_wheel.py")?;
        ensure!(
            out.status.success(),
            "make_wheel.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn served_files(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("/files/"))
        .count()
}

/// Requests `pack` with `runtime` (or resets its row when `reset`), waits for the daemon's
/// `build finished` line and checks the row is ready; returns commit → finished.
async fn timed_build(
    db: &Db,
    d: &mut Proc,
    pack: &str,
    runtime: &str,
    reset: Option<i64>,
) -> anyhow::Result<(i64, Duration)> {
    let (id, committed): (i64, DateTime<Utc>) = match reset {
        None => {
            sqlx::query_as("SELECT r.id, clock_timestamp() FROM request_pack_environment($1, $2) r")
                .bind(pack)
                .bind(runtime)
                .fetch_one(&db.pool)
                .await?
        }
        Some(id) => {
            sqlx::query_as(
                "UPDATE pack_environment SET status = 'pending' WHERE id = $1
                 RETURNING id, clock_timestamp()",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await?
        }
    };
    let mut seen = HashMap::new();
    let (_, done) = match await_row(d, id, &mut seen, Duration::from_secs(120)).await {
        Ok(t) => t,
        Err(e) => {
            let error: Option<String> =
                sqlx::query_scalar("SELECT install_error FROM pack_environment WHERE id = $1")
                    .bind(id)
                    .fetch_one(&db.pool)
                    .await?;
            bail!(
                "{pack} ({runtime}) not ready: {}; {e}",
                error.unwrap_or_default()
            );
        }
    };
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status::text, install_error FROM pack_environment WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    ensure!(
        status == "ready",
        "the build of {pack} ({runtime}) ended {status}: {}",
        error.unwrap_or_default()
    );
    Ok((id, elapsed(committed, done)))
}

/// Row 4: per sample and runtime, a daemon with a fresh cache dir builds a pack whose three
/// requirements come from a loopback index (cold), then the row is reset and rebuilt (warm).
pub async fn cache_rebuilds(ctx: &Ctx, samples: usize) -> anyhow::Result<Caches> {
    let db = ctx.cluster.packenvd_db("cache", 2).await?;
    let result = async {
        let work = ctx.dir("index")?;
        let wheels = work.join("wheels");
        std::fs::create_dir_all(&wheels)?;
        make_wheels(&wheels, &["bench-a", "bench-b", "bench-c"])?;
        let log = work.join("served.log");
        let (mut index, port) = start_index(&wheels, &log).await?;
        let req = format!(
            "--index-url http://127.0.0.1:{port}/simple/\n--trusted-host 127.0.0.1\nbench-a==1.0\nbench-b==1.0\nbench-c==1.0\n"
        );
        let uv = match std::process::Command::new("uv").arg("--version").output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`uv --version` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("uv not found: {e}")),
        };
        let mut pip = CacheTimes::default();
        let mut uvt = CacheTimes::default();
        for i in 1..=samples {
            for (runtime, times) in [("core.python", &mut pip), ("core.python-uv", &mut uvt)] {
                if runtime == "core.python-uv" && uv.is_err() {
                    continue;
                }
                let tag = if runtime == "core.python" { "pip" } else { "uv" };
                let dirs = ctx.daemon_dirs(&format!("cache-{tag}{i}"))?;
                let pack = format!("{tag}{i}");
                std::fs::create_dir_all(dirs.packs_dir.join(&pack))?;
                std::fs::write(dirs.packs_dir.join(&pack).join("requirements.txt"), &req)?;
                sqlx::query("INSERT INTO pack (ref, label) VALUES ($1, '')")
                    .bind(&pack)
                    .execute(&db.pool)
                    .await?;
                let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-cache", None, true)?;
                d.wait_ready().await?;
                let (id, cold) = timed_build(&db, &mut d, &pack, runtime, None).await?;
                let before = served_files(&log);
                let (_, warm) = timed_build(&db, &mut d, &pack, runtime, Some(id)).await?;
                times.warm_downloads += served_files(&log) - before;
                d.stop(Duration::from_secs(15)).await;
                eprintln!(
                    "packenvd-bench: {runtime} {i}: cold {:.3} s, warm {:.3} s",
                    cold.as_secs_f64(),
                    warm.as_secs_f64()
                );
                times.cold.push(cold);
                times.warm.push(warm);
            }
        }
        let _ = index.kill().await;
        Ok(Caches {
            pip,
            uv: uv.map(|()| uvt),
        })
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

// ---------------------------------------------------------------------------------------------
// 5. Verification

#[derive(Debug, Clone, Copy)]
pub struct VerifyRun {
    pub environments: usize,
    pub took: Duration,
}

#[derive(Debug)]
pub struct Verification {
    pub runtime: &'static str,
    pub one: VerifyRun,
    pub two: VerifyRun,
}

/// The daemon's settings with every default but its directories and name.
fn daemon_settings(
    dirs: &DaemonDirs,
    url: &str,
    name: &str,
) -> anyhow::Result<packenvd::config::Settings> {
    use std::collections::BTreeMap;
    let p = |d: &Path| d.display().to_string();
    let flags = BTreeMap::from([
        ("envs_root", p(&dirs.envs_root)),
        ("packs_dir", p(&dirs.packs_dir)),
        ("cache_dir", p(&dirs.cache_dir)),
        ("instance_name", name.to_owned()),
    ]);
    let env = BTreeMap::from([("DATABASE_URL".to_string(), url.to_owned())]);
    let (settings, _) = packenvd::config::Settings::load(
        packenvd::config::Layers {
            file: Some(dirs.config.clone()),
            flags,
            env,
        },
        true,
    )
    .map_err(|e| anyhow::anyhow!("settings: {e}"))?;
    Ok(settings)
}

/// Row 5: one real core.python-uv build, `n - 1` more ready rows linked to it, all stale; then
/// `verify::run_pass(Scope::Stale)` (the library, the daemon's default settings) by one
/// instance, and again (all stale again) by two at once.
pub async fn verification(ctx: &Ctx, n: usize) -> anyhow::Result<Verification> {
    let runtime = "core.python-uv";
    let db = ctx.cluster.packenvd_db("verify", 4).await?;
    let result = async {
        let dirs = ctx.daemon_dirs("verify")?;
        let work = ctx.dir("verify-wheels")?;
        let req = wheelhouse(&work)?;
        std::fs::create_dir_all(dirs.packs_dir.join("v1"))?;
        std::fs::write(dirs.packs_dir.join("v1/requirements.txt"), &req)?;
        insert_packs(&db.pool, "v", 1).await?;
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-verify", None, true)?;
        d.wait_ready().await?;
        let built = timed_build(&db, &mut d, "v1", runtime, None).await;
        d.stop(Duration::from_secs(15)).await;
        let (id, _) = built?;
        let (env_path, metadata, fingerprint): (String, serde_json::Value, Option<String>) =
            sqlx::query_as(
                "SELECT env_path, metadata, fingerprint FROM pack_environment WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
        let build_dir = metadata["build_dir"]
            .as_str()
            .context("metadata has no build_dir")?
            .to_owned();
        let rt_dir = Path::new(&env_path)
            .file_name()
            .context("env_path")?
            .to_string_lossy()
            .into_owned();
        let shared = dirs.packs_dir.join("v1").display().to_string();
        sqlx::query(
            "INSERT INTO pack (ref, label, storage_path)
             SELECT 'v' || i, 'v', $1 FROM generate_series(2, $2::bigint) i",
        )
        .bind(&shared)
        .bind(n as i64)
        .execute(&db.pool)
        .await?;
        sqlx::query(
            "INSERT INTO pack_environment (pack, runtime, status, env_path, metadata, fingerprint, installed_at, last_verified)
             SELECT p.id, r.id, 'ready', $1 || '/' || p.ref || '/' || $2, $3, $4, now(), now()
             FROM pack p, runtime r WHERE r.ref = $5 AND p.ref <> 'v1'",
        )
        .bind(dirs.envs_root.display().to_string())
        .bind(&rt_dir)
        .bind(&metadata)
        .bind(&fingerprint)
        .bind(runtime)
        .execute(&db.pool)
        .await?;
        for i in 2..=n {
            let dir = dirs.envs_root.join(format!("v{i}"));
            std::fs::create_dir_all(&dir)?;
            std::os::unix::fs::symlink(&build_dir, dir.join(&rt_dir))?;
        }
        let a = daemon_settings(&dirs, &db.url, "bench-verify-a")?;
        let b = daemon_settings(&dirs, &db.url, "bench-verify-b")?;
        // The daemon's pool, as `packenvd verify` makes it (concurrency + 4 connections).
        let size = u32::try_from(a.concurrency).unwrap_or(u32::MAX).saturating_add(4);
        let pool = packenvd::store::connect(&db.url, size).await?;
        let stale = || async {
            sqlx::query(
                "UPDATE pack_environment SET last_verified = now() - interval '30 days' WHERE status = 'ready'",
            )
            .execute(&db.pool)
            .await
        };
        let check = |findings: Vec<packenvd::verify::Finding>| -> anyhow::Result<usize> {
            if let Some(f) = findings.iter().find(|f| f.failure.is_some()) {
                bail!("{} failed verification: {:?}", f.pack_ref, f.failure);
            }
            Ok(findings.len())
        };
        stale().await?;
        let started = Instant::now();
        let found = packenvd::verify::run_pass(&pool, &a, &packenvd::verify::Scope::Stale).await?;
        let one = VerifyRun {
            took: started.elapsed(),
            environments: check(found)?,
        };
        stale().await?;
        let started = Instant::now();
        let (fa, fb) = tokio::join!(
            packenvd::verify::run_pass(&pool, &a, &packenvd::verify::Scope::Stale),
            packenvd::verify::run_pass(&pool, &b, &packenvd::verify::Scope::Stale),
        );
        let took = started.elapsed();
        let two = VerifyRun {
            took,
            environments: check(fa?)? + check(fb?)?,
        };
        pool.close().await;
        ensure!(
            one.environments == n && two.environments == n,
            "verified {} and {} environments, expected {n} each",
            one.environments,
            two.environments
        );
        Ok(Verification { runtime, one, two })
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

// ---------------------------------------------------------------------------------------------
// 6. Idle cost

#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub window: Duration,
    pub cpu_seconds: f64,
    pub statements: u64,
    /// Connection checks of sqlx's pool: a `Sync` with no statement before it.
    pub pings: u64,
    pub peak_rss_kb: u64,
}

impl Idle {
    pub fn cpu_per_30s(&self) -> f64 {
        self.cpu_seconds * 30.0 / self.window.as_secs_f64()
    }
}

/// Time after start-up before the window opens, so start-up work is not counted.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

async fn measure_idle(p: &Proc, counts: &proxy::Counts, window: Duration) -> anyhow::Result<Idle> {
    tokio::time::sleep(IDLE_SETTLE).await;
    let cpu0 = procs::cpu_seconds(p.pid())?;
    let c0 = counts.snapshot();
    tokio::time::sleep(window).await;
    let cpu1 = procs::cpu_seconds(p.pid())?;
    let c1 = counts.snapshot();
    let d = c1 - c0;
    Ok(Idle {
        window,
        cpu_seconds: cpu1 - cpu0,
        statements: d.statements,
        pings: d.syncs.saturating_sub(d.executes),
        peak_rss_kb: procs::status_kb(p.pid(), "VmHWM")?,
    })
}

/// packenvd with every default but its directories, talking through a counting proxy.
pub async fn packenvd_idle(ctx: &Ctx, window: Duration) -> anyhow::Result<Idle> {
    let db = ctx.cluster.packenvd_db("idle", 1).await?;
    let result = async {
        let proxy = proxy::start(&db.url, &ctx.dir("proxy")?)?;
        let dirs = ctx.daemon_dirs("idle")?;
        let mut d = procs::spawn_packenvd(&dirs, &proxy.url, "bench-idle", None, false)?;
        d.wait_ready().await?;
        let idle = measure_idle(&d, &proxy.counts, window).await;
        d.stop(Duration::from_secs(15)).await;
        idle
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

pub async fn peer_idle(ctx: &Ctx, window: Duration, options: &PeerOptions) -> anyhow::Result<Idle> {
    let db = ctx.cluster.fresh_db("peeridle", 1).await?;
    let result = async {
        let proxy = proxy::start(&db.url, &ctx.dir("proxy")?)?;
        let mut p = procs::spawn_peer(&ctx.peer_exe, &proxy.url, "peer-idle", options)?;
        p.wait_ready().await?;
        let idle = measure_idle(&p, &proxy.counts, window).await;
        p.stop(Duration::from_secs(15)).await;
        idle
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}
