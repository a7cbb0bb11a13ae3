//! The table: one row per measurement, the goal of issue 7 beside it and whether it is met.
//! Printed aligned for a terminal, then as Markdown for docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_table::{presets, ContentArrangement, Table};

use crate::pg::Cluster;
use crate::scenarios::{
    BuildTimes, Converge, Environments, Fleet, Floor, Idle, Latencies, Lookups, PeerRate,
    Rerequest, Run, Variant, Verification, Versus,
};
use crate::Plan;

mod rows;

/// A measurement that was not asked for, was made, or failed (the reason is shown in the row).
#[derive(Debug, Default)]
pub enum Cell<T> {
    #[default]
    NotRun,
    Done(T),
    Failed(String),
}

impl<T> Cell<T> {
    pub fn done(&self) -> Option<&T> {
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
    pub packenvd: Cell<Run>,
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
    pub environments: Cell<Environments>,
    pub fleet: Vec<(Variant, Cell<Fleet>)>,
    pub rerequest: Cell<Rerequest>,
    pub verification: Cell<Verification>,
    pub idle: Cell<Idle>,
    pub peer_idle_default: Cell<Idle>,
    pub peer_idle_best: Cell<Idle>,
    /// Row 7: converge time by number of nodes.
    pub converge: Vec<(usize, Cell<Converge>)>,
    /// Row 7: single-node throughput beside the baseline, by concurrency.
    pub versus: Vec<(usize, Cell<Versus>)>,
    /// Row 7: the model's floor, by (loops, rows per claim).
    pub floor: Vec<Cell<Floor>>,
    /// `--baseline`: the other build's binary.
    pub baseline: Option<PathBuf>,
    /// The action runner's lookups (issue 15).
    pub lookups: Cell<Lookups>,
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

/// The middle value (the mean of the two middle ones for an even count).
fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// What the table calls `--baseline`: the revision when scripts/bench.sh built it
/// (`target/baseline-REV/...`), else the path.
fn baseline_label(p: &Path) -> String {
    p.components()
        .filter_map(|c| c.as_os_str().to_str()?.strip_prefix("baseline-"))
        .next_back()
        .map_or_else(|| p.display().to_string(), str::to_owned)
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
    rows::throughput_rows(m, &mut out);
    rows::latency_rows(m, &mut out);
    rows::build_rows(m, &mut out);
    rows::environments_rows(m, &mut out);
    rows::fleet_rows(m, &mut out);
    rows::verification_rows(m, &mut out);
    rows::idle_rows(m, &mut out);
    rows::nodes_rows(m, &mut out);
    rows::lookup_rows(m, &mut out);
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
            "- rows per throughput run: {}; latency requests: {}; build samples: {}; environment samples: {}; fleet: {} packs ({} for pip only and the old commands); re-requested packs: {}; verified environments: {}; idle window: {} s; environments per node request: {}; single-node runs per build: {}; peer: {}",
            p.rows,
            p.latency_samples,
            p.build_samples,
            p.cache_samples,
            p.fleet_packs,
            p.fleet_packs_slow,
            p.rerequest_packs,
            p.verify_envs,
            p.idle_window.as_secs(),
            p.nodes_envs,
            p.versus_samples,
            if p.peer { "graphile_worker 0.14 (best: ".to_string() + &m.peer_best_settings + ")" } else { "skipped".into() }
        );
    }
    if let Some(b) = &m.baseline {
        println!("- baseline: {}", b.display());
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
    fn medians_and_baseline_labels() {
        assert_eq!(median_f64(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_f64(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(
            baseline_label(Path::new("target/baseline-35b39af/release/packenvd")),
            "35b39af"
        );
        assert_eq!(baseline_label(Path::new("/opt/packenvd")), "/opt/packenvd");
    }

    #[test]
    fn rows_not_run_are_left_out() {
        let rows = rows(&Measured::default());
        assert!(rows.is_empty());
    }
}
