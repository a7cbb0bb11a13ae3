//! The command line: every command, flag and argument with its help. `--help`, the man page
//! (`packenvd man`) and the shell completions (`packenvd completions`) are all made from these
//! definitions, so each one carries its doc comment.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::SettingFlags;
use crate::logging::LogFormat;
use crate::store::Status;

/// The exit statuses, as `--help` and the man page print them (the README has the same table).
pub const EXIT_STATUS: &str = "\
Exit status:
  0  done; every environment shown or waited for is well
  1  something is wrong: an environment shown or waited for is failed or broken (status,
     logs, request --wait, rebuild --wait, verify), a build of run --until-done failed, a
     check of check-config --connect failed, or packenvd could not do it (the database
     unreachable or a statement refused, a path that could not be removed; run: stopped on
     an error)
  2  usage or configuration: an unknown command, flag, value, pack, runtime or node (the
     message lists the valid ones), a bad config file, remove without --yes off a terminal
  4  --wait or --follow gave up after --timeout";

#[derive(Debug, Parser)]
#[command(
    name = "packenvd",
    version,
    about = "Builds and keeps an isolated environment per pack and runtime, driven by PostgreSQL",
    after_help = EXIT_STATUS
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// What every command that reads the configuration takes, before its name or after it.
#[derive(Debug, Clone, Default, Args)]
pub struct Common {
    /// Config file (TOML). Default: /etc/packenvd/packenvd.toml when it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations (as the owner of the schema).
    #[command(after_help = EXIT_STATUS)]
    Migrate(Plain),
    /// Run the daemon: claim pending and outdated rows and build their environments.
    #[command(after_help = EXIT_STATUS)]
    Run(RunArgs),
    /// Show environments as a table (or JSON): what each is doing or why it failed, and the
    /// nodes' last heartbeats. Exit status 1 when a row shown is failed.
    #[command(after_help = EXIT_STATUS)]
    Status(StatusArgs),
    /// Show the nodes: name, last seen, what each can build, its rows by status.
    #[command(after_help = EXIT_STATUS)]
    Nodes(NodesArgs),
    /// Operate on one node.
    #[command(subcommand)]
    #[command(after_help = EXIT_STATUS)]
    Node(NodeCommand),
    /// Ask for an environment (what a pack install does): creates the row or sends it back to
    /// pending. A current build whose inputs are unchanged answers it without rebuilding.
    #[command(after_help = EXIT_STATUS)]
    Request(RequestArgs),
    /// Force a rebuild from scratch: reset environments to pending.
    #[command(after_help = EXIT_STATUS)]
    Rebuild(RebuildArgs),
    /// Print the install log and the error of one environment.
    #[command(after_help = EXIT_STATUS)]
    Logs(LogsArgs),
    /// Print the effective configuration as a config file that loads back: every setting,
    /// its value and where it came from, secrets masked.
    #[command(after_help = EXIT_STATUS)]
    CheckConfig(CheckConfigArgs),
    /// Remove superseded and orphaned builds now (what the daemon does every gc_interval).
    #[command(after_help = EXIT_STATUS)]
    Gc(GcArgs),
    /// Delete environments on purpose: their rows (on every node) and their directories (on
    /// this node; the other nodes' collectors remove theirs).
    #[command(after_help = EXIT_STATUS)]
    Remove(RemoveArgs),
    /// Verify ready environments now; exit status 1 when any was found broken (it is then
    /// `outdated` and a running daemon rebuilds it) or could not be checked on this host, 2
    /// when the checks may not run as configured (a build user without the capabilities).
    #[command(after_help = EXIT_STATUS)]
    Verify(VerifyArgs),
    /// Print a completion script for a shell (e.g. `packenvd completions bash >
    /// /etc/bash_completion.d/packenvd`).
    #[command(after_help = EXIT_STATUS)]
    Completions(CompletionsArgs),
    /// Print the man page (roff), made from this command line's definition.
    #[command(after_help = EXIT_STATUS)]
    Man(ManArgs),
}

/// A command with no arguments of its own.
#[derive(Debug, Clone, Args)]
pub struct Plain {
    #[command(flatten)]
    pub common: Common,
}

/// `packenvd run`'s own flags and the setting flags.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// Exit once no row is pending, outdated or installing (for batch jobs and the demo).
    #[arg(long)]
    pub until_done: bool,
    #[command(flatten)]
    pub settings: SettingFlags,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Only this pack's environments.
    #[arg(long, value_name = "PACK")]
    pub pack: Option<String>,
    /// Only environments in this status.
    #[arg(long, value_enum)]
    pub status: Option<Status>,
    /// One node's rows (its paths, steps and errors) instead of the summary over nodes.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Print JSON instead of a table: every row with all its fields.
    #[arg(long, conflicts_with = "wide")]
    pub json: bool,
    /// Every column, each cell whole, however wide the terminal (by default the table fits
    /// the terminal's width).
    #[arg(long)]
    pub wide: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct NodesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

/// `packenvd node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Forget a node (it was retired): its rows go, and environments stop waiting for it.
    /// Nothing on any disk is touched.
    #[command(after_help = EXIT_STATUS)]
    Forget(ForgetArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ForgetArgs {
    /// The node's name (`packenvd nodes` lists them).
    pub name: String,
    #[command(flatten)]
    pub common: Common,
}

/// Following a build until it ends.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Follow the build until it ends: each step, the time it takes and the last line of
    /// output; exit status 0 when ready, 1 when failed (the error is printed).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (e.g. 30m) with exit status 4; the build goes on.
    #[arg(long, value_name = "DURATION", requires = "wait", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// The pack's ref (`pack.ref`).
    pub pack: String,
    /// The runtime's ref (`runtime.ref`, e.g. core.python).
    pub runtime: String,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    /// The pack whose environments to rebuild; with --failed it may be left out, to reset
    /// every failed environment.
    pub pack: Option<String>,
    /// Only the pack's environment of this runtime (default: all of the pack's).
    pub runtime: Option<String>,
    /// Only environments that are `failed`.
    #[arg(long)]
    pub failed: bool,
    /// Only on this node (the other nodes keep their builds).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// The pack.
    pub pack: String,
    /// The runtime; may be left out when the pack has one environment.
    pub runtime: Option<String>,
    /// That node's build (default: the one building now, else the last node's).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Keep printing the log as it grows until the build ends; exit status 0 when ready, 1
    /// when failed.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// With --follow: give up after this long (e.g. 30m) with exit status 4.
    #[arg(long, value_name = "DURATION", requires = "follow", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct CheckConfigArgs {
    /// Also check this host against the configuration: the database (reachable, migrated,
    /// the role's rights), the directories (exist, writable, the envs root owned by this
    /// user) and each runtime's commands on PATH. The results follow the file as comments;
    /// exit status 1 when one failed.
    #[arg(long)]
    pub connect: bool,
    #[command(flatten)]
    pub settings: SettingFlags,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// List what would be removed and why, and what waits out gc_grace and when it becomes
    /// removable; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct RemoveArgs {
    /// The pack whose environments to delete.
    pub pack: String,
    /// Only the pack's environment of this runtime (default: all of the pack's).
    pub runtime: Option<String>,
    /// List the rows and directories that would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete without asking (needed when stdin is not a terminal).
    #[arg(long, short = 'y', conflicts_with = "dry_run")]
    pub yes: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Every ready environment, whatever the age of its last check.
    #[arg(long, conflicts_with_all = ["stale", "pack"])]
    pub all: bool,
    /// Only environments whose last check is older than verify_max_age (the default).
    #[arg(long, conflicts_with = "pack")]
    pub stale: bool,
    /// Only this pack's environments (any age).
    pub pack: Option<String>,
    /// Only the pack's environment of this runtime.
    pub runtime: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write packenvd.1 and a page per command (packenvd-status.1, ...) into this directory
    /// instead of printing packenvd.1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

impl Command {
    /// The setting flags given to this command.
    pub fn setting_flags(&self) -> std::collections::BTreeMap<&'static str, String> {
        match self {
            Command::Run(a) => a.settings.0.clone(),
            Command::CheckConfig(a) => a.settings.0.clone(),
            _ => Default::default(),
        }
    }

    /// The `--config` and `--log-format` given after the command's name; `None` for the
    /// commands that read no configuration.
    pub fn common(&self) -> Option<&Common> {
        Some(match self {
            Command::Migrate(a) => &a.common,
            Command::Run(a) => &a.common,
            Command::Status(a) => &a.common,
            Command::Nodes(a) => &a.common,
            Command::Node(NodeCommand::Forget(a)) => &a.common,
            Command::Request(a) => &a.common,
            Command::Rebuild(a) => &a.common,
            Command::Logs(a) => &a.common,
            Command::CheckConfig(a) => &a.common,
            Command::Gc(a) => &a.common,
            Command::Remove(a) => &a.common,
            Command::Verify(a) => &a.common,
            Command::Completions(_) | Command::Man(_) => return None,
        })
    }
}

impl Cli {
    /// `--config` and `--log-format`, from before or after the command's name. A flag given in
    /// both places, or to a command that reads no configuration, is an error: one of them
    /// would be ignored.
    pub fn common(&self) -> Result<Common, clap::Error> {
        use clap::CommandFactory;
        let conflict = |what: &str| {
            Cli::command().error(clap::error::ErrorKind::ArgumentConflict, what.to_owned())
        };
        let top = &self.common;
        let Some(sub) = self.command.common() else {
            if top.config.is_some() || top.log_format.is_some() {
                return Err(conflict(
                    "--config and --log-format do not apply to this command: it reads no configuration",
                ));
            }
            return Ok(Common::default());
        };
        if top.config.is_some() && sub.config.is_some() {
            return Err(conflict(
                "--config is given twice (before and after the command)",
            ));
        }
        if top.log_format.is_some() && sub.log_format.is_some() {
            return Err(conflict(
                "--log-format is given twice (before and after the command)",
            ));
        }
        Ok(Common {
            config: sub.config.clone().or_else(|| top.config.clone()),
            log_format: sub.log_format.or(top.log_format),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_argument_of_every_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "packenvd", &mut missing);
        assert_eq!(missing, Vec::<String>::new(), "without help");
    }

    #[test]
    fn a_flag_that_would_be_ignored_is_refused() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).and_then(|c| c.common());
        assert!(
            parse(&["packenvd", "--config", "a.toml", "status", "--config", "b.toml"]).is_err()
        );
        assert!(parse(&["packenvd", "--config", "a.toml", "completions", "bash"]).is_err());
        assert!(parse(&["packenvd", "completions", "bash", "--config", "a.toml"]).is_err());
        assert!(parse(&["packenvd", "status", "--json", "--wide"]).is_err());
        assert!(parse(&["packenvd", "verify", "--stale", "p"]).is_err());
        assert!(parse(&["packenvd", "request", "p", "r", "--timeout", "1m"]).is_err());
        assert!(parse(&["packenvd", "remove", "p", "--dry-run", "--yes"]).is_err());
        // Parsed; the command refuses it, naming --failed (tests/cli.rs).
        assert!(parse(&["packenvd", "rebuild"]).is_ok());
        let c = parse(&[
            "packenvd",
            "--log-format",
            "json",
            "run",
            "--config",
            "a.toml",
        ])
        .unwrap();
        assert_eq!(c.config.as_deref(), Some(std::path::Path::new("a.toml")));
        assert_eq!(c.log_format, Some(LogFormat::Json));
    }
}
