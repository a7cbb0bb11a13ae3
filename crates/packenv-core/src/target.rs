//! One environment to build or check, as its row describes it, and the daemon settings a build
//! or a check needs. The queue (claims, tokens, attempts) is not here: the `packenvd` crate keeps
//! that beside it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runner::Supervised;
use crate::supervise::{Confinement, LandlockMode};

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
    /// The pack row's `runtime_dependencies` as JSON text, when the platform's `pack` table
    /// has such a column: constraints on the interpreter, like those of `pack.yaml`.
    pub pack_dependencies: Option<String>,
    /// What the database found wrong with the row (its pack_ref is not its pack's ref, its
    /// runtime's directory is another runtime's): the build fails with it before anything runs.
    pub problem: Option<String>,
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
    /// Daemon variables steps may see, beyond PATH and LANG.
    pub env_passthrough: Vec<String>,
    /// How steps are confined; `None` runs them directly (then only their process group is
    /// killed, and nothing confines what they write or connect to).
    pub sandbox: Option<SandboxConfig>,
    /// Where Pythons are found beyond the steps' PATH ([`crate::toolchain::pythons`]).
    pub python_search: Vec<PathBuf>,
}

impl BuildConfig {
    /// Where builds and checks get their private temporary directories.
    pub fn tmp_root(&self) -> PathBuf {
        self.cache_dir.join(".tmp")
    }
}

/// How steps and checks are confined (DESIGN §6), applied by the step supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The supervisor's program and first arguments: `packenvd __supervise`.
    pub supervisor: Vec<OsString>,
    pub landlock: LandlockMode,
    /// The build user `(uid, gid)` steps run as; `None` runs them as the daemon's user (never
    /// for a root daemon: its settings always name one).
    pub user: Option<(u32, u32)>,
    /// Per-step limits: address space, processes of the step's user, file size (bytes).
    pub memory: Option<u64>,
    pub processes: Option<u64>,
    pub file_size: Option<u64>,
    /// TCP ports steps may connect to; `None` for any.
    pub tcp_ports: Option<Vec<u16>>,
    /// More places steps may write, beyond their build, cache and private tmp.
    pub writable: Vec<PathBuf>,
    /// Paths steps may not read: the daemon's credentials and config.
    pub hidden: Vec<PathBuf>,
}

impl SandboxConfig {
    /// How one command runs: writes allowed beneath `writable` (and the configured extras).
    pub fn supervised(&self, writable: &[&Path]) -> Supervised {
        let mut all: Vec<PathBuf> = writable.iter().map(|p| p.to_path_buf()).collect();
        all.extend(self.writable.iter().cloned());
        Supervised {
            supervisor: self.supervisor.clone(),
            confinement: Confinement {
                landlock: self.landlock,
                writable: all,
                hidden: self.hidden.clone(),
                tcp_ports: self.tcp_ports.clone(),
                memory: self.memory,
                processes: self.processes,
                file_size: self.file_size,
                namespaces: true,
            },
            user: self.user,
        }
    }
}
