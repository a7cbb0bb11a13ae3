//! The client's errors: what a caller can act on, each its own variant, the database's with
//! its source kept.

use crate::Status;

/// Why an operation could not give what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Nothing to run yet on this node: the environment waits or is being built for the first
    /// time (`not ready: installing step 2/2`). Also what [`ensure`](crate::Client::ensure)
    /// returns when its time is up.
    #[error("not ready: {status}{}", step.as_ref().map(|s| format!(" step {s}")).unwrap_or_default())]
    NotReady {
        status: Status,
        /// The step that runs, as "2/2", while installing.
        step: Option<String>,
    },
    /// The build failed; `cause` is packenvd's sentence (the step, the command, how it
    /// ended, the end of its output), naming the node when several count.
    #[error("failed: {cause}")]
    Failed { cause: String },
    #[error("no such pack: {0}")]
    NoSuchPack(String),
    #[error("no such runtime: {0}")]
    NoSuchRuntime(String),
    /// The pack and the runtime exist, but nobody asked for this environment.
    #[error("no environment of pack {pack} for runtime {runtime}: request it first")]
    NoSuchEnvironment { pack: String, runtime: String },
    /// The environment is there, but has no executable of that name.
    #[error("no executable {name:?} in this environment (it has: {})", available.join(", "))]
    NoSuchExecutable {
        name: String,
        available: Vec<String>,
    },
    /// The environment has no copy on this node: no packenvd has registered under this name,
    /// or the node cannot build the runtime (`packenvd nodes` says what it lacks).
    #[error("node {node:?} has no copy of this environment: is packenvd running on this host with node_name = {node:?}, and can it build the runtime? (`packenvd nodes`)")]
    NotOnNode { node: String },
    /// The node's row names a path this client will not run or set: outside the row's build
    /// under the node's `envs_root` (DESIGN §6). `key` is `executables.<name>`,
    /// `env_vars.<NAME>` or `build_dir`; `reason` says where it lies instead.
    #[error("refusing {key} = {path:?} of node {node}: {reason}")]
    OutsideBuild {
        node: String,
        key: String,
        path: String,
        reason: String,
    },
    #[error("database error")]
    Database(#[from] sqlx::Error),
}
