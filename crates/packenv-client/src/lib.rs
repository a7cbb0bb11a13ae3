//! `packenv-client`: what a platform calls to use the environments packenvd builds.
//!
//! packenvd keeps one isolated environment per pack and runtime (a Python venv, a
//! `node_modules`) on every worker host, driven by the `pack_environment` table. This crate is
//! the platform's side of that contract: ask for an environment, wait until it is ready, and
//! before each action find the interpreter and the environment variables of the pack *on this
//! host*. It owns SQL and waiting only; it does not build anything and does not depend on the
//! daemon (`packenvd`) or its build side (`packenv-core`).
//!
//! # Layout
//! - [`Client`] (this file): the operations, and which node is "this host".
//! - `types`: [`Status`], [`Environment`] with each [`NodeEnvironment`], and [`Resolved`],
//!   what a runner starts a process with.
//! - `error`: [`Error`], one variant per thing a caller can act on.
//! - `store`: every SQL statement, one function each.
//! - `confine`: the check that every path a node's row names lies inside that row's build
//!   under the node's `envs_root`, before [`Client::lookup`] returns it.
//!
//! # Example
//!
//! What an action runner does before it starts an action of the pack `web` (its
//! `requirements.txt` installed by packenvd into a venv):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), packenv_client::Error> {
//! let client = packenv_client::Client::connect("postgres://platform@db/attune").await?;
//! // Once, when the pack is installed: ask for the environment and wait for it.
//! client.ensure("web", "core.python", Duration::from_secs(600)).await?;
//! // Before every action: one indexed query.
//! let env = client.lookup("web", "core.python").await?;
//! let mut cmd = std::process::Command::new(env.executable("python")?);
//! // VIRTUAL_ENV, and the venv's bin first on PATH.
//! env.apply(&mut cmd).arg("actions/fetch.py");
//! let status = cmd.status().expect("python runs");
//! # let _ = status;
//! # Ok(())
//! # }
//! ```
//!
//! A complete runner is `examples/run_action.rs` at the top of the repository:
//! `cargo run -p packenv-client --example run_action -- examples/packs/demo_python core.python
//! actions/hello.py`.
//!
//! # Nodes
//!
//! Each host that runs packenvd is a node with its own copy of every environment. [`Client`]
//! reads this host's copy: the node named like the host (packenvd's default `node_name`), or
//! the one given with [`Client::with_node`]. [`Client::ensure`] waits for the summary, which
//! is ready once every live node's copy is.

mod confine;
mod error;
mod store;
mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::time::Instant;

pub use error::Error;
#[doc(hidden)]
pub use store::LOOKUP_SQL;
pub use store::STATUS_CHANNEL;
pub use types::{Environment, NodeEnvironment, Resolved, Status};

/// How often [`Client::ensure`] looks again when no notification came: a notification can be
/// lost when the listening connection drops, and this bounds the wait that costs.
const POLL: Duration = Duration::from_secs(1);

/// A handle on packenvd's tables for one node. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    pool: PgPool,
    /// Whose copies [`lookup`](Client::lookup) and its helpers read.
    node: String,
}

impl Client {
    /// A client over `pool`, for the node named like this host.
    pub fn new(pool: PgPool) -> Client {
        Client {
            pool,
            node: host_name(),
        }
    }

    /// Connects to `url` with a small pool of its own (4 connections; a waiting
    /// [`ensure`](Client::ensure) holds one), for the node named like this host.
    pub async fn connect(url: &str) -> Result<Client, Error> {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
        Ok(Client::new(pool))
    }

    /// The same client for node `node`: set it to packenvd's `node_name` on this host when
    /// that is not the host's name.
    pub fn with_node(mut self, node: impl Into<String>) -> Client {
        self.node = node.into();
        self
    }

    /// The node whose copies this client reads.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pool, for the platform's own statements.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Asks for the environment of `pack_ref` for `runtime_ref` (what a pack install does):
    /// creates it, or sends it back to `pending`. A node whose build was made from the same
    /// inputs answers without rebuilding; a changed `requirements.txt` is rebuilt. Returns
    /// at once, with the environment as it is after the request.
    pub async fn request(&self, pack_ref: &str, runtime_ref: &str) -> Result<Environment, Error> {
        match store::request(&self.pool, pack_ref, runtime_ref).await {
            Ok(_) => self.get(pack_ref, runtime_ref).await,
            Err(e) => Err(request_error(e, pack_ref, runtime_ref)),
        }
    }

    /// Makes sure the environment exists and is ready, waiting at most `timeout`: a ready one
    /// is returned at once; a missing or failed one is requested (a failed one is built
    /// again); one that waits or builds is waited for. Woken by packenvd's notification when
    /// the environment becomes ready or failed (on [`STATUS_CHANNEL`]), and looks again every
    /// second in case one is lost.
    ///
    /// Errors: [`Error::Failed`] with the cause when the build failed; [`Error::NotReady`]
    /// with where it stands when `timeout` passed first; [`Error::NoSuchPack`] and
    /// [`Error::NoSuchRuntime`].
    pub async fn ensure(
        &self,
        pack_ref: &str,
        runtime_ref: &str,
        timeout: Duration,
    ) -> Result<Environment, Error> {
        let deadline = Instant::now() + timeout;
        // Listening before the first look, so a change between the look and the wait still
        // wakes the wait.
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(STATUS_CHANNEL).await?;
        let mut env = match self.get(pack_ref, runtime_ref).await {
            Ok(env) if env.status == Status::Failed => self.request(pack_ref, runtime_ref).await?,
            Ok(env) => env,
            Err(Error::NoSuchEnvironment { .. }) => self.request(pack_ref, runtime_ref).await?,
            Err(e) => return Err(e),
        };
        loop {
            match env.status {
                Status::Ready => return Ok(env),
                Status::Failed => {
                    return Err(Error::Failed {
                        cause: env
                            .install_error
                            .unwrap_or_else(|| "(no error recorded)".into()),
                    })
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(env.not_ready(&self.node));
            }
            let wait = (deadline - now).min(POLL);
            let _ = tokio::time::timeout(wait, async {
                loop {
                    match listener.recv().await {
                        Ok(n) if store::notified_id(n.payload()) == Some(env.id) => return,
                        // Another environment's change: the channel is shared.
                        Ok(_) => {}
                        // Reconnecting failed: the poll takes over for this round.
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
            })
            .await;
            env = self.get(pack_ref, runtime_ref).await?;
        }
    }

    /// The environment: its status over all nodes, its error, and each node's copy.
    pub async fn get(&self, pack_ref: &str, runtime_ref: &str) -> Result<Environment, Error> {
        let found = store::environments(&self.pool, Some(pack_ref), Some(runtime_ref)).await?;
        match found.into_iter().next() {
            Some(row) => environment(row),
            None => Err(self.missing(pack_ref, runtime_ref).await),
        }
    }

    /// Every environment of `pack_ref`, or of all packs, by pack and runtime.
    pub async fn list(&self, pack_ref: Option<&str>) -> Result<Vec<Environment>, Error> {
        store::environments(&self.pool, pack_ref, None)
            .await?
            .into_iter()
            .map(environment)
            .collect()
    }

    /// What a runner needs before an action, on this client's node, in one indexed query:
    /// the build directory, the executables and the environment variables.
    ///
    /// A copy that is `ready` resolves; so does one being rebuilt (`outdated`, or `pending`
    /// or `installing` again) while its current build is on disk, since that build serves
    /// until the new one replaces it. A copy taken over from the original design (a real
    /// directory at `env_path`, no build recorded) resolves to that directory, with the
    /// runtime's executable templates, until packenvd has rebuilt it. Otherwise: [`Error::NotReady`] (`not ready: installing
    /// step 2/2`), [`Error::Failed`], [`Error::NotOnNode`], [`Error::NoSuchEnvironment`],
    /// [`Error::NoSuchPack`], [`Error::NoSuchRuntime`], and [`Error::OutsideBuild`] when the
    /// row names an executable or a variable's path outside its build under the node's
    /// `envs_root` (DESIGN §6: such a row is refused, never run).
    pub async fn lookup(&self, pack_ref: &str, runtime_ref: &str) -> Result<Resolved, Error> {
        let row = store::lookup(&self.pool, pack_ref, runtime_ref, &self.node).await?;
        if !row.pack_found {
            return Err(Error::NoSuchPack(pack_ref.to_owned()));
        }
        if !row.runtime_found {
            return Err(Error::NoSuchRuntime(runtime_ref.to_owned()));
        }
        let Some(env_status) = row.env_status else {
            return Err(Error::NoSuchEnvironment {
                pack: pack_ref.to_owned(),
                runtime: runtime_ref.to_owned(),
            });
        };
        let Some(status) = row.status else {
            if Status::parse(&env_status)? == Status::Failed {
                return Err(failed(row.env_error));
            }
            return Err(Error::NotOnNode {
                node: self.node.clone(),
            });
        };
        let status = Status::parse(&status)?;
        let legacy = row.legacy_dir.map(|dir| Legacy {
            dir,
            pack_ref,
            runtime_ref,
            runtime_name: row.runtime_name.unwrap_or_default(),
        });
        let build_dir = match &legacy {
            // Not a link to a build: the original design's environment, a real directory.
            Some(l) => Some(PathBuf::from(&l.dir))
                .filter(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_dir())),
            None => row.build_dir.map(PathBuf::from),
        };
        let serves = match status {
            Status::Ready => legacy.is_none() || build_dir.is_some(),
            Status::Failed => return Err(failed(row.install_error.or(row.env_error))),
            // A rebuild: the current build serves until the new one is switched in.
            _ => build_dir.as_deref().is_some_and(Path::is_dir),
        };
        if !serves {
            return Err(Error::NotReady {
                status,
                step: row.step,
            });
        }
        let (executables, env_vars) = match &legacy {
            Some(l) => (
                l.resolve(row.legacy_executables)
                    .into_iter()
                    .map(|(k, v)| (k, v.into()))
                    .collect(),
                l.resolve(row.legacy_env_vars),
            ),
            None => (
                row.executables
                    .map(|j| j.0.into_iter().map(|(k, v)| (k, v.into())).collect())
                    .unwrap_or_default(),
                row.env_vars.map(|j| j.0).unwrap_or_default(),
            ),
        };
        let none = BTreeMap::new();
        let no_commands = BTreeMap::new();
        let confine = confine::Confine {
            node: &self.node,
            envs_root: row.envs_root.as_deref(),
            executable_templates: row.executable_templates.as_ref().map_or(&none, |j| &j.0),
            env_templates: row.env_templates.as_ref().map_or(&none, |j| &j.0),
            host_commands: row.host_commands.as_ref().map_or(&no_commands, |j| &j.0),
        };
        let build = match &build_dir {
            Some(dir) => Some(confine.build(&dir.to_string_lossy())?),
            None => None,
        };
        confine.executables(&executables, build.as_ref())?;
        confine.env_vars(&env_vars, build.as_ref())?;
        Ok(Resolved {
            node: self.node.clone(),
            status,
            build_dir,
            executables,
            env_vars,
        })
    }

    /// The executable `name` (`python`, `node`) of the environment on this node: the path in
    /// the resolved build, never through the `env_path` link. See [`lookup`](Client::lookup).
    pub async fn executable(
        &self,
        pack_ref: &str,
        runtime_ref: &str,
        name: &str,
    ) -> Result<PathBuf, Error> {
        let env = self.lookup(pack_ref, runtime_ref).await?;
        env.executable(name).map(Path::to_path_buf)
    }

    /// The variables a process of the pack needs on this node (`VIRTUAL_ENV`, `NODE_PATH`),
    /// pointing into the resolved build. See [`lookup`](Client::lookup).
    pub async fn env_vars(
        &self,
        pack_ref: &str,
        runtime_ref: &str,
    ) -> Result<BTreeMap<String, String>, Error> {
        Ok(self.lookup(pack_ref, runtime_ref).await?.env_vars)
    }

    /// Asks every node to check the environment at its next verification pass, first: the
    /// ready copies' `last_verified` becomes NULL, which the verifier takes before anything
    /// else whatever `verify_max_age` says (`packenvd verify --stale` runs a pass now). A check
    /// that fails marks the copy `outdated`, and it is rebuilt while the old build serves.
    /// Returns how many copies were marked.
    pub async fn request_verification(
        &self,
        pack_ref: &str,
        runtime_ref: &str,
    ) -> Result<u32, Error> {
        match store::request_verification(&self.pool, pack_ref, runtime_ref).await {
            Ok(n) => Ok(u32::try_from(n).unwrap_or(0)),
            Err(e) if is_no_data(&e) => Err(self.missing(pack_ref, runtime_ref).await),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the environment; each node's collector removes its directories once no process
    /// uses them. False when there was none.
    pub async fn remove(&self, pack_ref: &str, runtime_ref: &str) -> Result<bool, Error> {
        Ok(store::remove(&self.pool, pack_ref, runtime_ref).await?)
    }

    /// The error for an environment that is not there: what is missing, the pack, the runtime
    /// or only the environment.
    async fn missing(&self, pack_ref: &str, runtime_ref: &str) -> Error {
        match store::refs_exist(&self.pool, pack_ref, runtime_ref).await {
            Ok((false, _)) => Error::NoSuchPack(pack_ref.to_owned()),
            Ok((_, false)) => Error::NoSuchRuntime(runtime_ref.to_owned()),
            Ok(_) => Error::NoSuchEnvironment {
                pack: pack_ref.to_owned(),
                runtime: runtime_ref.to_owned(),
            },
            Err(e) => e.into(),
        }
    }
}

/// A copy packenvd did not build: an environment the original design made at `env_path` (a
/// real directory, no build recorded), taken over as it is until packenvd rebuilds it. Its
/// executables and variables are the runtime's templates filled in as the original did.
struct Legacy<'a> {
    dir: String,
    pack_ref: &'a str,
    runtime_ref: &'a str,
    runtime_name: String,
}

impl Legacy<'_> {
    fn resolve(
        &self,
        templates: Option<sqlx::types::Json<BTreeMap<String, String>>>,
    ) -> BTreeMap<String, String> {
        let fill = |t: &str| {
            t.replace("{env_path}", &self.dir)
                .replace("{pack_ref}", self.pack_ref)
                .replace("{runtime_ref}", self.runtime_ref)
                .replace("{runtime_name_lower}", &self.runtime_name.to_lowercase())
                .replace("{runtime_name}", &self.runtime_name)
        };
        templates
            .map(|j| j.0)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, fill(&v)))
            .collect()
    }
}

fn environment(row: store::EnvRow) -> Result<Environment, Error> {
    Ok(Environment {
        id: row.id,
        pack_ref: row.pack_ref,
        runtime_ref: row.runtime_ref,
        status: Status::parse(&row.status)?,
        install_error: row.install_error,
        nodes: row.nodes.0,
    })
}

fn failed(cause: Option<String>) -> Error {
    Error::Failed {
        cause: cause.unwrap_or_else(|| "(no error recorded)".into()),
    }
}

/// PostgreSQL's `no_data_found`, which packenvd's SQL functions raise for a missing ref.
fn is_no_data(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "P0002")
}

/// `request_pack_environment()` names what it did not find in its message.
fn request_error(e: sqlx::Error, pack_ref: &str, runtime_ref: &str) -> Error {
    if is_no_data(&e) {
        let message = e.as_database_error().map(|d| d.message().to_owned());
        if message.is_some_and(|m| m.starts_with("no runtime")) {
            return Error::NoSuchRuntime(runtime_ref.to_owned());
        }
        return Error::NoSuchPack(pack_ref.to_owned());
    }
    e.into()
}

/// This host's name, as packenvd takes it for its default `node_name` (the kernel's node
/// name), read without a libc binding.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_reads_like_a_sentence() {
        let e = Error::NotReady {
            status: Status::Installing,
            step: Some("2/2".into()),
        };
        assert_eq!(e.to_string(), "not ready: installing step 2/2");
        let e = Error::NotReady {
            status: Status::Pending,
            step: None,
        };
        assert_eq!(e.to_string(), "not ready: pending");
    }

    #[test]
    fn notifications_name_their_environment() {
        assert_eq!(store::notified_id("42 ready"), Some(42));
        assert_eq!(store::notified_id("x"), None);
    }
}
