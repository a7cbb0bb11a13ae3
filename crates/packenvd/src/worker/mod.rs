//! The build loop: wake on NOTIFY (or the poll fallback), claim as many rows as there are free
//! build slots, build each in its own task, write the result back fenced by its claim token.
//! [`Worker::run`] (the daemon) and [`Worker::drain`] (tests, batch jobs) share one body,
//! [`Worker::step`]. The maintenance services run beside the loop ([`crate::services`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use packenv_core::build::{self, Built};
use packenv_core::log::BuildLog;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Settings;
use crate::error::chain;
use crate::inflight::Inflight;
use crate::ops::{Health, Metrics, Notifier};
use crate::services::ready_writer::{ReadyJob, ReadyWriter, MAX_DB_RETRY_DELAY};
use crate::services::{self, Live};
use crate::store::{self, Claim, Transition};
use crate::Error;

/// The shutdown of one [`Worker::run`]: one root token, whose children are everything that
/// runs (the claim loop, each build, each service).
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Cancelled on the first signal: no new claims; running builds get `shutdown_grace`.
    pub stop: CancellationToken,
    /// Cancelled when the grace is over or on a second signal: builds are killed and hand
    /// their rows back, the services stop.
    pub root: CancellationToken,
}

impl Shutdown {
    /// Stop claiming, let running builds finish within the grace (the first signal).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Kill running builds now (the second signal).
    pub fn kill(&self) {
        self.root.cancel();
    }
}

/// What one turn of the loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Claimed this many rows and started their builds.
    Claimed(usize),
    /// Claimed nothing: the queue had nothing claimable, or every build slot is taken.
    Idle,
}

/// One packenvd instance's builder. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    /// The current settings; SIGHUP sends new ones. Each build takes a snapshot at its start.
    settings: Live,
    settings_tx: watch::Sender<Arc<Settings>>,
    inflight: Arc<Inflight>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    notifier: Arc<Notifier>,
    /// To the ready writer: one statement for every build that finished while the previous
    /// one ran (group commit). The writer ends when the last worker handle is dropped.
    ready_tx: mpsc::UnboundedSender<ReadyJob>,
    /// The root of every cancellation (see [`Shutdown`]).
    root: CancellationToken,
    /// What the host can build, found out once (`packenvd_node.runtimes` and `tools`).
    detected: tokio::sync::OnceCell<(serde_json::Value, serde_json::Value)>,
    /// The active protections, for the node registry.
    protections: std::sync::Mutex<Vec<String>>,
    /// Tasks of the answer lane now running (they are in the build set but take no slot).
    answering: std::sync::atomic::AtomicUsize,
    /// Requests the answer lane handed to the build lane, which it does not take again.
    deferred: std::sync::Mutex<std::collections::HashSet<i64>>,
    /// Rows the database refused, kept out of this daemon's claims for a backoff.
    quarantine: std::sync::Mutex<refused::Quarantine>,
}

impl Worker {
    /// A worker with its ready writer running on the current tokio runtime.
    pub fn new(pool: PgPool, settings: Arc<Settings>) -> Self {
        let (settings_tx, settings_rx) = watch::channel(settings);
        let metrics = Arc::<Metrics>::default();
        let root = CancellationToken::new();
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let writer = ReadyWriter {
            pool: pool.clone(),
            metrics: metrics.clone(),
            root: root.clone(),
        };
        tokio::spawn(writer.run(ready_rx));
        Worker {
            shared: Arc::new(Shared {
                pool,
                settings: settings_rx,
                settings_tx,
                inflight: Arc::default(),
                metrics,
                health: Arc::default(),
                notifier: Arc::default(),
                ready_tx,
                root,
                detected: tokio::sync::OnceCell::new(),
                protections: std::sync::Mutex::default(),
                answering: Default::default(),
                deferred: Default::default(),
                quarantine: Default::default(),
            }),
        }
    }

    /// The shutdown handle of this worker's [`Worker::run`].
    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            stop: self.shared.root.child_token(),
            root: self.shared.root.clone(),
        }
    }

    /// The settings now.
    pub fn cfg(&self) -> Arc<Settings> {
        self.shared.settings.borrow().clone()
    }

    /// The live settings, for services.
    pub fn live_settings(&self) -> Live {
        self.shared.settings.clone()
    }

    /// Applies reloaded settings (SIGHUP); running builds keep the ones they started with.
    pub fn reload(&self, settings: Settings) {
        self.shared.settings_tx.send_replace(Arc::new(settings));
    }

    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.shared.health.clone()
    }

    pub fn inflight(&self) -> Arc<Inflight> {
        self.shared.inflight.clone()
    }

    /// Starts this node: claims the envs root, registers what the host can build, adopts and
    /// catches up, checks the disk (DESIGN §8). What the host can build is found out once per
    /// worker.
    pub async fn start_node(&self) -> Result<crate::node::Started, Error> {
        let cfg = self.cfg();
        let detected = self
            .shared
            .detected
            .get_or_try_init(|| crate::node::detect(&self.shared.pool, &cfg))
            .await?;
        let protections = self
            .shared
            .protections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        crate::node::start(&self.shared.pool, &cfg, detected, &protections).await
    }

    /// What protects the host, as the node registry reports it (the daemon's start-up check).
    pub fn set_protections(&self, active: Vec<String>) {
        *self
            .shared
            .protections
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = active;
    }

    /// One turn: reaps finished builds, claims as many rows as there are free slots, and
    /// starts a build for each.
    pub async fn step(&self, builds: &mut JoinSet<()>) -> Result<Step, Error> {
        use std::sync::atomic::Ordering::Relaxed;
        while builds.try_join_next().is_some() {}
        let cfg = self.cfg();
        let answering = self.shared.answering.load(Relaxed);
        let free = cfg
            .concurrency
            .saturating_sub(builds.len().saturating_sub(answering));
        // Refilled in batches, once half the lane is done: a claim per answered row would make
        // the lane as slow as the round trips it exists to share.
        let answer_free = if answering <= ANSWER_LANE / 2 {
            ANSWER_LANE - answering
        } else {
            0
        };
        if free == 0 && answer_free == 0 {
            return Ok(Step::Idle);
        }
        let deferred: Vec<i64> = {
            let mut d = self
                .shared
                .deferred
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if d.len() > DEFERRED_MAX {
                d.clear();
            }
            d.iter().copied().collect()
        };
        let refused = self.refused_ids(&cfg).await;
        let lanes = store::Lanes {
            build: free as i64,
            answer: answer_free as i64,
            deferred: &deferred,
            refused: &refused,
            only: None,
        };
        let claims = match store::claim_lanes(
            &self.shared.pool,
            &cfg.node_name,
            &cfg.instance_name,
            cfg.lease,
            lanes,
            &cfg.envs_root,
        )
        .await
        {
            Ok(claims) => claims,
            // The server answered and refused: one row's trigger or constraint must not keep
            // the others pending (issue 21).
            Err(e) if !store::is_transient(&e) => self.claim_isolating(&cfg, lanes, e).await?,
            Err(e) => return Err(Error::db("claiming rows")(e)),
        };
        self.claimed(&claims);
        if claims.is_empty() {
            return Ok(Step::Idle);
        }
        let n = claims.len();
        for claim in claims {
            self.shared
                .metrics
                .pickup_latency
                .observe(claim.row.pickup_secs.max(0.0));
            let cancel = self.shared.root.child_token();
            let log = BuildLog::new(cfg.log_max_bytes);
            self.shared
                .inflight
                .insert(claim.fence, cancel.clone(), log.clone());
            if claim.row.answer {
                self.shared.answering.fetch_add(1, Relaxed);
                let guard = Answering(self.shared.clone());
                builds.spawn(self.clone().answer(claim, cancel, log, guard));
            } else {
                if !deferred.is_empty() {
                    self.shared
                        .deferred
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&claim.fence.id);
                }
                builds.spawn(self.clone().build(claim, cancel, log));
            }
        }
        Ok(Step::Claimed(n))
    }

    /// Claims and builds until nothing is claimable and no build runs; returns how many builds
    /// ran. The deterministic entry point for tests: no listener, no timers, no services.
    pub async fn drain(&self) -> Result<usize, Error> {
        self.start_node().await?;
        let mut builds = JoinSet::new();
        let mut total = 0;
        loop {
            match self.step(&mut builds).await? {
                Step::Claimed(n) => total += n,
                Step::Idle => {
                    if builds.join_next().await.is_none() {
                        return Ok(total);
                    }
                }
            }
        }
    }

    /// The daemon's loop, with the services beside it, until `shutdown.stop` (or, with
    /// `until_done`, until no row is pending, outdated or installing); then the shutdown of
    /// DESIGN §7: running builds get `shutdown_grace`, then are killed and hand their rows back.
    pub async fn run(&self, shutdown: &Shutdown, until_done: bool) -> Result<(), Error> {
        let pool = &self.shared.pool;
        // Listen before the first claim, so no wake-up between the two is missed.
        let mut listener = PgListener::connect_with(pool)
            .await
            .map_err(Error::db("connecting the NOTIFY listener"))?;
        listener
            .listen(store::WAKEUP_CHANNEL)
            .await
            .map_err(Error::db("listening for wake-ups"))?;
        // The database may go away during the start as at any other time: wait for it, as
        // the claim loop does. What is wrong on this host (its envs root, its name) stops it.
        let mut delay = Duration::from_millis(200);
        let started = loop {
            match self.start_node().await {
                Ok(started) => break started,
                Err(Error::Db { what, source }) if store::is_transient(&source) => {
                    tracing::warn!(error = %source, what, retry_in = ?delay, "cannot start the node; database unreachable?");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.stop.cancelled() => return Ok(()),
                    }
                    delay = (delay * 2).min(MAX_DB_RETRY_DELAY);
                }
                Err(e) => return Err(e),
            }
        };
        let cfg = self.cfg();
        // A list left by this instance's previous run names rows it no longer keeps out.
        self.publish_refused(&cfg).await;
        if started != crate::node::Started::default() {
            tracing::info!(node = %cfg.node_name, adopted = started.adopted, caught_up = started.caught_up, missing_on_disk = started.missing, "node started");
        }
        let services = TaskTracker::new();
        self.start_services(&services, &shutdown.root);
        let mut builds = JoinSet::new();
        let mut db_delay = Duration::from_millis(200);
        tracing::info!(instance = %cfg.instance_name, node = %cfg.node_name, concurrency = cfg.concurrency, "packenvd started");
        let (health, notifier) = (&self.shared.health, &self.shared.notifier);
        health.db_answered();
        notifier.ready(&format!(
            "connected; up to {} builds at once",
            cfg.concurrency
        ));
        'daemon: loop {
            health.loop_turned();
            notifier.watchdog();
            if shutdown.stop.is_cancelled() {
                break 'daemon;
            }
            // A turn that has begun is finished, however soon the stop comes: dropped between
            // its claim's commit and the start of its builds, its rows would stay `installing`
            // with nobody building them until their lease ran out. Bounded, so a database that
            // stops answering mid-claim cannot hold the shutdown (the lease covers that case).
            let step = {
                let turn = self.step(&mut builds);
                tokio::pin!(turn);
                tokio::select! {
                    step = &mut turn => step,
                    () = shutdown.stop.cancelled() => {
                        let _ = tokio::time::timeout(STOPPING_TURN, turn).await;
                        break 'daemon;
                    }
                }
            };
            match step {
                Ok(Step::Claimed(_)) | Ok(Step::Idle) => {
                    health.db_answered();
                    db_delay = Duration::from_millis(200);
                }
                Err(e) => {
                    self.shared.metrics.db_errors.inc();
                    let refused =
                        matches!(&e, Error::Db { source, .. } if !store::is_transient(source));
                    if refused {
                        notifier.status(&format!("the database refuses claims: {}", chain(&e)));
                        tracing::warn!(error = %chain(&e), retry_in = ?db_delay, "claim failed: the database refused it for every row it would take");
                    } else {
                        notifier.status(&format!("database unreachable: {}", chain(&e)));
                        tracing::warn!(error = %chain(&e), retry_in = ?db_delay, "claim failed; database unreachable?");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(db_delay) => {}
                        () = shutdown.stop.cancelled() => break,
                    }
                    db_delay = (db_delay * 2).min(MAX_DB_RETRY_DELAY);
                    continue;
                }
            }
            if until_done
                && builds.is_empty()
                && store::work_left(pool, &cfg.node_name)
                    .await
                    .is_ok_and(|left| !left)
            {
                break;
            }
            let poll = tokio::time::sleep(self.cfg().poll_interval);
            tokio::pin!(poll);
            // Wait for something that may have made work: a build ending, a wake-up for this
            // node (other nodes' wake-ups are ignored), or the poll.
            loop {
                tokio::select! {
                    () = shutdown.stop.cancelled() => break 'daemon,
                    Some(_) = builds.join_next(), if !builds.is_empty() => break,
                    n = listener.recv() => match n {
                        Ok(n) if n.payload() != cfg.node_name && !n.payload().is_empty() => {}
                        Ok(_) => break,
                        Err(e) => {
                            // The listener reconnects on its next recv; until then the poll
                            // covers.
                            tracing::warn!(error = %chain(&e), "lost the NOTIFY connection");
                            tokio::time::sleep(db_delay).await;
                            break;
                        }
                    },
                    () = &mut poll => break,
                }
            }
        }
        notifier.stopping(&format!("stopping: {} build(s) finishing", builds.len()));
        self.finish_builds(&mut builds, shutdown).await;
        shutdown.root.cancel();
        services.close();
        if tokio::time::timeout(Duration::from_secs(10), services.wait())
            .await
            .is_err()
        {
            tracing::warn!("a service did not stop within 10 s");
        }
        Ok(())
    }

    /// Starts the maintenance services, each stopped by a child of `root`.
    fn start_services(&self, tracker: &TaskTracker, root: &CancellationToken) {
        use services::{
            collector::Collector, heartbeat::Heartbeat, log_flusher::LogFlusher, rescuer::Rescuer,
            run_every, status_line::StatusLine, verifier::Verifier,
        };
        let s = &self.shared;
        tracker.spawn(run_every(
            Heartbeat {
                pool: s.pool.clone(),
                config: services::heartbeat::HeartbeatConfig {
                    lease: self.cfg().lease,
                    node: self.cfg().node_name.clone(),
                },
                inflight: s.inflight.clone(),
                metrics: s.metrics.clone(),
                health: s.health.clone(),
            },
            root.child_token(),
        ));
        tracker.spawn(run_every(
            Rescuer {
                pool: s.pool.clone(),
                settings: s.settings.clone(),
                metrics: s.metrics.clone(),
            },
            root.child_token(),
        ));
        tracker.spawn(run_every(
            LogFlusher {
                pool: s.pool.clone(),
                inflight: s.inflight.clone(),
                metrics: s.metrics.clone(),
            },
            root.child_token(),
        ));
        tracker.spawn(run_every(
            Collector {
                pool: s.pool.clone(),
                settings: s.settings.clone(),
                metrics: s.metrics.clone(),
            },
            root.child_token(),
        ));
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            tracker.spawn(run_every(
                StatusLine {
                    pool: s.pool.clone(),
                    node: self.cfg().node_name.clone(),
                    inflight: s.inflight.clone(),
                    notifier: s.notifier.clone(),
                },
                root.child_token(),
            ));
        }
        let verifier = Verifier::new(s.pool.clone(), s.settings.clone(), s.metrics.clone());
        let stop = root.child_token();
        tracker.spawn(async move {
            if let Err(e) = verifier.run(stop).await {
                tracing::error!(error = %chain(&e), "verification scheduler stopped");
            }
        });
    }

    /// Lets running builds finish within `shutdown_grace`, then kills the rest (they hand
    /// their rows back) and waits for their write-backs.
    async fn finish_builds(&self, builds: &mut JoinSet<()>, shutdown: &Shutdown) {
        if builds.is_empty() {
            return;
        }
        let grace = self.cfg().shutdown_grace;
        tracing::info!(running = builds.len(), grace = %humantime::format_duration(grace), "stopping: waiting for running builds");
        tokio::select! {
            () = async { while builds.join_next().await.is_some() {} } => {}
            () = tokio::time::sleep(grace) => {}
            () = shutdown.root.cancelled() => {}
        }
        if !builds.is_empty() {
            tracing::warn!(
                running = builds.len(),
                "grace over: killing builds and handing their rows back"
            );
            shutdown.root.cancel();
            while builds.join_next().await.is_some() {}
        }
    }

    /// One build, from claim to write-back.
    async fn build(self, claim: Claim, cancel: CancellationToken, log: BuildLog) {
        let row = &claim.row;
        let span = tracing::info_span!("build", pack_ref = %row.pack_ref, runtime_ref = %row.runtime_ref, env_id = row.env_id, claim_token = %claim.fence.token);
        async {
            tracing::info!(attempt = row.attempts, "installing");
            let settings = self.cfg();
            let started = Instant::now();
            let result = build::run(
                &settings.build_config(),
                &row.target(),
                &claim.fence.token.simple().to_string(),
                row.skip_if_current,
                &log,
                &cancel,
            )
            .await;
            self.shared
                .metrics
                .build_duration
                .observe(started.elapsed().as_secs_f64());
            let text = log.render();
            let (transition, switch) = match result {
                Ok(Built::NoEnvironment { metadata }) => (
                    Transition::Ready {
                        env_path: None,
                        metadata,
                        fingerprint: None,
                        log: text,
                    },
                    None,
                ),
                Ok(Built::Ready(r)) => (
                    Transition::Ready {
                        env_path: Some(r.env_path),
                        metadata: r.metadata,
                        fingerprint: Some(r.fingerprint),
                        log: text,
                    },
                    Some(r.switch),
                ),
                Ok(Built::Unchanged) => (
                    Transition::Unchanged {
                        log: store::unchanged_log(&text, row.previous_log.as_deref()),
                    },
                    None,
                ),
                Err(f) => (failure(&settings, &claim, &f, text), None),
            };
            self.write_back(&settings, &claim, transition, switch, started.elapsed())
                .await;
        }
        .instrument(span)
        .await;
        self.shared.inflight.remove(&claim.fence.token);
    }
}

mod answer;
mod refused;
mod write_back;
use answer::{Answering, ANSWER_LANE, DEFERRED_MAX};

/// How long a claim turn under way may still take once the daemon is told to stop.
const STOPPING_TURN: Duration = Duration::from_secs(5);
pub use write_back::backoff;
use write_back::failure;
