//! packenvd: keeps one isolated environment per (pack, runtime), driven by the
//! `pack_environment` table in PostgreSQL.
//!
//! # Layout
//! - [`config`]: the typed, layered [`config::Settings`] (file < environment < flags).
//! - [`store`]: every SQL statement, one function each; the embedded migrations.
//! - [`build`]: one build of a claimed row, without database access.
//! - [`worker`]: the claim loop, heartbeats and rescue, fenced write-back, shutdown.
//! - [`verify`]: the verification passes (cron and `packenvd verify`).
//! - [`ops`]: metrics, `/healthz`, the systemd notify protocol.
//! - [`gc`]: removes superseded and orphaned builds after a grace, never one a process uses.
//! - [`cli`]: the operator commands (`status`, `request`, `rebuild`, `logs`, ...).
//!
//! What an environment *is* (specs, templates, the step runner, the on-disk layout) lives in
//! the `packenv-core` crate, which knows nothing of the database.

pub mod build;
pub mod cli;
pub mod config;
pub mod gc;
pub mod ops;
pub mod store;
pub mod verify;
pub mod worker;
