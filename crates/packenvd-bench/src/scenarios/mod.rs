//! One function per measurement, one module per scenario; this module holds what they share.
//! Each measurement makes its own database and processes and removes them.
//!
//! Times are taken from one clock: PostgreSQL's `clock_timestamp()` for the moment a request
//! or a batch commits and for the moment the harness sees the queue empty, and the system
//! clock (the same CLOCK_REALTIME on this machine) in the worker's own log lines for the
//! moment it starts or finishes a row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::pg::{Cluster, Db};
use crate::procs::{self, DaemonDirs, Event, PeerOptions, Proc};

mod build;
mod environments;
mod floor;
mod idle;
mod latency;
mod lookup;
mod nodes;
mod throughput;
mod verify;

pub use build::{build_overhead, BuildTimes};
pub use environments::{
    environments, fleet, rerequest, EnvTimes, Environments, Fleet, Rerequest, Variant, VARIANTS,
};
pub use floor::{floors, Floor, FloorRun};
pub use idle::{packenvd_idle, peer_idle, Idle};
pub use latency::{packenvd_latency, peer_latency, Latencies};
pub use lookup::{lookups, Lookups};
pub use nodes::{converge, versus, Converge, Versus};
pub use throughput::{packenvd_throughput, peer_throughput, raw_throughput, PeerRate, Run};
pub use verify::{verification, Verification, VerifyRun};

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

/// The daemon a row runs: this build, whose schema the harness applies, or another build
/// (`--baseline`), which migrates its database itself.
#[derive(Debug, Clone, Copy)]
pub enum Build<'a> {
    This,
    Other(&'a Path),
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

async fn stop_all(procs: Vec<Proc>) {
    futures::future::join_all(procs.into_iter().map(|p| p.stop(Duration::from_secs(15)))).await;
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

/// Requests `pack` with `runtime` (or resets its row when `reset`), waits for the daemon's
/// `build finished` line and checks the row is ready; returns commit → finished. A failed
/// attempt (the row failed, or waits for a retry with an error) ends the wait with that error
/// at once: a scenario on a host that lacks what it needs must say so, not wait out a limit.
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
    let limit = Duration::from_secs(300);
    let started = Instant::now();
    let done = loop {
        ensure!(
            started.elapsed() < limit,
            "{pack} ({runtime}) not ready after {limit:?}"
        );
        match d.try_event(Duration::from_millis(250)).await? {
            Some(Event::Done { id: done, at }) if done == id => break at,
            Some(_) => continue,
            None => {}
        }
        if let Some(error) = failed_attempt(&db.pool, id).await? {
            bail!("the build of {pack} ({runtime}) failed: {error}");
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

/// The error of row `id` when its last attempt failed: it is `failed`, or back in the queue
/// with an error (waiting for a retry).
async fn failed_attempt(pool: &PgPool, id: i64) -> anyhow::Result<Option<String>> {
    let error: Option<Option<String>> = sqlx::query_scalar(
        "SELECT install_error FROM pack_environment
         WHERE id = $1 AND (status = 'failed' OR (status IN ('pending', 'outdated') AND install_error IS NOT NULL))",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(error.map(|e| e.unwrap_or_else(|| "(no error recorded)".into())))
}

/// Waits until no row is waiting or building; returns that moment (the server's clock). The
/// first failed row ends the wait with its error.
async fn wait_settled(pool: &PgPool, limit: Duration) -> anyhow::Result<DateTime<Utc>> {
    let started = Instant::now();
    loop {
        let (at, busy, failed): (DateTime<Utc>, i64, Option<String>) = sqlx::query_as(
            "SELECT clock_timestamp(),
                    count(*) FILTER (WHERE status NOT IN ('ready', 'failed')),
                    min(pack_ref || ' (' || runtime_ref || '): ' || coalesce(install_error, '?'))
                        FILTER (WHERE status = 'failed')
             FROM pack_environment",
        )
        .fetch_one(pool)
        .await?;
        if let Some(f) = failed {
            bail!("a build failed: {f}");
        }
        if busy == 0 {
            return Ok(at);
        }
        ensure!(
            started.elapsed() < limit,
            "{busy} row(s) still waiting or building after {limit:?}"
        );
        tokio::time::sleep(DONE_POLL).await;
    }
}
