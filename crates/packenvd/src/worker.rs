//! The build loop: wake on NOTIFY (or the poll fallback), claim as many rows as there are free
//! build slots, build each in its own task, write the result back fenced by its claim token.
//! Beside it, one heartbeat renews every lease this instance holds and rescues rows whose
//! holder died.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use packenv_core::log::CappedLog;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::build::{self, BuildResult};
use crate::config::Settings;
use crate::ops::{Health, Metrics, Notifier};
use crate::store::{self, Claimed};

/// How often a running build's log is written to its row.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Ceiling of the retry delay of claims and write-backs while the database is away: short,
/// because results wait in memory and the rows stay `installing` until it returns.
const MAX_DB_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Most `ready` results one write-back statement carries.
const MAX_WRITE_BATCH: usize = 500;

/// A finished build waiting for the batch writer, and where to say whether it was written.
#[derive(Debug)]
struct ReadyWrite {
    row: store::ReadyRow,
    written: oneshot::Sender<bool>,
}

/// Cancellation of the builds this instance runs, by claim token.
type Inflight = Arc<Mutex<HashMap<Uuid, CancellationToken>>>;

/// Shutdown signals of [`Worker::run`]: `stop` ends claiming and starts the grace period;
/// `kill` ends the grace at once (a second signal).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub kill: CancellationToken,
}

/// One packenvd instance's builder.
#[derive(Debug, Clone)]
pub struct Worker {
    pool: PgPool,
    /// The current settings; SIGHUP sends new ones. Each build takes a snapshot at its start.
    settings: watch::Receiver<Arc<Settings>>,
    settings_tx: Arc<watch::Sender<Arc<Settings>>>,
    inflight: Inflight,
    /// Cancelled when running builds must die (grace over); their rows go back to pending.
    kill_builds: CancellationToken,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    notifier: Arc<Notifier>,
    /// To the task that writes `ready` results in batches: one statement for every build that
    /// finished while the previous statement ran (group commit).
    ready_tx: mpsc::UnboundedSender<ReadyWrite>,
}

impl Worker {
    pub fn new(pool: PgPool, settings: Arc<Settings>) -> Self {
        let (tx, rx) = watch::channel(settings);
        let metrics = Arc::<Metrics>::default();
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        // Ends when the last clone of this worker is dropped and the channel closes.
        tokio::spawn(ready_writer(pool.clone(), metrics.clone(), ready_rx));
        Worker {
            pool,
            settings: rx,
            settings_tx: Arc::new(tx),
            inflight: Arc::default(),
            kill_builds: CancellationToken::new(),
            metrics,
            health: Arc::default(),
            notifier: Arc::default(),
            ready_tx,
        }
    }

    /// The settings now.
    pub fn cfg(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// Applies reloaded settings (SIGHUP); running builds keep the ones they started with.
    pub fn reload(&self, settings: Settings) {
        self.settings_tx.send_replace(Arc::new(settings));
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Claims and builds until nothing is claimable and no build runs; returns how many builds
    /// ran. The deterministic entry point for tests: no listener, no timers.
    pub async fn drain(&self) -> Result<usize, sqlx::Error> {
        let mut builds = JoinSet::new();
        let mut total = 0;
        loop {
            let claimed = self
                .claim(self.cfg().concurrency.saturating_sub(builds.len()))
                .await?;
            total += claimed.len();
            for row in claimed {
                builds.spawn(self.clone().build_and_write_back(row));
            }
            if builds.join_next().await.is_none() {
                return Ok(total);
            }
            while builds.try_join_next().is_some() {}
        }
    }

    /// The daemon's loop. With `until_done`, returns once no row is pending, outdated or
    /// installing (the demo and batch jobs).
    pub async fn run(&self, shutdown: Shutdown, until_done: bool) -> anyhow::Result<()> {
        // Listen before the first claim, so no wake-up between the two is missed.
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(store::WAKEUP_CHANNEL).await?;
        // Ends the helpers below when the loop ends, whether by a signal or `until_done`.
        let helpers = shutdown.stop.child_token();
        let _stop_helpers = helpers.clone().drop_guard();
        let heartbeat = tokio::spawn(self.clone().heartbeat_loop(helpers.clone()));
        let collector = tokio::spawn(self.clone().gc_loop());
        let verifier = tokio::spawn(crate::verify::schedule(
            self.pool.clone(),
            self.settings.clone(),
            self.metrics.clone(),
            helpers.clone(),
        ));
        let status_line = tokio::spawn(self.clone().status_loop());
        let mut builds = JoinSet::new();
        let mut db_delay = Duration::from_millis(200);
        let cfg = self.cfg();
        tracing::info!(instance = %cfg.instance_name, concurrency = cfg.concurrency, "packenvd started");
        self.health.db_answered();
        self.notifier.ready(&format!(
            "connected; up to {} builds at once",
            cfg.concurrency
        ));
        loop {
            self.health.loop_turned();
            self.notifier.watchdog();
            let cfg = self.cfg();
            let free = cfg.concurrency.saturating_sub(builds.len());
            let mut claimed_any = false;
            if free > 0 {
                match self.claim(free).await {
                    Ok(rows) => {
                        self.health.db_answered();
                        db_delay = Duration::from_millis(200);
                        claimed_any = !rows.is_empty();
                        for row in rows {
                            builds.spawn(self.clone().build_and_write_back(row));
                        }
                    }
                    Err(e) => {
                        self.metrics.db_errors.inc();
                        self.notifier.status(&format!("database unreachable: {e}"));
                        tracing::warn!(error = %e, retry_in = ?db_delay, "claim failed; database unreachable?");
                        tokio::select! {
                            () = tokio::time::sleep(db_delay) => {}
                            () = shutdown.stop.cancelled() => break,
                        }
                        db_delay = (db_delay * 2).min(MAX_DB_RETRY_DELAY);
                        continue;
                    }
                }
            }
            if until_done && builds.is_empty() && !claimed_any && self.queue_is_done().await {
                break;
            }
            tokio::select! {
                () = shutdown.stop.cancelled() => break,
                Some(_) = builds.join_next(), if !builds.is_empty() => {
                    // Reap every build that has finished, so the next claim fills all free
                    // slots in one statement instead of one row per turn.
                    while builds.try_join_next().is_some() {}
                }
                n = listener.recv() => if let Err(e) = n {
                    // The listener reconnects on its next recv; until then the poll covers.
                    tracing::warn!(error = %e, "lost the NOTIFY connection");
                    tokio::time::sleep(db_delay).await;
                },
                () = tokio::time::sleep(cfg.poll_interval) => {}
            }
        }
        self.notifier
            .stopping(&format!("stopping: {} build(s) finishing", builds.len()));
        status_line.abort();

        if !builds.is_empty() {
            let grace = self.cfg().shutdown_grace;
            tracing::info!(running = builds.len(), grace = %humantime::format_duration(grace), "stopping: waiting for running builds");
            let finish_all = async { while builds.join_next().await.is_some() {} };
            tokio::select! {
                () = finish_all => {}
                () = tokio::time::sleep(grace) => {}
                () = shutdown.kill.cancelled() => {}
            }
            if !builds.is_empty() {
                tracing::warn!(
                    running = builds.len(),
                    "grace over: killing builds and handing their rows back"
                );
                self.kill_builds.cancel();
                while builds.join_next().await.is_some() {}
            }
        }
        heartbeat.abort();
        collector.abort();
        helpers.cancel();
        match tokio::time::timeout(Duration::from_secs(5), verifier).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "verification scheduler"),
            Ok(_) => {}
            Err(_) => tracing::warn!("verification scheduler did not stop in time"),
        }
        Ok(())
    }

    async fn claim(&self, free: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        if free == 0 {
            return Ok(Vec::new());
        }
        let cfg = self.cfg();
        let rows = store::claim(
            &self.pool,
            &cfg.instance_name,
            cfg.lease,
            free as i64,
            &cfg.envs_root,
        )
        .await?;
        for row in &rows {
            self.metrics
                .pickup_latency
                .observe(row.pickup_secs.max(0.0));
            self.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(row.claim_token, self.kill_builds.child_token());
        }
        Ok(rows)
    }

    async fn queue_is_done(&self) -> bool {
        match store::count_by_status(&self.pool).await {
            Ok(counts) => !counts.iter().any(|(s, n)| {
                *n > 0 && matches!(s.as_str(), "pending" | "outdated" | "installing")
            }),
            Err(_) => false,
        }
    }

    /// Renews leases every third of the lease, cancels builds whose claim was lost, and once a
    /// lease rescues rows whose holder stopped renewing. An idle daemon holds nothing, so it
    /// sends only the rescue: one statement per lease besides the poll.
    async fn heartbeat_loop(self, stop: CancellationToken) {
        // The lease is not reloadable, so neither is this period.
        let mut tick = tokio::time::interval(self.cfg().lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for turn in 0u64.. {
            tick.tick().await;
            self.heartbeat_once().await;
            if turn % 3 == 0 && !stop.is_cancelled() {
                match store::rescue_expired(&self.pool, self.cfg().max_attempts).await {
                    Ok(0) => {}
                    Ok(n) => {
                        self.metrics.rescued.inc_by(n);
                        tracing::warn!(rows = n, "rescued rows whose lease expired");
                    }
                    Err(e) => {
                        self.metrics.db_errors.inc();
                        tracing::warn!(error = %e, "rescue failed");
                    }
                }
            }
        }
    }

    /// Runs the garbage collector every `gc_interval`; logs only when it did something.
    async fn gc_loop(self) {
        loop {
            tokio::time::sleep(self.cfg().gc_interval).await;
            match crate::gc::run_once(&self.pool, &self.cfg().gc(), false).await {
                Ok(report) => {
                    for r in &report.removed {
                        tracing::info!(path = %r.path.display(), reason = %r.reason, "removed old build");
                    }
                    for r in &report.errors {
                        tracing::warn!(path = %r.path.display(), reason = %r.reason, "collector");
                    }
                }
                Err(e) => {
                    self.metrics.db_errors.inc();
                    tracing::warn!(error = %e, "collector cannot read the rows");
                }
            }
        }
    }

    /// Keeps systemd's STATUS= line current ("3 building, 12 pending"). Runs only under
    /// systemd, so a daemon elsewhere sends no statements for it.
    async fn status_loop(self) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        loop {
            let building = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            if let Ok(counts) = store::count_by_status(&self.pool).await {
                let n = |s: &str| counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
                self.notifier.status(&format!(
                    "{building} building, {} pending, {} outdated, {} failed, {} ready",
                    n("pending"),
                    n("outdated"),
                    n("failed"),
                    n("ready")
                ));
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }

    /// One heartbeat: a single UPDATE for every claim this instance holds.
    pub async fn heartbeat_once(&self) {
        let held: Vec<Uuid> = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        if held.is_empty() {
            return;
        }
        match store::heartbeat(&self.pool, &held, self.cfg().lease).await {
            Ok(kept) => {
                self.health.db_answered();
                self.metrics.heartbeats.inc();
                let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                for token in held.iter().filter(|t| !kept.contains(t)) {
                    if let Some(cancel) = inflight.get(token) {
                        self.metrics.claims_lost.inc();
                        tracing::warn!(claim_token = %token, "claim lost (reset by an operator or rescued); cancelling its build");
                        cancel.cancel();
                    }
                }
            }
            Err(e) => {
                self.metrics.db_errors.inc();
                tracing::warn!(error = %e, "heartbeat failed; leases not renewed");
            }
        }
    }

    async fn build_and_write_back(self, row: Claimed) {
        let span = tracing::info_span!("build", pack_ref = %row.pack_ref, runtime_ref = %row.runtime_ref, env_id = row.id, claim_token = %row.claim_token);
        async {
            tracing::info!(attempt = row.attempts, "installing");
            let cancel = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&row.claim_token)
                .cloned()
                .unwrap_or_default();
            let settings = self.cfg();
            let log = Arc::new(Mutex::new(CappedLog::new(settings.log_max_bytes)));
            let flusher = tokio::spawn(flush_log_loop(
                self.pool.clone(),
                row.id,
                row.claim_token,
                log.clone(),
                cancel.clone(),
            ));
            let started = std::time::Instant::now();
            let result = build::run(&settings, &row, &log, &cancel).await;
            flusher.abort();
            let text = log.lock().unwrap_or_else(|p| p.into_inner()).render();
            self.metrics
                .build_duration
                .observe(started.elapsed().as_secs_f64());
            self.write_back(&settings, &row, result, &text, started.elapsed())
                .await;
            self.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&row.claim_token);
        }
        .instrument(span)
        .await;
    }

    /// Writes the result, retrying with backoff while the database is away: a finished build
    /// is never lost to an outage. Gives up only when the process is being killed.
    async fn write_back(
        &self,
        settings: &Settings,
        row: &Claimed,
        result: BuildResult,
        log: &str,
        took: Duration,
    ) {
        let took = humantime::format_duration(Duration::from_millis(took.as_millis() as u64));
        let mut delay = Duration::from_millis(250);
        loop {
            let (outcome, written) = match &result {
                BuildResult::Ready {
                    env_path,
                    metadata,
                    fingerprint,
                } => {
                    let (written, answer) = oneshot::channel();
                    let ready = store::ReadyRow {
                        id: row.id,
                        token: row.claim_token,
                        env_path: env_path.clone(),
                        log: log.to_owned(),
                        metadata: metadata.clone(),
                        fingerprint: fingerprint.clone(),
                    };
                    // The writer retries until the database takes the batch; it only goes
                    // away with the worker.
                    let _ = self.ready_tx.send(ReadyWrite {
                        row: ready,
                        written,
                    });
                    (
                        "ready".to_string(),
                        answer.await.map_err(|_| sqlx::Error::PoolClosed),
                    )
                }
                BuildResult::Unchanged => (
                    "ready (already up to date)".to_string(),
                    store::finish_unchanged(&self.pool, row.id, row.claim_token, log).await,
                ),
                BuildResult::Failed { error, retryable } => {
                    let retry_in = (*retryable && (row.attempts as u32) < settings.max_attempts)
                        .then(|| backoff(settings.retry_backoff, row.attempts, row.claim_token));
                    let outcome = match retry_in {
                        Some(d) => format!(
                            "pending (retry in {})",
                            humantime::format_duration(Duration::from_secs(d.as_secs()))
                        ),
                        None => "failed".to_string(),
                    };
                    (
                        outcome,
                        store::finish_failed(
                            &self.pool,
                            row.id,
                            row.claim_token,
                            error,
                            log,
                            retry_in,
                        )
                        .await,
                    )
                }
                BuildResult::Cancelled => (
                    "pending (handed back)".to_string(),
                    store::release(&self.pool, row.id, row.claim_token, log).await,
                ),
            };
            match written {
                Ok(true) => {
                    self.metrics.build(match &result {
                        BuildResult::Ready { .. } => "ready",
                        BuildResult::Unchanged => "unchanged",
                        BuildResult::Failed { .. } if outcome.starts_with("pending") => "retry",
                        BuildResult::Failed { .. } => "failed",
                        BuildResult::Cancelled => "cancelled",
                    });
                    match &result {
                        BuildResult::Failed { error, .. } => {
                            tracing::warn!(status = %outcome, took = %took, error = %error.lines().next().unwrap_or_default(), "build failed")
                        }
                        _ => tracing::info!(status = %outcome, took = %took, "build finished"),
                    }
                    return;
                }
                Ok(false) => {
                    self.metrics.build("discarded");
                    tracing::warn!(would_have_been = %outcome, "claim no longer ours (reset or rescued); result discarded");
                    return;
                }
                Err(e) => {
                    self.metrics.db_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot write result back; keeping it and retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_DB_RETRY_DELAY);
                }
            }
        }
    }
}

/// Writes `ready` results: takes every result waiting, writes them in one fenced statement,
/// and tells each build whether its row was still its own. Retries while the database is away.
async fn ready_writer(
    pool: PgPool,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<ReadyWrite>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let rows: Vec<store::ReadyRow> = batch.iter().map(|w| w.row.clone()).collect();
        let mut delay = Duration::from_millis(250);
        let written: std::collections::HashSet<i64> = loop {
            match store::finish_ready_batch(&pool, &rows).await {
                Ok(ids) => break ids.into_iter().collect(),
                Err(e) => {
                    metrics.db_errors.inc();
                    tracing::warn!(error = %e, results = rows.len(), retry_in = ?delay, "cannot write results back; keeping them and retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_DB_RETRY_DELAY);
                }
            }
        };
        for w in batch {
            let _ = w.written.send(written.contains(&w.row.id));
        }
    }
}

/// Exponential backoff with ±25 % jitter. The jitter comes from the claim token, which is
/// random, so instances that failed together do not retry together.
pub fn backoff(base: Duration, attempt: i32, token: Uuid) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.clamp(1, 16).saturating_sub(1) as u32);
    let capped = exp.min(Duration::from_secs(3600));
    let r = f64::from(token.as_bytes()[15]) / 255.0; // 0..=1
    capped.mul_f64(0.75 + r * 0.5)
}

async fn flush_log_loop(
    pool: PgPool,
    id: i64,
    token: Uuid,
    log: Arc<Mutex<CappedLog>>,
    cancel: CancellationToken,
) {
    let mut written = 0;
    loop {
        tokio::time::sleep(LOG_FLUSH_INTERVAL).await;
        let (version, text) = {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            if log.version() == written {
                continue;
            }
            (log.version(), log.render())
        };
        match store::flush_log(&pool, id, token, &text).await {
            Ok(true) => written = version,
            Ok(false) => {
                tracing::warn!("claim lost while building; cancelling the build");
                cancel.cancel();
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cannot flush log"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_jitter() {
        let t = Uuid::from_bytes([0; 16]);
        let base = Duration::from_secs(10);
        assert_eq!(backoff(base, 1, t), Duration::from_millis(7500));
        assert_eq!(backoff(base, 2, t), Duration::from_millis(15000));
        assert_eq!(backoff(base, 3, t), Duration::from_millis(30000));
        assert_eq!(backoff(base, 40, t), Duration::from_secs(2700));
    }
}
