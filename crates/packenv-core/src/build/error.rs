//! Why a build did not produce an environment, kept typed so that the retry decision and the
//! message an operator reads come from the same value.

use std::path::PathBuf;

use crate::fingerprint::ManifestError;
use crate::layout::LayoutError;
use crate::manifest::IncludeError;
use crate::runner::Outcome;
use crate::spec::SpecError;
use crate::template::TemplateError;

/// Installer output that says the package does not exist or cannot be resolved: another try
/// will not help.
const PERMANENT_MARKERS: &[&str] = &[
    "No matching distribution found",
    "Could not find a version that satisfies",
    "ResolutionImpossible",
    "Invalid requirement",
    "npm error code E404",
    "npm ERR! code E404",
    "npm error code ETARGET",
    "npm ERR! code ETARGET",
    "No solution found when resolving",
];

/// A build that ended without an environment.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `runtime.installers` is not a spec packenvd can read.
    #[error("runtime {runtime}: {source}")]
    Spec {
        runtime: String,
        #[source]
        source: SpecError,
    },
    /// A template in the spec does not render (unknown variable, unclosed brace).
    #[error("runtime {runtime}: {field}: {source}")]
    Template {
        runtime: String,
        /// Where in the spec, e.g. `step 'install', args[2]`.
        field: String,
        #[source]
        source: TemplateError,
    },
    /// The pack ref, runtime name or `env_path` is unsafe, or the build directory cannot be
    /// placed under the envs root.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The row contradicts itself or another row (its pack_ref is not its pack's ref; two
    /// runtimes would share one directory).
    #[error("{0}")]
    Row(String),
    /// The pack's files are not where the row says.
    #[error("pack directory {} does not exist or is not a directory", path.display())]
    PackMissing { path: PathBuf },
    /// A step failed: its name, its command, how it ended (with a limit it hit, if one
    /// explains it), and the output's tail.
    #[error("step '{name}' (`{command}`) {outcome}{}.\n--- output tail ---\n{tail}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Step {
        name: String,
        command: String,
        outcome: Outcome,
        hint: Option<String>,
        tail: String,
    },
    /// A step's command is a bare name that is not on the steps' PATH.
    #[error("step '{name}': `{program}` not found on PATH (PATH={path})")]
    CommandNotFound {
        name: String,
        program: String,
        path: String,
    },
    /// The steps succeeded but an executable the runtime promises does not run.
    #[error(
        "executable '{name}' ({template}) does not run: {failure}.\n--- output tail ---\n{tail}"
    )]
    Executable {
        name: String,
        template: String,
        failure: String,
        tail: String,
    },
    /// A dependency manifest of the pack is not a regular file of sane size.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A manifest a step reads, or a file or path it includes, leads out of the pack.
    #[error(transparent)]
    Include(#[from] IncludeError),
    /// The file system refused something packenvd needed (a cache directory).
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The runtime requires an environment but says nothing about how to make one: building
    /// it would serve an empty directory as `ready`.
    #[error("runtime {runtime} requires an environment but has no installer step and no executable: give it installers (packenvd's defaults exist for core.python and core.nodejs), or set \"requires_environment\": false")]
    EmptySpec { runtime: String },
    /// No interpreter on the host satisfies what the pack asks for, or what it asks for does
    /// not parse.
    #[error("pack {pack}: {source}")]
    Toolchain {
        pack: String,
        #[source]
        source: crate::toolchain::ToolchainError,
    },
    /// Shutdown or a lost claim stopped the build; it is not an attempt that failed.
    #[error("the build was cancelled (shutdown, or its claim was lost)")]
    Cancelled,
}

impl BuildError {
    /// Whether another attempt may succeed: network trouble, a timeout, a pack whose files are
    /// still being copied. A bad spec, an unsafe path, a missing command or a package that does
    /// not exist will fail the same way again.
    pub fn retryable(&self) -> bool {
        match self {
            BuildError::Spec { .. }
            | BuildError::Row(_)
            | BuildError::Template { .. }
            | BuildError::CommandNotFound { .. }
            | BuildError::Executable { .. }
            | BuildError::EmptySpec { .. }
            | BuildError::Cancelled => false,
            BuildError::Toolchain { source, .. } => match source {
                crate::toolchain::ToolchainError::Manifest(e) => e.retryable(),
                _ => false,
            },
            BuildError::Layout(e) => !matches!(
                e,
                LayoutError::OutsideRoot { .. }
                    | LayoutError::BadPackRef(_)
                    | LayoutError::BadRuntimeName(_)
                    | LayoutError::BadEnvPath(_)
            ),
            BuildError::PackMissing { .. } | BuildError::Io { .. } => true,
            BuildError::Manifest(e) => e.retryable(),
            BuildError::Include(e) => e.retryable(),
            BuildError::Step { outcome, tail, .. } => match outcome {
                Outcome::SpawnFailed(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ),
                Outcome::TimedOut(_) => true,
                _ => !PERMANENT_MARKERS.iter().any(|m| tail.contains(m)),
            },
        }
    }

    /// A short label for metrics and logs: which kind of failure, never a message.
    pub fn kind(&self) -> &'static str {
        match self {
            BuildError::Spec { .. } => "spec",
            BuildError::Template { .. } => "template",
            BuildError::Layout(_) => "layout",
            BuildError::Row(_) => "row",
            BuildError::PackMissing { .. } => "pack_missing",
            BuildError::Step { .. } => "step",
            BuildError::CommandNotFound { .. } => "command_not_found",
            BuildError::EmptySpec { .. } => "spec",
            BuildError::Toolchain { .. } => "interpreter",
            BuildError::Executable { .. } => "executable",
            BuildError::Io { .. } => "io",
            BuildError::Manifest(_) => "manifest",
            BuildError::Include(_) => "include",
            BuildError::Cancelled => "cancelled",
        }
    }
}

/// Which of the step's limits explains how it ended, if one does: a file-size signal, or output
/// that says memory or processes ran out.
pub fn limit_hint(
    outcome: &Outcome,
    tail: &str,
    limits: Option<&crate::supervise::Confinement>,
) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let limits = limits?;
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |v| v.to_string());
    if let Outcome::Exited(status) = outcome {
        let xfsz = nix::sys::signal::Signal::SIGXFSZ as i32;
        // Killed by SIGXFSZ, or a shell reporting a child that was (128 + the signal).
        if status.signal() == Some(xfsz)
            || status.code() == Some(128 + xfsz)
            || tail.contains("File size limit exceeded")
        {
            return Some(format!(
                "it wrote a file larger than step_max_file_size, {} bytes",
                show(limits.file_size)
            ));
        }
    }
    let memory = [
        "MemoryError",
        "Cannot allocate memory",
        "out of memory",
        "std::bad_alloc",
        "heap out of memory",
        "memory allocation of",
    ];
    if limits.memory.is_some() && memory.iter().any(|m| tail.contains(m)) {
        return Some(format!(
            "it ran out of memory: step_memory_limit is {} bytes of address space per process",
            show(limits.memory)
        ));
    }
    let processes = [
        "Resource temporarily unavailable",
        "fork: retry",
        "Cannot fork",
    ];
    if limits.processes.is_some() && processes.iter().any(|m| tail.contains(m)) {
        return Some(format!(
            "it could not start more processes: step_max_processes is {}",
            show(limits.processes)
        ));
    }
    None
}

/// A failed build and what is still served in its place.
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", served.as_ref().map(|b| format!(" The previous build {} is still served.", b.display())).unwrap_or_default())]
pub struct Failure {
    #[source]
    pub error: BuildError,
    /// The build `env_path` still points at, if any: a failed rebuild leaves it in service.
    pub served: Option<PathBuf>,
}

impl From<BuildError> for Failure {
    fn from(error: BuildError) -> Self {
        Failure {
            error,
            served: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn step(outcome: Outcome, tail: &str) -> BuildError {
        BuildError::Step {
            name: "install".into(),
            command: "pip install".into(),
            outcome,
            hint: None,
            tail: tail.into(),
        }
    }

    #[test]
    fn a_missing_package_is_permanent_and_a_network_error_is_not() {
        let exit1 = || Outcome::Exited(std::process::ExitStatus::from_raw(1 << 8));
        assert!(!step(exit1(), "ERROR: No matching distribution found for x").retryable());
        assert!(step(exit1(), "Connection reset by peer").retryable());
        assert!(step(Outcome::TimedOut(std::time::Duration::from_secs(1)), "").retryable());
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!step(Outcome::SpawnFailed(missing), "").retryable());
        assert!(BuildError::PackMissing { path: "/p".into() }.retryable());
    }

    #[test]
    fn a_failure_says_which_build_is_still_served() {
        let f = Failure {
            error: BuildError::PackMissing { path: "/p".into() },
            served: Some("/envs/p/.python-1".into()),
        };
        assert_eq!(
            f.to_string(),
            "pack directory /p does not exist or is not a directory The previous build /envs/p/.python-1 is still served."
        );
    }
}
