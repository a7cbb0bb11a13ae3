//! Every SQL statement of packenvd, one function each, and the state machine they make.
//! Queries are checked at run time (`sqlx::query_as`), and the integration tests run each of
//! them against a real PostgreSQL.
//!
//! # The state machine (DESIGN §2), per node (DESIGN §8)
//!
//! The platform writes `pack_environment`, one row per (pack, runtime); the queue is
//! `pack_environment_node`, one row per (environment, node), and the machine below is a node
//! row's. The parent's `status` is the summary of its required node rows (see the migration
//! `…_nodes.sql`), kept in the same statement as each node row's change.
//!
//! | from | to | made by |
//! |---|---|---|
//! | (none) | `pending` | the fan-out trigger, for each live node that can build the runtime, when the platform inserts or asks (`request_pack_environment()`, a plain `INSERT` or `UPDATE`); [`catch_up`] for a node that joins or returns; [`adopt`] takes over a single-host row as it is |
//! | `pending`, `outdated` | `installing` | [`claim`] or [`claim_lanes`] of the row's own node (attempts + 1, a fresh claim token, a lease) |
//! | `installing` | `ready` | [`finish`] with [`Transition::Ready`] or [`Transition::Unchanged`] |
//! | `installing` | `pending` (run later) | [`finish`] with [`Transition::Retry`] |
//! | `installing` | `failed` | [`finish`] with [`Transition::Failed`] |
//! | `installing` | `pending` (attempt not spent) | [`finish`] with [`Transition::Released`] (shutdown) or [`Transition::Deferred`] (a request the answer lane hands to the build lane) |
//! | `installing`, lease expired | `pending`, or `failed` when attempts are spent | [`rescue_expired`] of the same node |
//! | `ready` | `outdated` | [`finish_verification`] with a failure; [`builds_missing`] at start; a pack update (the platform's `UPDATE`, fanned out) |
//! | any | `pending` | an operator's `UPDATE` of the parent, [`rebuild`] (all nodes) or [`rebuild_on_node`]: the triggers drop the claim and start the attempts over |
//!
//! Fencing (DESIGN §3): every write for a claimed row says `WHERE id = $1 AND claim_token = $2`
//! and reports whether it matched, so a stale build never overwrites a reset or another claim.
//! A ready build's switch on disk happens inside [`lock_fenced`]'s transaction, while the row
//! lock keeps any reset waiting, so a lost claim never changes what `env_path` serves.

mod admin;
mod nodes;
mod queue;
mod summary;
mod verify;
mod watch;
mod write_back;

use std::time::Duration;

use chrono::{DateTime, Utc};
use packenv_core::target::Target;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

pub use admin::*;
pub use nodes::*;
pub use queue::*;
pub use verify::*;
pub use watch::*;
pub use write_back::*;

/// Migrations embedded from the workspace's `migrations/` directory. Versions in
/// `_sqlx_migrations` that are not ours are ignored: a platform that migrates its own schema
/// with sqlx keeps its versions in the same table (issue 15).
pub static MIGRATOR: sqlx::migrate::Migrator = {
    let mut m = sqlx::migrate!("../../migrations");
    m.ignore_missing = true;
    m
};

/// The channel the NOTIFY trigger sends on.
pub const WAKEUP_CHANNEL: &str = "packenvd_wakeup";

/// What a pool's sessions run, which decides what they tell the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The daemon's: the queue's statements (claim, write-back, heartbeat, rescue, verification
    /// claim), each driven by an index on ids or on the node and run thousands of times a
    /// minute.
    ///
    /// They are planned once per connection (a generic plan): PostgreSQL would otherwise plan a
    /// claim or a write-back again on most executions, because a plan that knows the length of
    /// its id arrays and its LIMIT looks cheaper, and that planning cost more than running the
    /// statement (up to a millisecond per claim at concurrency 8, three times what it runs in).
    /// Sequential scans are disabled so that a plan made while the tables are empty (a
    /// daemon's first claim on a new database) uses the indexes too, rather than scanning
    /// every parent on each claim until the next ANALYZE replans it. A statement without an
    /// index to use still scans. JIT is off: no statement of the daemon's runs long enough to
    /// repay a compilation, and a disabled scan's cost (PostgreSQL's way of disabling it) would
    /// otherwise pass `jit_above_cost` and compile queries in a loop (a start-up statement over
    /// 2,000 environments took minutes).
    Daemon,
    /// A command's: each statement runs about once, planned with what its parameters are.
    Command,
}

/// Opens a pool of `max` connections.
pub async fn connect(url: &str, max: u32, workload: Workload) -> Result<PgPool, sqlx::Error> {
    connect_with_password(url, None, max, workload).await
}

/// Opens a pool of `max` connections, with `password` when the URL holds none: the
/// `PGPASSWORD` the daemon took out of its environment before sqlx could read it there.
pub async fn connect_with_password(
    url: &str,
    password: Option<&str>,
    max: u32,
    workload: Workload,
) -> Result<PgPool, sqlx::Error> {
    let mut options: PgConnectOptions = url.parse()?;
    if let Some(password) = password.filter(|_| !crate::config::has_password(url)) {
        options = options.password(password);
    }
    let options = options.application_name("packenvd");
    // One connection first, with a short limit: a refused or unreachable server is reported at
    // once with its cause, where the pool would retry for its whole acquire timeout and then
    // say only that it timed out.
    match tokio::time::timeout(FIRST_CONTACT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", FIRST_CONTACT.as_secs()),
            )))
        }
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // The default pings every connection taken from the pool: a round trip per statement.
        // A connection that died with the server fails its statement instead, and every
        // caller retries (claims, heartbeats and write-backs back off and try again).
        .test_before_acquire(false)
        // SET after connecting rather than startup options: a pooler such as PgBouncer refuses
        // a startup parameter it does not know.
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if workload == Workload::Daemon {
                    conn.execute(DAEMON_SESSION).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
}

/// The settings of the daemon's sessions ([`Workload::Daemon`]). Each statement is planned
/// once per connection, and a plan made once must suit every call: a generic plan knows
/// neither a claim's LIMIT nor a write-back's arrays and guesses a tenth of the queue, so on a
/// large queue it would scan or merge whole tables and indexes to join a few rows. Every
/// statement of the daemon is driven by keys (DESIGN §3), so it is planned as nested lookups by
/// index; `jit` is off because the disabled plans' costs would otherwise pass its threshold.
const DAEMON_SESSION: &str = "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
     SET enable_mergejoin = off; SET enable_hashjoin = off; SET jit = off";

/// How long the first connection may take before `packenvd` says the server does not answer.
const FIRST_CONTACT: Duration = Duration::from_secs(5);

/// Where a database URL points, for messages: `host:port`, or the socket directory and port,
/// with the database and user (never the password).
pub fn describe_url(url: &str) -> String {
    let Ok(o) = url.parse::<PgConnectOptions>() else {
        return "(a URL that does not parse)".into();
    };
    let at = match o.get_socket() {
        Some(dir) => format!("socket {}/.s.PGSQL.{}", dir.display(), o.get_port()),
        None => format!("{}:{}", o.get_host(), o.get_port()),
    };
    format!(
        "{at}, database {:?} as {:?}",
        o.get_database().unwrap_or(o.get_username()),
        o.get_username()
    )
}

/// `pack_environment.status`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, sqlx::Type, clap::ValueEnum,
)]
#[sqlx(type_name = "pack_environment_status_enum", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Installing,
    Ready,
    Failed,
    Outdated,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Installing,
        Status::Ready,
        Status::Failed,
        Status::Outdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Installing => "installing",
            Status::Ready => "ready",
            Status::Failed => "failed",
            Status::Outdated => "outdated",
        }
    }

    /// Work is asked for or under way: a daemon has something to do.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            Status::Pending | Status::Installing | Status::Outdated
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a write for a claimed row must match: the row and the claim it was built under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    pub id: i64,
    pub token: Uuid,
}

/// How a claimed build ended, as the row records it.
#[derive(Debug, Clone)]
pub enum Transition {
    /// A new build is served: `ready`, with where it is and what it was built from.
    Ready {
        /// `None` for runtimes that need no environment.
        env_path: Option<String>,
        metadata: serde_json::Value,
        fingerprint: Option<String>,
        log: String,
    },
    /// A request answered by the current build: `ready` again, nothing rebuilt.
    Unchanged { log: String },
    /// A retryable failure with attempts left: `pending` again after `after`.
    Retry {
        after: Duration,
        error: String,
        log: String,
    },
    /// A permanent failure, or the last attempt: `failed`.
    Failed { error: String, log: String },
    /// Stopped by shutdown: `pending` at once, the attempt not counted.
    Released { log: String },
    /// A request the answer lane could not answer without a build: `pending` at once for the
    /// build lane, the attempt not counted, the log of the current build kept.
    Deferred,
}

impl Transition {
    /// The status the row ends in.
    pub fn status(&self) -> Status {
        match self {
            Transition::Ready { .. } | Transition::Unchanged { .. } => Status::Ready,
            Transition::Retry { .. } | Transition::Released { .. } | Transition::Deferred => {
                Status::Pending
            }
            Transition::Failed { .. } => Status::Failed,
        }
    }

    /// A label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Transition::Ready { .. } => "ready",
            Transition::Unchanged { .. } => "unchanged",
            Transition::Retry { .. } => "retry",
            Transition::Failed { .. } => "failed",
            Transition::Released { .. } => "released",
            Transition::Deferred => "deferred",
        }
    }
}

/// An environment taken to build (with a claim) or to check (with the time it was taken):
/// the row, its pack and its runtime.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EnvRow {
    /// The node row (`pack_environment_node.id`): what claims, fences and checks name.
    pub id: i64,
    /// The environment (`pack_environment.id`): what the platform and the logs name.
    pub env_id: i64,
    pub pack_ref: String,
    pub runtime_ref: String,
    pub runtime_name: String,
    pub env_path: Option<String>,
    pub storage_path: Option<String>,
    /// The pack row's `runtime_dependencies` (JSON text), when its table has the column.
    pub pack_dependencies: Option<String>,
    /// `runtime.installers` as text: decoded per row, so one bad spec fails one row.
    pub installers: String,
    pub fingerprint: Option<String>,
    /// `metadata` as text, for the same reason.
    pub metadata: String,
    /// Set by a build claim; NULL for a verification.
    pub claim_token: Option<Uuid>,
    pub attempts: i32,
    /// Set by `request_pack_environment()`: a matching fingerprint may skip the rebuild.
    pub skip_if_current: bool,
    /// Seconds from the row becoming claimable (its last write, or its run_after) to this claim.
    pub pickup_secs: f64,
    /// The `last_verified` a verification claim set; its result is written only if unchanged.
    pub checked_at: Option<DateTime<Utc>>,
    /// What the claim found the row to contradict (its pack's ref, another runtime's
    /// directory); the build fails with it.
    pub problem: Option<String>,
    /// For a verification: `last_verified` and `last_verify_result` before the claim, to give
    /// the row back unchecked when the pass cannot finish.
    pub previous_verified: Option<DateTime<Utc>>,
    pub previous_result: Option<String>,
    /// Claimed by the answer lane (a request, answered from the current build if it can be).
    #[sqlx(default)]
    pub answer: bool,
    /// For a request that an unchanged build may answer (`skip_if_current`): the row's log
    /// before the claim, the current build's, which such an answer keeps beside its note.
    #[sqlx(default)]
    pub previous_log: Option<String>,
}

/// The line between an unchanged answer's note and the log of the build it points to.
pub const CURRENT_BUILD_LOG: &str = "==> the current build's log, as it was written:";

/// The log of a request answered by the current build: the note, then that build's own log
/// (`previous`, without the note of an earlier such answer).
pub fn unchanged_log(note: &str, previous: Option<&str>) -> String {
    let previous = previous.map(|p| match p.find(CURRENT_BUILD_LOG) {
        Some(i) => p[i + CURRENT_BUILD_LOG.len()..].trim_start_matches('\n'),
        None => p,
    });
    match previous.filter(|p| !p.trim().is_empty()) {
        Some(p) => format!("{}\n{CURRENT_BUILD_LOG}\n{p}", note.trim_end_matches('\n')),
        None => note.to_owned(),
    }
}

impl EnvRow {
    /// What the build or the check needs of the row.
    pub fn target(&self) -> Target {
        Target {
            env_id: self.env_id,
            pack_ref: self.pack_ref.clone(),
            runtime_ref: self.runtime_ref.clone(),
            runtime_name: self.runtime_name.clone(),
            env_path: self.env_path.clone(),
            storage_path: self.storage_path.clone(),
            pack_dependencies: self.pack_dependencies.clone(),
            installers: self.installers.clone(),
            fingerprint: self.fingerprint.clone(),
            metadata: self.metadata.clone(),
            problem: self.problem.clone(),
        }
    }
}

/// A row claimed for a build, and the fence its writes carry.
#[derive(Debug, Clone)]
pub struct Claim {
    pub fence: Fence,
    pub row: EnvRow,
}

/// Whether an error may pass by itself (the connection or the server went away, a pool
/// timeout), as opposed to the database refusing the statement (a constraint, a permission):
/// retrying the latter only repeats the refusal.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            // Class 08: connection exceptions; 53: insufficient resources; 57: operator
            // intervention (shutdown, cancel); 40: serialization failure, deadlock.
            db.code()
                .is_some_and(|c| ["08", "53", "57", "40"].iter().any(|p| c.starts_with(p)))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_answer_keeps_the_current_builds_log_once() {
        let note = "==> inputs unchanged since the current build (fingerprint matches): already up to date\n";
        let built = "==> step 1/1 'install': pip install\nInstalled six\n";
        assert_eq!(unchanged_log(note, None), note);
        assert_eq!(unchanged_log(note, Some("  \n")), note);
        let once = unchanged_log(note, Some(built));
        assert_eq!(
            once,
            format!("{}\n{CURRENT_BUILD_LOG}\n{built}", note.trim_end())
        );
        // Asked again: the earlier note goes, the build's log stays, once.
        let twice = unchanged_log(note, Some(&once));
        assert_eq!(twice, once);
    }
}
