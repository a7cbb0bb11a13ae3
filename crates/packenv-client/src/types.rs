//! What the client hands back: statuses, environments with each node's row, and an
//! environment resolved for one host.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer};

use crate::Error;

/// The status of an environment (`pack_environment.status`, the summary over nodes) or of one
/// node's copy of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Asked for; no node has started on it yet.
    Pending,
    /// A build runs.
    Installing,
    /// Built and checked.
    Ready,
    /// The build failed; `install_error` says why.
    Failed,
    /// The inputs changed or a check failed; a rebuild is queued and the old build still
    /// serves meanwhile.
    Outdated,
}

impl Status {
    /// The word the database uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Installing => "installing",
            Status::Ready => "ready",
            Status::Failed => "failed",
            Status::Outdated => "outdated",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Status, Error> {
        Ok(match s {
            "pending" => Status::Pending,
            "installing" => Status::Installing,
            "ready" => Status::Ready,
            "failed" => Status::Failed,
            "outdated" => Status::Outdated,
            other => {
                return Err(Error::Database(sqlx::Error::Decode(
                    format!("unknown environment status {other:?}").into(),
                )))
            }
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One environment of a pack for a runtime: the platform's row, whose status sums up the
/// nodes', and every node's copy.
#[derive(Debug, Clone)]
pub struct Environment {
    /// `pack_environment.id`, also the payload of its status notifications.
    pub id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    /// `ready` once every live node that can build the runtime has it ready; `failed` when
    /// one failed.
    pub status: Status,
    /// Why it failed; prefixed with the node (`node web-3: ...`) when several nodes count.
    pub install_error: Option<String>,
    /// Each node's copy, by node name.
    pub nodes: Vec<NodeEnvironment>,
}

impl Environment {
    /// The copy on node `name`, if that node has one.
    pub fn node(&self, name: &str) -> Option<&NodeEnvironment> {
        self.nodes.iter().find(|n| n.node == name)
    }

    /// Where it stands as an error, for one node: its copy's status and step, else the
    /// summary's.
    pub(crate) fn not_ready(&self, node: &str) -> Error {
        match self.node(node) {
            Some(n) => Error::NotReady {
                status: n.status,
                step: n.step.clone(),
            },
            None => Error::NotReady {
                status: self.status,
                step: None,
            },
        }
    }
}

/// One node's copy of an environment (`pack_environment_node`).
#[derive(Debug, Clone, Deserialize)]
pub struct NodeEnvironment {
    /// The node (packenvd's `node_name`; by default the host's name).
    pub node: String,
    pub status: Status,
    /// `<envs_root>/<pack>/<runtime>`, a symlink to the current build: for people, never for
    /// starting processes (see [`Resolved`]).
    pub env_path: Option<PathBuf>,
    /// The current build's directory, where processes must be started from.
    pub build_dir: Option<PathBuf>,
    /// Executables by name (`python`, `node`), inside the build or resolved on the host.
    #[serde(default)]
    pub executables: BTreeMap<String, PathBuf>,
    /// What a process of the pack needs in its environment (`VIRTUAL_ENV`, `NODE_PATH`).
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    pub install_error: Option<String>,
    /// While installing: the step that runs, as "2/3" (from the build's log).
    pub step: Option<String>,
    #[serde(deserialize_with = "epoch")]
    pub installed_at: Option<SystemTime>,
    #[serde(deserialize_with = "epoch")]
    pub last_verified: Option<SystemTime>,
    /// "ok", or what the last check found wrong.
    pub last_verify_result: Option<String>,
    /// Not seen by the database for its ttl: its copy no longer counts.
    pub node_gone: bool,
}

/// Seconds since the epoch, as the queries send timestamps (the client has no date crate).
fn epoch<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    let secs: Option<f64> = Option::deserialize(d)?;
    Ok(secs
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s)))
}

/// An environment resolved on one node: what a runner needs to start an action.
///
/// Start processes from these paths, never through `env_path`: a Python started as
/// `<env_path>/bin/python` keeps `sys.prefix = <env_path>` and, after packenvd switches the
/// link to a new build, imports the new build's modules beside the old build's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The node it was resolved for.
    pub node: String,
    /// That node's status: `ready`, or `outdated`, `pending` or `installing` while a rebuild
    /// runs and the current build still serves.
    pub status: Status,
    /// The build's directory; `None` for a runtime that needs no environment.
    pub build_dir: Option<PathBuf>,
    /// Executables by name.
    pub executables: BTreeMap<String, PathBuf>,
    /// Variables to set for a process of the pack.
    pub env_vars: BTreeMap<String, String>,
}

impl Resolved {
    /// The executable `name` (`python`, `node`, ...) of this environment.
    pub fn executable(&self, name: &str) -> Result<&Path, Error> {
        self.executables
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| Error::NoSuchExecutable {
                name: name.to_owned(),
                available: self.executables.keys().cloned().collect(),
            })
    }

    /// The directories to put first on `PATH` for a process of the pack, as activating the
    /// environment would: each directory of the build that holds one of its executables (a
    /// venv's `bin`), then `node_modules/.bin` of each `NODE_PATH` entry that has one. A
    /// script that calls `pip` or a package's command then finds the environment's own.
    pub fn path_prefix(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut add = |d: PathBuf| {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        };
        if let Some(build) = &self.build_dir {
            for exe in self.executables.values() {
                if let Some(dir) = exe.parent().filter(|d| d.starts_with(build)) {
                    add(dir.to_path_buf());
                }
            }
        }
        if let Some(node_path) = self.env_vars.get("NODE_PATH") {
            for entry in std::env::split_paths(node_path) {
                let bin = entry.join(".bin");
                if bin.is_dir() {
                    add(bin);
                }
            }
        }
        dirs
    }

    /// Every variable a process of the pack needs: [`env_vars`](Resolved::env_vars)
    /// (`VIRTUAL_ENV`, `NODE_PATH`, ...) and `PATH`, the [`path_prefix`](Resolved::path_prefix)
    /// before `inherited_path` (the runner's own `PATH`, usually). `PATH` is left out when
    /// there is nothing to put first.
    pub fn process_env(&self, inherited_path: Option<&OsStr>) -> BTreeMap<String, OsString> {
        let mut vars: BTreeMap<String, OsString> = self
            .env_vars
            .iter()
            .map(|(k, v)| (k.clone(), OsString::from(v)))
            .collect();
        let prefix = self.path_prefix();
        if !prefix.is_empty() {
            let inherited = inherited_path.map(std::env::split_paths);
            let all = prefix.into_iter().chain(inherited.into_iter().flatten());
            // join_paths refuses only a directory with ':' in its name; such a PATH could
            // not name it anyway, so the variables go without it.
            if let Ok(path) = std::env::join_paths(all) {
                vars.insert("PATH".into(), path);
            }
        }
        vars
    }

    /// Sets [`process_env`](Resolved::process_env) on `cmd`, prefixing this process's `PATH`.
    ///
    /// ```no_run
    /// # async fn run(client: &packenv_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let env = client.lookup("web", "core.python").await?;
    /// let mut cmd = std::process::Command::new(env.executable("python")?);
    /// env.apply(&mut cmd).arg("actions/fetch.py");
    /// let output = cmd.output()?;
    /// # let _ = output;
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.envs(self.process_env(std::env::var_os("PATH").as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(build: &Path) -> Resolved {
        Resolved {
            node: "n".into(),
            status: Status::Ready,
            build_dir: Some(build.to_path_buf()),
            executables: BTreeMap::from([
                ("python".into(), build.join("bin/python")),
                ("pip".into(), build.join("bin/pip")),
                // A host command (a runtime whose template is plain `node`): not the build's.
                ("node".into(), PathBuf::from("/usr/bin/node")),
            ]),
            env_vars: BTreeMap::from([(
                "NODE_PATH".into(),
                build.join("node_modules").display().to_string(),
            )]),
        }
    }

    #[test]
    fn path_puts_the_builds_executable_dirs_and_node_bins_first_and_keeps_the_inherited() {
        let dir = std::env::temp_dir().join(format!("packenv-client-path-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("node_modules/.bin")).unwrap();
        let env = resolved(&dir);
        assert_eq!(
            env.path_prefix(),
            [dir.join("bin"), dir.join("node_modules/.bin")]
        );
        let vars = env.process_env(Some(OsStr::new("/usr/bin:/bin")));
        let expected = format!("{0}/bin:{0}/node_modules/.bin:/usr/bin:/bin", dir.display());
        assert_eq!(vars["PATH"], OsString::from(expected));
        assert_eq!(vars["NODE_PATH"], dir.join("node_modules").into_os_string());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_environment_without_its_own_executables_leaves_path_alone() {
        let env = Resolved {
            node: "n".into(),
            status: Status::Ready,
            build_dir: None,
            executables: BTreeMap::new(),
            env_vars: BTreeMap::new(),
        };
        assert!(env.path_prefix().is_empty());
        assert!(!env
            .process_env(Some(OsStr::new("/bin")))
            .contains_key("PATH"));
    }
}
