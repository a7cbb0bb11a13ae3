//! Row 5, verification: environments per second of `verify::run_pass(Scope::Stale)`, by
//! one instance and by two at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::{insert_packs, timed_build, wheelhouse, Ctx};
use crate::procs::{self, DaemonDirs};

/// The node whose rows are verified: the daemon that builds the first environment and the
/// passes run as it.
const NODE: &str = "bench-verify";

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

/// The daemon's settings with every default but its directories, names and supervisor.
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
        ("node_name", NODE.to_owned()),
        // The default supervisor is the running binary, which here is the harness.
        ("step_supervisor", p(&dirs.exe)),
    ]);
    let env = BTreeMap::from([("DATABASE_URL".to_string(), url.to_owned())]);
    let settings = packenvd::config::Settings::load(
        packenvd::config::Layers {
            file: Some(dirs.config.clone()),
            flags,
            env,
        },
        true,
    )
    .map_err(|e| anyhow::anyhow!("settings: {e}"))?
    .settings;
    Ok(settings)
}

/// Row 5: one real core.python build, `n - 1` more ready rows linked to it, all stale; then
/// `verify::run_pass(Scope::Stale)` (the library, the daemon's default settings) by one
/// instance, and again (all stale again) by two at once.
pub async fn verification(ctx: &Ctx, n: usize) -> anyhow::Result<Verification> {
    // The default runtime: it builds with uv or, on a host without it, with pip.
    let runtime = "core.python";
    let db = ctx.cluster.packenvd_db("verify", 4).await?;
    let result = async {
        let mut dirs = ctx.daemon_dirs("verify")?;
        dirs.node_name = Some(NODE.into());
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
                "SELECT env_path, metadata, fingerprint FROM pack_environment_node
                 WHERE env_id = $1 AND node = $2",
            )
            .bind(id)
            .bind(NODE)
            .fetch_one(&db.pool)
            .await?;
        let build_dir = PathBuf::from(
            metadata["build_dir"]
                .as_str()
                .context("metadata has no build_dir")?,
        );
        let build_name = build_dir
            .file_name()
            .context("build_dir")?
            .to_string_lossy()
            .into_owned();
        let rt_dir = Path::new(&env_path)
            .file_name()
            .context("env_path")?
            .to_string_lossy()
            .into_owned();
        // Each environment gets its own build directory in its own pack directory (a link may
        // only name a build beside it), made of hard links to the first build's files: real
        // links, real checks, and the copies cost no disk.
        for i in 2..=n {
            let dir = dirs.envs_root.join(format!("v{i}"));
            std::fs::create_dir_all(&dir)?;
            link_tree(&build_dir, &dir.join(&build_name))?;
            std::os::unix::fs::symlink(&build_name, dir.join(&rt_dir))?;
        }
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
             SELECT p.id, r.id, 'ready', $1 || '/' || p.ref || '/' || $2,
                    jsonb_set($3, '{build_dir}', to_jsonb($1 || '/' || p.ref || '/' || $6)),
                    $4, now(), now()
             FROM pack p, runtime r WHERE r.ref = $5 AND p.ref <> 'v1'",
        )
        .bind(dirs.envs_root.display().to_string())
        .bind(&rt_dir)
        .bind(&metadata)
        .bind(&fingerprint)
        .bind(runtime)
        .bind(&build_name)
        .execute(&db.pool)
        .await?;
        // Ready rows written by SQL have no node rows, as a single-host database's had not:
        // the node adopts them as they are, as a daemon does at start.
        packenvd::store::adopt(&db.pool, NODE, &dirs.envs_root.display().to_string()).await?;
        let a = daemon_settings(&dirs, &db.url, "bench-verify-a")?;
        let b = daemon_settings(&dirs, &db.url, "bench-verify-b")?;
        // The daemon's pool, as `packenvd verify` makes it (concurrency + 4 connections).
        let size = u32::try_from(a.concurrency).unwrap_or(u32::MAX).saturating_add(4);
        let pool = packenvd::store::connect(&db.url, size, packenvd::store::Workload::Daemon).await?;
        let stale = || async {
            sqlx::query(
                "UPDATE pack_environment_node SET last_verified = now() - interval '30 days'
                 WHERE status = 'ready'",
            )
            .execute(&db.pool)
            .await
        };
        let check = |findings: Vec<packenvd::verify::Finding>| -> anyhow::Result<usize> {
            if let Some(f) = findings
                .iter()
                .find(|f| f.failure.is_some() || f.unchecked.is_some())
            {
                bail!(
                    "{} failed verification: {:?}",
                    f.pack_ref,
                    f.failure.as_ref().or(f.unchecked.as_ref())
                );
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

/// `dst` as a copy of the tree `src` whose files are hard links: directories made, symlinks
/// made again with the same target.
fn link_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            link_tree(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else {
            std::fs::hard_link(&from, &to)?;
        }
    }
    Ok(())
}
