//! The table's rows, one function per scenario; `rows()` calls them in the order of issue 7.

use std::time::Duration;

use super::{
    baseline_label, mb, median, median_f64, p99, peer_rate, quantiles, ratio, rows_per_s, yes,
    Cell, Measured,
};
mod environments;
pub(super) use environments::{environments_rows, fleet_rows};

use crate::scenarios::{Converge, Floor, FloorRun, Idle, Latencies, Run, Verification, Versus};

/// The text of an empty cell.
fn dash() -> String {
    "—".to_string()
}

/// Measure 1, queue throughput: one row per concurrency setting.
pub(super) fn throughput_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
    for t in &m.throughput {
        let setting = format!(
            "concurrency {}, {} process{}",
            t.concurrency,
            t.processes,
            if t.processes == 1 { "" } else { "es" }
        );
        let p = t.packenvd.done().map(|r| r.rows_per_s);
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
            t.packenvd.text(|r| rows_per_s(r.rows_per_s)),
            baseline,
            vs_raw,
            t.peer_default.text(peer_rate),
            t.peer_best.text(peer_rate),
            vs_peer,
            "≥ 0.80 of raw and ≥ peer best".into(),
            met,
        ]);
    }
}

/// Measure 2, pickup latency: commit → claimed and commit → ready.
pub(super) fn latency_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
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
}

/// Measure 3, build overhead.
pub(super) fn build_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
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
            format!("old core.python commands (venv + ensurepip + pip), 3 local wheels; {n} pairs, medians (÷: median of pair ratios)"),
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
}

/// Measure 5, verification: one row for one instance, one for two at once.
pub(super) fn verification_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
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
                    "{} stale {} environments (1 build + {} hard-linked copies)",
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
}

/// Measure 6, idle cost: CPU, statements sent and peak RSS.
pub(super) fn idle_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
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
}

/// Measure 7, nodes (issue 12): converge time on 1 and 3 nodes, per-node throughput, and
/// single-node queue throughput beside `--baseline`.
pub(super) fn nodes_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let per_s = |envs: u64, d: Duration| envs as f64 / d.as_secs_f64().max(1e-9);
    let one = m
        .converge
        .iter()
        .find(|(n, _)| *n == 1)
        .and_then(|(_, c)| c.done());
    let no_goal = || "(no goal set by issue 12)".to_string();
    for (nodes, c) in &m.converge {
        let envs = c.done().map_or_else(|| "N".into(), |c| c.envs.to_string());
        let (baseline, vs) = match (c.done(), one) {
            (Some(c), Some(o)) if *nodes != 1 => (
                format!("1 node {}", secs(o.took)),
                ratio(c.took.as_secs_f64(), o.took.as_secs_f64()),
            ),
            _ => (dash(), dash()),
        };
        out.push([
            "7 nodes, converge time".into(),
            format!(
                "{envs} environments in one request, {nodes} node{}, defaults; request commit → every parent and node row ready",
                if *nodes == 1 { "" } else { "s" }
            ),
            c.text(|c| secs(c.took)),
            baseline,
            vs,
            dash(),
            dash(),
            dash(),
            no_goal(),
            dash(),
        ]);
    }
    if let Some((nodes, c)) = m.converge.iter().find(|(n, _)| *n > 1) {
        let rates = |c: &Converge| -> Vec<f64> {
            c.per_node.iter().map(|(_, d)| per_s(c.envs, *d)).collect()
        };
        let (baseline, vs) = match (c.done(), one) {
            (Some(c), Some(o)) => {
                let one_rate = per_s(o.envs, o.took);
                let r = rates(c);
                let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.iter().copied().fold(0.0, f64::max);
                (
                    format!("1 node {one_rate:.0}"),
                    format!("{}–{}", ratio(lo, one_rate), ratio(hi, one_rate)),
                )
            }
            _ => (dash(), dash()),
        };
        out.push([
            "7 nodes, per-node throughput, envs/s".into(),
            format!(
                "{nodes} nodes at once: environments ÷ a node's time to its last ready (installed_at), each node"
            ),
            c.text(|c| {
                rates(c)
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            }),
            baseline,
            vs,
            dash(),
            dash(),
            dash(),
            no_goal(),
            dash(),
        ]);
    }
    let label = m.baseline.as_deref().map(baseline_label);
    let rates = |v: &[Run]| {
        let all: Vec<String> = v.iter().map(|r| format!("{:.0}", r.rows_per_s)).collect();
        let median = median_f64(&v.iter().map(|r| r.rows_per_s).collect::<Vec<_>>());
        format!("{} (runs {})", rows_per_s(median), all.join(", "))
    };
    // Medians of daemon and server CPU per row, each over the runs.
    let cpu = |v: &[Run]| {
        let d = median_f64(&v.iter().map(|r| r.daemon_cpu_us).collect::<Vec<_>>());
        let s = median_f64(&v.iter().map(|r| r.server_cpu_us).collect::<Vec<_>>());
        (d, s)
    };
    let show_cpu = |(d, s): (f64, f64)| format!("{d:.0} + {s:.0} = {:.0} µs", d + s);
    for (c, v) in &m.versus {
        let n = v.done().map_or(0, |v| v.this.len());
        let rows = m.plan.as_ref().map_or(0, |p| p.rows);
        let with_other = |f: &dyn Fn(&Versus, &str) -> [String; 3]| match (v.done(), &label) {
            (Some(v), Some(label)) if !v.other.is_empty() => f(v, label),
            _ => [dash(), dash(), "n/a".into()],
        };
        let [baseline, vs, met] = with_other(&|v, label| {
            let median =
                |runs: &[Run]| median_f64(&runs.iter().map(|r| r.rows_per_s).collect::<Vec<_>>());
            let r = median(&v.this) / median(&v.other);
            [
                format!("{label}: {}", rates(&v.other)),
                format!("{r:.2}"),
                yes(r >= 0.9),
            ]
        });
        out.push([
            "7 nodes, single-node queue throughput, rows/s".into(),
            format!(
                "row 1's method: {rows} core.shell rows, concurrency {c}, 1 process; medians of {n}{}",
                if label.is_some() { ", runs alternating with the baseline" } else { "" }
            ),
            v.text(|v| rates(&v.this)),
            baseline,
            vs,
            dash(),
            dash(),
            dash(),
            "≥ 0.90 of baseline".into(),
            met,
        ]);
        let [baseline, vs, _] = with_other(&|v, label| {
            let (a, b) = (cpu(&v.this), cpu(&v.other));
            [
                format!("{label}: {}", show_cpu(b)),
                ratio(a.0 + a.1, b.0 + b.1),
                dash(),
            ]
        });
        out.push([
            "7 nodes, single-node CPU per row".into(),
            format!(
                "the same runs: daemon + server (every postgres process) CPU ÷ rows, medians; concurrency {c}"
            ),
            v.text(|v| show_cpu(cpu(&v.this))),
            baseline,
            vs,
            dash(),
            dash(),
            dash(),
            "(diagnosis: what the rate costs)".into(),
            dash(),
        ]);
    }
    for f in &m.floor {
        floor_rows(m, f, out);
    }
}

/// Row 7's floor: the least the nodes model costs (scenarios/floor.rs), two tables beside one.
fn floor_rows(m: &Measured, f: &Cell<Floor>, out: &mut Vec<[String; 10]>) {
    let rows = m.plan.as_ref().map_or(0, |p| p.rows);
    let (what, n) = f.done().map_or_else(
        || ("the model's floor".to_string(), 0),
        |f| {
            (
                format!("{} loops × {} rows per claim", f.tasks, f.batch),
                f.one.len(),
            )
        },
    );
    let rate = |v: &[FloorRun]| median_f64(&v.iter().map(|r| r.rows_per_s).collect::<Vec<_>>());
    let cpu = |v: &[FloorRun]| median_f64(&v.iter().map(|r| r.server_cpu_us).collect::<Vec<_>>());
    let runs = |v: &[FloorRun]| {
        let all: Vec<String> = v.iter().map(|r| format!("{:.0}", r.rows_per_s)).collect();
        format!("{} (runs {})", rows_per_s(rate(v)), all.join(", "))
    };
    let diagnosis = || "(diagnosis: what the model costs at least)".to_string();
    out.push([
        "7 nodes, the model's floor, rows/s".into(),
        format!(
            "{rows} rows, no daemon: {what}, each written back in one statement; two tables (node row + parent counts in the same statement) beside one (the queue alone); no triggers or checks; medians of {n}, alternating"
        ),
        f.text(|f| format!("two tables: {}", runs(&f.two))),
        f.text(|f| format!("one table: {}", runs(&f.one))),
        f.done()
            .map_or_else(dash, |f| ratio(rate(&f.two), rate(&f.one))),
        dash(),
        dash(),
        dash(),
        diagnosis(),
        dash(),
    ]);
    out.push([
        "7 nodes, the model's floor, server CPU per row".into(),
        format!("the same runs: every postgres process's CPU ÷ rows, medians; {what}"),
        f.text(|f| {
            let (two, one) = (cpu(&f.two), cpu(&f.one));
            format!("two tables: {two:.0} µs ({:+.0} µs)", two - one)
        }),
        f.text(|f| format!("one table: {:.0} µs", cpu(&f.one))),
        f.done()
            .map_or_else(dash, |f| ratio(cpu(&f.two), cpu(&f.one))),
        dash(),
        dash(),
        dash(),
        diagnosis(),
        dash(),
    ]);
}

/// Measure 8, lookups (issue 15): the action runner's lookup per second.
pub(super) fn lookup_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
    if matches!(m.lookups, Cell::NotRun) {
        return;
    }
    let setting = m.lookups.done().map_or_else(
        || "packenv_client::Client::lookup".to_string(),
        |l| {
            format!(
                "packenv_client::Client::lookup, {} tasks sharing a pool of {}; {} ready environments × {} nodes; p50 / p99 {} / {} ms",
                l.tasks,
                l.tasks,
                l.environments,
                l.nodes,
                super::ms(super::percentile(&l.latencies, 0.5)),
                super::ms(super::percentile(&l.latencies, 0.99)),
            )
        },
    );
    out.push([
        "8 lookups before an action, per second".into(),
        setting,
        m.lookups.text(|l| {
            format!(
                "{:.0} lookups/s ({} in {:.1} s)",
                l.per_second(),
                l.lookups,
                l.took.as_secs_f64()
            )
        }),
        dash(),
        dash(),
        dash(),
        dash(),
        dash(),
        "≥ 5,000/s".into(),
        m.lookups
            .done()
            .map_or_else(|| "n/a".into(), |l| yes(l.per_second() >= 5000.0)),
    ]);
}
