//! Runs the garbage collector of builds ([`crate::gc`]) every `gc_interval`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::gc::{self, GcConfig, Report};
use crate::ops::Metrics;
use crate::services::{Live, Service};

#[derive(Debug)]
pub struct Collector {
    pub pool: PgPool,
    pub settings: Live,
    pub metrics: Arc<Metrics>,
}

impl Collector {
    fn config(&self) -> GcConfig {
        GcConfig::from(&self.settings.borrow())
    }
}

impl Service for Collector {
    type Report = Report;
    const NAME: &'static str = "collector";

    fn period(&self) -> Duration {
        self.settings.borrow().gc_interval
    }

    async fn run_once(&self) -> Result<Report, crate::Error> {
        gc::run_once(&self.pool, &self.config(), false)
            .await
            .inspect_err(|_| {
                self.metrics.db_errors.inc();
            })
    }

    fn log(&self, report: &Report) {
        for r in &report.removed {
            tracing::info!(path = %r.path.display(), reason = %r.reason, "removed old build");
        }
        for r in &report.errors {
            tracing::warn!(path = %r.path.display(), reason = %r.reason, "collector");
        }
    }
}
