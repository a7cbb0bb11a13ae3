//! The builds this instance runs, by claim token: what the heartbeat renews, the log flusher
//! copies to the rows, the status line counts and a lost claim or shutdown cancels.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use packenv_core::log::BuildLog;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::Fence;

/// One running build.
#[derive(Debug, Clone)]
pub struct Running {
    pub fence: Fence,
    /// Kills the build's running step; the build then hands its row back.
    pub cancel: CancellationToken,
    pub log: BuildLog,
    /// The log version last written to the row, so an unchanged log is not written again.
    pub flushed: u64,
    pub started: Instant,
}

/// The registry of running builds.
#[derive(Debug, Default)]
pub struct Inflight {
    builds: Mutex<HashMap<Uuid, Running>>,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Running>> {
        // No code path panics while holding the lock; a poisoned map is still consistent.
        self.builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a build right after its claim, so the next heartbeat already renews it.
    pub fn insert(&self, fence: Fence, cancel: CancellationToken, log: BuildLog) {
        self.lock().insert(
            fence.token,
            Running {
                fence,
                cancel,
                log,
                flushed: 0,
                started: Instant::now(),
            },
        );
    }

    pub fn remove(&self, token: &Uuid) {
        self.lock().remove(token);
    }

    pub fn get(&self, token: &Uuid) -> Option<Running> {
        self.lock().get(token).cloned()
    }

    /// The claims held now.
    pub fn fences(&self) -> Vec<Fence> {
        self.lock().values().map(|r| r.fence).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Cancels the build of `token` (its claim was lost); false when it is not running here
    /// or was cancelled already, so a lost claim is counted and logged once.
    pub fn cancel(&self, token: &Uuid) -> bool {
        match self.lock().get(token) {
            Some(r) if !r.cancel.is_cancelled() => {
                r.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The logs that changed since they were last written: fence, text, version.
    pub fn changed_logs(&self) -> Vec<(Fence, String, u64)> {
        let snapshot: Vec<Running> = self.lock().values().cloned().collect();
        snapshot
            .into_iter()
            .filter_map(|r| {
                let version = r.log.version();
                (version != r.flushed).then(|| (r.fence, r.log.render(), version))
            })
            .collect()
    }

    /// Records that the row of `token` holds its log up to `version`.
    pub fn flushed(&self, token: &Uuid, version: u64) {
        if let Some(r) = self.lock().get_mut(token) {
            r.flushed = version;
        }
    }
}
