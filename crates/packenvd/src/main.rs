//! The `packenvd` binary: parse flags, load config, set up logging, dispatch.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use packenvd::cli::{self, Cli, Command, LogFormat};
use packenvd::store;
use packenvd::worker::{Shutdown, Worker};
use signal_hook::consts::{SIGINT, SIGTERM};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let require_db = !matches!(cli.command, Command::CheckConfig(_));
    let (settings, sources) = match cli::load_settings(&cli, require_db) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("packenvd: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(dispatch(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("packenvd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    command: Command,
    settings: packenvd::config::Settings,
) -> anyhow::Result<ExitCode> {
    let pool_size = u32::try_from(settings.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let pool = store::connect(settings.database_url.expose(), pool_size)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    match command {
        Command::Migrate => {
            store::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
        Command::Run(args) => {
            // `run` migrates too: several instances may start at once, and sqlx serialises
            // migrations with an advisory lock.
            store::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            let shutdown = Shutdown::default();
            let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])
                .context("installing signal handlers")?;
            let handle = signals.handle();
            let s = shutdown.clone();
            tokio::spawn(async move {
                let mut signals = signals;
                if let Some(sig) = signals.next().await {
                    tracing::info!(signal = sig, "stopping: no new claims");
                    s.stop.cancel();
                }
                if let Some(sig) = signals.next().await {
                    tracing::warn!(signal = sig, "second signal: killing running builds now");
                    s.kill.cancel();
                }
            });
            Worker::new(pool, Arc::new(settings))
                .run(shutdown, args.until_done)
                .await?;
            handle.close();
            tracing::info!("packenvd stopped");
        }
        Command::Status { pack, status, json } => {
            cli::status(&pool, pack.as_deref(), status.as_deref(), json).await?
        }
        Command::Request { pack, runtime } => cli::request(&pool, &pack, &runtime).await?,
        Command::Rebuild {
            pack,
            runtime,
            failed,
        } => cli::rebuild(&pool, pack.as_deref(), runtime.as_deref(), failed).await?,
        Command::Logs { pack, runtime } => cli::logs(&pool, &pack, &runtime).await?,
        Command::Gc { dry_run } => cli::gc(&pool, &settings, dry_run).await?,
        Command::Remove { pack, runtime } => {
            cli::remove(&pool, &settings, &pack, runtime.as_deref()).await?
        }
        Command::Verify {
            all,
            stale: _,
            pack,
            runtime,
        } => {
            if cli::verify(&pool, &settings, all, pack, runtime).await? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::CheckConfig(_) => unreachable!("handled before connecting"),
    }
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PACKENVD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
