//! `packenvd check-config --connect`: this host against its configuration, before the daemon
//! meets the same problems one at a time in its journal. Each finding is a comment line after
//! the printed config, so the output still loads back as a config file.

use std::path::Path;

use sqlx::PgPool;

use super::Exit;
use crate::config::Settings;
use crate::error::chain;
use crate::store;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Not in the way now, but worth knowing (a directory the daemon will create).
    Note,
    Fail,
}

#[derive(Default)]
struct Findings {
    lines: Vec<(Outcome, String)>,
}

impl Findings {
    fn add(&mut self, outcome: Outcome, text: impl Into<String>) {
        self.lines.push((outcome, text.into()));
    }

    fn print(&self) -> Exit {
        println!();
        println!("# --- check-config --connect ---");
        for (outcome, text) in &self.lines {
            let tag = match outcome {
                Outcome::Ok => "ok  ",
                Outcome::Note => "note",
                Outcome::Fail => "FAIL",
            };
            // One finding may span lines (a cause chain): every line stays a comment.
            for (i, line) in text.lines().enumerate() {
                if i == 0 {
                    println!("# {tag} {line}");
                } else {
                    println!("#      {line}");
                }
            }
        }
        let failed = self
            .lines
            .iter()
            .filter(|(o, _)| *o == Outcome::Fail)
            .count();
        if failed == 0 {
            println!("# all checks passed");
            Exit::Ok
        } else {
            println!("# {failed} check(s) failed");
            Exit::Unwell
        }
    }
}

/// Runs the checks and prints them; `pool` is the connection attempt's result.
pub async fn connect(settings: &Settings, pool: anyhow::Result<PgPool>) -> Exit {
    let mut f = Findings::default();
    let url = store::describe_url(settings.database_url.expose());
    match pool {
        Err(e) => {
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            f.add(Outcome::Fail, format!("database: {}", chain(e)));
        }
        Ok(pool) => database(&mut f, &pool, &url, settings).await,
    }
    directories(&mut f, settings);
    f.print()
}

async fn database(f: &mut Findings, pool: &PgPool, url: &str, settings: &Settings) {
    match store::server_version(pool).await {
        Ok(v) => f.add(
            Outcome::Ok,
            format!("database: reachable at {url} (PostgreSQL {v})"),
        ),
        Err(e) => {
            f.add(
                Outcome::Fail,
                format!(
                    "database: connected to {url} but cannot query it: {}",
                    chain(&e)
                ),
            );
            return;
        }
    }
    // None: could not be read (the rights check below says which are missing).
    let migrated = match store::unapplied_migrations(pool).await {
        Ok(pending) if pending.is_empty() => {
            f.add(
                Outcome::Ok,
                "database: migrated (every migration of this binary is applied)",
            );
            Some(true)
        }
        Ok(pending) => {
            let versions: Vec<String> = pending.iter().map(i64::to_string).collect();
            f.add(
                Outcome::Fail,
                format!(
                    "database: not migrated: {} migration(s) pending ({}); run `packenvd migrate` \
                     as the schema's owner",
                    pending.len(),
                    versions.join(", ")
                ),
            );
            Some(false)
        }
        Err(e) => {
            f.add(
                Outcome::Fail,
                format!("database: cannot read _sqlx_migrations: {}", chain(&e)),
            );
            None
        }
    };
    match store::missing_privileges(pool).await {
        Ok(missing) if missing.is_empty() => f.add(
            Outcome::Ok,
            "database: the role has every right the daemon uses (docs/operations.md, \
             \"The database role\")",
        ),
        Ok(missing) => f.add(
            Outcome::Fail,
            format!(
                "database: the role lacks {}{}",
                missing.join(", "),
                if migrated == Some(false) {
                    " (migrate first)"
                } else {
                    "; apply deploy/db-role.sql as the schema's owner"
                }
            ),
        ),
        Err(e) => f.add(
            Outcome::Fail,
            format!("database: cannot read the role's rights: {}", chain(&e)),
        ),
    }
    if migrated != Some(true) {
        return;
    }
    match crate::node::detect(pool, settings).await {
        Ok((runtimes, _)) => runtime_commands(f, &runtimes),
        Err(e) => f.add(
            Outcome::Fail,
            format!("runtimes: cannot read them: {}", chain(&e)),
        ),
    }
}

/// Each runtime's commands, as the daemon finds them on the steps' PATH at its start.
fn runtime_commands(f: &mut Findings, runtimes: &serde_json::Value) {
    let Some(runtimes) = runtimes.as_object() else {
        return;
    };
    if runtimes.is_empty() {
        f.add(Outcome::Note, "runtimes: the runtime table is empty");
    }
    for (name, r) in runtimes {
        let missing: Vec<&str> = r["missing"]
            .as_array()
            .map(|m| m.iter().filter_map(|c| c.as_str()).collect())
            .unwrap_or_default();
        if missing.is_empty() {
            let found: Vec<String> = r["commands"]
                .as_object()
                .map(|c| {
                    c.iter()
                        .map(|(cmd, at)| format!("{cmd} ({})", at.as_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            let found = if found.is_empty() {
                "runs no command of its own".to_owned()
            } else {
                format!("found {}", found.join(", "))
            };
            f.add(Outcome::Ok, format!("runtime {name}: {found}"));
        } else {
            f.add(
                Outcome::Fail,
                format!(
                    "runtime {name}: not found on this host's PATH: {} (its environments are \
                     not built here)",
                    missing.join(", ")
                ),
            );
        }
    }
}

fn directories(f: &mut Findings, settings: &Settings) {
    dir(f, "envs_root", &settings.envs_root, true, true);
    dir(f, "cache_dir", &settings.cache_dir, true, false);
    dir(f, "packs_dir", &settings.packs_dir, false, false);
}

/// One directory: it exists, and is writable (a file is really created and removed, which
/// also finds read-only mounts) and owned by this user when the daemon needs that.
fn dir(f: &mut Findings, key: &str, path: &Path, writable: bool, owned: bool) {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && writable => {
            // The daemon creates it at start when it may.
            let parent = path.parent().unwrap_or(Path::new("/"));
            if probe_write(parent).is_ok() {
                f.add(
                    Outcome::Note,
                    format!("{key} {shown}: does not exist; the daemon creates it at start"),
                );
            } else {
                f.add(
                    Outcome::Fail,
                    format!(
                        "{key} {shown}: does not exist, and {} is not writable to create it",
                        parent.display()
                    ),
                );
            }
            return;
        }
        Err(e) => {
            f.add(Outcome::Fail, format!("{key} {shown}: {e}"));
            return;
        }
    };
    if !meta.is_dir() {
        f.add(Outcome::Fail, format!("{key} {shown}: not a directory"));
        return;
    }
    let mut problems = Vec::new();
    let mut good = vec!["exists"];
    if writable {
        match probe_write(path) {
            Ok(()) => good.push("writable"),
            Err(e) => problems.push(format!("not writable by this user ({e})")),
        }
    } else {
        match std::fs::read_dir(path) {
            Ok(_) => good.push("readable"),
            Err(e) => problems.push(format!("not readable by this user ({e})")),
        }
    }
    if owned {
        use std::os::unix::fs::MetadataExt;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() == me {
            good.push("owned by this user");
        } else {
            problems.push(format!(
                "owned by uid {}, not this user (uid {me}): the daemon refuses an envs root \
                 that is not its own",
                meta.uid()
            ));
        }
    }
    if problems.is_empty() {
        f.add(Outcome::Ok, format!("{key} {shown}: {}", good.join(", ")));
    } else {
        f.add(
            Outcome::Fail,
            format!("{key} {shown}: {}", problems.join("; ")),
        );
    }
}

fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".packenvd-check-config.{}", std::process::id()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}
