//! The peer of the benchmark: a Graphile Worker (Rust port) process with one no-op task,
//! started by `packenvd-bench` the way it starts `packenvd run`. A binary of its own, so its
//! memory and CPU are measured without the benchmark's code around it.
//!
//! Prints `ready` once migrated and initialised. With `--record-times` it also prints
//! `S <job id> <unix µs>` when a job's handler starts and `C <job id> <unix µs>` once its
//! completion is written (the `JobComplete` hook runs after the write, batched or not).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use graphile_worker::{
    IntoTaskHandlerResult, JobComplete, LocalQueueConfig, TaskHandler, WorkerContext, WorkerOptions,
};
use serde::{Deserialize, Serialize};

/// The peer's tunings as measured; `best` is documented in docs/benchmarks.md.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Jobs run at once; the library's default is the number of CPUs.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Local queue (batch fetch) plus batched completion, and a pool as large as the
    /// concurrency; otherwise every setting is the library's default.
    #[arg(long)]
    best: bool,
    /// Jobs fetched per local-queue batch (with --best).
    #[arg(long, default_value_t = 100)]
    local_queue_size: usize,
    /// Completion batch delay in milliseconds (with --best).
    #[arg(long, default_value_t = 1)]
    batch_delay_ms: u64,
    #[arg(long)]
    record_times: bool,
}

static RECORD: AtomicBool = AtomicBool::new(false);

fn micros_now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

#[derive(Debug, Deserialize, Serialize)]
struct Noop {}

impl TaskHandler for Noop {
    const IDENTIFIER: &'static str = "noop";

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        if RECORD.load(Ordering::Relaxed) {
            println!("S {} {}", ctx.job().id(), micros_now());
        }
        Ok::<(), String>(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    RECORD.store(args.record_times, Ordering::Relaxed);
    let mut options = WorkerOptions::default()
        .database_url(&args.database_url)
        .define_job::<Noop>();
    if let Some(c) = args.concurrency {
        options = options.concurrency(c);
    }
    if args.best {
        let c = args
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // The default pool (20) would make 64 handlers queue for connections.
        options = options
            .max_pg_conn(u32::try_from(c).unwrap_or(u32::MAX).saturating_add(4))
            .local_queue(LocalQueueConfig::default().with_size(args.local_queue_size))
            .complete_job_batch_delay(Duration::from_millis(args.batch_delay_ms));
    }
    if args.record_times {
        options = options.on(JobComplete, |ctx| async move {
            println!("C {} {}", ctx.job.id(), micros_now());
        });
    }
    let worker = options.init().await?;
    println!("ready");
    worker.run().await?;
    Ok(())
}
