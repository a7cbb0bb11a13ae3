//! The command line and the operator commands. `main.rs` only parses and calls [`main`].
//!
//! - [`args`]: every command, flag and argument, with its help (also the man page and the
//!   completions).
//! - [`status`]: `status` and `nodes`, the tables and the nodes' liveness.
//! - [`follow`]: following builds: `request --wait`, `rebuild --wait`, `logs --follow`.
//! - [`commands`]: the other commands, and the checks that turn an unknown pack, runtime or
//!   node into a usage error listing the valid ones.
//! - [`explain`]: reading rows back for people: a build's step, a failure's cause.
//!
//! Every command ends with one of the [`Exit`] statuses; `anyhow` stops here.

pub mod args;
mod check;
mod commands;
pub mod explain;
mod follow;
mod status;

use std::process::ExitCode;

use anyhow::Context;
use sqlx::PgPool;

pub use args::*;

use crate::config::{Layers, Loaded, Settings};
use crate::logging::LogFormat;
use crate::store;

/// How a command ends, as its exit status (the README's table, and [`args::EXIT_STATUS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; every environment shown or waited for is well.
    Ok,
    /// An environment shown or waited for is failed or broken, or a build of `run
    /// --until-done` failed.
    Unwell,
    /// The command line or the configuration is wrong; the message says what is valid.
    Usage,
    /// packenvd could not do it: the database, the file system. Shares 1 with [`Exit::Unwell`]:
    /// scripts and systemd read 1 as "failed", and a separate code would read to systemd as
    /// "not implemented".
    Trouble,
    /// `--wait`/`--follow` gave up after `--timeout`.
    TimedOut,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(match e {
            Exit::Ok => 0,
            Exit::Unwell | Exit::Trouble => 1,
            Exit::Usage => 2,
            Exit::TimedOut => 4,
        })
    }
}

/// An error in what the operator asked (an unknown pack, runtime or node, a missing `--yes`):
/// exit status 2. Its message names the valid choices.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A usage error, as an `anyhow` error the commands can return.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// Loads the settings for `cli` (with its `--config`); the caller exits with status 2 on error.
pub fn load_settings(
    cli: &Cli,
    common: &Common,
    require_database: bool,
) -> Result<Loaded, crate::config::ConfigError> {
    Settings::load(
        Layers::from_process_env(common.config.clone(), cli.command.setting_flags()),
        require_database,
    )
}

/// Runs the parsed command line; returns the process's exit status ([`Exit`]).
pub fn main(cli: Cli) -> ExitCode {
    let common = match cli.common() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match &cli.command {
        Command::Completions(a) => return commands::completions(a.shell),
        Command::Man(a) => return commands::man(a.out_dir.as_deref()),
        _ => {}
    }
    // Before any thread exists and before the secret is read (DESIGN §6).
    let hardening = crate::hardening::harden_process();
    let require_db = !matches!(cli.command, Command::CheckConfig(_));
    let loaded = match load_settings(&cli, &common, require_db) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("packenvd: configuration error: {}", crate::error::chain(&e));
            return Exit::Usage.into();
        }
    };
    let forgotten = crate::hardening::forget_secrets();
    let filter = crate::logging::init(
        common.log_format.unwrap_or(LogFormat::Text),
        &loaded.settings.log_level,
    );
    for w in loaded.warnings.iter().chain(&hardening) {
        tracing::warn!("{w}");
    }
    if let Command::CheckConfig(a) = &cli.command {
        if a.connect && loaded.settings.database_url.is_empty() {
            eprintln!(
                "packenvd: check-config --connect needs a database: set DATABASE_URL in the \
                 environment, or `database_url` or `database_url_file` in the config file"
            );
            return Exit::Usage.into();
        }
        print!("{}", loaded.settings.to_toml(&loaded.sources));
        if !a.connect {
            return ExitCode::SUCCESS;
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("packenvd: cannot start the async runtime: {e}");
            return Exit::Trouble.into();
        }
    };
    if let Command::CheckConfig(_) = &cli.command {
        let settings = &loaded.settings;
        return runtime
            .block_on(async {
                let pool = connect(settings, &forgotten, store::Workload::Command).await;
                check::connect(settings, pool).await
            })
            .into();
    }
    match runtime.block_on(dispatch(&cli, &common, loaded.settings, forgotten, filter)) {
        Ok(code) => code.into(),
        Err(e) => {
            if let Some(u) = e.downcast_ref::<UsageError>() {
                eprintln!("packenvd: {u}");
                return Exit::Usage.into();
            }
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("packenvd: {}", crate::error::chain(e));
            Exit::Trouble.into()
        }
    }
}

async fn connect(
    settings: &Settings,
    forgotten: &crate::hardening::Forgotten,
    workload: store::Workload,
) -> anyhow::Result<PgPool> {
    let pool_size = u32::try_from(settings.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let password = forgotten.pg_password.as_ref().map(|p| p.expose());
    let url = settings.database_url.expose();
    store::connect_with_password(url, password, pool_size, workload)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                store::describe_url(url)
            )
        })
}

async fn dispatch(
    cli: &Cli,
    common: &Common,
    settings: Settings,
    forgotten: crate::hardening::Forgotten,
    filter: crate::logging::LogFilter,
) -> anyhow::Result<Exit> {
    let workload = match &cli.command {
        Command::Run(_) => store::Workload::Daemon,
        _ => store::Workload::Command,
    };
    let pool = connect(&settings, &forgotten, workload).await?;
    Ok(match &cli.command {
        Command::Migrate(_) => {
            store::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
            Exit::Ok
        }
        Command::Run(args) => {
            let options = crate::daemon::RunOptions {
                config_file: common.config.clone(),
                flags: args.settings.0.clone(),
                until_done: args.until_done,
            };
            match crate::daemon::run(pool, settings, options, filter).await? {
                Some(summary) => {
                    print!("{summary}");
                    if summary.failed() {
                        Exit::Unwell
                    } else {
                        Exit::Ok
                    }
                }
                None => Exit::Ok,
            }
        }
        Command::Status(a) => status::status(&pool, a).await?,
        Command::Nodes(a) => status::nodes(&pool, a.json).await?,
        Command::Node(NodeCommand::Forget(a)) => commands::forget(&pool, &a.name).await?,
        Command::Request(a) => commands::request(&pool, a).await?,
        Command::Rebuild(a) => commands::rebuild(&pool, a).await?,
        Command::Logs(a) => commands::logs(&pool, a).await?,
        Command::Gc(a) => commands::gc(&pool, &settings, a.dry_run).await?,
        Command::Remove(a) => commands::remove(&pool, &settings, a).await?,
        Command::Verify(a) => commands::verify(&pool, &settings, a).await?,
        Command::CheckConfig(_) | Command::Completions(_) | Command::Man(_) => {
            unreachable!("handled before connecting")
        }
    })
}
