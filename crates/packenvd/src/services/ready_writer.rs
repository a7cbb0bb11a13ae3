//! Writes `ready` results in batches (group commit): every result that finished while the
//! previous write ran goes back in one fenced statement (requests answered by their current
//! build in another). A result with a build on disk is
//! switched in while its row is locked (DESIGN §6: a lost claim never changes what `env_path`
//! serves), and a build whose claim was lost is removed at once.

use std::sync::Arc;
use std::time::Duration;

use packenv_core::build::Switch;
use packenv_core::layout::LayoutError;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::ops::Metrics;
use crate::store::{self, Fence, Transition};

/// Most results one write carries.
pub const MAX_WRITE_BATCH: usize = 500;
/// Ceiling of the retry delay while the database is away: short, because results wait in
/// memory and the rows stay `installing` until it returns.
pub const MAX_DB_RETRY_DELAY: Duration = Duration::from_secs(5);
/// After shutdown has killed the builds, how long results keep waiting for an unreachable
/// database before they are given up (their rows are then rescued when the lease runs out).
pub const WRITE_GIVE_UP_AFTER_KILL: Duration = Duration::from_secs(10);

/// One finished build for the writer.
#[derive(Debug)]
pub struct ReadyJob {
    pub fence: Fence,
    /// A [`Transition::Ready`], or a [`Transition::Unchanged`] (no switch).
    pub transition: Transition,
    /// The build to switch in; `None` for a runtime without an environment.
    pub switch: Option<Switch>,
    /// Where the writer says what became of it.
    pub done: oneshot::Sender<Written>,
}

/// What became of one result.
#[derive(Debug)]
pub enum Written {
    /// Switched in and recorded.
    Done,
    /// The claim was lost; the result was discarded and its build removed.
    Lost,
    /// The switch on disk failed; nothing was recorded.
    SwitchFailed(LayoutError),
    /// The database refused to record it (a constraint, a permission), not a passing fault.
    Rejected(sqlx::Error),
    /// Shutdown: the database stayed unreachable; nothing was recorded.
    GaveUp,
}

/// The writer: a channel in, one task.
#[derive(Debug)]
pub struct ReadyWriter {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the daemon kills its builds: from then on, retries are bounded.
    pub root: CancellationToken,
}

impl ReadyWriter {
    /// Writes one batch: locks the rows still held (when a build is to be switched in), switches
    /// those on disk, records them, commits. Returns per job what became of it.
    pub async fn run_once(&self, jobs: &[ReadyJob]) -> Result<Vec<Written>, sqlx::Error> {
        let items: Vec<(Fence, Transition)> = jobs
            .iter()
            .map(|j| (j.fence, j.transition.clone()))
            .collect();
        if jobs.iter().all(|j| j.switch.is_none()) {
            // Nothing on disk to fence: one statement, no transaction.
            let mut conn = self.pool.acquire().await?;
            let written = store::finish_all(&mut conn, &items).await?;
            return Ok(written
                .into_iter()
                .map(|w| if w { Written::Done } else { Written::Lost })
                .collect());
        }
        let fences: Vec<Fence> = jobs.iter().map(|j| j.fence).collect();
        let (mut tx, held) = store::lock_fenced(&self.pool, &fences).await?;
        let switches: Vec<(usize, Switch)> = jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| held.contains(&j.fence))
            .filter_map(|(i, j)| j.switch.clone().map(|s| (i, s)))
            .collect();
        let applied = packenv_core::blocking(move || {
            switches
                .into_iter()
                .map(|(i, s)| {
                    let r = s.apply();
                    (i, s, r)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let mut outcome: Vec<Option<Written>> = jobs.iter().map(|_| None).collect();
        let mut reverts = Vec::new();
        for (i, s, r) in applied {
            match r {
                Ok(previous) => reverts.push((s, previous)),
                Err(e) => outcome[i] = Some(Written::SwitchFailed(e)),
            }
        }
        let to_write: Vec<usize> = (0..jobs.len())
            .filter(|&i| held.contains(&jobs[i].fence) && outcome[i].is_none())
            .collect();
        let batch: Vec<(Fence, Transition)> = to_write.iter().map(|&i| items[i].clone()).collect();
        let written = match store::finish_all(&mut tx, &batch).await {
            Ok(w) => match tx.commit().await {
                Ok(()) => Ok(w),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                // Not recorded: what was switched in must not stay served.
                packenv_core::blocking(move || {
                    for (s, previous) in reverts {
                        s.revert(previous.as_deref());
                    }
                })
                .await;
                return Err(e);
            }
        };
        for (k, &i) in to_write.iter().enumerate() {
            outcome[i] = Some(if written[k] {
                Written::Done
            } else {
                Written::Lost
            });
        }
        let mut lost = Vec::new();
        let result = outcome
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.unwrap_or_else(|| {
                    if let Some(s) = &jobs[i].switch {
                        lost.push(s.clone());
                    }
                    Written::Lost
                })
            })
            .collect();
        if !lost.is_empty() {
            packenv_core::blocking(move || lost.iter().for_each(Switch::discard)).await;
        }
        Ok(result)
    }

    /// Takes results as they come and writes them in batches until the channel closes (the
    /// last worker handle is gone). A batch the database refuses outright is halved until
    /// the refused results are found, so one bad result cannot hold the others back.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<ReadyJob>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_WRITE_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let results = self.write_isolating(&batch).await;
            let mut results = results.into_iter();
            for job in batch {
                let w = results.next().unwrap_or(Written::GaveUp);
                // A build that stopped waiting (its task was dropped) has nothing to learn.
                let _ = job.done.send(w);
            }
        }
    }

    /// Writes `jobs`; when the database refuses them together, writes each half on its own,
    /// and so on down to the refused results (a batch of n with one refused row costs about
    /// 2·log2(n) statements). Each half is its own transaction: what it switched in is
    /// reverted when it is refused, and the other halves' results are kept.
    async fn write_isolating(&self, jobs: &[ReadyJob]) -> Vec<Written> {
        match self.write_with_retry(jobs).await {
            Ok(w) => w,
            Err(e) if store::is_transient(&e) => jobs.iter().map(|_| Written::GaveUp).collect(),
            Err(e) if jobs.len() == 1 => vec![Written::Rejected(e)],
            Err(e) => {
                tracing::debug!(error = %crate::error::chain(&e), results = jobs.len(), "the database refused a batch of results; writing each half on its own");
                let (front, back) = jobs.split_at(jobs.len() / 2);
                let mut w = Box::pin(self.write_isolating(front)).await;
                w.extend(Box::pin(self.write_isolating(back)).await);
                w
            }
        }
    }

    /// Retries `run_once` while the database is away; after the builds were killed, for at
    /// most [`WRITE_GIVE_UP_AFTER_KILL`]. A refusal is returned at once.
    async fn write_with_retry(&self, jobs: &[ReadyJob]) -> Result<Vec<Written>, sqlx::Error> {
        let mut delay = Duration::from_millis(250);
        let mut killed_at = None;
        loop {
            match self.run_once(jobs).await {
                Ok(w) => return Ok(w),
                Err(e) if !store::is_transient(&e) => return Err(e),
                Err(e) => {
                    self.metrics.db_errors.inc();
                    if self.root.is_cancelled() {
                        let since = *killed_at.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= WRITE_GIVE_UP_AFTER_KILL {
                            return Err(e);
                        }
                    }
                    tracing::warn!(error = %crate::error::chain(&e), results = jobs.len(), retry_in = ?delay, "cannot write results back; keeping them and retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_DB_RETRY_DELAY);
                }
            }
        }
    }
}
