//! The `packenvd` binary: parse flags, load config, set up logging, dispatch. The daemon's
//! parts live in the library; this file wires signals, the metrics server and reloads.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use packenvd::cli::{self, Cli, Command, LogFormat};
use packenvd::config::Settings;
use packenvd::store;
use packenvd::worker::{Shutdown, Worker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let require_db = !matches!(cli.command, Command::CheckConfig(_));
    let (settings, sources) = match cli::load_settings(&cli, require_db) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("packenvd: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = init_tracing(cli.log_format, &settings.log_level);
    if let Command::CheckConfig(_) = cli.command {
        print!("{}", settings.describe(&sources));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("packenvd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(&cli, settings, filter)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("packenvd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: &Cli, settings: Settings, filter: FilterHandle) -> anyhow::Result<ExitCode> {
    let pool_size = u32::try_from(settings.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let pool = store::connect(settings.database_url.expose(), pool_size)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    match &cli.command {
        Command::Migrate => {
            store::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
        Command::Run(args) => run(cli, pool, settings, filter, args.until_done).await?,
        Command::Status { pack, status, json } => {
            cli::status(&pool, pack.as_deref(), status.as_deref(), *json).await?
        }
        Command::Request { pack, runtime } => cli::request(&pool, pack, runtime).await?,
        Command::Rebuild {
            pack,
            runtime,
            failed,
        } => cli::rebuild(&pool, pack.as_deref(), runtime.as_deref(), *failed).await?,
        Command::Logs { pack, runtime } => cli::logs(&pool, pack, runtime).await?,
        Command::Gc { dry_run } => cli::gc(&pool, &settings, *dry_run).await?,
        Command::Remove { pack, runtime } => {
            cli::remove(&pool, &settings, pack, runtime.as_deref()).await?
        }
        Command::Verify {
            all,
            stale: _,
            pack,
            runtime,
        } => {
            if cli::verify(&pool, &settings, *all, pack.clone(), runtime.clone()).await? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::CheckConfig(_) => unreachable!("handled before connecting"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `packenvd run`: migrate, serve metrics if asked, handle signals, run the worker.
async fn run(
    cli: &Cli,
    pool: sqlx::PgPool,
    settings: Settings,
    filter: FilterHandle,
    until_done: bool,
) -> anyhow::Result<()> {
    // Several instances may start at once; sqlx serialises migrations with an advisory lock.
    // Only when something is pending: MIGRATOR.run always begins with CREATE TABLE IF NOT
    // EXISTS _sqlx_migrations, which needs CREATE on the schema even when the table exists,
    // and the least-privilege role (deploy/db-role.sql) has no such right.
    let pending = store::unapplied_migrations(&pool)
        .await
        .context("reading _sqlx_migrations")?;
    if !pending.is_empty() {
        if let Err(e) = store::MIGRATOR.run(&pool).await {
            let denied = match &e {
                sqlx::migrate::MigrateError::Execute(db)
                | sqlx::migrate::MigrateError::ExecuteMigration(db, _) => {
                    db.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501")
                }
                _ => false,
            };
            if denied {
                anyhow::bail!(
                    "the database lacks migration(s) {pending:?} and this database user may not apply them: \
                     run `packenvd migrate` as the owner of the schema, re-apply deploy/db-role.sql, \
                     then start packenvd again ({e})"
                );
            }
            return Err(e).context("applying migrations");
        }
    }
    let worker = Worker::new(pool.clone(), Arc::new(settings.clone()));
    let shutdown = Shutdown::default();
    let metrics_server = settings.metrics_listen.map(|addr| {
        let window = (settings.poll_interval * 3).max(Duration::from_secs(30));
        let (m, h, stop) = (worker.metrics(), worker.health(), shutdown.stop.clone());
        tokio::spawn(packenvd::ops::serve(addr, pool.clone(), m, h, window, stop))
    });

    let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    let (s, w, layers_cli) = (
        shutdown.clone(),
        worker.clone(),
        (cli.config.clone(), cli_overrides(cli)),
    );
    tokio::spawn(async move {
        let mut signals = signals;
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => reload(&w, &filter, &layers_cli),
                _ if !s.stop.is_cancelled() => {
                    tracing::info!(signal = sig, "stopping: no new claims");
                    s.stop.cancel();
                }
                _ => {
                    tracing::warn!(signal = sig, "second signal: killing running builds now");
                    s.kill.cancel();
                }
            }
        }
    });
    let result = worker.run(shutdown.clone(), until_done).await;
    shutdown.stop.cancel();
    handle.close();
    if let Some(server) = metrics_server {
        if let Ok(Err(e)) = server.await {
            tracing::warn!(error = %e, "metrics server");
        }
    }
    tracing::info!("packenvd stopped");
    result
}

fn cli_overrides(cli: &Cli) -> std::collections::BTreeMap<&'static str, String> {
    match &cli.command {
        Command::Run(a) | Command::CheckConfig(a) => a.overrides(),
        _ => Default::default(),
    }
}

/// SIGHUP: read the config again; apply what can change while running, keep the rest; a bad
/// file is logged and the running config kept.
fn reload(
    worker: &Worker,
    filter: &FilterHandle,
    (file, flags): &(
        Option<std::path::PathBuf>,
        std::collections::BTreeMap<&'static str, String>,
    ),
) {
    let layers = packenvd::config::Layers::from_process_env(file.clone(), flags.clone());
    let new = match Settings::load(layers, true) {
        Ok((new, _)) => new,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
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
        } else {
            tracing::warn!(
                key = c.key,
                "changed in the config, but only a restart applies it; keeping the running value"
            );
        }
    }
    if merged.log_level != current.log_level {
        if let Err(e) = filter.modify(|f| *f = EnvFilter::new(&merged.log_level)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
    worker.reload(merged);
}

fn init_tracing(format: LogFormat, level: &str) -> FilterHandle {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    handle
}
