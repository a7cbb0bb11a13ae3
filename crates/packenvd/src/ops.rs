//! What operators watch: Prometheus metrics and `/healthz` over HTTP (`metrics_listen`, off by
//! default), and the systemd notify protocol (READY, STATUS, WATCHDOG, STOPPING).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use crate::store::{self, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
    /// The node whose rows are counted: each daemon reports its own node's.
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// The daemon's metrics. Always counted (a counter is an atomic add); exported only when
/// `metrics_listen` is set.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Builds by outcome: ready, unchanged, retry, failed, released, discarded (claim lost).
    pub builds: Family<OutcomeLabel, Counter>,
    pub build_duration: Histogram,
    /// This node's rows by status, read from the database at scrape time.
    pub environments: Family<StatusLabel, Gauge>,
    /// From a row becoming claimable (its last write or its run_after) to its claim.
    pub pickup_latency: Histogram,
    pub verifications: Family<ResultLabel, Counter>,
    pub heartbeats: Counter,
    pub claims_lost: Counter,
    pub rescued: Counter,
    pub db_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            builds: Family::default(),
            build_duration: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            environments: Family::default(),
            pickup_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            verifications: Family::default(),
            heartbeats: Counter::default(),
            claims_lost: Counter::default(),
            rescued: Counter::default(),
            db_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "packenvd_builds",
            "Finished builds by outcome",
            m.builds.clone(),
        );
        registry.register(
            "packenvd_build_duration_seconds",
            "Wall time of builds",
            m.build_duration.clone(),
        );
        registry.register(
            "packenvd_environments",
            "Environments by status",
            m.environments.clone(),
        );
        registry.register(
            "packenvd_pickup_latency_seconds",
            "From claimable to claimed",
            m.pickup_latency.clone(),
        );
        registry.register(
            "packenvd_verifications",
            "Verified environments by result",
            m.verifications.clone(),
        );
        registry.register(
            "packenvd_heartbeats",
            "Lease renewals sent",
            m.heartbeats.clone(),
        );
        registry.register(
            "packenvd_claims_lost",
            "Builds cancelled because their row was reset or rescued",
            m.claims_lost.clone(),
        );
        registry.register(
            "packenvd_rescued",
            "Rows rescued from a holder whose lease expired",
            m.rescued.clone(),
        );
        registry.register(
            "packenvd_db_errors",
            "Failed database statements",
            m.db_errors.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn build(&self, outcome: &'static str) {
        self.builds.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The text exposition, after reading this node's rows by status.
    pub async fn render(&self, pool: &PgPool, node: &str) -> String {
        match store::count_by_status(pool, node).await {
            Ok(counts) => {
                for status in Status::ALL {
                    let n = counts
                        .iter()
                        .find(|(s, _)| *s == status)
                        .map_or(0, |(_, n)| *n);
                    self.environments
                        .get_or_create(&StatusLabel {
                            status: status.as_str(),
                            node: node.to_owned(),
                        })
                        .set(n);
                }
            }
            Err(_) => {
                self.db_errors.inc();
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Liveness for `/healthz` and the watchdog: when the loop last turned, and when the database
/// last answered.
#[derive(Debug, Default)]
pub struct Health {
    loop_ms: AtomicI64,
    db_ok_ms: AtomicI64,
}

impl Health {
    pub fn loop_turned(&self) {
        self.loop_ms.store(now_ms(), Ordering::Relaxed);
    }
    pub fn db_answered(&self) {
        self.db_ok_ms.store(now_ms(), Ordering::Relaxed);
    }
    /// Healthy when both happened within `window`; else the reason.
    pub fn check(&self, window: Duration) -> Result<(), String> {
        let limit = now_ms() - window.as_millis() as i64;
        if self.loop_ms.load(Ordering::Relaxed) < limit {
            return Err("the claim loop has not turned recently".into());
        }
        if self.db_ok_ms.load(Ordering::Relaxed) < limit {
            return Err("the database has not answered recently".into());
        }
        Ok(())
    }
}

/// Serves `/metrics` and `/healthz` on `listen` until `stop`.
pub async fn serve(
    listen: std::net::SocketAddr,
    pool: PgPool,
    node: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    window: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (pool, metrics, node) = (pool.clone(), metrics.clone(), node.clone());
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(&pool, &node).await,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.check(window) {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("unhealthy: {why}\n"),
                        ),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "serving /metrics and /healthz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// The systemd notify protocol; every call is a no-op without `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub struct Notifier {
    last_watchdog_ms: AtomicI64,
}

impl Notifier {
    pub fn ready(&self, status: &str) {
        self.send(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }
    pub fn status(&self, status: &str) {
        self.send(&[sd_notify::NotifyState::Status(status)]);
    }
    pub fn stopping(&self, status: &str) {
        self.send(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status(status),
        ]);
    }
    /// A watchdog ping, at most one a second however often the loop turns.
    pub fn watchdog(&self) {
        let now = now_ms();
        if now - self.last_watchdog_ms.load(Ordering::Relaxed) >= 1000 {
            self.last_watchdog_ms.store(now, Ordering::Relaxed);
            self.send(&[sd_notify::NotifyState::Watchdog]);
        }
    }
    fn send(&self, states: &[sd_notify::NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}
