//! `packenvd-bench`: measures the real `packenvd` binary against the goals of issue 7 and
//! against a peer (the Rust port of Graphile Worker), and prints one table.
//!
//! Run it as `scripts/bench.sh [--quick] [--rows N]`, which builds both binaries in release
//! mode and provides a throwaway PostgreSQL. What each row measures, and how, is in
//! docs/benchmarks.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

mod pg;
mod procs;
mod proxy;
mod report;
mod scenarios;

use procs::PeerOptions;
use report::{Measured, Throughput};
use scenarios::Ctx;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks packenvd (and a peer) against a PostgreSQL in DATABASE_URL")]
struct Args {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Rows per throughput run (default 20000; 500 with --quick).
    #[arg(long)]
    rows: Option<u64>,
    /// A smoke run for CI: few rows and samples, a short idle window, no peer.
    #[arg(long)]
    quick: bool,
    /// Skip the peer (graphile_worker) rows.
    #[arg(long)]
    no_peer: bool,
    /// Only these scenarios (comma-separated: throughput, latency, build, environments, fleet,
    /// rerequest, verify, idle, nodes, lookup; `caches` is the old name of environments).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The packenvd binary (default: next to this one, i.e. target/release/packenvd).
    #[arg(long)]
    packenvd: Option<PathBuf>,
    /// Another packenvd binary (e.g. the previous release) whose single-node queue throughput
    /// the nodes row measures beside this build's; it migrates its own database.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Diagnosis: send throughput daemons through the counting proxy and print statements
    /// and pool pings per row (slower; not for the table).
    #[arg(long)]
    count_statements: bool,
    /// Builds per side in the build-overhead row (default 10; 1 with --quick).
    #[arg(long)]
    build_samples: Option<usize>,
    /// Skip the raw-limit runs (when comparing daemon builds).
    #[arg(long)]
    no_raw: bool,
    /// The peer's local-queue batch size in its best settings.
    #[arg(long, default_value_t = 100)]
    peer_local_queue_size: usize,
    /// The peer's completion batch delay (ms) in its best settings.
    #[arg(long, default_value_t = 1)]
    peer_batch_delay_ms: u64,
}

/// The knobs that --quick turns down.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rows: u64,
    pub concurrencies: Vec<(usize, usize)>,
    pub raw_tasks: Vec<usize>,
    pub latency_samples: usize,
    pub build_samples: usize,
    pub build_warm_up: bool,
    /// Cold/warm build pairs per variant in the environments row (medians are shown).
    pub cache_samples: usize,
    /// Packs in the fleet row built by the default runtime with uv, and by pip only and the
    /// old commands (fewer: minutes each; the row scales their time per pack).
    pub fleet_packs: usize,
    pub fleet_packs_slow: usize,
    /// Packs re-requested in the re-request row.
    pub rerequest_packs: usize,
    /// Stale ready environments in the verification row.
    pub verify_envs: usize,
    pub idle_window: Duration,
    /// Environments per request in the nodes row (on 1 node, then on 3).
    pub nodes_envs: u64,
    /// Runs per build and concurrency of the single-node throughput beside `--baseline`;
    /// without one, a single run, or row 1's when it ran.
    pub versus_samples: usize,
    pub peer: bool,
    /// How long a throughput run of the peer's defaults may take (it drains a bulk insert at
    /// about `concurrency` rows per second; see docs/benchmarks.md).
    pub peer_default_cap: Duration,
}

impl Plan {
    fn from(args: &Args) -> Plan {
        let quick = args.quick;
        Plan {
            rows: args.rows.unwrap_or(if quick { 500 } else { 20_000 }),
            concurrencies: vec![(1, 1), (8, 1), (64, 1), (64, 2)],
            raw_tasks: match (args.no_raw, quick) {
                (true, _) => vec![],
                (false, true) => vec![1, 2],
                (false, false) => vec![1, 2, 4, 8],
            },
            latency_samples: if quick { 50 } else { 500 },
            build_samples: args.build_samples.unwrap_or(if quick { 1 } else { 10 }),
            build_warm_up: !quick,
            cache_samples: if quick { 1 } else { 3 },
            fleet_packs: if quick { 10 } else { 200 },
            fleet_packs_slow: if quick { 2 } else { 20 },
            rerequest_packs: if quick { 50 } else { 1000 },
            verify_envs: if quick { 200 } else { 2000 },
            idle_window: Duration::from_secs(if quick { 10 } else { 60 }),
            nodes_envs: if quick { 100 } else { 1000 },
            versus_samples: if quick || args.baseline.is_none() {
                1
            } else {
                3
            },
            peer: !quick && !args.no_peer,
            peer_default_cap: Duration::from_secs(20),
        }
    }
}

/// Concurrencies of the single-node throughput in the nodes row: one where each row waits for
/// its own round trips, one where batches dominate.
const VERSUS_CONCURRENCIES: [usize; 2] = [8, 64];

/// The floor's loops and rows per claim: one row per statement (where the daemon's
/// concurrency-8 claims mostly are), 16 (about where its concurrency-64 ones are) and 32.
const FLOORS: [(usize, usize); 3] = [(8, 1), (4, 16), (2, 32)];

fn sibling_exe(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("packenvd-bench: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("packenvd-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn wanted(args: &Args, scenario: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|s| s == scenario)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::from(&args);
    let started = Instant::now();
    let packenvd_exe = match &args.packenvd {
        Some(p) => p.clone(),
        None => sibling_exe("packenvd")?,
    };
    if let Some(b) = &args.baseline {
        anyhow::ensure!(
            b.is_file(),
            "--baseline {}: no such file (scripts/bench.sh --baseline REV builds one)",
            b.display()
        );
    }
    anyhow::ensure!(
        packenvd_exe.is_file(),
        "{} not found: build it first (cargo build --release -p packenvd), or use scripts/bench.sh",
        packenvd_exe.display()
    );
    let peer_exe = sibling_exe("packenvd-bench-peer")?;
    if plan.peer && !peer_exe.is_file() {
        // `cargo run -p packenvd-bench` builds only the default binary.
        anyhow::bail!(
            "{} not found: build it with `cargo build --release -p packenvd-bench` (scripts/bench.sh does), or pass --no-peer",
            peer_exe.display()
        );
    }
    let cluster = pg::Cluster::connect(&args.database_url).await?;
    let scratch = tempfile::Builder::new()
        .prefix("packenvd-bench-")
        .tempdir()
        .context("scratch directory")?;
    // A daemon running as root starts its step supervisor (itself) as an unprivileged build
    // id, which may not reach a binary inside the checkout (a private directory on its path):
    // the daemons run a copy that every user can reach.
    let packenvd_exe = {
        let copy = scratch.path().join("packenvd");
        std::fs::copy(&packenvd_exe, &copy)
            .with_context(|| format!("cannot copy {}", packenvd_exe.display()))?;
        copy
    };
    let ctx = Ctx {
        cluster,
        packenvd_exe,
        peer_exe,
        scratch,
        count_statements: args.count_statements,
    };
    let mut m = Measured {
        plan: Some(plan.clone()),
        baseline: args.baseline.clone(),
        machine: report::machine(&ctx.cluster).await,
        ..Measured::default()
    };
    let peer_default = PeerOptions::default();
    let peer_best = PeerOptions {
        best: true,
        local_queue_size: Some(args.peer_local_queue_size),
        batch_delay_ms: Some(args.peer_batch_delay_ms),
        ..PeerOptions::default()
    };
    m.peer_best_settings = format!(
        "local queue of {} jobs, completions batched every {} ms, pool = concurrency + 4",
        args.peer_local_queue_size, args.peer_batch_delay_ms
    );

    if wanted(&args, "throughput") {
        for &(c, procs) in &plan.concurrencies {
            let mut t = Throughput {
                concurrency: c,
                processes: procs,
                ..Throughput::default()
            };
            progress(&format!(
                "throughput: packenvd, concurrency {c} × {procs} process(es)"
            ));
            t.packenvd =
                report::keep(scenarios::packenvd_throughput(&ctx, plan.rows, c, procs).await);
            if procs == 1 {
                for &tasks in plan.raw_tasks.iter().filter(|&&n| n <= c) {
                    progress(&format!(
                        "throughput: raw limit, concurrency {c}, {tasks} task(s)"
                    ));
                    if let report::Cell::Done(r) =
                        report::keep(scenarios::raw_throughput(&ctx, plan.rows, c, tasks).await)
                    {
                        if t.raw.is_none_or(|(best, _)| r > best) {
                            t.raw = Some((r, tasks));
                        }
                    }
                }
            } else {
                t.raw = m
                    .throughput
                    .iter()
                    .find(|o| o.concurrency == c && o.processes == 1)
                    .and_then(|o| o.raw);
            }
            if plan.peer {
                let opts = |base: &PeerOptions| PeerOptions {
                    concurrency: Some(c),
                    ..base.clone()
                };
                progress(&format!(
                    "throughput: peer defaults, concurrency {c} × {procs}"
                ));
                t.peer_default = report::keep(
                    scenarios::peer_throughput(
                        &ctx,
                        plan.rows,
                        procs,
                        &opts(&peer_default),
                        plan.peer_default_cap,
                    )
                    .await,
                );
                progress(&format!("throughput: peer best, concurrency {c} × {procs}"));
                t.peer_best = report::keep(
                    scenarios::peer_throughput(
                        &ctx,
                        plan.rows,
                        procs,
                        &opts(&peer_best),
                        Duration::MAX,
                    )
                    .await,
                );
            }
            m.throughput.push(t);
        }
    }

    if wanted(&args, "latency") {
        progress(&format!(
            "pickup latency: packenvd, {} requests",
            plan.latency_samples
        ));
        m.latency = report::keep(scenarios::packenvd_latency(&ctx, plan.latency_samples).await);
        if plan.peer {
            progress("pickup latency: peer defaults");
            m.peer_latency_default = report::keep(
                scenarios::peer_latency(&ctx, plan.latency_samples, &peer_default).await,
            );
            progress("pickup latency: peer best");
            m.peer_latency_best =
                report::keep(scenarios::peer_latency(&ctx, plan.latency_samples, &peer_best).await);
        }
    }

    if wanted(&args, "build") {
        progress(&format!(
            "build overhead: {} daemon builds and {} direct runs",
            plan.build_samples, plan.build_samples
        ));
        m.build = report::keep(
            scenarios::build_overhead(&ctx, plan.build_samples, plan.build_warm_up).await,
        );
    }

    if wanted(&args, "environments") || wanted(&args, "caches") {
        progress(&format!(
            "environments: {} cold and warm build(s) per variant (uv, pip only, old commands)",
            plan.cache_samples
        ));
        m.environments = report::keep(scenarios::environments(&ctx, plan.cache_samples).await);
    }

    if wanted(&args, "fleet") {
        for variant in scenarios::VARIANTS {
            let n = if variant == scenarios::Variant::Uv {
                plan.fleet_packs
            } else {
                plan.fleet_packs_slow
            };
            progress(&format!(
                "fleet: {n} packs built, made outdated and rebuilt ({})",
                variant.label()
            ));
            m.fleet.push((
                variant,
                report::keep(scenarios::fleet(&ctx, variant, n).await),
            ));
        }
    }

    if wanted(&args, "rerequest") {
        progress(&format!(
            "re-request: {} ready packs requested again",
            plan.rerequest_packs
        ));
        m.rerequest = report::keep(scenarios::rerequest(&ctx, plan.rerequest_packs).await);
    }

    if wanted(&args, "verify") {
        progress(&format!(
            "verification: {} stale environments, 1 then 2 instances",
            plan.verify_envs
        ));
        m.verification = report::keep(scenarios::verification(&ctx, plan.verify_envs).await);
    }

    if wanted(&args, "idle") {
        // The three idle processes run side by side: each is measured on its own process and
        // its own proxy, and idle processes do not compete for anything.
        progress(&format!(
            "idle cost: {} s window{}",
            plan.idle_window.as_secs(),
            if plan.peer {
                ", packenvd and both peers side by side"
            } else {
                ""
            }
        ));
        let w = plan.idle_window;
        if plan.peer {
            let (a, b, c) = tokio::join!(
                scenarios::packenvd_idle(&ctx, w),
                scenarios::peer_idle(&ctx, w, &peer_default),
                scenarios::peer_idle(&ctx, w, &peer_best),
            );
            m.idle = report::keep(a);
            m.peer_idle_default = report::keep(b);
            m.peer_idle_best = report::keep(c);
        } else {
            m.idle = report::keep(scenarios::packenvd_idle(&ctx, w).await);
        }
    }

    if wanted(&args, "nodes") {
        for nodes in [1, 3] {
            progress(&format!(
                "nodes: {nodes} node(s) × {} environments",
                plan.nodes_envs
            ));
            m.converge.push((
                nodes,
                report::keep(scenarios::converge(&ctx, nodes, plan.nodes_envs).await),
            ));
        }
        for c in VERSUS_CONCURRENCIES {
            // Without a baseline the row shows this build only, which row 1 measured already
            // by the same method when it ran.
            let row1 = m
                .throughput
                .iter()
                .find(|t| t.concurrency == c && t.processes == 1)
                .and_then(|t| t.packenvd.done());
            if let (None, Some(run)) = (&args.baseline, row1) {
                let v = scenarios::Versus {
                    this: vec![*run],
                    other: Vec::new(),
                };
                m.versus.push((c, report::Cell::Done(v)));
                continue;
            }
            progress(&format!(
                "nodes: single-node throughput, concurrency {c}, {} run(s){}",
                plan.versus_samples,
                if args.baseline.is_some() {
                    " per build, alternating with the baseline"
                } else {
                    ""
                }
            ));
            m.versus.push((
                c,
                report::keep(
                    scenarios::versus(
                        &ctx,
                        args.baseline.as_deref(),
                        plan.rows,
                        c,
                        plan.versus_samples,
                    )
                    .await,
                ),
            ));
        }
        for (tasks, batch) in FLOORS {
            progress(&format!(
                "nodes: the model's floor, {tasks} loops × {batch} rows per claim, one table and two, {} run(s) each",
                plan.versus_samples
            ));
            m.floor.push(report::keep(
                scenarios::floors(&ctx, plan.rows, batch, tasks, plan.versus_samples).await,
            ));
        }
    }

    if wanted(&args, "lookup") {
        progress("lookups: the action runner's lookup from several tasks");
        m.lookups = report::keep(scenarios::lookups(&ctx, args.quick).await);
    }

    m.took = started.elapsed();
    report::print(&m);
    Ok(())
}

fn progress(what: &str) {
    eprintln!("packenvd-bench: {what}");
}
