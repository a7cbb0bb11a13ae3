//! The garbage collector of builds (DESIGN §4): removes builds that are no longer current once
//! their grace period is over *and* no running process uses them, and the environments of rows
//! that are gone (a pack uninstalled).
//!
//! It touches only what packenvd made and recorded (DESIGN §6): inside an envs root that holds
//! packenvd's marker, in each pack directory, the environments named in that directory's record
//! (`.packenvd-envs`): their `<name>` links, `.<name>-<32 hex>` build directories and
//! `.<name>.switch-<pid>` leftovers. Everything is opened relative to the envs root and removed
//! without following a symlink.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use packenv_core::inuse::dirs_in_use;
use packenv_core::layout::{EnvsRoot, PackDir};
use rustix::fs::FileType;
use sqlx::PgPool;

use crate::store;
use crate::Error;

/// Settings of the collector.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// Root it works under; nothing outside is ever looked at.
    pub envs_root: PathBuf,
    /// How long a superseded build or an orphaned environment is kept before removal.
    pub grace: Duration,
    /// The node whose rows say what to keep: the envs root is that node's disk.
    pub node: String,
}

impl GcConfig {
    pub fn from(s: &crate::config::Settings) -> Self {
        GcConfig {
            envs_root: s.envs_root.clone(),
            grace: s.gc_grace,
            node: s.node_name.clone(),
        }
    }
}

/// Something the collector removes (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for Removal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// What one pass found.
#[derive(Debug, Default)]
pub struct Report {
    pub removed: Vec<Removal>,
    /// Builds past their grace that a running process still uses.
    pub kept_in_use: Vec<Removal>,
    /// Paths that could not be removed.
    pub errors: Vec<Removal>,
    /// Builds and links that will be removable once `gc_grace` has passed since they were
    /// superseded: the reason says when.
    pub waiting: Vec<Removal>,
}

/// Whether `entry` is a build directory name of environment `env`: `.<env>-<32 hex>` (a claim
/// token) or `.<env>-legacy-<pid>`.
fn is_build_of(entry: &str, env: &str) -> bool {
    let Some(rest) = entry
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(env))
        .and_then(|r| r.strip_prefix('-'))
    else {
        return false;
    };
    if let Some(pid) = rest.strip_prefix("legacy-") {
        return !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    }
    rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `entry` is a leftover temporary link of an interrupted switch of `env`.
fn is_switch_leftover_of(entry: &str, env: &str) -> bool {
    entry
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(env))
        .and_then(|r| r.strip_prefix(".switch-"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// One pass: reads what the rows keep alive, then walks the envs root. With `dry_run`, removes
/// nothing and reports what it would remove.
pub async fn run_once(pool: &PgPool, cfg: &GcConfig, dry_run: bool) -> Result<Report, Error> {
    // Rows first, then the disk: a build that starts after this query is younger than the
    // grace, so it is safe even though the query does not know it.
    let rows = store::live_environments(pool, &cfg.node)
        .await
        .map_err(Error::db("reading the environments to keep"))?;
    let root = cfg.envs_root.clone();
    let grace = cfg.grace;
    packenv_core::blocking(move || collect(&root, grace, &rows, dry_run)).await
}

/// A removal candidate: where it is, its pack directory's entry name, why.
struct Candidate {
    pack: String,
    entry: String,
    path: PathBuf,
    reason: String,
}

fn collect(
    root_path: &Path,
    grace: Duration,
    rows: &[store::LiveEnv],
    dry_run: bool,
) -> Result<Report, Error> {
    let io = |what: &str| {
        let what = format!("{what} {}", root_path.display());
        move |e: std::io::Error| Error::Io { what, source: e }
    };
    let root = match EnvsRoot::open(root_path, false) {
        Ok(Some(root)) => root,
        // Nothing was built yet.
        Ok(None) => return Ok(Report::default()),
        Err(e) => {
            return Err(Error::Io {
                what: "the collector cannot use the envs root".into(),
                source: std::io::Error::other(e.to_string()),
            })
        }
    };
    let live_links: HashSet<PathBuf> = rows
        .iter()
        .filter_map(|r| r.env_path.as_ref().map(PathBuf::from))
        .collect();
    let live_builds: HashSet<PathBuf> = rows
        .iter()
        .filter_map(|r| r.build_dir.as_ref().map(PathBuf::from))
        .collect();
    let building: HashSet<String> = rows
        .iter()
        .filter_map(|r| r.building_token.map(|t| t.simple().to_string()))
        .collect();
    // A row not yet claimed has no env_path: its pack's links are not orphans.
    let unplaced_packs: HashSet<&str> = rows
        .iter()
        .filter(|r| r.env_path.is_none())
        .map(|r| r.pack_ref.as_str())
        .collect();

    let mut candidates = Vec::new();
    let mut waiting = Vec::new();
    let mut open_packs: BTreeMap<String, PackDir> = BTreeMap::new();
    for pack_ref in root.packs().map_err(io("cannot list"))? {
        let Ok(Some(pack)) = root.pack_dir(&pack_ref, false) else {
            continue;
        };
        let recorded = pack.recorded().unwrap_or_default();
        if recorded.is_empty() {
            continue;
        }
        let entries = pack.entries().unwrap_or_default();
        for env in &recorded {
            let link = pack.path().join(env);
            let mut keep: Option<String> = None;
            if pack.type_of(env).ok().flatten() == Some(FileType::Symlink) {
                let orphan =
                    !live_links.contains(&link) && !unplaced_packs.contains(pack_ref.as_str());
                let age = pack.age(env);
                if let Some(age) = age.filter(|a| orphan && *a <= grace) {
                    waiting.push(Removal {
                        path: link.clone(),
                        reason: format!(
                            "no pack_environment row names this environment: {}",
                            removable_in(grace - age)
                        ),
                    });
                }
                if orphan && age.is_some_and(|a| a > grace) {
                    candidates.push(Candidate {
                        pack: pack_ref.clone(),
                        entry: env.clone(),
                        path: link.clone(),
                        reason: "no pack_environment row names this environment (pack or runtime removed)".into(),
                    });
                } else {
                    // A current link keeps its build, whatever the rows say.
                    keep = pack.link_target(env);
                }
            }
            for entry in &entries {
                let path = pack.path().join(entry);
                if is_switch_leftover_of(entry, env) && pack.age(entry).is_some_and(|a| a > grace) {
                    candidates.push(Candidate {
                        pack: pack_ref.clone(),
                        entry: entry.clone(),
                        path,
                        reason: "leftover of an interrupted switch".into(),
                    });
                    continue;
                }
                if !is_build_of(entry, env)
                    || keep.as_deref() == Some(entry.as_str())
                    || live_builds.contains(&path)
                    || building.iter().any(|t| entry.ends_with(t.as_str()))
                    || pack.type_of(entry).ok().flatten() != Some(FileType::Directory)
                {
                    continue;
                }
                let Some(age) = pack.age(entry) else {
                    continue;
                };
                if age <= grace {
                    waiting.push(Removal {
                        path,
                        reason: format!(
                            "not current, superseded or abandoned {} ago: {}",
                            rounded(age),
                            removable_in(grace - age)
                        ),
                    });
                    continue;
                }
                candidates.push(Candidate {
                    pack: pack_ref.clone(),
                    entry: entry.clone(),
                    path,
                    reason: format!("not current, superseded or abandoned {} ago", rounded(age)),
                });
            }
        }
        open_packs.insert(pack_ref, pack);
    }
    let mut report = remove_unused(&open_packs, candidates, dry_run);
    report.waiting = waiting;
    if !dry_run {
        for r in &report.removed {
            if let Some(pack) = r
                .path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
            {
                root.remove_pack_if_empty(pack);
            }
        }
    }
    Ok(report)
}

/// A duration to the second, for people.
fn rounded(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

/// `removable in 50m (at 2026-11-27 19:05 UTC)`.
fn removable_in(left: Duration) -> String {
    let at = chrono::Utc::now() + left;
    format!(
        "removable in {} (at {})",
        rounded(left),
        at.format("%Y-%m-%d %H:%M UTC")
    )
}

/// What `packenvd remove` deletes: the rows (on every node), and what of them this node keeps
/// on its disk.
#[derive(Debug)]
pub struct RemovalPlan {
    pub pack_ref: String,
    pub rows: Vec<store::RemovalTarget>,
    /// This node's links and build directories of those rows (`removed`: would be removed), and
    /// builds a running process uses (left for the collector).
    pub disk: Report,
}

/// Reads what `packenvd remove PACK [RUNTIME]` would delete; deletes nothing.
pub async fn plan_removal(
    pool: &PgPool,
    cfg: &GcConfig,
    pack_ref: &str,
    runtime_ref: Option<&str>,
) -> Result<RemovalPlan, Error> {
    let rows = store::removal_targets(pool, &cfg.node, pack_ref, runtime_ref)
        .await
        .map_err(Error::db("reading the environments to remove"))?;
    let env_paths = rows.iter().filter_map(|r| r.env_path.clone()).collect();
    let disk = remove_dirs(cfg, pack_ref, env_paths, true).await;
    Ok(RemovalPlan {
        pack_ref: pack_ref.to_owned(),
        rows,
        disk,
    })
}

/// Deletes the rows of `plan` (those still there) and then their environments on this node's
/// disk, except builds a running process still uses, which the collector removes later. Returns
/// the runtimes deleted.
pub async fn execute_removal(
    pool: &PgPool,
    cfg: &GcConfig,
    plan: &RemovalPlan,
) -> Result<(Vec<String>, Report), Error> {
    let ids: Vec<i64> = plan.rows.iter().map(|r| r.id).collect();
    let deleted = store::remove(pool, &cfg.node, &ids)
        .await
        .map_err(Error::db("deleting the rows"))?;
    let names = deleted.iter().map(|(runtime, _)| runtime.clone()).collect();
    let env_paths = deleted.into_iter().filter_map(|(_, p)| p).collect();
    Ok((
        names,
        remove_dirs(cfg, &plan.pack_ref, env_paths, false).await,
    ))
}

/// `packenvd remove` without a look first: deletes the rows and their environments at once.
pub async fn remove(
    pool: &PgPool,
    cfg: &GcConfig,
    pack_ref: &str,
    runtime_ref: Option<&str>,
) -> Result<(Vec<String>, Report), Error> {
    let plan = plan_removal(pool, cfg, pack_ref, runtime_ref).await?;
    execute_removal(pool, cfg, &plan).await
}

/// Removes (or with `dry_run` lists) this node's links and build directories of the
/// environments at `env_paths` of one pack, then the pack's directory if that left it empty.
/// Only environments recorded in the pack's own directory are touched: a row that names
/// another pack's directory removes nothing.
async fn remove_dirs(
    cfg: &GcConfig,
    pack_ref: &str,
    env_paths: Vec<String>,
    dry_run: bool,
) -> Report {
    let (root_path, pack_ref) = (cfg.envs_root.clone(), pack_ref.to_owned());
    packenv_core::blocking(move || {
        let Ok(Some(root)) = EnvsRoot::open(&root_path, false) else {
            return Report::default();
        };
        let Ok(Some(pack)) = root.pack_dir(&pack_ref, false) else {
            return Report::default();
        };
        let recorded = pack.recorded().unwrap_or_default();
        let entries = pack.entries().unwrap_or_default();
        let mut candidates = Vec::new();
        for env_path in &env_paths {
            let env_path = Path::new(env_path);
            let Some(env) = env_path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|_| env_path.parent() == Some(pack.path()))
                .filter(|n| recorded.iter().any(|r| r == n))
            else {
                continue;
            };
            for entry in entries
                .iter()
                .filter(|e| *e == env || is_build_of(e, env) || is_switch_leftover_of(e, env))
            {
                candidates.push(Candidate {
                    pack: pack_ref.clone(),
                    entry: entry.clone(),
                    path: pack.path().join(entry),
                    reason: "removed on request".into(),
                });
            }
        }
        let packs = BTreeMap::from([(pack_ref.clone(), pack)]);
        let report = remove_unused(&packs, candidates, dry_run);
        if !dry_run {
            drop(packs);
            root.remove_pack_if_empty(&pack_ref);
        }
        report
    })
    .await
}

/// Removes each candidate no running process uses (or, with `dry_run`, only reports it),
/// relative to its open pack directory.
fn remove_unused(
    packs: &BTreeMap<String, PackDir>,
    candidates: Vec<Candidate>,
    dry_run: bool,
) -> Report {
    let mut report = Report::default();
    let dirs: Vec<PathBuf> = candidates
        .iter()
        .filter(|c| {
            packs
                .get(&c.pack)
                .and_then(|p| p.type_of(&c.entry).ok().flatten())
                == Some(FileType::Directory)
        })
        .map(|c| c.path.clone())
        .collect();
    let in_use = dirs_in_use(&dirs);
    for c in candidates {
        if let Some(users) = in_use.get(&c.path) {
            report.kept_in_use.push(Removal {
                path: c.path,
                reason: format!("still in use: {}", users.join(", ")),
            });
            continue;
        }
        let removal = Removal {
            path: c.path,
            reason: c.reason,
        };
        if dry_run {
            report.removed.push(removal);
            continue;
        }
        let Some(pack) = packs.get(&c.pack) else {
            continue;
        };
        match pack.remove(&c.entry) {
            Ok(()) => report.removed.push(removal),
            Err(e) => report.errors.push(Removal {
                reason: format!("cannot remove: {e}"),
                ..removal
            }),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packenvd_names_of_a_recorded_environment_are_its_builds() {
        assert!(is_build_of(
            ".python-0123456789abcdef0123456789abcdef",
            "python"
        ));
        assert!(is_build_of(
            ".node.js-0123456789abcdef0123456789abcdef",
            "node.js"
        ));
        assert!(is_build_of(".python-legacy-1234", "python"));
        for not in [
            "python",
            ".python",
            ".python-123",
            ".cache",
            ".python-0123456789abcdef0123456789abcdeg",
            "-0123456789abcdef0123456789abcdef",
            ".node-0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_build_of(not, "python"), "{not}");
        }
        assert!(is_switch_leftover_of(".python.switch-42", "python"));
        assert!(!is_switch_leftover_of("python.switch-42", "python"));
        assert!(!is_switch_leftover_of(".node.switch-42", "python"));
    }
}
