//! Row 4, caches: cold (fresh cache dir) and warm (same cache dir) builds of core.python and
//! core.python-uv packs whose requirements come from a loopback index.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};

use super::{fixtures, timed_build, Ctx};
use crate::pg::Db;
use crate::procs::{self, DaemonDirs};

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

/// Row 4: per sample and runtime, a daemon with a fresh cache dir builds a pack whose three
/// requirements come from a loopback index (cold), then the row is reset and rebuilt (warm).
pub async fn cache_rebuilds(ctx: &Ctx, samples: usize) -> anyhow::Result<Caches> {
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
    let result = async {
        let mut pip = CacheTimes::default();
        let mut uvt = CacheTimes::default();
        for i in 1..=samples {
            for (runtime, times) in [("core.python", &mut pip), ("core.python-uv", &mut uvt)] {
                if runtime == "core.python-uv" && uv.is_err() {
                    continue;
                }
                let tag = if runtime == "core.python" {
                    "pip"
                } else {
                    "uv"
                };
                let mut dirs = ctx.daemon_dirs(&format!("cache-{tag}{i}"))?;
                // Steps may connect to ports 80 and 443 by default (Landlock); the loopback
                // index stands in for a registry on 443.
                dirs.settings
                    .push(("PACKENVD_STEP_TCP_PORTS".into(), port.to_string()));
                let pack = format!("{tag}{i}");
                std::fs::create_dir_all(dirs.packs_dir.join(&pack))?;
                std::fs::write(dirs.packs_dir.join(&pack).join("requirements.txt"), &req)?;
                // A database per daemon: each daemon here is a new node (its own envs root),
                // and a second node on one database would also build the first one's packs.
                let db = ctx.cluster.packenvd_db("cache", 2).await?;
                let pair = cold_and_warm(&db, &dirs, &pack, runtime, &log).await;
                ctx.cluster.drop_db(db).await;
                let (cold, warm, downloads) = pair?;
                eprintln!(
                    "packenvd-bench: {runtime} {i}: cold {:.3} s, warm {:.3} s",
                    cold.as_secs_f64(),
                    warm.as_secs_f64()
                );
                times.cold.push(cold);
                times.warm.push(warm);
                times.warm_downloads += downloads;
            }
        }
        Ok(Caches {
            pip,
            uv: uv.map(|()| uvt),
        })
    }
    .await;
    let _ = index.kill().await;
    result
}

/// One daemon's cold build of `pack` and its warm rebuild; and the wheel files the index
/// served during the warm one.
async fn cold_and_warm(
    db: &Db,
    dirs: &DaemonDirs,
    pack: &str,
    runtime: &str,
    log: &Path,
) -> anyhow::Result<(Duration, Duration, usize)> {
    sqlx::query("INSERT INTO pack (ref, label) VALUES ($1, '')")
        .bind(pack)
        .execute(&db.pool)
        .await?;
    let mut d = procs::spawn_packenvd(dirs, &db.url, "bench-cache", None, true)?;
    d.wait_ready().await?;
    let result = async {
        let (id, cold) = timed_build(db, &mut d, pack, runtime, None).await?;
        let before = served_files(log);
        let (_, warm) = timed_build(db, &mut d, pack, runtime, Some(id)).await?;
        Ok((cold, warm, served_files(log) - before))
    }
    .await;
    d.stop(Duration::from_secs(15)).await;
    result
}
