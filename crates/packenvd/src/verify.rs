//! Verification passes (DESIGN §7): a pass takes rows whose last check is older than
//! `verify_max_age`, in batches claimed with SKIP LOCKED so that with several instances each
//! row is checked once, runs the checks of [`packenv_core::check`] on each, and sends broken
//! environments to `outdated` with the reason. The daemon runs a pass on `verify_schedule`
//! ([`crate::services::verifier`]); `packenvd verify` runs one now.

use futures::StreamExt;
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
        let checked: Vec<(EnvRow, Option<String>)> = futures::stream::iter(rows)
            .map(|row| {
                let cfg = &cfg;
                async move {
                    let failure = packenv_core::check::check(cfg, &row.target())
                        .await
                        .err()
                        .map(|e| e.to_string());
                    (row, failure)
                }
            })
            .buffer_unordered(settings.concurrency.max(1))
            .collect()
            .await;
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
            });
        }
    }
}
