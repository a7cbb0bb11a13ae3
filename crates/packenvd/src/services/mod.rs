//! The daemon's maintenance services, River style: each is a small struct with a config whose
//! fields say why they exist, a `run_once()` that tests call directly and that returns what it
//! did, and a loop that runs it on a ticker and logs only when it did something.
//!
//! | service | period | `run_once` returns |
//! |---|---|---|
//! | [`heartbeat::Heartbeat`] | a third of the lease | the claims renewed and those lost (their builds are cancelled) |
//! | [`rescuer::Rescuer`] | the lease | how many rows whose holder died went back to pending |
//! | [`log_flusher::LogFlusher`] | 2 s | the logs written, the claims found lost |
//! | [`collector::Collector`] | `gc_interval` | the collector's report |
//! | [`status_line::StatusLine`] | 10 s (only under systemd) | the `STATUS=` line sent |
//! | [`verifier::Verifier`] | `verify_schedule` (cron) | what one pass found |
//! | [`ready_writer::ReadyWriter`] | when results arrive | per result: written, lost, switch failed, rejected |

pub mod collector;
pub mod heartbeat;
pub mod log_flusher;
pub mod ready_writer;
pub mod rescuer;
pub mod status_line;
pub mod verifier;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// The daemon's settings as they are now; SIGHUP sends new ones.
pub type Live = watch::Receiver<Arc<Settings>>;

/// Settings that never change, for tests and one-shot commands.
pub fn fixed(settings: Settings) -> Live {
    watch::channel(Arc::new(settings)).1
}

/// A service run on a ticker.
pub trait Service: Send + Sync + 'static {
    /// What one run did.
    type Report: Send;
    /// For logs.
    const NAME: &'static str;
    /// Whether the first run happens at start rather than after one period.
    const RUN_AT_START: bool = false;

    /// How long to wait before the next run (read each time: a reload may change it).
    fn period(&self) -> Duration;

    /// One run.
    fn run_once(&self) -> impl Future<Output = Result<Self::Report, crate::Error>> + Send;

    /// Logs what a run did, if it did anything.
    fn log(&self, report: &Self::Report);
}

/// Runs `service` every `period()` until `stop`; a failed run is logged and the next one tried.
pub async fn run_every<S: Service>(service: S, stop: CancellationToken) {
    let mut first = true;
    loop {
        if !(first && S::RUN_AT_START) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(service.period()) => {}
            }
        }
        first = false;
        // A run in progress finishes (they are short); the next is not started.
        match service.run_once().await {
            Ok(report) => service.log(&report),
            Err(e) => {
                tracing::warn!(service = S::NAME, error = %crate::error::chain(&e), "run failed")
            }
        }
    }
}
