//! Row 6, idle cost: CPU time, statements sent and peak RSS of an idle packenvd and an idle
//! peer, each talking through a counting proxy.

use std::time::Duration;

use super::Ctx;
use crate::procs::{self, PeerOptions, Proc};
use crate::proxy;

#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub window: Duration,
    pub cpu_seconds: f64,
    pub statements: u64,
    /// Connection checks of sqlx's pool: a `Sync` with no statement before it.
    pub pings: u64,
    pub peak_rss_kb: u64,
}

impl Idle {
    pub fn cpu_per_30s(&self) -> f64 {
        self.cpu_seconds * 30.0 / self.window.as_secs_f64()
    }
}

/// Time after start-up before the window opens, so start-up work is not counted.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

async fn measure_idle(p: &Proc, counts: &proxy::Counts, window: Duration) -> anyhow::Result<Idle> {
    tokio::time::sleep(IDLE_SETTLE).await;
    let cpu0 = procs::cpu_seconds(p.pid())?;
    let c0 = counts.snapshot();
    tokio::time::sleep(window).await;
    let cpu1 = procs::cpu_seconds(p.pid())?;
    let c1 = counts.snapshot();
    let d = c1 - c0;
    Ok(Idle {
        window,
        cpu_seconds: cpu1 - cpu0,
        statements: d.statements,
        pings: d.syncs.saturating_sub(d.executes),
        peak_rss_kb: procs::status_kb(p.pid(), "VmHWM")?,
    })
}

/// packenvd with every default but its directories, talking through a counting proxy.
pub async fn packenvd_idle(ctx: &Ctx, window: Duration) -> anyhow::Result<Idle> {
    let db = ctx.cluster.packenvd_db("idle", 1).await?;
    let result = async {
        let proxy = proxy::start(&db.url, &ctx.dir("proxy")?)?;
        let dirs = ctx.daemon_dirs("idle")?;
        let mut d = procs::spawn_packenvd(&dirs, &proxy.url, "bench-idle", None, false)?;
        d.wait_ready().await?;
        let idle = measure_idle(&d, &proxy.counts, window).await;
        d.stop(Duration::from_secs(15)).await;
        idle
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

pub async fn peer_idle(ctx: &Ctx, window: Duration, options: &PeerOptions) -> anyhow::Result<Idle> {
    let db = ctx.cluster.fresh_db("peeridle", 1).await?;
    let result = async {
        let proxy = proxy::start(&db.url, &ctx.dir("proxy")?)?;
        let mut p = procs::spawn_peer(&ctx.peer_exe, &proxy.url, "peer-idle", options)?;
        p.wait_ready().await?;
        let idle = measure_idle(&p, &proxy.counts, window).await;
        p.stop(Duration::from_secs(15)).await;
        idle
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}
