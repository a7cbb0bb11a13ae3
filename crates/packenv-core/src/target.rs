//! One environment to build or check, as its row describes it, and the daemon settings a build
//! or a check needs. The queue (claims, tokens, attempts) is not here: the `packenvd` crate keeps
//! that beside it.

use std::path::PathBuf;
use std::time::Duration;

/// An environment as the row and its pack and runtime describe it. Everything here is untrusted
/// input (DESIGN §6): the build checks each field before it acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `pack_environment.id`, for logs and error messages.
    pub env_id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    /// `runtime.name`: its lower-cased form names the environment's directory.
    pub runtime_name: String,
    /// The row's `env_path`; checked against the envs root before anything is written.
    pub env_path: Option<String>,
    /// `pack.storage_path`; `None` means `<packs_dir>/<pack_ref>`.
    pub storage_path: Option<String>,
    /// `runtime.installers` as JSON text, parsed per row so that a spec that cannot be parsed
    /// fails its own row and no other.
    pub installers: String,
    /// The fingerprint of the current build, if any.
    pub fingerprint: Option<String>,
    /// The row's `metadata` as JSON text: what the current build recorded. Compared, never
    /// executed.
    pub metadata: String,
}

impl Target {
    /// The row's metadata; `Null` when it is not JSON packenvd can read (then nothing in it is
    /// trusted: a request rebuilds, a check fails on the recorded build directory).
    pub fn metadata(&self) -> serde_json::Value {
        serde_json::from_str(&self.metadata).unwrap_or(serde_json::Value::Null)
    }
}

/// The daemon's settings that a build or a check reads.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Every environment and build is created under this directory, and nowhere else.
    pub envs_root: PathBuf,
    /// Where a pack lives when its `storage_path` is NULL.
    pub packs_dir: PathBuf,
    /// The shared download caches, one subdirectory per runtime.
    pub cache_dir: PathBuf,
    /// Default limit of one step; a step's own `timeout` overrides it.
    pub step_timeout: Duration,
    /// Daemon variables steps may see, beyond PATH, HOME and LANG.
    pub env_passthrough: Vec<String>,
}
