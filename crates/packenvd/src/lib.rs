//! packenvd: keeps one isolated environment per (pack, runtime), driven by the
//! `pack_environment` table in PostgreSQL. What an environment *is* (specs, templates, the
//! build, the step runner, the checks, the on-disk layout) lives in the `packenv-core` crate,
//! which knows nothing of the database; this crate owns the queue and the daemon around it.
//!
//! # Layout
//! - [`config`]: the typed, layered [`config::Settings`], each setting declared once.
//! - [`store`]: every SQL statement, one function each; the state machine ([`store::Status`],
//!   [`store::Transition`], the table at the top of the module); the embedded migrations.
//! - [`worker`]: the claim loop ([`worker::Worker::step`]), one task per build, the fenced
//!   write-back, the shutdown with its grace.
//! - [`inflight`]: the registry of running builds the services share.
//! - [`services`]: heartbeat, rescuer, log flusher, collector, status line, verifier, ready
//!   writer; each with a `run_once()`.
//! - [`verify`]: a verification pass (the verifier service and `packenvd verify`).
//! - [`gc`]: which builds the collector (and `packenvd remove`) may delete, and deleting them.
//! - [`ops`]: metrics, `/healthz`, the systemd notify protocol.
//! - [`daemon`]: `packenvd run`: migration policy, signals, reloads, the metrics server.
//! - [`logging`]: the log subscriber and its reloadable filter.
//! - [`cli`]: the command line and the operator commands (`status`, `request`, ...).
//! - [`error`]: the library's [`Error`] and the error-chain printer.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod gc;
pub mod hardening;
pub mod inflight;
pub mod logging;
pub mod node;
pub mod ops;
pub mod services;
pub mod store;
pub mod verify;
pub mod worker;

pub use error::Error;
