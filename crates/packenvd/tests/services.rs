//! The maintenance services, driven one run at a time through `run_once()`: no sleeps, no
//! daemon loop.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use packenv_core::log::BuildLog;
use packenvd::inflight::Inflight;
use packenvd::ops::{Health, Metrics};
use packenvd::services::heartbeat::{Heartbeat, HeartbeatConfig};
use packenvd::services::log_flusher::LogFlusher;
use packenvd::services::rescuer::Rescuer;
use packenvd::services::{fixed, Service};
use packenvd::store::{self, Claim};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// `n` pending rows of a no-op runtime, claimed by "me".
async fn claimed_rows(pool: &PgPool, n: usize) -> Vec<Claim> {
    add_runtime(pool, "t.noop", shell_runtime("true")).await;
    for i in 0..n {
        add_pack(pool, &format!("p{i}")).await;
        request(pool, &format!("p{i}"), "t.noop").await;
    }
    register_node(pool, "/envs").await;
    store::claim(
        pool,
        &node_name(),
        "me",
        Duration::from_secs(60),
        n as i64,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap()
}

fn register(inflight: &Inflight, claims: &[Claim]) -> Vec<(CancellationToken, BuildLog)> {
    claims
        .iter()
        .map(|c| {
            let (cancel, log) = (CancellationToken::new(), BuildLog::new(4096));
            inflight.insert(c.fence, cancel.clone(), log.clone());
            (cancel, log)
        })
        .collect()
}

async fn reset(pool: &PgPool, id: i64) {
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_heartbeat_renews_held_leases_and_cancels_the_build_whose_claim_was_lost(pool: PgPool) {
    let claims = claimed_rows(&pool, 2).await;
    let inflight = Arc::new(Inflight::default());
    let builds = register(&inflight, &claims);
    sqlx::query("UPDATE pack_environment_node SET lease_expires_at = now() + interval '5 seconds'")
        .execute(&pool)
        .await
        .unwrap();
    reset(&pool, claims[1].row.id).await;
    let heartbeat = Heartbeat {
        pool: pool.clone(),
        config: HeartbeatConfig {
            lease: Duration::from_secs(600),
            node: node_name(),
        },
        inflight: inflight.clone(),
        metrics: Arc::default(),
        health: Arc::new(Health::default()),
    };
    let report = heartbeat.run_once().await.unwrap();
    assert_eq!(report.renewed, 1);
    assert_eq!(report.lost, [claims[1].fence.token]);
    assert!(!builds[0].0.is_cancelled());
    assert!(
        builds[1].0.is_cancelled(),
        "the lost claim's build is cancelled"
    );
    let renewed: bool = sqlx::query_scalar(
        "SELECT lease_expires_at > now() + interval '500 seconds' FROM pack_environment_node
         WHERE env_id = $1",
    )
    .bind(claims[0].row.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        renewed,
        "the held lease was extended to the configured lease"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_log_flusher_writes_only_changed_logs_and_cancels_builds_whose_row_was_reset(
    pool: PgPool,
) {
    let claims = claimed_rows(&pool, 3).await;
    let inflight = Arc::new(Inflight::default());
    let builds = register(&inflight, &claims);
    builds[0].1.line("step 1 of p0");
    builds[2].1.line("step 1 of p2");
    reset(&pool, claims[2].row.id).await;
    let flusher = LogFlusher {
        pool: pool.clone(),
        inflight: inflight.clone(),
        metrics: Arc::new(Metrics::default()),
    };
    let report = flusher.run_once().await.unwrap();
    assert_eq!((report.written, report.lost), (1, 1));
    // A running build's log is this node's: it reaches the platform's row when the build ends.
    let log: Option<String> =
        sqlx::query_scalar("SELECT install_log FROM pack_environment_node WHERE env_id = $1")
            .bind(claims[0].row.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(log.as_deref(), Some("step 1 of p0\n"));
    assert!(builds[2].0.is_cancelled());
    assert!(!builds[0].0.is_cancelled() && !builds[1].0.is_cancelled());
    // Nothing changed since: nothing is written.
    let again = flusher.run_once().await.unwrap();
    assert_eq!((again.written, again.lost), (0, 0));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_rescuer_sends_expired_rows_back_and_fails_those_whose_attempts_are_spent(
    pool: PgPool,
) {
    let env = Env::new(&[("max_attempts", "2")]);
    let claims = claimed_rows(&pool, 3).await;
    // p0: a live lease; p1: expired on its first attempt; p2: expired on its last.
    sqlx::query(
        "UPDATE pack_environment_node n SET lease_expires_at = now() - interval '1 second',
                attempts = CASE pe.pack_ref WHEN 'p2' THEN 2 ELSE n.attempts END
         FROM pack_environment pe WHERE pe.id = n.env_id AND pe.pack_ref IN ('p1', 'p2')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rescuer = Rescuer {
        pool: pool.clone(),
        settings: fixed(env.settings.clone()),
        metrics: Arc::new(Metrics::default()),
    };
    assert_eq!(rescuer.run_once().await.unwrap(), 2);
    let (p0, p1, p2) = (
        row(&pool, claims[0].row.id).await,
        row(&pool, claims[1].row.id).await,
        row(&pool, claims[2].row.id).await,
    );
    assert_eq!(p0.status, "installing", "a live lease is left alone");
    assert_eq!(p1.status, "pending");
    assert!(p1.install_error.unwrap().contains("it will be retried"));
    assert_eq!(p2.status, "failed", "attempts spent: failed, not retried");
    let error = p2.install_error.unwrap();
    assert!(
        error.contains("stopped renewing its lease") && error.contains("no attempts left"),
        "{error}"
    );
    assert_eq!(
        rescuer.run_once().await.unwrap(),
        0,
        "nothing left to rescue"
    );
}
