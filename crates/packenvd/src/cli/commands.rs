//! The operator commands other than `status`, `nodes` and following builds, and the checks
//! that turn an unknown pack, runtime or node into a usage error that lists the valid ones.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use sqlx::PgPool;

use super::{explain, follow, usage, Cli, Exit};
use super::{LogsArgs, RebuildArgs, RemoveArgs, RequestArgs, VerifyArgs};
use crate::config::Settings;
use crate::store::{self, Status};

/// How many valid choices an error lists before it says how many more there are.
const CHOICES_SHOWN: usize = 20;

/// `a, b, c`, or `a, b, … (20 of 1234)`; `none` for none.
pub(super) fn choices(items: &[String], total: i64) -> String {
    if items.is_empty() {
        return "none".into();
    }
    let shown: Vec<&str> = items
        .iter()
        .take(CHOICES_SHOWN)
        .map(String::as_str)
        .collect();
    if total as usize > shown.len() {
        format!(
            "{}, … ({} of {total}; packenvd status lists them)",
            shown.join(", "),
            shown.len()
        )
    } else {
        shown.join(", ")
    }
}

/// The runtimes of `pack`'s environments; an unknown pack is a usage error that lists the
/// packs that have environments.
pub(super) async fn runtimes_of(pool: &PgPool, pack: &str) -> anyhow::Result<Vec<String>> {
    let runtimes = store::runtimes_of(pool, pack)
        .await
        .context("reading pack_environment")?;
    if runtimes.is_empty() {
        let (packs, total) = store::packs_with_environments(pool, CHOICES_SHOWN as i64)
            .await
            .context("reading pack_environment")?;
        return Err(usage(format!(
            "pack {pack:?} has no environment; packs with environments: {}",
            choices(&packs, total)
        )));
    }
    Ok(runtimes)
}

/// Checks that `pack` has an environment of `runtime` (when given), naming the pack's runtimes
/// when it has not.
async fn check_environment(pool: &PgPool, pack: &str, runtime: Option<&str>) -> anyhow::Result<()> {
    let runtimes = runtimes_of(pool, pack).await?;
    match runtime {
        Some(r) if !runtimes.iter().any(|x| x == r) => Err(usage(format!(
            "pack {pack} has no environment of runtime {r:?}; its runtimes: {}",
            runtimes.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The runtime of the one environment meant: the one given, or the pack's only one.
async fn one_runtime(pool: &PgPool, pack: &str, runtime: Option<&str>) -> anyhow::Result<String> {
    check_environment(pool, pack, runtime).await?;
    if let Some(r) = runtime {
        return Ok(r.to_owned());
    }
    let mut runtimes = runtimes_of(pool, pack).await?;
    if runtimes.len() > 1 {
        return Err(usage(format!(
            "pack {pack} has {} environments: name the runtime, one of {}",
            runtimes.len(),
            runtimes.join(", ")
        )));
    }
    Ok(runtimes.remove(0))
}

/// Checks that a node of that name exists, naming the nodes when it does not.
async fn check_node(pool: &PgPool, node: &str) -> anyhow::Result<()> {
    let nodes = store::liveness(pool)
        .await
        .context("reading packenvd_node")?;
    if nodes.iter().any(|n| n.name == node) {
        return Ok(());
    }
    let names: Vec<String> = nodes.into_iter().map(|n| n.name).collect();
    Err(usage(format!(
        "no node named {node:?}; the nodes: {}",
        choices(&names, names.len() as i64)
    )))
}

/// A database error raised by our SQL functions carries a message meant for people.
fn db_message(e: sqlx::Error) -> anyhow::Error {
    match e.as_database_error() {
        Some(db) => anyhow::anyhow!("{}", db.message()),
        None => e.into(),
    }
}

/// `packenvd request PACK RUNTIME [--wait]`.
pub async fn request(pool: &PgPool, a: &RequestArgs) -> anyhow::Result<Exit> {
    let since = store::now(pool).await.context("reading the clock")?;
    let (id, status) = match store::request(pool, &a.pack, &a.runtime).await {
        Ok(r) => r,
        // request_pack_environment() raises no_data_found for an unknown pack or runtime.
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("P0002") => {
            let message = e.as_database_error().map(|d| d.message().to_owned());
            let message = message.unwrap_or_default();
            let (kind, (refs, total)) = if message.contains("runtime") {
                (
                    "runtimes",
                    store::runtime_refs(pool, CHOICES_SHOWN as i64).await?,
                )
            } else {
                ("packs", store::pack_refs(pool, CHOICES_SHOWN as i64).await?)
            };
            return Err(usage(format!(
                "{message}; the {kind}: {}",
                choices(&refs, total)
            )));
        }
        Err(e) => return Err(db_message(e)),
    };
    println!(
        "{} {}: {status} (pack_environment.id = {id})",
        a.pack, a.runtime
    );
    if !a.wait.wait {
        return Ok(Exit::Ok);
    }
    follow::wait(pool, &[id], since, a.wait.timeout).await
}

/// `packenvd rebuild`.
pub async fn rebuild(pool: &PgPool, a: &RebuildArgs) -> anyhow::Result<Exit> {
    // Checked here rather than by clap, whose message would name only <PACK>.
    if a.pack.is_none() && !a.failed {
        return Err(usage(
            "rebuild needs a PACK (and optionally its RUNTIME), or --failed to reset every \
             failed environment",
        ));
    }
    if let Some(pack) = &a.pack {
        check_environment(pool, pack, a.runtime.as_deref()).await?;
    }
    if let Some(node) = &a.node {
        check_node(pool, node).await?;
    }
    let since = store::now(pool).await.context("reading the clock")?;
    let (pack, runtime) = (a.pack.as_deref(), a.runtime.as_deref());
    let rows = match &a.node {
        None => store::rebuild(pool, pack, runtime, a.failed).await?,
        Some(node) => store::rebuild_on_node(pool, node, pack, runtime, a.failed).await?,
    };
    if rows.is_empty() {
        if a.failed {
            println!("no failed environment to reset");
            return Ok(Exit::Ok);
        }
        return Err(usage(format!(
            "node {} has no row of pack {}{}",
            a.node.as_deref().unwrap_or("?"),
            pack.unwrap_or("?"),
            runtime
                .map(|r| format!(" and runtime {r}"))
                .unwrap_or_default()
        )));
    }
    for (_, p, r) in &rows {
        println!("{p} {r}: reset to pending");
    }
    if !a.wait.wait {
        return Ok(Exit::Ok);
    }
    let ids: Vec<i64> = rows.iter().map(|(id, _, _)| *id).collect();
    follow::wait(pool, &ids, since, a.wait.timeout).await
}

/// Which row's log `logs` shows: the node's given; else a node's building now, the only node's,
/// or the summary's (the last node's to write).
fn pick(rows: &[store::Logs], node: Option<&str>) -> Option<store::Logs> {
    let (summary, nodes) = rows.split_first()?;
    if let Some(node) = node {
        return nodes
            .iter()
            .find(|l| l.node.as_deref() == Some(node))
            .cloned();
    }
    if let [only] = nodes {
        return Some(only.clone());
    }
    nodes
        .iter()
        .find(|l| l.status == Status::Installing)
        .cloned()
        .or_else(|| {
            let mut s = summary.clone();
            // The summary's node is the last to write; the log is that node's.
            s.node = s.node.filter(|_| !nodes.is_empty());
            Some(s)
        })
}

/// `packenvd logs PACK [RUNTIME] [--node N] [--follow]`.
pub async fn logs(pool: &PgPool, a: &LogsArgs) -> anyhow::Result<Exit> {
    let runtime = one_runtime(pool, &a.pack, a.runtime.as_deref()).await?;
    if let Some(node) = &a.node {
        check_node(pool, node).await?;
    }
    if a.follow {
        return follow::follow_log(pool, &a.pack, &runtime, a.node.as_deref(), a.timeout).await;
    }
    let rows = store::logs(pool, &a.pack, &runtime)
        .await
        .context("reading the log")?;
    let nodes = rows.len().saturating_sub(1);
    let Some(l) = pick(&rows, a.node.as_deref()) else {
        return Err(usage(format!(
            "node {} has no row of {} {runtime}",
            a.node.as_deref().unwrap_or("?"),
            a.pack
        )));
    };
    let on = match (&l.node, nodes) {
        (Some(n), 0 | 1) => format!(" (node {n})"),
        (Some(n), _) => format!(" (node {n}; --node NAME for another of its {nodes} nodes)"),
        (None, _) => String::new(),
    };
    println!(
        "{} {runtime}: {}{on}, attempt {}",
        a.pack, l.status, l.attempts
    );
    print_log_and_error(&l);
    Ok(if l.status == Status::Failed {
        Exit::Unwell
    } else {
        Exit::Ok
    })
}

/// The log, then the error without the output tail the log already shows.
pub(super) fn print_log_and_error(l: &store::Logs) {
    println!(
        "--- install log ---\n{}",
        l.install_log.as_deref().unwrap_or("(none yet)").trim_end()
    );
    if let Some(e) = &l.install_error {
        let (head, tail) = explain::without_tail(e, l.install_log.as_deref());
        println!("--- error ---\n{head}");
        if let Some(tail) = tail {
            println!("--- output tail ---\n{tail}");
        }
    }
}

/// `packenvd node forget NAME`.
pub async fn forget(pool: &PgPool, name: &str) -> anyhow::Result<Exit> {
    check_node(pool, name).await?;
    if !store::forget_node(pool, name).await? {
        return Err(usage(format!("no node named {name:?}")));
    }
    println!("node {name} forgotten: its rows are gone; nothing on disk was touched");
    Ok(Exit::Ok)
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
pub async fn gc(pool: &PgPool, settings: &Settings, dry_run: bool) -> anyhow::Result<Exit> {
    let report = crate::gc::run_once(pool, &crate::gc::GcConfig::from(settings), dry_run).await?;
    print_report(&report, if dry_run { "would remove" } else { "removed" });
    if dry_run {
        for r in &report.waiting {
            println!("waiting {r}");
        }
    }
    if report.removed.is_empty() && report.kept_in_use.is_empty() {
        println!("nothing to remove");
    }
    if !report.errors.is_empty() {
        eprintln!(
            "packenvd: {} path(s) could not be removed",
            report.errors.len()
        );
        return Ok(Exit::Trouble);
    }
    Ok(Exit::Ok)
}

/// `packenvd remove PACK [RUNTIME] [--dry-run] [--yes]`.
pub async fn remove(pool: &PgPool, settings: &Settings, a: &RemoveArgs) -> anyhow::Result<Exit> {
    check_environment(pool, &a.pack, a.runtime.as_deref()).await?;
    let cfg = crate::gc::GcConfig::from(settings);
    let plan = crate::gc::plan_removal(pool, &cfg, &a.pack, a.runtime.as_deref()).await?;
    let verb = if a.dry_run { "would delete" } else { "deletes" };
    println!(
        "{verb} {} environment row(s) of pack {}, on every node:",
        plan.rows.len(),
        a.pack
    );
    for r in &plan.rows {
        println!(
            "  {} {} ({}, {} node row(s))",
            a.pack, r.runtime_ref, r.status, r.node_rows
        );
    }
    if plan.disk.removed.is_empty() && plan.disk.kept_in_use.is_empty() {
        println!("and nothing on this node's disk ({})", cfg.node);
    } else {
        println!("and on this node's disk ({}):", cfg.node);
        for r in &plan.disk.removed {
            println!("  {}", r.path.display());
        }
        for r in &plan.disk.kept_in_use {
            println!(
                "  {} is {}: left for the collector",
                r.path.display(),
                r.reason
            );
        }
    }
    if plan.rows.iter().any(|r| r.node_rows > 1) {
        println!("(other nodes remove their copies at their next garbage collection)");
    }
    if a.dry_run {
        return Ok(Exit::Ok);
    }
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(usage(
                "refusing to delete without confirmation: stdin is not a terminal; pass --yes \
                 (or --dry-run to list what would go)",
            ));
        }
        print!("Delete? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            println!("nothing deleted");
            return Ok(Exit::Ok);
        }
    }
    let (runtimes, report) = crate::gc::execute_removal(pool, &cfg, &plan).await?;
    for r in &runtimes {
        println!("{} {r}: row deleted", a.pack);
    }
    print_report(&report, "removed");
    if !report.errors.is_empty() {
        return Ok(Exit::Trouble);
    }
    Ok(Exit::Ok)
}

/// `packenvd verify`: exit status 1 when anything was found broken or could not be checked.
pub async fn verify(pool: &PgPool, settings: &Settings, a: &VerifyArgs) -> anyhow::Result<Exit> {
    use crate::verify::Scope;
    if let Some(pack) = &a.pack {
        check_environment(pool, pack, a.runtime.as_deref()).await?;
    }
    if let Err(e) = may_verify(settings).await {
        eprintln!("packenvd: refusing to verify: {e}");
        return Ok(Exit::Usage);
    }
    let scope = match (a.all, &a.pack) {
        (true, _) => Scope::All,
        (false, Some(pack)) => Scope::Pack {
            pack: pack.clone(),
            runtime: a.runtime.clone(),
        },
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
    Ok(if broken > 0 || unchecked > 0 {
        Exit::Unwell
    } else {
        Exit::Ok
    })
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

/// `packenvd completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "packenvd",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}

/// `packenvd man [--out-dir DIR]`.
pub fn man(out_dir: Option<&Path>) -> ExitCode {
    let result = match out_dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("packenvd: cannot write the man page: {e}");
            Exit::Trouble.into()
        }
    }
}
