//! The write-back of a finished build: the outcome chosen from the result (retry policy),
//! written fenced, kept through database outages, and what happens when the database refuses
//! it or the switch on disk fails.

use std::time::{Duration, Instant};

use packenv_core::build::{self, Failure, Switch};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Worker;
use crate::config::Settings;
use crate::error::chain;
use crate::services::ready_writer::{
    ReadyJob, Written, MAX_DB_RETRY_DELAY, WRITE_GIVE_UP_AFTER_KILL,
};
use crate::store::{self, Claim, Fence, Transition};

impl Worker {
    /// Writes the outcome, keeping it through database outages; a result the database refuses
    /// becomes a failure of the row, and a build whose switch failed is retried.
    pub(super) async fn write_back(
        &self,
        settings: &Settings,
        claim: &Claim,
        mut transition: Transition,
        mut switch: Option<Switch>,
        took: Duration,
    ) {
        let took = humantime::format_duration(Duration::from_millis(took.as_millis() as u64));
        loop {
            let written = match &transition {
                // Both go in batches: many builds finish at once, and a platform re-requesting
                // every pack makes many unchanged answers at once.
                Transition::Ready { .. } | Transition::Unchanged { .. } => {
                    self.send_ready(claim.fence, &transition, switch.take())
                        .await
                }
                _ => self.finish_with_retry(claim.fence, &transition).await,
            };
            let metrics = &self.shared.metrics;
            match written {
                Written::Done => {
                    if let Transition::Deferred = transition {
                        // Not an outcome: the build lane takes the row next.
                        return;
                    }
                    metrics.build(transition.label());
                    match &transition {
                        Transition::Retry { error, .. } | Transition::Failed { error, .. } => {
                            tracing::warn!(status = %transition.status(), outcome = transition.label(), took = %took, error = %error.lines().next().unwrap_or_default(), "build failed")
                        }
                        _ => {
                            tracing::info!(status = %transition.status(), outcome = transition.label(), took = %took, "build finished")
                        }
                    }
                    return;
                }
                Written::Lost => {
                    metrics.build("discarded");
                    tracing::warn!(
                        would_have_been = transition.label(),
                        "claim no longer ours (reset or rescued); result discarded"
                    );
                    return;
                }
                Written::SwitchFailed(e) => {
                    let text = match &transition {
                        Transition::Ready { log, .. } => log.clone(),
                        _ => String::new(),
                    };
                    let f = Failure::from(build::BuildError::from(e));
                    transition = failure(settings, claim, &f, text);
                }
                Written::Rejected(e) if matches!(transition.status(), store::Status::Ready) => {
                    tracing::warn!(node_row = claim.fence.id, error = %chain(&e), "the database refused to record the finished build; recording it as failed, the rest of its batch went on");
                    transition = Transition::Failed {
                        error: format!(
                            "the database refused to record the finished build: {}",
                            chain(&e)
                        ),
                        log: String::new(),
                    };
                }
                Written::Rejected(e) => {
                    tracing::error!(error = %chain(&e), outcome = transition.label(), "the database refused to record the outcome; the row stays installing until its lease expires and is rescued");
                    self.refused_write_back(claim, &e).await;
                    return;
                }
                Written::GaveUp => {
                    tracing::error!(outcome = transition.label(), "database unreachable at shutdown: result not recorded; the row will be rescued when its lease expires");
                    return;
                }
            }
        }
    }

    /// Hands a ready result to the ready writer and waits for its answer.
    async fn send_ready(
        &self,
        fence: Fence,
        transition: &Transition,
        switch: Option<Switch>,
    ) -> Written {
        let (done, answer) = oneshot::channel();
        let job = ReadyJob {
            fence,
            transition: transition.clone(),
            switch,
            done,
        };
        if self.shared.ready_tx.send(job).is_err() {
            tracing::error!("the ready writer has stopped; the result is not recorded");
            return Written::GaveUp;
        }
        answer.await.unwrap_or_else(|_| {
            tracing::error!("the ready writer dropped the result without an answer");
            Written::GaveUp
        })
    }

    /// Writes a non-ready outcome, retrying while the database is away (bounded once the
    /// builds were killed).
    async fn finish_with_retry(&self, fence: Fence, transition: &Transition) -> Written {
        let mut delay = Duration::from_millis(250);
        let mut killed_at = None;
        loop {
            match store::finish(&self.shared.pool, fence, transition.clone()).await {
                Ok(true) => return Written::Done,
                Ok(false) => return Written::Lost,
                Err(e) if !store::is_transient(&e) => return Written::Rejected(e),
                Err(e) => {
                    self.shared.metrics.db_errors.inc();
                    if self.shared.root.is_cancelled() {
                        let since = *killed_at.get_or_insert_with(Instant::now);
                        if since.elapsed() >= WRITE_GIVE_UP_AFTER_KILL {
                            return Written::GaveUp;
                        }
                    }
                    tracing::warn!(error = %chain(&e), retry_in = ?delay, "cannot write result back; keeping it and retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_DB_RETRY_DELAY);
                }
            }
        }
    }
}

/// The outcome of a failed build: handed back when cancelled, retried after a backoff when the
/// failure may pass and attempts are left, failed otherwise.
pub(super) fn failure(settings: &Settings, claim: &Claim, f: &Failure, log: String) -> Transition {
    let attempts = claim.row.attempts;
    if matches!(f.error, build::BuildError::Cancelled) {
        return Transition::Released { log };
    }
    if f.error.retryable() && (attempts.max(0) as u32) < settings.max_attempts {
        return Transition::Retry {
            after: backoff(settings.retry_backoff, attempts, claim.fence.token),
            error: f.to_string(),
            log,
        };
    }
    Transition::Failed {
        error: f.to_string(),
        log,
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
