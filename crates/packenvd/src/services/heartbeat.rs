//! Renews the leases of every build this instance runs, in one statement, every third of the
//! lease, and cancels the builds whose claim was lost (an operator's reset, a rescue).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::inflight::Inflight;
use crate::ops::{Health, Metrics};
use crate::services::Service;
use crate::store;

/// Settings of the heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// Each renewal extends a lease to now + this; the heartbeat runs every third of it, so two
    /// missed beats still leave the lease valid.
    pub lease: Duration,
    /// The node whose `last_seen` each beat refreshes (one small UPDATE).
    pub node: String,
}

/// What one heartbeat did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    pub renewed: usize,
    /// Claims that were no longer ours; their builds were cancelled.
    pub lost: Vec<Uuid>,
}

#[derive(Debug)]
pub struct Heartbeat {
    pub pool: PgPool,
    pub config: HeartbeatConfig,
    pub inflight: Arc<Inflight>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Service for Heartbeat {
    type Report = HeartbeatReport;
    const NAME: &'static str = "heartbeat";

    fn period(&self) -> Duration {
        self.config.lease / 3
    }

    async fn run_once(&self) -> Result<HeartbeatReport, crate::Error> {
        let was_gone = store::touch_node(&self.pool, &self.config.node)
            .await
            .map_err(crate::Error::db("refreshing the node"))?;
        if was_gone {
            // Declared gone while this daemon could not reach the database: its rows stopped
            // counting; they count again as it catches up.
            let n = store::catch_up(&self.pool, &self.config.node)
                .await
                .map_err(crate::Error::db("catching up"))?;
            tracing::warn!(node = %self.config.node, rows = n, "this node had been declared gone; caught up");
        }
        let held = self.inflight.fences();
        if held.is_empty() {
            return Ok(HeartbeatReport::default());
        }
        let kept = store::heartbeat(&self.pool, &held, self.config.lease)
            .await
            .map_err(|e| {
                self.metrics.db_errors.inc();
                crate::Error::db("renewing leases")(e)
            })?;
        self.health.db_answered();
        self.metrics.heartbeats.inc();
        let lost: Vec<Uuid> = held
            .into_iter()
            .map(|f| f.token)
            .filter(|t| !kept.contains(t))
            .collect();
        for token in &lost {
            if self.inflight.cancel(token) {
                self.metrics.claims_lost.inc();
            }
        }
        Ok(HeartbeatReport {
            renewed: kept.len(),
            lost,
        })
    }

    fn log(&self, report: &HeartbeatReport) {
        for token in &report.lost {
            tracing::warn!(claim_token = %token, "claim lost (reset by an operator or rescued); cancelling its build");
        }
    }
}
