//! `packenvd run`: the migration policy, the metrics server, signals and reloads around the
//! [`Worker`]'s loop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use sqlx::PgPool;

use crate::config::{Layers, Settings};
use crate::error::chain;
use crate::logging::LogFilter;
use crate::store;
use crate::worker::{Shutdown, Worker};
use crate::Error;

/// How `packenvd run` was started, for reloads.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--config`, read again on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// The setting flags, which keep winning over the file on SIGHUP.
    pub flags: BTreeMap<&'static str, String>,
    /// Exit once no row is pending, outdated or installing.
    pub until_done: bool,
}

/// What a `run --until-done` did: the builds of this node that ended while it ran.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// (status, pack, runtime, the error's first line) of each build that ended.
    pub ended: Vec<(String, String, String, Option<String>)>,
}

impl RunSummary {
    pub fn failed(&self) -> bool {
        self.ended.iter().any(|(s, ..)| s == "failed")
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |st: &str| self.ended.iter().filter(|(s, ..)| s == st).count();
        writeln!(
            f,
            "done: {} environment(s) built, {} failed",
            count("ready"),
            count("failed")
        )?;
        for (_, pack, runtime, error) in self.ended.iter().filter(|(s, ..)| s == "failed") {
            writeln!(
                f,
                "  failed: {pack} {runtime}: {} (packenvd logs {pack} {runtime})",
                error.as_deref().unwrap_or("?")
            )?;
        }
        Ok(())
    }
}

/// Runs the daemon until a signal (or, with `until_done`, until the queue is empty, and then
/// says what it built).
pub async fn run(
    pool: PgPool,
    settings: Settings,
    options: RunOptions,
    filter: LogFilter,
) -> Result<Option<RunSummary>, Error> {
    migrate_if_needed(&pool).await?;
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .map_err(Error::db("reading the server's clock"))?;
    let protections = crate::hardening::Protections::detect(&settings)
        .await
        .map_err(|e| Error::Io {
            what: "refusing to run steps without a required protection".into(),
            source: std::io::Error::other(e),
        })?;
    protections.log();
    let worker = Worker::new(pool.clone(), Arc::new(settings.clone()));
    worker.set_protections(protections.active.clone());
    let shutdown = worker.shutdown();
    let metrics_server = settings.metrics_listen.map(|addr| {
        let window = (settings.poll_interval * 3).max(Duration::from_secs(30));
        tokio::spawn(crate::ops::serve(
            addr,
            pool.clone(),
            settings.node_name.clone(),
            worker.metrics(),
            worker.health(),
            window,
            shutdown.root.child_token(),
        ))
    });
    let signals =
        signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|source| Error::Io {
            what: "installing signal handlers".into(),
            source,
        })?;
    let handle = signals.handle();
    tokio::spawn(handle_signals(
        signals,
        shutdown.clone(),
        worker.clone(),
        filter,
        options.clone(),
    ));
    let result = worker.run(&shutdown, options.until_done).await;
    handle.close();
    if let Some(server) = metrics_server {
        if let Ok(Err(e)) = server.await {
            tracing::warn!(error = %chain(&e), "metrics server");
        }
    }
    tracing::info!("packenvd stopped");
    result?;
    if !options.until_done {
        return Ok(None);
    }
    let ended = store::ended_since(&pool, &settings.node_name, started)
        .await
        .map_err(Error::db("reading what this run built"))?;
    Ok(Some(RunSummary { ended }))
}

async fn handle_signals(
    mut signals: signal_hook_tokio::Signals,
    shutdown: Shutdown,
    worker: Worker,
    filter: LogFilter,
    options: RunOptions,
) {
    while let Some(sig) = signals.next().await {
        match sig {
            SIGHUP => reload(&worker, &filter, &options),
            _ if !shutdown.stop.is_cancelled() => {
                tracing::info!(signal = sig, "stopping: no new claims");
                shutdown.stop();
            }
            _ => {
                tracing::warn!(signal = sig, "second signal: killing running builds now");
                shutdown.kill();
            }
        }
    }
}

/// Applies the embedded migrations when some are missing. Several instances may start at
/// once; sqlx serialises migrations with an advisory lock. Only when something is pending:
/// `MIGRATOR.run` always begins with CREATE TABLE IF NOT EXISTS _sqlx_migrations, which needs
/// CREATE on the schema even when the table exists, and the least-privilege role
/// (deploy/db-role.sql) has no such right.
pub async fn migrate_if_needed(pool: &PgPool) -> Result<(), Error> {
    let pending = store::unapplied_migrations(pool)
        .await
        .map_err(Error::db("reading _sqlx_migrations"))?;
    if pending.is_empty() {
        return Ok(());
    }
    store::MIGRATOR.run(pool).await.map_err(|e| {
        let denied = match &e {
            sqlx::migrate::MigrateError::Execute(db)
            | sqlx::migrate::MigrateError::ExecuteMigration(db, _) => {
                db.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501")
            }
            _ => false,
        };
        if denied {
            Error::MigrationDenied { pending, source: e }
        } else {
            Error::Migrate(e)
        }
    })
}

/// SIGHUP: read the config again; apply what can change while running, keep the rest; a bad
/// file is logged and the running config kept.
fn reload(worker: &Worker, filter: &LogFilter, options: &RunOptions) {
    let layers = Layers::from_process_env(options.config_file.clone(), options.flags.clone());
    // The database URL is not reloadable, and the daemon keeps no secret in its environment.
    let new = match Settings::load(layers, false) {
        Ok(loaded) => loaded.settings,
        Err(e) => {
            tracing::error!(error = %chain(&e), "reload failed; keeping the running configuration");
            return;
        }
    };
    let current = worker.cfg();
    let (merged, changes) = current.reloaded(&new);
    if changes.is_empty() {
        tracing::info!("reloaded: nothing changed");
        return;
    }
    for c in &changes {
        if c.applied {
            tracing::info!(key = c.key, old = %c.old, new = %c.new, "reloaded");
        } else if c.key != "database_url" || !new.database_url.is_empty() {
            tracing::warn!(
                key = c.key,
                "changed in the config, but only a restart applies it; keeping the running value"
            );
        }
    }
    if merged.log_level != current.log_level {
        if let Err(e) = filter.set(&merged.log_level) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
    worker.reload(merged);
}
