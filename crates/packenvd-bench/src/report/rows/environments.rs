//! Rows 4, 4b and 4c (issue 13): Python environments, a fleet made outdated, re-requests.

use std::time::Duration;

use super::super::{mb, median, ratio, yes, Cell, Measured};
use super::dash;
use crate::scenarios::{EnvTimes, Fleet, Variant};

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn median_u64(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// "cold 1.20 s, warm 0.30 s, +0.1 MB per extra environment".
fn env_times(t: &EnvTimes) -> String {
    format!(
        "cold {}, warm {} ({} wheel requests), +{} per extra environment (first {})",
        secs(median(&t.cold)),
        secs(median(&t.warm)),
        t.warm_downloads,
        mb(median_u64(&t.extra_disk) / 1024),
        mb(median_u64(&t.first_disk) / 1024),
    )
}

/// Measure 4 (issue 13): one row per way of building a Python environment; the old commands
/// are the baseline of the others.
pub(in crate::report) fn environments_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
    if matches!(m.environments, Cell::NotRun) {
        return;
    }
    let variant = |v: Variant| -> Result<&EnvTimes, String> {
        match &m.environments {
            Cell::Done(e) => e.variants.iter().find(|(w, _)| *w == v).map_or_else(
                || Err("not run".into()),
                |(_, r)| r.as_ref().map_err(|e| e.clone()),
            ),
            Cell::Failed(e) => Err(e.clone()),
            Cell::NotRun => Err("not run".into()),
        }
    };
    let n = m.environments.done().map_or(0, |e| e.samples);
    let old = variant(Variant::Old);
    for v in crate::scenarios::VARIANTS {
        let this = variant(v);
        let (goal, met) = match (v, &this) {
            (Variant::Uv, Ok(t)) => (
                "warm ≤ 0.5 s, cold ≤ 1 s, ≤ 1 MB per extra env",
                yes(median(&t.warm) <= Duration::from_millis(500)
                    && median(&t.cold) <= Duration::from_secs(1)
                    && median_u64(&t.extra_disk) <= 1_000_000),
            ),
            (Variant::PipOnly, Ok(t)) => (
                "warm ≤ 1.5 s",
                yes(median(&t.warm) <= Duration::from_millis(1500)),
            ),
            (Variant::Uv, Err(_)) => (
                "warm ≤ 0.5 s, cold ≤ 1 s, ≤ 1 MB per extra env",
                "n/a".into(),
            ),
            (Variant::PipOnly, Err(_)) => ("warm ≤ 1.5 s", "n/a".into()),
            (Variant::Old, _) => ("(the baseline)", dash()),
        };
        let (baseline, vs) = match (v, &this, &old) {
            (Variant::Old, _, _) => (dash(), dash()),
            (_, Ok(t), Ok(o)) => (
                env_times(o),
                format!(
                    "cold {}, warm {}, disk {}",
                    ratio(median(&t.cold).as_secs_f64(), median(&o.cold).as_secs_f64()),
                    ratio(median(&t.warm).as_secs_f64(), median(&o.warm).as_secs_f64()),
                    ratio(
                        median_u64(&t.extra_disk) as f64,
                        median_u64(&o.extra_disk) as f64
                    ),
                ),
            ),
            (_, _, Ok(o)) => (env_times(o), dash()),
            (_, _, Err(e)) => (format!("n/a: {e}"), dash()),
        };
        out.push([
            "4 Python environment, cold and warm build, disk".into(),
            format!(
                "{}; 3 wheels from a loopback index; warm = operator reset, same cache; medians of {n}",
                v.label()
            ),
            match &this {
                Ok(t) => env_times(t),
                Err(e) => format!("n/a: {e}"),
            },
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

/// Seconds per pack of a fleet rebuild.
fn per_pack(f: &Fleet) -> f64 {
    f.rebuild.as_secs_f64() / f.packs.max(1) as f64
}

fn fleet_text(f: &Fleet) -> String {
    format!(
        "{} packs in {} ({:.2} s per pack; first build {})",
        f.packs,
        secs(f.rebuild),
        per_pack(f),
        secs(f.first)
    )
}

/// Measures 4b and 4c (issue 13): a fleet made outdated, per variant against the old commands
/// (time per pack: the old commands' fleet is smaller); and the re-request of unchanged packs.
pub(in crate::report) fn fleet_rows(m: &Measured, out: &mut Vec<[String; 10]>) {
    let old = m
        .fleet
        .iter()
        .find(|(v, _)| *v == Variant::Old)
        .map(|(_, c)| c);
    for (v, cell) in &m.fleet {
        if *v == Variant::Old {
            continue;
        }
        let (baseline, vs, speedup) = match (cell.done(), old.and_then(|o| o.done())) {
            (Some(f), Some(o)) => (
                fleet_text(o),
                ratio(per_pack(f), per_pack(o)),
                Some(per_pack(o) / per_pack(f).max(1e-9)),
            ),
            (_, Some(o)) => (fleet_text(o), dash(), None),
            (_, None) => (old.map_or_else(dash, |o| o.text(fleet_text)), dash(), None),
        };
        let (goal, met) = match v {
            Variant::Uv => (
                "≥ 10× faster than the old commands".to_string(),
                speedup.map_or_else(|| "n/a".into(), |s| yes(s >= 10.0)),
            ),
            _ => (dash(), dash()),
        };
        out.push([
            "4b fleet made outdated → all ready".into(),
            format!(
                "{}; 3 shared requirements + 1 of 5 per pack, loopback index; default concurrency{}",
                v.label(),
                speedup.map_or_else(String::new, |s| format!("; {s:.1}× faster per pack"))
            ),
            cell.text(fleet_text),
            baseline,
            vs,
            dash(),
            dash(),
            dash(),
            goal,
            met,
        ]);
    }
    if !matches!(m.rerequest, Cell::NotRun) {
        let rate =
            |r: &crate::scenarios::Rerequest| r.packs as f64 / r.took.as_secs_f64().max(1e-9);
        out.push([
            "4c re-request of unchanged packs".into(),
            m.rerequest.done().map_or_else(
                || "ready packs requested again in one statement".into(),
                |r| {
                    format!(
                        "{} ready packs ({}) requested again in one statement",
                        r.packs,
                        r.variant.label()
                    )
                },
            ),
            m.rerequest.text(|r| {
                format!(
                    "{:.0} answered/s ({} in {}; {} rebuilt)",
                    rate(r),
                    r.packs,
                    secs(r.took),
                    r.rebuilt
                )
            }),
            dash(),
            dash(),
            dash(),
            dash(),
            dash(),
            "≥ 2,000 answered/s, none rebuilt".into(),
            m.rerequest.done().map_or_else(
                || "n/a".into(),
                |r| yes(rate(r) >= 2000.0 && r.rebuilt == 0),
            ),
        ]);
    }
}
