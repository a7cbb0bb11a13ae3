//! Verification passes (DESIGN §7): a pass takes rows whose last check is older than
//! `verify_max_age`, in batches claimed with SKIP LOCKED so that with several instances each
//! row is checked once, runs the checks of [`packenv_core::check`] on each, and sends broken
//! environments to `outdated` with the reason. Rows whose checks could not run on this host
//! go back unchecked. The daemon runs a pass on `verify_schedule`
//! ([`crate::services::verifier`]); `packenvd verify` runs one now.

use futures::StreamExt;
use packenv_core::check::CheckError;
use sqlx::PgPool;

use crate::config::Settings;
use crate::store::{self, EnvRow};
use crate::Error;

/// Which rows a pass takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Rows last verified longer ago than `verify_max_age` (the cron's pass).
    Stale,
    /// Every ready row.
    All,
    /// The ready rows of one pack, or of one pack and runtime, whatever their age.
    Pack {
        pack: String,
        runtime: Option<String>,
    },
}

/// The result of checking one environment.
#[derive(Debug, Clone)]
pub struct Finding {
    pub pack_ref: String,
    pub runtime_ref: String,
    /// `None` when every check passed; else which check failed and what it saw.
    pub failure: Option<String>,
    /// Why the checks could not run at all (a fault of this host, not of the environment);
    /// the row was then given back unchecked and `failure` is `None`.
    pub unchecked: Option<String>,
}

/// Runs one pass over `scope`; returns what it found, row by row.
pub async fn run_pass(
    pool: &PgPool,
    settings: &Settings,
    scope: &Scope,
) -> Result<Vec<Finding>, Error> {
    let (max_age, pack, runtime) = match scope {
        Scope::Stale => (Some(settings.verify_max_age), None, None),
        Scope::All => (None, None, None),
        Scope::Pack { pack, runtime } => (None, Some(pack.as_str()), runtime.as_deref()),
    };
    let cutoff = store::verify_cutoff(pool, max_age)
        .await
        .map_err(Error::db("reading the verification cut-off"))?;
    let cfg = settings.check_config();
    let mut findings = Vec::new();
    loop {
        let rows = store::claim_verification(
            pool,
            &settings.node_name,
            cutoff,
            pack,
            runtime,
            settings.verify_batch,
            &settings.instance_name,
        )
        .await
        .map_err(Error::db("taking rows to verify"))?;
        if rows.is_empty() {
            return Ok(findings);
        }
        let results: Vec<(EnvRow, Result<(), CheckError>)> = futures::stream::iter(rows)
            .map(|row| {
                let cfg = &cfg;
                async move {
                    let result = packenv_core::check::check(cfg, &row.target()).await;
                    (row, result)
                }
            })
            .buffer_unordered(settings.concurrency.max(1))
            .collect()
            .await;
        let mut checked: Vec<(EnvRow, Option<String>)> = Vec::new();
        let mut unchecked: Vec<(EnvRow, String)> = Vec::new();
        for (row, result) in results {
            match result {
                Err(e) if e.is_local() => unchecked.push((row, e.to_string())),
                r => checked.push((row, r.err().map(|e| e.to_string()))),
            }
        }
        if !unchecked.is_empty() {
            give_back_unchecked(pool, &unchecked).await;
            findings.extend(unchecked.iter().map(|(row, reason)| Finding {
                pack_ref: row.pack_ref.clone(),
                runtime_ref: row.runtime_ref.clone(),
                failure: None,
                unchecked: Some(reason.clone()),
            }));
        }
        for (i, (row, failure)) in checked.iter().enumerate() {
            let Some(checked_at) = row.checked_at else {
                continue;
            };
            let written = match store::finish_verification(
                pool,
                row.id,
                checked_at,
                failure.as_deref(),
            )
            .await
            {
                Ok(w) => w,
                Err(e) => {
                    // Rows of this batch not yet recorded go back unchecked, so they are
                    // not counted as verified for verify_max_age.
                    let rest: Vec<&EnvRow> = checked[i..].iter().map(|(r, _)| r).collect();
                    if let Err(release) = store::release_verification(pool, &rest).await {
                        tracing::warn!(error = %crate::error::chain(&release), rows = rest.len(), "cannot give unchecked rows back");
                    }
                    return Err(Error::db("recording a verification")(e));
                }
            };
            match (&failure, written) {
                (Some(reason), true) => {
                    tracing::warn!(pack_ref = %row.pack_ref, runtime_ref = %row.runtime_ref, env_id = row.env_id, reason = %reason, "verification failed: outdated, will be rebuilt")
                }
                (_, false) => {
                    tracing::info!(pack_ref = %row.pack_ref, env_id = row.env_id, "row changed while being verified; result discarded")
                }
                (None, true) => {
                    tracing::debug!(pack_ref = %row.pack_ref, env_id = row.env_id, "verified")
                }
            }
            findings.push(Finding {
                pack_ref: row.pack_ref.clone(),
                runtime_ref: row.runtime_ref.clone(),
                failure: failure.clone(),
                unchecked: None,
            });
        }
        if !unchecked.is_empty() {
            // The rows given back are stale again and the next claim would take them at once:
            // the pass ends here, and the next one tries again.
            return Ok(findings);
        }
    }
}

/// Gives rows whose checks could not run back unchecked, logging why: a fault of this host
/// must neither send a healthy environment to `outdated` nor count as a check.
async fn give_back_unchecked(pool: &PgPool, unchecked: &[(EnvRow, String)]) {
    for (row, reason) in unchecked {
        tracing::error!(pack_ref = %row.pack_ref, runtime_ref = %row.runtime_ref, env_id = row.id, reason = %reason, "cannot verify this environment here; left as it was");
    }
    let rows: Vec<&EnvRow> = unchecked.iter().map(|(r, _)| r).collect();
    if let Err(e) = store::release_verification(pool, &rows).await {
        tracing::warn!(error = %crate::error::chain(&e), rows = rows.len(), "cannot give unchecked rows back");
    }
}
