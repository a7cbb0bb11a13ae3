//! Runs a verification pass ([`crate::verify`]) on `verify_schedule`, a tokio-cron-scheduler
//! job, restarting the scheduler when a reload changes the schedule. A pass still running when
//! the next is due is not doubled.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::ops::{Metrics, ResultLabel};
use crate::services::Live;
use crate::verify::{self, Finding, Scope};
use crate::Error;

#[derive(Debug, Clone)]
pub struct Verifier {
    pub pool: PgPool,
    pub settings: Live,
    pub metrics: Arc<Metrics>,
    /// Held while a pass runs, so that a slow pass is not joined by the next.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Verifier {
    pub fn new(pool: PgPool, settings: Live, metrics: Arc<Metrics>) -> Self {
        Verifier {
            pool,
            settings,
            metrics,
            running: Arc::default(),
        }
    }

    /// One pass over the stale rows; `None` when a pass was already running.
    pub async fn run_once(&self) -> Result<Option<Vec<Finding>>, Error> {
        let Ok(_guard) = self.running.try_lock() else {
            return Ok(None);
        };
        let settings = self.settings.borrow().clone();
        let found = verify::run_pass(&self.pool, &settings, &Scope::Stale)
            .await
            .inspect_err(|_| {
                self.metrics.db_errors.inc();
            })?;
        let broken = found.iter().filter(|f| f.failure.is_some()).count() as u64;
        let unchecked = found.iter().filter(|f| f.unchecked.is_some()).count() as u64;
        let label = |result| ResultLabel { result };
        self.metrics
            .verifications
            .get_or_create(&label("ok"))
            .inc_by(found.len() as u64 - broken - unchecked);
        self.metrics
            .verifications
            .get_or_create(&label("failed"))
            .inc_by(broken);
        self.metrics
            .verifications
            .get_or_create(&label("unchecked"))
            .inc_by(unchecked);
        Ok(Some(found))
    }

    fn log(result: &Result<Option<Vec<Finding>>, Error>) {
        match result {
            Ok(None) => {
                tracing::info!("previous verification pass still running; skipping this one")
            }
            Ok(Some(found)) if found.is_empty() => {}
            Ok(Some(found)) => {
                let broken = found.iter().filter(|f| f.failure.is_some()).count();
                let unchecked = found.iter().filter(|f| f.unchecked.is_some()).count();
                tracing::info!(
                    verified = found.len() - unchecked,
                    broken,
                    unchecked,
                    "verification pass done"
                );
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(e), "verification pass failed")
            }
        }
    }

    /// Runs passes on the schedule until `stop`.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), Error> {
        loop {
            let expr = self.settings.borrow_and_update().verify_schedule.clone();
            let mut scheduler = JobScheduler::new().await.map_err(Error::Scheduler)?;
            let me = self.clone();
            let job = Job::new_async(expr.as_str(), move |_, _| {
                let me = me.clone();
                Box::pin(async move { Verifier::log(&me.run_once().await) })
            })
            .map_err(Error::Scheduler)?;
            scheduler.add(job).await.map_err(Error::Scheduler)?;
            scheduler.start().await.map_err(Error::Scheduler)?;
            let changed = loop {
                tokio::select! {
                    () = stop.cancelled() => break false,
                    r = self.settings.changed() => {
                        if r.is_err() {
                            break false;
                        }
                        if self.settings.borrow().verify_schedule != expr {
                            break true;
                        }
                    }
                }
            };
            scheduler.shutdown().await.map_err(Error::Scheduler)?;
            if !changed {
                return Ok(());
            }
            tracing::info!(schedule = %self.settings.borrow().verify_schedule, "verification schedule changed");
        }
    }
}
