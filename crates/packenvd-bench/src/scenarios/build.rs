//! Row 3, build overhead: builds by the daemon against the same steps run directly by the
//! harness. The runtime is core.python as it was before issue 13 (`python3 -m venv`, then the
//! venv's pip: [`super::environments`]'s old commands), whose steps the harness runs as they
//! are; today's core.python picks its steps by what the host has, which row 4 measures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};

use super::{await_row, elapsed, insert_packs, wheelhouse, Ctx};
use crate::procs;

#[derive(Debug, Default)]
pub struct BuildTimes {
    pub daemon: Vec<Duration>,
    pub direct: Vec<Duration>,
}

/// The environment packenvd gives its steps (the same function the daemon calls), so the
/// direct run differs only by the daemon.
fn step_env(cache_dir: &Path, tmp: &Path) -> Vec<(String, String)> {
    let passthrough: Vec<String> = packenv_core::probe::DEFAULT_PASSTHROUGH
        .iter()
        .map(|s| s.to_string())
        .collect();
    packenv_core::probe::step_environment(&passthrough, cache_dir, tmp)
        .into_iter()
        .collect()
}

/// The old core.python's steps and executable checks, run by the harness itself.
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
    let db = super::environments::database(ctx, "build", 2).await?;
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
        std::fs::create_dir_all(work.join("tmp/home"))?;
        let env = step_env(&work.join("cache"), &work.join("tmp"));
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-build", None, true)?;
        d.wait_ready().await?;
        let mut out = BuildTimes::default();
        let mut seen = HashMap::new();
        for i in 1..=runs {
            let (id, committed): (i64, DateTime<Utc>) = sqlx::query_as(
                "SELECT r.id, clock_timestamp() FROM request_pack_environment($1, $2) r",
            )
            .bind(format!("py{i}"))
            .bind(super::environments::OLD_RUNTIME)
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
