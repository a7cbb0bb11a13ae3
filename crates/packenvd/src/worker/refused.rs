//! Rows the database refuses (issue 21): a claim the server refuses, rather than one that does
//! not reach it, is retried part by part (the candidates halved) until the refused row is
//! found, so the rest of the batch is claimed in the same turn. The refused row is failed with
//! the database's message in a statement of its own; when that is refused too, the row is kept
//! out of this daemon's claims for a backoff and listed on its node's row for `status`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::Worker;
use crate::config::Settings;
use crate::error::chain;
use crate::store::{self, Candidate, Claim, Lanes};
use crate::Error;

/// The first backoff of a quarantined row; it doubles with each refusal, up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(1800);
/// Refusal counts kept at most; past this they start again (a row refused again then waits the
/// first backoff, nothing else).
const STRIKES_MAX: usize = 10_000;

/// One row kept out of this daemon's claims.
#[derive(Debug, Clone)]
struct Refused {
    row: Candidate,
    /// `claim` or `write-back`: what the database refused.
    what: &'static str,
    /// The database's message.
    error: String,
    since: DateTime<Utc>,
    retry: Instant,
    retry_at: DateTime<Utc>,
}

/// The rows this daemon keeps out of its claims, and how often each was refused.
#[derive(Debug, Default)]
pub(super) struct Quarantine {
    rows: HashMap<i64, Refused>,
    strikes: HashMap<i64, u32>,
}

impl Quarantine {
    /// Keeps `row` out of the claims for a backoff that doubles with each refusal; returns the
    /// backoff and whether this is the row's first refusal (the one logged at warn).
    fn add(&mut self, row: Candidate, what: &'static str, error: String) -> (Duration, bool) {
        if self.strikes.len() > STRIKES_MAX {
            self.strikes.clear();
        }
        let strikes = self.strikes.entry(row.id).or_insert(0);
        *strikes += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (*strikes - 1).min(16))
            .min(MAX_BACKOFF);
        let first = *strikes == 1;
        let now = Utc::now();
        self.rows.insert(
            row.id,
            Refused {
                row,
                what,
                error,
                since: now,
                retry: Instant::now() + backoff,
                retry_at: now + chrono::Duration::from_std(backoff).unwrap_or_default(),
            },
        );
        (backoff, first)
    }

    /// The rows to keep out of the next claim; rows whose backoff is over are let go (and
    /// retried by that claim). True when the list changed.
    fn active(&mut self) -> (Vec<i64>, bool) {
        let now = Instant::now();
        let before = self.rows.len();
        self.rows.retain(|_, r| r.retry > now);
        (
            self.rows.keys().copied().collect(),
            self.rows.len() != before,
        )
    }

    /// A row claimed or recorded after all: its refusals are forgotten.
    fn cleared(&mut self, id: i64) {
        self.strikes.remove(&id);
    }

    /// The list `packenvd status` shows, as this node's row records it.
    fn json(&self, instance: &str) -> serde_json::Value {
        let mut rows: Vec<&Refused> = self.rows.values().collect();
        rows.sort_by_key(|r| r.row.id);
        serde_json::Value::Array(
            rows.into_iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.row.id,
                        "env_id": r.row.env_id,
                        "pack_ref": r.row.pack_ref,
                        "runtime_ref": r.row.runtime_ref,
                        "what": r.what,
                        "error": r.error,
                        "since": r.since,
                        "retry_at": r.retry_at,
                        "instance": instance,
                    })
                })
                .collect(),
        )
    }
}

impl Worker {
    /// The rows to keep out of the next claim; publishes the list when rows were let go.
    pub(super) async fn refused_ids(&self, cfg: &Settings) -> Vec<i64> {
        let (ids, changed) = self.quarantine().active();
        if changed {
            self.publish_refused(cfg).await;
        }
        ids
    }

    /// Rows claimed: whatever refusals they had are forgotten.
    pub(super) fn claimed(&self, claims: &[Claim]) {
        let mut q = self.quarantine();
        for c in claims {
            q.cleared(c.fence.id);
        }
    }

    /// After the database refused a claim of `lanes`: claims the candidates part by part,
    /// halving each refused part until the refused rows are found, and fails or quarantines
    /// those. Returns every claim made (each is committed and must be built). When every
    /// candidate is refused, the statement is refused, not a row: `refusal` is returned.
    pub(super) async fn claim_isolating(
        &self,
        cfg: &Settings,
        lanes: Lanes<'_>,
        refusal: sqlx::Error,
    ) -> Result<Vec<Claim>, Error> {
        let pool = self.pool();
        let candidates = store::claimable(
            pool,
            &cfg.node_name,
            lanes.refused,
            lanes.build + lanes.answer,
        )
        .await
        .map_err(Error::db("listing the rows a refused claim would take"))?;
        if candidates.is_empty() {
            return Err(Error::db("claiming rows")(refusal));
        }
        tracing::warn!(error = %chain(&refusal), candidates = candidates.len(), "the database refused a claim; claiming its rows part by part to find the refused one");
        let (mut build, mut answer) = (lanes.build, lanes.answer);
        let mut claims: Vec<Claim> = Vec::new();
        let mut refused: Vec<(Candidate, sqlx::Error)> = Vec::new();
        // A stack whose top is the front of the claim's order: rows are taken oldest first.
        let mut parts: Vec<&[Candidate]> = vec![&candidates];
        while let Some(part) = parts.pop() {
            if build <= 0 && answer <= 0 {
                break;
            }
            let ids: Vec<i64> = part.iter().map(|c| c.id).collect();
            let sub = Lanes {
                build,
                answer,
                only: Some(&ids),
                ..lanes
            };
            match store::claim_lanes(
                pool,
                &cfg.node_name,
                &cfg.instance_name,
                cfg.lease,
                sub,
                &cfg.envs_root,
            )
            .await
            {
                Ok(got) => {
                    for c in &got {
                        if c.row.answer {
                            answer -= 1;
                        } else {
                            build -= 1;
                        }
                    }
                    claims.extend(got);
                }
                // The database went away meanwhile: what was claimed is built, the rest waits.
                Err(e) if store::is_transient(&e) => {
                    if claims.is_empty() {
                        return Err(Error::db("claiming rows")(e));
                    }
                    break;
                }
                Err(e) if part.len() == 1 => refused.push((part[0].clone(), e)),
                Err(_) => {
                    let (front, back) = part.split_at(part.len() / 2);
                    parts.push(back);
                    parts.push(front);
                }
            }
        }
        if claims.is_empty() && refused.len() == candidates.len() && candidates.len() > 1 {
            return Err(Error::db("claiming rows")(refusal));
        }
        for (row, e) in refused {
            self.refused_claim(cfg, row, e).await;
        }
        Ok(claims)
    }

    /// Fails a row the database refused to claim, with the database's message; when that is
    /// refused too (or the database is away), keeps the row out of the claims for a backoff.
    async fn refused_claim(&self, cfg: &Settings, row: Candidate, e: sqlx::Error) {
        let message = chain(&e).to_string();
        let error = format!("the database refused to claim this row: {message}");
        let (id, env_id) = (row.id, row.env_id);
        let (pack_ref, runtime_ref) = (
            row.pack_ref.clone().unwrap_or_default(),
            row.runtime_ref.clone().unwrap_or_default(),
        );
        match store::fail_refused(self.pool(), &cfg.node_name, id, &error).await {
            Ok(true) => {
                tracing::warn!(node_row = id, env_id, pack_ref, runtime_ref, error = %message, "the database refused to claim this row; recorded it as failed, the others go on");
            }
            Ok(false) => {
                tracing::info!(node_row = id, env_id, pack_ref, runtime_ref, error = %message, "the database refused to claim this row, which is no longer claimable");
            }
            Err(fail) => {
                let (backoff, first) = self.quarantine().add(row, "claim", message.clone());
                let retry_in = humantime::format_duration(backoff).to_string();
                if first {
                    tracing::warn!(node_row = id, env_id, pack_ref, runtime_ref, error = %message, fail_error = %chain(&fail), retry_in, "the database refused to claim this row and to fail it; this daemon leaves it alone until the backoff is over");
                } else {
                    tracing::debug!(node_row = id, error = %message, retry_in, "the database refused this row again");
                }
                self.publish_refused(cfg).await;
            }
        }
    }

    /// A row whose outcome the database refused to record (and, for a build, to fail): kept
    /// out of the claims for a backoff once its lease runs out and it is rescued.
    pub(super) async fn refused_write_back(&self, claim: &Claim, e: &sqlx::Error) {
        let cfg = self.cfg();
        let row = Candidate {
            id: claim.fence.id,
            env_id: claim.row.env_id,
            pack_ref: Some(claim.row.pack_ref.clone()),
            runtime_ref: Some(claim.row.runtime_ref.clone()),
        };
        let (backoff, _) = self
            .quarantine()
            .add(row, "write-back", chain(e).to_string());
        tracing::warn!(node_row = claim.fence.id, error = %chain(e), retry_in = %humantime::format_duration(backoff), "the database refused to record this row's outcome: it stays installing until its lease expires, and this daemon leaves it alone until the backoff is over");
        self.publish_refused(&cfg).await;
    }

    /// Writes the quarantine to this node's row; a failure is logged (the list is shown again
    /// with its next change).
    pub(super) async fn publish_refused(&self, cfg: &Settings) {
        let json = self.quarantine().json(&cfg.instance_name);
        if let Err(e) =
            store::record_refused(self.pool(), &cfg.node_name, &cfg.instance_name, &json).await
        {
            tracing::warn!(error = %chain(&e), "cannot record the refused rows on this node's row");
        }
    }

    fn quarantine(&self) -> std::sync::MutexGuard<'_, Quarantine> {
        self.shared
            .quarantine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
