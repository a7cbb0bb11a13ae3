//! Keeps systemd's `STATUS=` line current ("3 building, 12 pending, ..."), so `systemctl
//! status` shows what the daemon is doing. Started only under systemd: elsewhere nobody reads
//! the line, and the daemon sends no statement for it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::inflight::Inflight;
use crate::ops::Notifier;
use crate::services::Service;
use crate::store::{self, Status};

/// How often the line is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct StatusLine {
    pub pool: PgPool,
    /// The node whose rows are counted.
    pub node: String,
    pub inflight: Arc<Inflight>,
    pub notifier: Arc<Notifier>,
}

impl Service for StatusLine {
    /// The line sent.
    type Report = String;
    const NAME: &'static str = "status line";
    const RUN_AT_START: bool = true;

    fn period(&self) -> Duration {
        STATUS_INTERVAL
    }

    async fn run_once(&self) -> Result<String, crate::Error> {
        let counts = store::count_by_status(&self.pool, &self.node)
            .await
            .map_err(crate::Error::db("counting rows by status"))?;
        let n = |s: Status| counts.iter().find(|(k, _)| *k == s).map_or(0, |(_, n)| *n);
        let line = format!(
            "{} building, {} pending, {} outdated, {} failed, {} ready",
            self.inflight.len(),
            n(Status::Pending),
            n(Status::Outdated),
            n(Status::Failed),
            n(Status::Ready)
        );
        self.notifier.status(&line);
        Ok(line)
    }

    fn log(&self, _: &String) {}
}
