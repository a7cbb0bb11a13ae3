//! Copies the logs of running builds to their rows every two seconds, in one statement, so an
//! operator can watch a build; a row that is no longer ours cancels its build.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::inflight::Inflight;
use crate::ops::Metrics;
use crate::services::Service;
use crate::store;

/// How often running builds' logs are written to their rows.
pub const LOG_FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// What one flush did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub written: usize,
    /// Builds whose rows were no longer theirs; they were cancelled.
    pub lost: usize,
}

#[derive(Debug)]
pub struct LogFlusher {
    pub pool: PgPool,
    pub inflight: Arc<Inflight>,
    pub metrics: Arc<Metrics>,
}

impl Service for LogFlusher {
    type Report = FlushReport;
    const NAME: &'static str = "log flusher";

    fn period(&self) -> Duration {
        LOG_FLUSH_INTERVAL
    }

    async fn run_once(&self) -> Result<FlushReport, crate::Error> {
        let changed = self.inflight.changed_logs();
        if changed.is_empty() {
            return Ok(FlushReport::default());
        }
        let logs: Vec<(store::Fence, String)> = changed
            .iter()
            .map(|(f, text, _)| (*f, text.clone()))
            .collect();
        let written = store::flush_logs(&self.pool, &logs).await.map_err(|e| {
            self.metrics.db_errors.inc();
            crate::Error::db("writing build logs")(e)
        })?;
        let mut report = FlushReport::default();
        for (fence, _, version) in changed {
            if written.contains(&fence.id) {
                self.inflight.flushed(&fence.token, version);
                report.written += 1;
            } else if self.inflight.cancel(&fence.token) {
                tracing::warn!(node_row = fence.id, claim_token = %fence.token, "claim lost while building; cancelling the build");
                self.metrics.claims_lost.inc();
                report.lost += 1;
            }
        }
        Ok(report)
    }

    fn log(&self, _: &FlushReport) {
        // Lost claims are logged as they are found; a written log is not news.
    }
}
