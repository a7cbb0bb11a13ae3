//! The garbage collector of builds (DESIGN §4): removes builds that are no longer current once
//! their grace period is over *and* no running process uses them, and the environments of rows
//! that are gone (a pack uninstalled). It touches only what packenvd created under the envs
//! root: `<pack>/<name>` symlinks and `<pack>/.<name>-<id>` build directories.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use packenv_core::inuse::dirs_in_use;
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
}

impl GcConfig {
    pub fn from(s: &crate::config::Settings) -> Self {
        GcConfig {
            envs_root: s.envs_root.clone(),
            grace: s.gc_grace,
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
}

/// A build directory name: `.<name>-<32 hex>` (a claim token) or `.<name>-legacy-<pid>`.
fn is_build_dir_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    if let Some((_, pid)) = rest.rsplit_once("-legacy-") {
        return !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    }
    rest.rsplit_once('-').is_some_and(|(n, id)| {
        !n.is_empty() && id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// A leftover temporary link of an interrupted switch: `.<name>.switch-<pid>`.
fn is_switch_leftover(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".switch-")
            .is_some_and(|(_, pid)| pid.bytes().all(|b| b.is_ascii_digit()))
}

fn age(meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default()
}

/// One pass: reads what the rows keep alive, then walks the envs root. With `dry_run`, removes
/// nothing and reports what it would remove.
pub async fn run_once(pool: &PgPool, cfg: &GcConfig, dry_run: bool) -> Result<Report, Error> {
    // Rows first, then the disk: a build that starts after this query is younger than the
    // grace, so it is safe even though the query does not know it.
    let rows = store::live_environments(pool)
        .await
        .map_err(Error::db("reading the environments to keep"))?;
    let root = cfg.envs_root.clone();
    let grace = cfg.grace;
    packenv_core::blocking(move || collect(&root, grace, &rows, dry_run)).await
}

fn collect(
    root: &Path,
    grace: Duration,
    rows: &[store::LiveEnv],
    dry_run: bool,
) -> Result<Report, Error> {
    let live_links: HashSet<PathBuf> = rows
        .iter()
        .filter_map(|r| r.env_path.as_ref().map(PathBuf::from))
        .collect();
    let mut live_builds: HashSet<PathBuf> = rows
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

    let packs = match std::fs::read_dir(root) {
        Ok(packs) => packs,
        // Nothing was built yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Report::default()),
        Err(source) => {
            return Err(Error::Io {
                what: format!("cannot read the envs root {}", root.display()),
                source,
            })
        }
    };
    let mut candidates: Vec<(PathBuf, String)> = Vec::new();
    let mut touched_pack_dirs = BTreeSet::new();
    for pack in packs.flatten() {
        let pack_dir = pack.path();
        // Only real directories: a symlink here was not made by packenvd.
        if !pack.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let pack_ref = pack.file_name().to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir(&pack_dir) else {
            continue;
        };
        let mut links = Vec::new();
        let mut builds = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.file_type().is_symlink() && !name.starts_with('.') {
                links.push((e.path(), meta));
            } else if meta.is_dir() && is_build_dir_name(&name) {
                builds.push((e.path(), name, meta));
            } else if meta.file_type().is_symlink()
                && is_switch_leftover(&name)
                && age(&meta) > grace
            {
                candidates.push((e.path(), "leftover of an interrupted switch".into()));
            }
        }
        for (link, meta) in links {
            let target = std::fs::read_link(&link).ok().map(|t| pack_dir.join(t));
            let orphan = !live_links.contains(&link) && !unplaced_packs.contains(pack_ref.as_str());
            if orphan && age(&meta) > grace {
                candidates.push((
                    link.clone(),
                    "no pack_environment row names this environment (pack or runtime removed)"
                        .into(),
                ));
                touched_pack_dirs.insert(pack_dir.clone());
            } else if let Some(t) = target {
                // A current link keeps its build, whatever the rows say.
                live_builds.insert(t);
            }
        }
        for (dir, name, meta) in builds {
            if live_builds.contains(&dir) || building.iter().any(|t| name.ends_with(t.as_str())) {
                continue;
            }
            if age(&meta) <= grace {
                continue;
            }
            candidates.push((
                dir,
                format!(
                    "not current, superseded or abandoned {} ago",
                    humantime::format_duration(Duration::from_secs(age(&meta).as_secs()))
                ),
            ));
            touched_pack_dirs.insert(pack_dir.clone());
        }
    }

    let report = remove_unused(candidates, dry_run);
    if !dry_run {
        for dir in touched_pack_dirs {
            // Fails while anything is left in it, which is what we want.
            let _ = std::fs::remove_dir(&dir);
        }
    }
    Ok(report)
}

/// `packenvd remove`: deletes the rows and their environments at once, except builds a running
/// process still uses, which the collector removes later.
pub async fn remove(
    pool: &PgPool,
    cfg: &GcConfig,
    pack_ref: &str,
    runtime_ref: Option<&str>,
) -> Result<(Vec<String>, Report), Error> {
    let deleted = store::remove(pool, pack_ref, runtime_ref)
        .await
        .map_err(Error::db("deleting the rows"))?;
    let names = deleted.iter().map(|(runtime, _)| runtime.clone()).collect();
    let root = cfg.envs_root.clone();
    let report = packenv_core::blocking(move || {
        let candidates = deleted
            .iter()
            .filter_map(|(_, env_path)| env_path.as_deref())
            .flat_map(|env_path| removal_candidates(&root, Path::new(env_path)))
            .collect();
        remove_unused(candidates, false)
    })
    .await;
    Ok((names, report))
}

/// The link `env_path` and its build directories, if `env_path` lies where packenvd puts
/// environments.
fn removal_candidates(root: &Path, env_path: &Path) -> Vec<(PathBuf, String)> {
    let Some(pack_dir) = env_path.parent().filter(|p| p.parent() == Some(root)) else {
        return Vec::new();
    };
    let Some(name) = env_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Vec::new();
    };
    let mut candidates = vec![(env_path.to_owned(), "removed on request".to_string())];
    if let Ok(entries) = std::fs::read_dir(pack_dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if is_build_dir_name(&n)
                && n.strip_prefix('.')
                    .is_some_and(|r| r.starts_with(&format!("{name}-")))
            {
                candidates.push((e.path(), "removed on request".to_string()));
            }
        }
    }
    candidates
}

/// Removes each candidate no running process uses (or, with `dry_run`, only reports it).
fn remove_unused(candidates: Vec<(PathBuf, String)>, dry_run: bool) -> Report {
    let mut report = Report::default();
    let dirs: Vec<PathBuf> = candidates
        .iter()
        .filter(|(p, _)| p.is_dir() && !p.is_symlink())
        .map(|(p, _)| p.clone())
        .collect();
    let in_use = dirs_in_use(&dirs);
    for (path, reason) in candidates {
        if let Some(users) = in_use.get(&path) {
            report.kept_in_use.push(Removal {
                path,
                reason: format!("still in use: {}", users.join(", ")),
            });
            continue;
        }
        if dry_run {
            report.removed.push(Removal { path, reason });
            continue;
        }
        let result = if path.is_symlink() || !path.is_dir() {
            std::fs::remove_file(&path)
        } else {
            std::fs::remove_dir_all(&path)
        };
        match result {
            Ok(()) => report.removed.push(Removal { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.errors.push(Removal {
                path,
                reason: format!("cannot remove: {e}"),
            }),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packenvd_names_are_build_directories() {
        assert!(is_build_dir_name(
            ".python-0123456789abcdef0123456789abcdef"
        ));
        assert!(is_build_dir_name(
            ".node.js-0123456789abcdef0123456789abcdef"
        ));
        assert!(is_build_dir_name(".python-legacy-1234"));
        for not in [
            "python",
            ".python",
            ".python-123",
            ".cache",
            ".python-0123456789abcdef0123456789abcdeg",
            "-0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_build_dir_name(not), "{not}");
        }
        assert!(is_switch_leftover(".python.switch-42"));
        assert!(!is_switch_leftover("python.switch-42"));
    }
}
