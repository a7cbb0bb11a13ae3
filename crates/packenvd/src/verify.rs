//! Verification of ready environments (DESIGN §7): a pass takes rows whose last check is older
//! than `verify_max_age`, in batches claimed with SKIP LOCKED so that with several instances
//! each row is checked once, runs the checks cheapest first, and sends broken environments to
//! `outdated` with the reason. The daemon runs a pass on `verify_schedule`; `packenvd verify`
//! runs one now.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use packenv_core::fingerprint::{fingerprint, inputs_digest};
use packenv_core::layout::EnvLocation;
use packenv_core::log::tail_lines;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::build::{executable_version, interpreter, step_environment};
use crate::config::Settings;
use crate::store::{self, ToVerify};

/// Which rows a pass takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Rows last verified longer ago than `verify_max_age` (the cron's pass).
    Stale,
    /// Every ready row.
    All,
    /// The ready rows of one pack, or of one pack and runtime, whatever their age.
    Pack {
        pack: String,
        runtime: Option<String>,
    },
}

/// The result of checking one environment.
#[derive(Debug, Clone)]
pub struct Finding {
    pub pack_ref: String,
    pub runtime_ref: String,
    /// `None` when every check passed; else which check failed and what it saw.
    pub failure: Option<String>,
}

/// Runs one pass over `scope`; returns what it found, row by row.
pub async fn run_pass(
    pool: &PgPool,
    settings: &Settings,
    scope: &Scope,
) -> Result<Vec<Finding>, sqlx::Error> {
    let (max_age, pack, runtime) = match scope {
        Scope::Stale => (Some(settings.verify_max_age), None, None),
        Scope::All => (None, None, None),
        Scope::Pack { pack, runtime } => (None, Some(pack.as_str()), runtime.as_deref()),
    };
    let cutoff = store::verify_cutoff(pool, max_age).await?;
    let mut findings = Vec::new();
    loop {
        let rows = store::claim_verification(
            pool,
            cutoff,
            pack,
            runtime,
            settings.verify_batch,
            &settings.instance_name,
        )
        .await?;
        if rows.is_empty() {
            return Ok(findings);
        }
        let checked: Vec<(ToVerify, Option<String>)> = futures::stream::iter(rows)
            .map(|row| async move {
                let failure = check(settings, &row).await.err();
                (row, failure)
            })
            .buffer_unordered(settings.concurrency.max(1))
            .collect()
            .await;
        for (row, failure) in checked {
            let written =
                store::finish_verification(pool, row.id, row.claimed_at, failure.as_deref())
                    .await?;
            match (&failure, written) {
                (Some(reason), true) => {
                    tracing::warn!(pack_ref = %row.pack_ref, runtime_ref = %row.runtime_ref, env_id = row.id, reason = %reason, "verification failed: outdated, will be rebuilt")
                }
                (_, false) => {
                    tracing::info!(pack_ref = %row.pack_ref, env_id = row.id, "row changed while being verified; result discarded")
                }
                (None, true) => {
                    tracing::debug!(pack_ref = %row.pack_ref, env_id = row.id, "verified")
                }
            }
            findings.push(Finding {
                pack_ref: row.pack_ref,
                runtime_ref: row.runtime_ref,
                failure,
            });
        }
    }
}

/// The checks, cheapest first. Err holds one sentence naming the check and what it saw.
async fn check(settings: &Settings, row: &ToVerify) -> Result<(), String> {
    if row.metadata["requires_environment"] == false {
        return Ok(());
    }
    // 1. env_path names a build directory inside the envs root, the one the row records.
    let env_path = row.env_path.as_deref().ok_or("the row has no env_path")?;
    let loc = EnvLocation::new(
        &settings.envs_root,
        &row.pack_ref,
        &row.runtime_name,
        Some(env_path),
    )
    .map_err(|e| e.to_string())?;
    let build = loc
        .current_build()
        .ok_or_else(|| format!("env_path {env_path} does not point to a build directory"))?;
    let real = std::fs::canonicalize(&build)
        .map_err(|e| format!("cannot resolve {}: {e}", build.display()))?;
    let root = std::fs::canonicalize(&settings.envs_root)
        .map_err(|e| format!("cannot resolve the envs root: {e}"))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "env_path {env_path} resolves to {}, outside the envs root",
            real.display()
        ));
    }
    let recorded = row.metadata["build_dir"].as_str().map(PathBuf::from);
    if recorded.as_deref() != Some(real.as_path()) && recorded.as_deref() != Some(build.as_path()) {
        return Err(format!(
            "env_path {env_path} points to {}, but the row records {:?}",
            build.display(),
            recorded
        ));
    }

    // 2. Each executable exists and runs.
    let runtime_dir = loc
        .env_path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let env = step_environment(settings, &settings.cache_dir.join(runtime_dir));
    let executables: BTreeMap<String, String> =
        serde_json::from_value(row.metadata["executables"].clone()).unwrap_or_default();
    let cancel = CancellationToken::new();
    let mut versions = BTreeMap::new();
    for (name, path) in &executables {
        if path.starts_with('/') && !Path::new(path).exists() {
            return Err(format!("executable '{name}' ({path}) is missing"));
        }
        match executable_version(path, &build, &env, settings.verify_timeout, &cancel).await {
            Ok(v) => {
                versions.insert(name.clone(), v);
            }
            Err((outcome, text, inv)) => {
                return Err(format!(
                    "executable '{name}' does not run: `{}` {}: {}",
                    inv.display(),
                    outcome.describe(),
                    tail_lines(&text, 3, 400)
                ))
            }
        }
    }

    // 3. The inputs are those the build was made from.
    if let Some(recorded) = &row.fingerprint {
        let pack_path = row
            .storage_path
            .as_ref()
            .map_or_else(|| settings.packs_dir.join(&row.pack_ref), PathBuf::from);
        let digest = inputs_digest(&row.installers, &pack_path).map_err(|e| {
            format!(
                "cannot read the pack's manifests in {}: {e}",
                pack_path.display()
            )
        })?;
        let version = interpreter(&versions).map(|(_, v)| v.as_str());
        if &fingerprint(&digest, version) != recorded {
            let was = row.metadata["interpreter_version"].as_str();
            return Err(match (was, version) {
                (Some(was), Some(now)) if was != now => format!("inputs changed: the interpreter is now {now:?}, the build was made with {was:?}"),
                _ => "inputs changed: the runtime's installer spec or the pack's dependency manifests differ from the build's".into(),
            });
        }
    }

    // 4. For Python with pip: installed packages are consistent.
    if settings.verify_pip_check && executables.contains_key("pip") {
        if let Some(python) = executables.get("python") {
            let inv = packenv_core::runner::Invocation {
                program: python.clone(),
                args: vec!["-m".into(), "pip".into(), "check".into()],
                cwd: build.clone(),
                env: env.clone(),
                timeout: settings.verify_timeout,
            };
            let out = std::sync::Arc::new(std::sync::Mutex::new(
                packenv_core::log::CappedLog::new(8192),
            ));
            let outcome = packenv_core::runner::run(&inv, &out, &cancel).await;
            if !outcome.success() {
                let text = out.lock().unwrap_or_else(|p| p.into_inner()).render();
                return Err(format!(
                    "`{}` {}: {}",
                    inv.display(),
                    outcome.describe(),
                    tail_lines(&text, 5, 600)
                ));
            }
        }
    }
    Ok(())
}

/// Runs stale passes on `verify_schedule` until `stop`, restarting the scheduler when a reload
/// changes the schedule. A pass still running when the next is due is not doubled.
pub async fn schedule(
    pool: PgPool,
    mut settings: tokio::sync::watch::Receiver<std::sync::Arc<Settings>>,
    metrics: std::sync::Arc<crate::ops::Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let running = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let expr = settings.borrow_and_update().verify_schedule.clone();
        let mut scheduler = JobScheduler::new().await?;
        let (pool, rx, running, metrics) = (
            pool.clone(),
            settings.clone(),
            running.clone(),
            metrics.clone(),
        );
        let job = Job::new_async(expr.as_str(), move |_, _| {
            let (pool, settings, running, metrics) = (
                pool.clone(),
                rx.borrow().clone(),
                running.clone(),
                metrics.clone(),
            );
            Box::pin(async move {
                let Ok(_guard) = running.try_lock() else {
                    tracing::info!("previous verification pass still running; skipping this one");
                    return;
                };
                match run_pass(&pool, &settings, &Scope::Stale).await {
                    Ok(found) if found.is_empty() => {}
                    Ok(found) => {
                        let broken = found.iter().filter(|f| f.failure.is_some()).count();
                        let label = |result| crate::ops::ResultLabel { result };
                        metrics
                            .verifications
                            .get_or_create(&label("ok"))
                            .inc_by((found.len() - broken) as u64);
                        metrics
                            .verifications
                            .get_or_create(&label("failed"))
                            .inc_by(broken as u64);
                        tracing::info!(verified = found.len(), broken, "verification pass done");
                    }
                    Err(e) => {
                        metrics.db_errors.inc();
                        tracing::warn!(error = %e, "verification pass failed");
                    }
                }
            })
        })?;
        scheduler.add(job).await?;
        scheduler.start().await?;
        let changed = loop {
            tokio::select! {
                () = stop.cancelled() => break false,
                r = settings.changed() => {
                    if r.is_err() {
                        break false;
                    }
                    if settings.borrow().verify_schedule != expr {
                        break true;
                    }
                }
            }
        };
        scheduler.shutdown().await?;
        if !changed {
            return Ok(());
        }
        tracing::info!(schedule = %settings.borrow().verify_schedule, "verification schedule changed");
    }
}

/// Checks a cron expression the way the scheduler will read it.
pub fn check_schedule(expr: &str) -> Result<(), String> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| format!("{e} (six fields, seconds first: \"0 0 * * * *\" is hourly)"))
}
