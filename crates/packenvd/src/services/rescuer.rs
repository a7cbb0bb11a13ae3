//! Sends rows whose holder stopped renewing its lease (killed, cut off) back to `pending`, or
//! to `failed` when their attempts are spent. Any instance may rescue; SKIP LOCKED keeps each
//! rescue single.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::ops::Metrics;
use crate::services::{Live, Service};
use crate::store;

/// Settings of the rescuer.
#[derive(Debug, Clone)]
pub struct RescuerConfig {
    /// It looks once per lease: a row is rescued at most one lease after its lease expired, and
    /// an idle daemon sends one statement per lease for it.
    pub lease: Duration,
    /// A rescued row whose attempts reached this is failed instead of retried.
    pub max_attempts: u32,
    /// Only this node's rows are rescued: no node takes another's work.
    pub node: String,
}

impl RescuerConfig {
    pub fn from(s: &crate::config::Settings) -> Self {
        RescuerConfig {
            lease: s.lease,
            max_attempts: s.max_attempts,
            node: s.node_name.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Rescuer {
    pub pool: PgPool,
    pub settings: Live,
    pub metrics: Arc<Metrics>,
}

impl Rescuer {
    fn config(&self) -> RescuerConfig {
        RescuerConfig::from(&self.settings.borrow())
    }
}

impl Service for Rescuer {
    /// Rows rescued.
    type Report = u64;
    const NAME: &'static str = "rescuer";
    const RUN_AT_START: bool = true;

    fn period(&self) -> Duration {
        self.config().lease
    }

    async fn run_once(&self) -> Result<u64, crate::Error> {
        let RescuerConfig {
            max_attempts: max,
            node,
            ..
        } = self.config();
        // Nodes not seen for their ttl stop counting, whoever notices first.
        let gone = store::reap_gone_nodes(&self.pool)
            .await
            .map_err(crate::Error::db("declaring nodes gone"))?;
        for g in &gone {
            tracing::warn!(node = %g, "node gone: not seen for its ttl; environments stop waiting for it");
        }
        let n = match store::rescue_expired(&self.pool, &node, max).await {
            Ok(n) => n,
            // The database refuses the statement for one of the rows: rescue them one by one,
            // so that row does not keep the others installing forever.
            Err(e) if !store::is_transient(&e) => {
                tracing::warn!(error = %crate::error::chain(&e), "the database refused a rescue; rescuing rows one by one");
                let ids = store::expired_leases(&self.pool, &node)
                    .await
                    .map_err(crate::Error::db("listing expired leases"))?;
                let mut n = 0;
                for id in ids {
                    match store::rescue_row(&self.pool, &node, max, id).await {
                        Ok(k) => n += k,
                        Err(e) => {
                            tracing::warn!(node_row = id, error = %crate::error::chain(&e), "the database refuses to rescue this row")
                        }
                    }
                }
                n
            }
            Err(e) => {
                self.metrics.db_errors.inc();
                return Err(crate::Error::db("rescuing rows with expired leases")(e));
            }
        };
        self.metrics.rescued.inc_by(n);
        Ok(n)
    }

    fn log(&self, rescued: &u64) {
        if *rescued > 0 {
            tracing::warn!(rows = rescued, "rescued rows whose lease expired");
        }
    }
}
