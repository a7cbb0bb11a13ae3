//! Row 2, pickup latency: requests one at a time, commit → the worker starts the row and
//! commit → its result is committed, for packenvd and the peer.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};

use super::{await_row, elapsed, insert_packs, start_peers, Ctx};
use crate::procs::{self, PeerOptions};

/// Per request: commit → the worker starts it, and commit → its result is committed.
#[derive(Debug, Default)]
pub struct Latencies {
    pub pickup: Vec<Duration>,
    pub ready: Vec<Duration>,
    /// packenvd only: the largest gap between the `build finished` line and `installed_at`
    /// (a check that the log's clock and the server's agree).
    pub max_clock_gap: Option<Duration>,
}

/// Pause between a result and the next request, so each request meets an idle worker.
const REQUEST_GAP: Duration = Duration::from_millis(10);

pub async fn packenvd_latency(ctx: &Ctx, samples: usize) -> anyhow::Result<Latencies> {
    let db = ctx.cluster.packenvd_db("lat", 2).await?;
    let result = async {
        insert_packs(&db.pool, "lat", samples as u64).await?;
        let dirs = ctx.daemon_dirs("lat")?;
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-lat", None, true)?;
        d.wait_ready().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut out = Latencies::default();
        let mut seen = HashMap::new();
        let mut commits = Vec::new();
        for i in 1..=samples {
            tokio::time::sleep(REQUEST_GAP).await;
            let (id, committed): (i64, DateTime<Utc>) = sqlx::query_as(
                "SELECT r.id, clock_timestamp() FROM request_pack_environment($1, 'core.shell') r",
            )
            .bind(format!("lat{i}"))
            .fetch_one(&db.pool)
            .await?;
            let (started, done) = await_row(&mut d, id, &mut seen, Duration::from_secs(30)).await?;
            out.pickup.push(elapsed(committed, started));
            out.ready.push(elapsed(committed, done));
            commits.push((id, done));
        }
        d.stop(Duration::from_secs(15)).await;
        let installed: HashMap<i64, DateTime<Utc>> =
            sqlx::query_as("SELECT id, installed_at FROM pack_environment WHERE status = 'ready'")
                .fetch_all(&db.pool)
                .await?
                .into_iter()
                .collect();
        out.max_clock_gap = commits
            .iter()
            .filter_map(|(id, done)| installed.get(id).map(|i| (*done - *i).abs()))
            .max()
            .and_then(|g| g.to_std().ok());
        Ok(out)
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

pub async fn peer_latency(
    ctx: &Ctx,
    samples: usize,
    options: &PeerOptions,
) -> anyhow::Result<Latencies> {
    let db = ctx.cluster.fresh_db("peerlat", 2).await?;
    let result = async {
        let options = PeerOptions {
            record_times: true,
            ..options.clone()
        };
        let mut peers = start_peers(ctx, &db, 1, &options).await?;
        let mut p = peers.pop().context("peer")?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut out = Latencies::default();
        let mut seen = HashMap::new();
        for _ in 0..samples {
            tokio::time::sleep(REQUEST_GAP).await;
            let (id, committed): (i64, DateTime<Utc>) = sqlx::query_as(
                "SELECT j.id, clock_timestamp() FROM graphile_worker.add_job('noop', '{}'::json) j",
            )
            .fetch_one(&db.pool)
            .await?;
            let (started, done) = await_row(&mut p, id, &mut seen, Duration::from_secs(30)).await?;
            out.pickup.push(elapsed(committed, started));
            out.ready.push(elapsed(committed, done));
        }
        p.stop(Duration::from_secs(15)).await;
        Ok(out)
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}
