//! The answer lane: requests whose current build may still match, claimed beside the build
//! slots and answered without one (docs/architecture.md, claim).

use std::sync::Arc;
use std::time::Instant;

use packenv_core::build::{self, Built};
use packenv_core::log::BuildLog;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Shared, Worker};
use crate::store::{self, Claim, Transition};

/// Requests the answer lane takes beyond the build slots. Answering one from its current build
/// is a few file reads and no process, so a platform that re-requests every pack at start-up is
/// answered in batches instead of `concurrency` rows per round trip.
pub(super) const ANSWER_LANE: usize = 256;

/// Deferred ids kept at most; past this the set starts again (a request taken twice costs one
/// more look at its files, nothing else).
pub(super) const DEFERRED_MAX: usize = 10_000;

/// Counts an answer-lane task from its spawn to its end, however it ends.
pub(super) struct Answering(pub(super) Arc<Shared>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0
            .answering
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Worker {
    /// The answer lane: a request answered from its current build when its inputs are
    /// unchanged; otherwise handed back, `pending` with its attempt unspent, for a build slot.
    pub(super) async fn answer(
        self,
        claim: Claim,
        cancel: CancellationToken,
        log: BuildLog,
        _n: Answering,
    ) {
        let row = &claim.row;
        let span = tracing::info_span!("answer", pack_ref = %row.pack_ref, runtime_ref = %row.runtime_ref, env_id = row.env_id, claim_token = %claim.fence.token);
        async {
            let settings = self.cfg();
            let started = Instant::now();
            let transition =
                match build::answer(&settings.build_config(), &row.target(), &log, &cancel).await {
                    Some(Built::Unchanged) => Transition::Unchanged {
                        log: store::unchanged_log(&log.render(), row.previous_log.as_deref()),
                    },
                    Some(Built::NoEnvironment { metadata }) => Transition::Ready {
                        env_path: None,
                        metadata,
                        fingerprint: None,
                        log: log.render(),
                    },
                    Some(Built::Ready(_)) | None => Transition::Deferred,
                };
            if let Transition::Deferred = transition {
                self.shared
                    .deferred
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(claim.fence.id);
                tracing::debug!("not answerable from the current build; handed to the build lane");
            }
            self.write_back(&settings, &claim, transition, None, started.elapsed())
                .await;
        }
        .instrument(span)
        .await;
        self.shared.inflight.remove(&claim.fence.token);
    }
}
