//! Command-line interface: parsing and the operator commands. `main.rs` only dispatches.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sqlx::PgPool;

use crate::config::{Layers, Loaded, SettingFlags, Settings};
use crate::logging::LogFormat;
use crate::store::{self, Status};

#[derive(Debug, Parser)]
#[command(
    name = "packenvd",
    version,
    about = "Builds and keeps an isolated environment per pack and runtime, driven by PostgreSQL"
)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/packenvd/packenvd.toml when it exists.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations.
    Migrate,
    /// Run the daemon: claim pending and outdated rows and build their environments.
    Run(RunArgs),
    /// Show environments as a table (or JSON).
    Status {
        /// Only this pack.
        #[arg(long)]
        pack: Option<String>,
        /// Only rows in this status.
        #[arg(long, value_enum)]
        status: Option<Status>,
        /// One node's rows instead of the summary over nodes.
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the nodes: name, last seen, what each can build, its rows by status.
    Nodes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Operate on one node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Ask for an environment (what a pack install does): creates the row or sends it back to pending.
    Request { pack: String, runtime: String },
    /// Force a rebuild from scratch: reset rows to pending.
    Rebuild {
        /// The pack; with --failed, may be omitted to reset every failed row.
        pack: Option<String>,
        runtime: Option<String>,
        /// Only rows that are `failed`.
        #[arg(long)]
        failed: bool,
        /// Only on this node (the other nodes keep their builds).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
    /// Print the install log and error of one environment.
    Logs {
        pack: String,
        runtime: String,
        /// That node's build (default: the summary's, the last node's log).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
    /// Print the effective configuration as a config file that loads back: every setting,
    /// its value and where it came from, secrets masked.
    CheckConfig(SettingFlags),
    /// Remove superseded and orphaned builds now (what the daemon does every gc_interval).
    Gc {
        /// List what would be removed and why; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete environments on purpose: the rows and their directories.
    Remove {
        pack: String,
        runtime: Option<String>,
    },
    /// Verify ready environments now; exit status 1 when any was found broken (it is then
    /// `outdated` and a running daemon rebuilds it) or could not be checked on this host, 2
    /// when the checks may not run as configured (a build user without the capabilities).
    Verify {
        /// Every ready environment, whatever the age of its last check.
        #[arg(long, conflicts_with_all = ["stale", "pack"])]
        all: bool,
        /// Only environments whose last check is older than verify_max_age (the default).
        #[arg(long)]
        stale: bool,
        /// Only this pack (any age).
        pack: Option<String>,
        runtime: Option<String>,
    },
}

/// `packenvd node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Forget a node (it was retired): its rows go, and environments stop waiting for it.
    /// Nothing on any disk is touched.
    Forget { name: String },
}

/// `packenvd run`'s own flags and the setting flags.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Exit once no row is pending, outdated or installing (for batch jobs and the demo).
    #[arg(long)]
    pub until_done: bool,
    #[command(flatten)]
    pub settings: SettingFlags,
}

impl Command {
    /// The setting flags given to this command.
    pub fn setting_flags(&self) -> BTreeMap<&'static str, String> {
        match self {
            Command::Run(a) => a.settings.0.clone(),
            Command::CheckConfig(f) => f.0.clone(),
            _ => BTreeMap::new(),
        }
    }
}

/// Loads the settings for `cli`; the caller exits with status 2 on error.
pub fn load_settings(
    cli: &Cli,
    require_database: bool,
) -> Result<Loaded, crate::config::ConfigError> {
    Settings::load(
        Layers::from_process_env(cli.config.clone(), cli.command.setting_flags()),
        require_database,
    )
}

/// `packenvd status`.
pub async fn status(
    pool: &PgPool,
    pack: Option<&str>,
    status: Option<Status>,
    node: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let rows = store::status(pool, pack, status, node)
        .await
        .context("reading v_pack_environment_status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    // With more than one node the summary's env_path is only one node's: the nodes' counts
    // say more (`status --node` gives each node's paths).
    let per_node = node.is_none()
        && rows.iter().any(|r| {
            r.nodes
                .as_ref()
                .and_then(|n| n.as_object())
                .is_some_and(|m| m.values().filter_map(|v| v.as_i64()).sum::<i64>() > 1)
        });
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "pack",
        "runtime",
        "status",
        "attempts",
        if per_node { "nodes" } else { "env_path" },
        "last verified",
        "error",
    ]);
    let now = chrono::Utc::now();
    for r in &rows {
        let mut st = r.status.to_string();
        if r.status == Status::Pending && r.run_after > now {
            st = format!(
                "pending (retry in {}s)",
                (r.run_after - now).num_seconds().max(0)
            );
        }
        if r.needs_verification {
            st.push_str(" (needs verification)");
        }
        let error = r
            .install_error
            .as_deref()
            .and_then(|e| e.lines().next())
            .unwrap_or("");
        table.add_row([
            r.pack_ref.clone(),
            r.runtime_ref.clone(),
            st,
            r.attempts.to_string(),
            if per_node {
                node_counts(r.nodes.as_ref())
            } else {
                r.env_path.clone().unwrap_or_else(|| "-".into())
            },
            match (&r.last_verified, r.last_verify_result.as_deref()) {
                (Some(at), Some(res)) => {
                    format!("{} {}", at.format("%Y-%m-%d %H:%M"), truncate(res, 30))
                }
                (Some(at), None) => at.format("%Y-%m-%d %H:%M").to_string(),
                _ => "-".into(),
            },
            truncate(error, 60),
        ]);
    }
    println!("{table}");
    println!("{} environment(s)", rows.len());
    Ok(())
}

/// `2 ready, 1 installing`, in the order of the state machine.
fn node_counts(nodes: Option<&serde_json::Value>) -> String {
    let counts: Vec<String> = Status::ALL
        .iter()
        .filter_map(|s| {
            let n = nodes?.get(s.to_string())?.as_i64()?;
            Some(format!("{n} {s}"))
        })
        .collect();
    if counts.is_empty() {
        "-".into()
    } else {
        counts.join(", ")
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max - 1).collect::<String>() + "…"
    }
}

/// `packenvd nodes`.
pub async fn nodes(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let rows = store::nodes(pool).await.context("reading packenvd_node")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "node",
        "last seen",
        "envs root",
        "tools",
        "cannot build",
        "rows",
    ]);
    let now = chrono::Utc::now();
    for n in &rows {
        let ago = humantime::format_duration(std::time::Duration::from_secs(
            (now - n.last_seen).num_seconds().max(0) as u64,
        ));
        let seen = if n.gone {
            format!("{ago} ago (gone)")
        } else {
            format!("{ago} ago")
        };
        let lacking: Vec<String> = n
            .runtimes
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v["buildable"] == false)
                    .map(|(k, v)| {
                        format!(
                            "{k} (no {})",
                            v["missing"]
                                .as_array()
                                .map(|a| a
                                    .iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "))
                                .unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tools: Vec<String> = n
            .tools
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v["version"].as_str() {
                        Some(version) => format!("{k} {version}"),
                        None => k.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let counts: Vec<String> = n
            .rows
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{v} {k}")).collect())
            .unwrap_or_default();
        table.add_row([
            n.name.clone(),
            seen,
            n.envs_root.clone(),
            tools.join(", "),
            if lacking.is_empty() {
                "-".into()
            } else {
                lacking.join("; ")
            },
            if counts.is_empty() {
                "-".into()
            } else {
                counts.join(", ")
            },
        ]);
    }
    println!("{table}");
    println!("{} node(s)", rows.len());
    Ok(())
}

/// `packenvd request`.
pub async fn request(pool: &PgPool, pack: &str, runtime: &str) -> anyhow::Result<()> {
    let (id, status) = store::request(pool, pack, runtime)
        .await
        .map_err(db_message)?;
    println!("{pack} {runtime}: {status} (pack_environment.id = {id})");
    Ok(())
}

/// `packenvd rebuild`.
pub async fn rebuild(
    pool: &PgPool,
    pack: Option<&str>,
    runtime: Option<&str>,
    failed: bool,
    node: Option<&str>,
) -> anyhow::Result<()> {
    if pack.is_none() && !failed {
        anyhow::bail!("name a pack, or use --failed to reset every failed environment");
    }
    let rows = match node {
        None => store::rebuild(pool, pack, runtime, failed).await?,
        Some(node) => store::rebuild_on_node(pool, node, pack, runtime, failed).await?,
    };
    if rows.is_empty() {
        anyhow::bail!("no environment matched");
    }
    for (p, r) in &rows {
        println!("{p} {r}: reset to pending");
    }
    Ok(())
}

/// `packenvd logs`.
pub async fn logs(
    pool: &PgPool,
    pack: &str,
    runtime: &str,
    node: Option<&str>,
) -> anyhow::Result<()> {
    let Some(l) = store::logs(pool, pack, runtime, node).await? else {
        anyhow::bail!("no environment for pack {pack} and runtime {runtime}");
    };
    println!("status: {}", l.status);
    if let Some(e) = &l.install_error {
        println!("error: {e}");
    }
    println!(
        "--- install log ---\n{}",
        l.install_log.as_deref().unwrap_or("(none yet)")
    );
    Ok(())
}

/// A database error raised by our SQL functions carries a message meant for people.
fn db_message(e: sqlx::Error) -> anyhow::Error {
    match e.as_database_error() {
        Some(db) => anyhow::anyhow!("{}", db.message()),
        None => e.into(),
    }
}

fn print_report(report: &crate::gc::Report, verb: &str) {
    for r in &report.removed {
        println!("{verb} {r}");
    }
    for r in &report.kept_in_use {
        println!("kept {r}");
    }
    for r in &report.errors {
        eprintln!("error {r}");
    }
}

/// `packenvd gc [--dry-run]`.
pub async fn gc(pool: &PgPool, settings: &Settings, dry_run: bool) -> anyhow::Result<()> {
    let report = crate::gc::run_once(pool, &crate::gc::GcConfig::from(settings), dry_run).await?;
    print_report(&report, if dry_run { "would remove" } else { "removed" });
    if report.removed.is_empty() && report.kept_in_use.is_empty() {
        println!("nothing to remove");
    }
    if !report.errors.is_empty() {
        anyhow::bail!("{} path(s) could not be removed", report.errors.len());
    }
    Ok(())
}

/// `packenvd remove PACK [RUNTIME]`.
pub async fn remove(
    pool: &PgPool,
    settings: &Settings,
    pack: &str,
    runtime: Option<&str>,
) -> anyhow::Result<()> {
    let (runtimes, report) =
        crate::gc::remove(pool, &crate::gc::GcConfig::from(settings), pack, runtime).await?;
    if runtimes.is_empty() {
        anyhow::bail!(
            "no environment for pack {pack}{}",
            runtime
                .map(|r| format!(" and runtime {r}"))
                .unwrap_or_default()
        );
    }
    for r in &runtimes {
        println!("{pack} {r}: row deleted");
    }
    print_report(&report, "removed");
    Ok(())
}

/// `packenvd verify`; returns whether anything was found broken or could not be checked.
pub async fn verify(
    pool: &PgPool,
    settings: &Settings,
    all: bool,
    pack: Option<String>,
    runtime: Option<String>,
) -> anyhow::Result<bool> {
    use crate::verify::Scope;
    let scope = match (all, pack) {
        (true, _) => Scope::All,
        (false, Some(pack)) => Scope::Pack { pack, runtime },
        (false, None) => Scope::Stale,
    };
    let findings = crate::verify::run_pass(pool, settings, &scope).await?;
    let (mut broken, mut unchecked) = (0, 0);
    for f in &findings {
        match (&f.failure, &f.unchecked) {
            (_, Some(reason)) => {
                unchecked += 1;
                println!(
                    "UNCHECKED {} {}: {reason} (left as it was)",
                    f.pack_ref, f.runtime_ref
                );
            }
            (None, None) => println!("ok      {} {}", f.pack_ref, f.runtime_ref),
            (Some(reason), None) => {
                broken += 1;
                println!(
                    "BROKEN  {} {}: {reason} (now outdated: it will be rebuilt)",
                    f.pack_ref, f.runtime_ref
                );
            }
        }
    }
    println!(
        "{} environment(s) verified, {broken} broken{}",
        findings.len() - unchecked,
        if unchecked > 0 {
            format!(", {unchecked} could not be checked")
        } else {
            String::new()
        }
    );
    Ok(broken > 0 || unchecked > 0)
}

/// What the daemon checks at start that checks need too: its envs root (checks refuse one of
/// another user, which is what running `verify` as root finds), and a build user it may switch
/// to and give files to. Without them every check would fail and send healthy environments to
/// `outdated`.
async fn may_verify(settings: &Settings) -> Result<(), String> {
    let root = settings.envs_root.clone();
    match packenv_core::blocking(move || packenv_core::layout::EnvsRoot::open(&root, false)).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(format!(
                "envs root {} does not exist (is this the daemon's configuration?)",
                settings.envs_root.display()
            ))
        }
        Err(e) => return Err(format!("{e}: run packenvd verify as the daemon's user")),
    }
    crate::hardening::Protections::detect(settings)
        .await
        .map(|_| ())
}

/// Runs the parsed command line; returns the process's exit status. Configuration errors exit
/// with 2, a command that found something wrong (a broken environment) with 1.
pub fn main(cli: Cli) -> std::process::ExitCode {
    use std::process::ExitCode;
    // Before any thread exists and before the secret is read (DESIGN §6).
    let hardening = crate::hardening::harden_process();
    let require_db = !matches!(cli.command, Command::CheckConfig(_));
    let loaded = match load_settings(&cli, require_db) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("packenvd: configuration error: {}", crate::error::chain(&e));
            return ExitCode::from(2);
        }
    };
    let forgotten = crate::hardening::forget_secrets();
    let filter = crate::logging::init(cli.log_format, &loaded.settings.log_level);
    for w in loaded.warnings.iter().chain(&hardening) {
        tracing::warn!("{w}");
    }
    if let Command::CheckConfig(_) = cli.command {
        print!("{}", loaded.settings.to_toml(&loaded.sources));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("packenvd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(&cli, loaded.settings, forgotten, filter)) {
        Ok(code) => code,
        Err(e) => {
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("packenvd: {}", crate::error::chain(e));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    cli: &Cli,
    settings: Settings,
    forgotten: crate::hardening::Forgotten,
    filter: crate::logging::LogFilter,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let pool_size = u32::try_from(settings.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let password = forgotten.pg_password.as_ref().map(|p| p.expose());
    let url = settings.database_url.expose();
    let pool = store::connect_with_password(url, password, pool_size)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                store::describe_url(url)
            )
        })?;
    match &cli.command {
        Command::Migrate => {
            store::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
        Command::Run(args) => {
            let options = crate::daemon::RunOptions {
                config_file: cli.config.clone(),
                flags: args.settings.0.clone(),
                until_done: args.until_done,
            };
            let summary = crate::daemon::run(pool, settings, options, filter).await?;
            if let Some(summary) = summary {
                print!("{summary}");
                if summary.failed() {
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Status {
            pack,
            status: s,
            node,
            json,
        } => status(&pool, pack.as_deref(), *s, node.as_deref(), *json).await?,
        Command::Nodes { json } => nodes(&pool, *json).await?,
        Command::Node(NodeCommand::Forget { name }) => {
            if !store::forget_node(&pool, name).await? {
                anyhow::bail!("no node named {name:?}");
            }
            println!("node {name} forgotten: its rows are gone; nothing on disk was touched");
        }
        Command::Request { pack, runtime } => request(&pool, pack, runtime).await?,
        Command::Rebuild {
            pack,
            runtime,
            failed,
            node,
        } => {
            rebuild(
                &pool,
                pack.as_deref(),
                runtime.as_deref(),
                *failed,
                node.as_deref(),
            )
            .await?
        }
        Command::Logs {
            pack,
            runtime,
            node,
        } => logs(&pool, pack, runtime, node.as_deref()).await?,
        Command::Gc { dry_run } => gc(&pool, &settings, *dry_run).await?,
        Command::Remove { pack, runtime } => {
            remove(&pool, &settings, pack, runtime.as_deref()).await?
        }
        Command::Verify {
            all,
            stale: _,
            pack,
            runtime,
        } => {
            if let Err(e) = may_verify(&settings).await {
                eprintln!("packenvd: refusing to verify: {e}");
                return Ok(ExitCode::from(2));
            }
            if verify(&pool, &settings, *all, pack.clone(), runtime.clone()).await? {
                return Ok(ExitCode::from(1));
            }
        }
        Command::CheckConfig(_) => unreachable!("handled before connecting"),
    }
    Ok(ExitCode::SUCCESS)
}
