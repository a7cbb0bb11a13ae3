//! packenv-core: what an environment build is, without any database.
//!
//! # Layout
//! - [`spec`]: parses `runtime.installers` (steps, executables, env vars) with errors that say
//!   where the JSON is wrong.
//! - [`template`]: strict `{variable}` rendering of step fields.
//! - [`runner`]: runs one command in its own process group with a scrubbed environment, a
//!   timeout, and output captured into a [`log::CappedLog`].
//! - [`fingerprint`]: the hash of what an environment depends on, to skip needless rebuilds.
//! - [`inuse`]: which build directories running processes still use (read from `/proc`).
//! - [`layout`]: where builds live under the envs root, path safety, the atomic symlink switch.
//!
//! The queue, the claim and everything that talks to PostgreSQL live in the `packenvd` crate.

pub mod fingerprint;
pub mod inuse;
pub mod layout;
pub mod log;
pub mod runner;
pub mod spec;
pub mod template;
