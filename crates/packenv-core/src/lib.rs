//! packenv-core: what an environment build is, without any database.
//!
//! # Layout
//! - [`target`]: one environment to build or check, as its row describes it, and the
//!   daemon settings a build reads.
//! - [`spec`]: parses `runtime.installers` (steps, executables, env vars) with errors that say
//!   where the JSON is wrong.
//! - [`template`]: strict `{variable}` rendering of step fields.
//! - [`build`]: one build, from spec to a finished, checked build directory, and the
//!   [`build::Switch`] that puts it in service; typed [`build::BuildError`]s.
//! - [`check`]: the verification checks of a ready environment.
//! - [`installed`]: whether the files Python installers recorded (`*.dist-info/RECORD`) are
//!   still on disk and still what was installed (their sha256), read without running anything
//!   of the environment.
//! - [`runner`]: runs one command under the step supervisor (or, unsupervised, in its own
//!   process group) with a scrubbed environment, a timeout, and output captured into a
//!   [`log::CappedLog`].
//! - [`supervise`]: the step supervisor: a subreaper that kills whatever a step leaves
//!   behind, sets its resource limits and confines it with Landlock.
//! - [`probe`]: what builds and checks ask of the host: the step environment, pack and cache
//!   paths, command lookup, `--version`.
//! - [`toolchain`]: the interpreter a pack asks for (`runtime_dependencies`) and the one the
//!   host has that satisfies it.
//! - [`manifest`]: pack files read beneath the pack's directory, and the check that no include
//!   or local path of a build's dependency manifests leads out of the pack.
//! - [`fingerprint`]: the hash of what an environment depends on, to skip needless rebuilds.
//! - [`inuse`]: which build directories running processes still use (read from `/proc`).
//! - [`layout`]: where builds live under the envs root, path safety, the atomic symlink switch.
//!
//! The queue, the claim and everything that talks to PostgreSQL live in the `packenvd` crate.

pub mod build;
pub mod check;
pub mod fingerprint;
pub mod fsat;
pub mod installed;
pub mod inuse;
pub mod layout;
pub mod log;
pub mod manifest;
pub mod probe;
pub mod runner;
pub mod spec;
pub mod supervise;
pub mod target;
pub mod template;
pub mod toolchain;

/// Runs blocking file-system work on tokio's blocking pool, so that a slow disk or a hostile
/// path never stalls the async threads that keep heartbeats and health answers going.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
