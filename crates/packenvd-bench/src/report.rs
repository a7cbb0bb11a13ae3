//! The table: one row per measurement, the goal of issue 7 beside it and whether it is met.
//! Printed aligned for a terminal, then as Markdown for docs/benchmarks.md.

use std::time::Duration;

use comfy_table::{presets, ContentArrangement, Table};

use crate::pg::Cluster;
use crate::scenarios::{BuildTimes, CacheTimes, Caches, Idle, Latencies, PeerRate, Verification};
use crate::Plan;

/// A measurement that was not asked for, was made, or failed (the reason is shown in the row).
#[derive(Debug, Default)]
pub enum Cell<T> {
    #[default]
    NotRun,
    Done(T),
    Failed(String),
}

impl<T> Cell<T> {
    fn done(&self) -> Option<&T> {
        match self {
            Cell::Done(t) => Some(t),
            _ => None,
        }
    }

    /// The cell's text: `show` of the value, or why there is none.
    fn text(&self, show: impl FnOnce(&T) -> String) -> String {
        match self {
            Cell::NotRun => "—".into(),
            Cell::Done(t) => show(t),
            Cell::Failed(e) => format!("n/a: {e}"),
        }
    }
}

pub fn keep<T>(r: anyhow::Result<T>) -> Cell<T> {
    match r {
        Ok(t) => Cell::Done(t),
        Err(e) => {
            eprintln!("packenvd-bench: failed: {e:#}");
            let first = format!("{e:#}");
            let first = first.lines().next().unwrap_or_default();
            Cell::Failed(first.chars().take(80).collect())
        }
    }
}

#[derive(Debug, Default)]
pub struct Throughput {
    pub concurrency: usize,
    pub processes: usize,
    pub packenvd: Cell<f64>,
    /// Rows/s and the number of harness tasks that gave it.
    pub raw: Option<(f64, usize)>,
    pub peer_default: Cell<PeerRate>,
    pub peer_best: Cell<PeerRate>,
}

#[derive(Debug, Default)]
pub struct Measured {
    pub plan: Option<Plan>,
    pub machine: Vec<(String, String)>,
    pub peer_best_settings: String,
    pub throughput: Vec<Throughput>,
    pub latency: Cell<Latencies>,
    pub peer_latency_default: Cell<Latencies>,
    pub peer_latency_best: Cell<Latencies>,
    pub build: Cell<BuildTimes>,
    pub caches: Cell<Caches>,
    pub verification: Cell<Verification>,
    pub idle: Cell<Idle>,
    pub peer_idle_default: Cell<Idle>,
    pub peer_idle_best: Cell<Idle>,
    pub took: Duration,
}

/// nproc, memory and the server's version.
pub async fn machine(cluster: &Cluster) -> Vec<(String, String)> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0),
        );
    let server = cluster
        .server_version()
        .await
        .unwrap_or_else(|e| format!("? ({e})"));
    vec![
        ("packenvd".into(), revision()),
        ("nproc".into(), cpus.to_string()),
        ("memory".into(), mem),
        ("server".into(), server),
    ]
}

/// The commit the daemon was built from, and whether its sources had uncommitted changes.
fn revision() -> String {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "? (not a git checkout)".into(),
        Some(rev) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "crates/packenvd",
                "crates/packenv-core",
                "migrations",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("commit {rev} with uncommitted changes to the daemon")
            } else {
                format!("commit {rev}")
            }
        }
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    percentile(&s, 0.5)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

/// "p50 / p95 / p99 / max ms".
fn quantiles(v: &[Duration]) -> String {
    let mut s = v.to_vec();
    s.sort();
    format!(
        "{} / {} / {} / {} ms",
        ms(percentile(&s, 0.50)),
        ms(percentile(&s, 0.95)),
        ms(percentile(&s, 0.99)),
        ms(s.last().copied().unwrap_or_default())
    )
}

fn p99(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    percentile(&s, 0.99)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

fn yes(ok: bool) -> String {
    if ok { "yes" } else { "NO" }.into()
}

fn rows_per_s(r: f64) -> String {
    format!("{r:.0}")
}

fn peer_rate(r: &PeerRate) -> String {
    match r.partial {
        None => rows_per_s(r.rows_per_s),
        Some((done, took)) => format!(
            "{:.1} (not done: {done} rows in {:.0} s)",
            r.rows_per_s,
            took.as_secs_f64()
        ),
    }
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 * 1024.0 / 1e6)
}

const HEADER: [&str; 10] = [
    "measure",
    "setting",
    "packenvd",
    "baseline",
    "÷ baseline",
    "peer, defaults",
    "peer, best",
    "÷ peer best",
    "goal",
    "met",
];

/// The table's rows, in the order of issue 7.
pub fn rows(m: &Measured) -> Vec<[String; 10]> {
    let mut out: Vec<[String; 10]> = Vec::new();
    let dash = || "—".to_string();

    // 1. Queue throughput
    for t in &m.throughput {
        let setting = format!(
            "concurrency {}, {} process{}",
            t.concurrency,
            t.processes,
            if t.processes == 1 { "" } else { "es" }
        );
        let p = t.packenvd.done().copied();
        let baseline = t.raw.map_or_else(dash, |(r, tasks)| {
            format!(
                "raw {} ({tasks} task{})",
                rows_per_s(r),
                if tasks == 1 { "" } else { "s" }
            )
        });
        let vs_raw = match (p, t.raw) {
            (Some(p), Some((r, _))) => ratio(p, r),
            _ => dash(),
        };
        let vs_peer = match (p, t.peer_best.done()) {
            (Some(p), Some(b)) => ratio(p, b.rows_per_s),
            _ => dash(),
        };
        let met = match (p, t.raw) {
            (Some(p), Some((r, _))) => {
                let beats_peer = t.peer_best.done().is_none_or(|b| p >= b.rows_per_s);
                yes(p >= 0.8 * r && beats_peer)
            }
            _ => "n/a".into(),
        };
        out.push([
            "1 queue throughput, rows/s".into(),
            setting,
            t.packenvd.text(|r| rows_per_s(*r)),
            baseline,
            vs_raw,
            t.peer_default.text(peer_rate),
            t.peer_best.text(peer_rate),
            vs_peer,
            "≥ 0.80 of raw and ≥ peer best".into(),
            met,
        ]);
    }

    // 2. Pickup latency
    let samples = m.latency.done().map_or(0, |l| l.pickup.len());
    let vs = |f: fn(&Latencies) -> &Vec<Duration>| match (
        m.latency.done(),
        m.peer_latency_best.done(),
    ) {
        (Some(a), Some(b)) => ratio(p99(f(a)).as_secs_f64(), p99(f(b)).as_secs_f64()),
        _ => dash(),
    };
    if !matches!(m.latency, Cell::NotRun) {
        out.push([
            "2 pickup latency, commit → claimed".into(),
            format!("{samples} requests one at a time; p50 / p95 / p99 / max"),
            m.latency.text(|l| quantiles(&l.pickup)),
            dash(),
            dash(),
            m.peer_latency_default.text(|l| quantiles(&l.pickup)),
            m.peer_latency_best.text(|l| quantiles(&l.pickup)),
            vs(|l| &l.pickup),
            "p99 < 10 ms (aim 5 ms)".into(),
            m.latency.done().map_or_else(
                || "n/a".into(),
                |l| yes(p99(&l.pickup) < Duration::from_millis(10)),
            ),
        ]);
        out.push([
            "2 pickup latency, commit → ready".into(),
            "same requests".into(),
            m.latency.text(|l| quantiles(&l.ready)),
            dash(),
            dash(),
            m.peer_latency_default.text(|l| quantiles(&l.ready)),
            m.peer_latency_best.text(|l| quantiles(&l.ready)),
            vs(|l| &l.ready),
            "(no goal)".into(),
            dash(),
        ]);
    }

    // 3. Build overhead
    if !matches!(m.build, Cell::NotRun) {
        let n = m.build.done().map_or(0, |b| b.daemon.len());
        let (packenvd, direct, over, met) = match m.build.done() {
            Some(b) if !b.daemon.is_empty() => {
                let d = median(&b.daemon);
                let h = median(&b.direct);
                // Per pair, then the median: a pair runs back to back, so drift in the
                // machine's speed (±20 % between samples here) cancels out within a pair.
                let mut ratios: Vec<f64> = b
                    .daemon
                    .iter()
                    .zip(&b.direct)
                    .map(|(d, h)| d.as_secs_f64() / h.as_secs_f64() - 1.0)
                    .collect();
                ratios.sort_by(f64::total_cmp);
                let over = ratios[(ratios.len() - 1) / 2..=ratios.len() / 2]
                    .iter()
                    .sum::<f64>()
                    / if ratios.len() % 2 == 0 { 2.0 } else { 1.0 };
                (
                    format!("{:.2} s", d.as_secs_f64()),
                    format!("direct {:.2} s", h.as_secs_f64()),
                    format!("{:+.1} %", over * 100.0),
                    yes(over < 0.03),
                )
            }
            _ => (
                m.build.text(|_| String::new()),
                dash(),
                dash(),
                "n/a".into(),
            ),
        };
        out.push([
            "3 build overhead, request → ready".into(),
            format!("core.python, 3 local wheels; {n} pairs, medians (÷: median of pair ratios)"),
            packenvd,
            direct,
            over,
            dash(),
            dash(),
            dash(),
            "< 3 % over the same commands".into(),
            met,
        ]);
    }

    // 4. Caches
    if !matches!(m.caches, Cell::NotRun) {
        let n = m.caches.done().map_or(0, |c| c.pip.cold.len());
        let goal = "warm ≥ 5× faster than cold";
        let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        let speedup = |t: &CacheTimes| {
            median(&t.cold).as_secs_f64() / median(&t.warm).as_secs_f64().max(1e-9)
        };
        let pip_uv = match m.caches.done().map(|c| (&c.pip, &c.uv)) {
            Some((p, Ok(u))) if !p.cold.is_empty() && !u.cold.is_empty() => format!(
                "; pip ÷ uv: cold {:.1}×, warm {:.1}×",
                median(&p.cold).as_secs_f64() / median(&u.cold).as_secs_f64().max(1e-9),
                median(&p.warm).as_secs_f64() / median(&u.warm).as_secs_f64().max(1e-9),
            ),
            _ => String::new(),
        };
        let rows: [(&str, Result<Option<&CacheTimes>, String>); 2] = match &m.caches {
            Cell::Done(c) => [
                ("core.python", Ok(Some(&c.pip))),
                (
                    "core.python-uv",
                    c.uv.as_ref().map(Some).map_err(|e| e.clone()),
                ),
            ],
            Cell::Failed(e) => [
                ("core.python", Err(e.clone())),
                ("core.python-uv", Err(e.clone())),
            ],
            Cell::NotRun => [("core.python", Ok(None)), ("core.python-uv", Ok(None))],
        };
        for (runtime, t) in rows {
            let setting = format!(
                "{runtime}, 3 wheels from a loopback index; warm = operator reset, same cache; medians of {n}{}",
                if runtime == "core.python-uv" { pip_uv.as_str() } else { "" }
            );
            let (packenvd, baseline, vs, met) = match t {
                Ok(Some(t)) if !t.cold.is_empty() => (
                    format!(
                        "warm {} ({:.1}× faster; {} wheel requests)",
                        secs(median(&t.warm)),
                        speedup(t),
                        t.warm_downloads
                    ),
                    format!("cold {}", secs(median(&t.cold))),
                    ratio(median(&t.warm).as_secs_f64(), median(&t.cold).as_secs_f64()),
                    yes(speedup(t) >= 5.0),
                ),
                Ok(_) => (dash(), dash(), dash(), "n/a".into()),
                Err(e) => (format!("n/a: {e}"), dash(), dash(), "n/a".into()),
            };
            out.push([
                "4 caches, warm vs cold rebuild".into(),
                setting,
                packenvd,
                baseline,
                vs,
                dash(),
                dash(),
                dash(),
                goal.into(),
                met,
            ]);
        }
    }

    // 5. Verification
    if !matches!(m.verification, Cell::NotRun) {
        let per_s = |r: &crate::scenarios::VerifyRun| {
            format!(
                "{:.0} envs/s ({} in {:.2} s)",
                r.environments as f64 / r.took.as_secs_f64().max(1e-9),
                r.environments,
                r.took.as_secs_f64()
            )
        };
        let what = m.verification.done().map_or_else(
            || "stale ready environments".to_string(),
            |v| {
                format!(
                    "{} stale {} environments (1 build + {} linked rows)",
                    v.one.environments,
                    v.runtime,
                    v.one.environments.saturating_sub(1)
                )
            },
        );
        for (instances, pick) in [
            (
                1,
                (|v: &Verification| v.one) as fn(&Verification) -> crate::scenarios::VerifyRun,
            ),
            (2, |v: &Verification| v.two),
        ] {
            out.push([
                "5 verification, environments/s".into(),
                format!(
                    "{what}; verify::run_pass(Stale), default settings; {instances} instance{}",
                    if instances == 1 { "" } else { "s at once" }
                ),
                m.verification.text(|v| per_s(&pick(v))),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
                "(no goal set by issue #5)".into(),
                dash(),
            ]);
        }
    }

    // 6. Idle cost
    if !matches!(m.idle, Cell::NotRun) {
        let window = m
            .plan
            .as_ref()
            .map_or(Duration::from_secs(60), |p| p.idle_window);
        let setting = format!("{} s idle, default settings", window.as_secs());
        // The poll fallback alone: one claim per poll_interval (5 s by default).
        let polls = window.as_secs() / 5;
        let stmts = |i: &Idle| format!("{} (+{} pings)", i.statements, i.pings);
        let vs = |f: fn(&Idle) -> f64| match (m.idle.done(), m.peer_idle_best.done()) {
            (Some(a), Some(b)) => ratio(f(a), f(b)),
            _ => dash(),
        };
        out.push([
            "6 idle cost, CPU".into(),
            setting.clone(),
            m.idle
                .text(|i| format!("{:.3} s per 30 s", i.cpu_per_30s())),
            dash(),
            dash(),
            m.peer_idle_default
                .text(|i| format!("{:.3} s per 30 s", i.cpu_per_30s())),
            m.peer_idle_best
                .text(|i| format!("{:.3} s per 30 s", i.cpu_per_30s())),
            vs(Idle::cpu_per_30s),
            "< 0.1 CPU-s per 30 s".into(),
            m.idle
                .done()
                .map_or_else(|| "n/a".into(), |i| yes(i.cpu_per_30s() < 0.1)),
        ]);
        out.push([
            "6 idle cost, statements sent".into(),
            format!("{setting}; poll fallback alone: {polls}"),
            m.idle.text(stmts),
            dash(),
            dash(),
            m.peer_idle_default.text(stmts),
            m.peer_idle_best.text(stmts),
            vs(|i| i.statements as f64),
            "only the poll fallback".into(),
            m.idle
                .done()
                .map_or_else(|| "n/a".into(), |i| yes(i.statements <= polls + 1)),
        ]);
        out.push([
            "6 idle cost, peak RSS".into(),
            setting,
            m.idle.text(|i| mb(i.peak_rss_kb)),
            dash(),
            dash(),
            m.peer_idle_default.text(|i| mb(i.peak_rss_kb)),
            m.peer_idle_best.text(|i| mb(i.peak_rss_kb)),
            vs(|i| i.peak_rss_kb as f64),
            "< 25 MB".into(),
            m.idle.done().map_or_else(
                || "n/a".into(),
                |i| yes((i.peak_rss_kb * 1024) < 25_000_000),
            ),
        ]);
    }
    out
}

fn table(rows: &[[String; 10]], preset: &str) -> Table {
    let mut t = Table::new();
    t.load_preset(preset)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(HEADER);
    for r in rows {
        t.add_row(r.iter());
    }
    t
}

pub fn print(m: &Measured) {
    let rows = rows(m);
    println!("{}", table(&rows, presets::UTF8_FULL_CONDENSED));
    println!();
    println!("Markdown (for docs/benchmarks.md):");
    println!();
    for (k, v) in &m.machine {
        println!("- {k}: {v}");
    }
    if let Some(p) = &m.plan {
        println!(
            "- rows per throughput run: {}; latency requests: {}; build samples: {}; cache samples: {}; verified environments: {}; idle window: {} s; peer: {}",
            p.rows,
            p.latency_samples,
            p.build_samples,
            p.cache_samples,
            p.verify_envs,
            p.idle_window.as_secs(),
            if p.peer { "graphile_worker 0.14 (best: ".to_string() + &m.peer_best_settings + ")" } else { "skipped".into() }
        );
    }
    println!("- the whole run took {:.0} s", m.took.as_secs_f64());
    println!();
    println!("{}", table(&rows, presets::ASCII_MARKDOWN));
    if let Some(l) = m.latency.done() {
        if let Some(gap) = l.max_clock_gap {
            println!();
            println!(
                "(check: the daemon's `build finished` log times and `installed_at` differ by at most {} ms)",
                ms(gap)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&v[..1], 0.99), Duration::from_millis(1));
    }

    #[test]
    fn rows_not_run_are_left_out() {
        let rows = rows(&Measured::default());
        assert!(rows.is_empty());
    }
}
