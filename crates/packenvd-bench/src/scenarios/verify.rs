//! Row 5, verification: environments per second of `verify::run_pass(Scope::Stale)`, by
//! one instance and by two at once.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::{insert_packs, timed_build, wheelhouse, Ctx};
use crate::procs::{self, DaemonDirs};

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
