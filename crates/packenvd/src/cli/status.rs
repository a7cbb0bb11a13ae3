//! `packenvd status` and `packenvd nodes`: the tables, and whether any daemon is alive to work
//! on what waits.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;

use comfy_table::{Cell, ColumnConstraint, ContentArrangement, Row, Table};
use serde::Serialize;
use sqlx::PgPool;

use super::explain;
use super::{Exit, StatusArgs};
use crate::store::{self, Liveness, Status, StatusRow};

/// A duration to the second, for people (`1m 12s`).
pub(super) fn ago(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
}

/// What a row is doing, or why it failed: a build's step and how long it has run, else the
/// cause of its last error.
fn detail(r: &StatusRow, per_node: bool) -> String {
    if r.status == Status::Installing {
        if let Some(marks) = &r.marks {
            let marks: Vec<&str> = marks.iter().map(String::as_str).collect();
            let mut text = format!(
                "{}, {}",
                explain::phase(&marks),
                ago(r.building_secs.unwrap_or(0.0))
            );
            if per_node {
                if let Some(node) = &r.building_node {
                    text = format!("{node}: {text}");
                }
                let building = r
                    .nodes
                    .as_ref()
                    .and_then(|n| n.get("installing"))
                    .and_then(|n| n.as_i64())
                    .unwrap_or(1);
                if building > 1 {
                    text.push_str(&format!(" (+{} more building)", building - 1));
                }
            }
            return text;
        }
    }
    r.install_error
        .as_deref()
        .map(explain::cause)
        .unwrap_or_default()
}

/// `2 ready, 1 installing`, in the order of the state machine.
fn node_counts(nodes: Option<&serde_json::Value>) -> String {
    let counts: Vec<String> = Status::ALL
        .iter()
        .filter_map(|s| {
            let n = nodes?.get(s.to_string())?.as_i64()?;
            Some(format!("{n} {s}"))
        })
        .collect();
    if counts.is_empty() {
        "-".into()
    } else {
        counts.join(", ")
    }
}

/// A row of `status --json`: the row's fields and what the table derives from them.
#[derive(Serialize)]
struct JsonRow<'a> {
    #[serde(flatten)]
    row: &'a StatusRow,
    /// For a build in progress: its step (`step 2/3 'install requirements'`).
    step: Option<String>,
    /// For an error: its cause in one line.
    cause: Option<String>,
}

/// `packenvd status`.
pub async fn status(pool: &PgPool, a: &StatusArgs) -> anyhow::Result<Exit> {
    let nodes = store::liveness(pool)
        .await
        .context("reading packenvd_node")?;
    if let Some(node) = &a.node {
        if !nodes.iter().any(|n| &n.name == node) {
            let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
            return Err(super::usage(format!(
                "no node named {node:?}; the nodes: {}",
                super::commands::choices(&names, names.len() as i64)
            )));
        }
    }
    let rows = store::status(pool, a.pack.as_deref(), a.status, a.node.as_deref())
        .await
        .context("reading v_pack_environment_status")?;
    if let (Some(pack), true) = (&a.pack, rows.is_empty()) {
        // Empty because of the other filters is an answer; an unknown pack is a mistake.
        super::commands::runtimes_of(pool, pack).await?;
    }
    let refused = store::refused_rows(pool)
        .await
        .context("reading packenvd_node.refused_rows")?;
    let refused = refused_lines(&refused, a.node.as_deref());
    let failed = rows.iter().any(|r| r.status == Status::Failed) || !refused.is_empty();
    let mut warnings = liveness_warnings(&rows, &nodes, a.node.as_deref());
    warnings.extend(refused);
    if a.json {
        let out: Vec<JsonRow> = rows
            .iter()
            .map(|r| JsonRow {
                row: r,
                step: (r.status == Status::Installing)
                    .then_some(r.marks.as_ref())
                    .flatten()
                    .map(|m| explain::phase(&m.iter().map(String::as_str).collect::<Vec<_>>())),
                cause: r.install_error.as_deref().map(explain::cause),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        return Ok(if failed { Exit::Unwell } else { Exit::Ok });
    }
    // With more than one node the summary's env_path is only one node's: the nodes' counts
    // say more (`status --node` gives each node's paths).
    let per_node = a.node.is_none()
        && rows.iter().any(|r| {
            r.nodes
                .as_ref()
                .and_then(|n| n.as_object())
                .is_some_and(|m| m.values().filter_map(|v| v.as_i64()).sum::<i64>() > 1)
        });
    println!("{}", table(&rows, per_node, a.wide));
    println!("{}", totals(&rows));
    if !nodes.is_empty() {
        println!("{}", nodes_line(&nodes));
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    Ok(if failed { Exit::Unwell } else { Exit::Ok })
}

/// The table, fitted to the terminal's width unless `wide`: each row on one line, the long
/// cells cut with `…`.
fn table(rows: &[StatusRow], per_node: bool, wide: bool) -> Table {
    let terminal = std::io::stdout().is_terminal();
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|w| *w >= 40);
    let fitting = !wide && (terminal || columns.is_some());
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    let place = if per_node { "nodes" } else { "env_path" };
    let mut header = vec!["pack", "runtime", "status"];
    if wide {
        header.extend(["attempts", "detail", place, "last verified", "error"]);
    } else {
        header.extend(["detail", place, "verified"]);
    }
    table.set_header(header);
    if wide {
        table.set_content_arrangement(ContentArrangement::Disabled);
    } else {
        table
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_truncation_indicator("…");
        // Off a terminal comfy_table knows no width; `COLUMNS` (which shells set, and `watch`
        // and `less` pass on) is the width the reader has. Without it the rows stay whole, for
        // grep.
        if !terminal {
            if let Some(w) = columns {
                table.set_width(w);
            }
        }
    }
    let now = chrono::Utc::now();
    for r in rows {
        let mut st = r.status.to_string();
        if r.status == Status::Pending && r.run_after > now {
            st = format!(
                "pending (retry in {})",
                ago((r.run_after - now).num_seconds() as f64)
            );
        }
        let place = if per_node {
            node_counts(r.nodes.as_ref())
        } else {
            r.env_path.clone().unwrap_or_else(|| "-".into())
        };
        let due = if r.needs_verification { " (due)" } else { "" };
        let mut cells = vec![r.pack_ref.clone(), r.runtime_ref.clone(), st];
        if wide {
            let verified = match (&r.last_verified, r.last_verify_result.as_deref()) {
                (Some(at), Some(res)) => format!("{} {res}{due}", at.format("%Y-%m-%d %H:%M")),
                (Some(at), None) => format!("{}{due}", at.format("%Y-%m-%d %H:%M")),
                _ => format!("-{due}"),
            };
            let error = r
                .install_error
                .as_deref()
                .map(|e| explain::without_tail(e, None).0)
                .unwrap_or_default();
            cells.extend([
                r.attempts.to_string(),
                detail(r, per_node),
                place,
                verified,
                error,
            ]);
        } else {
            let verified = match (&r.last_verified, r.last_verify_result.as_deref()) {
                (Some(at), Some("ok") | None) => format!("{}{due}", at.format("%Y-%m-%d")),
                (Some(at), Some(_)) => format!("{} failed{due}", at.format("%Y-%m-%d")),
                _ => format!("-{due}"),
            };
            // comfy_table wraps at spaces and the row shows only its first line: with no-break
            // spaces the cut falls at the column's edge, not after the first word.
            let detail = detail(r, per_node);
            let detail = if fitting {
                detail.replace(' ', "\u{a0}")
            } else {
                detail
            };
            cells.extend([detail, place, verified]);
        }
        let mut row = Row::from(cells.into_iter().map(Cell::new).collect::<Vec<_>>());
        if !wide {
            row.max_height(1);
        }
        table.add_row(row);
    }
    if !wide {
        // The names and the status are what a reader scans: never cut them.
        for i in 0..3 {
            if let Some(c) = table.column_mut(i) {
                c.set_constraint(ColumnConstraint::ContentWidth);
            }
        }
        // Then the detail (a step, a cause) matters more than the path, which starts with the
        // envs root every row shares.
        if let Some(c) = table.column_mut(4) {
            c.set_constraint(ColumnConstraint::UpperBoundary(
                comfy_table::Width::Percentage(15),
            ));
        }
        if let Some(c) = table.column_mut(5) {
            c.set_constraint(ColumnConstraint::ContentWidth);
        }
    }
    table
}

/// `3 environment(s): 1 ready, 1 installing, 1 failed`.
fn totals(rows: &[StatusRow]) -> String {
    let counts: Vec<String> = Status::ALL
        .iter()
        .filter_map(|s| {
            let n = rows.iter().filter(|r| r.status == *s).count();
            (n > 0).then(|| format!("{n} {s}"))
        })
        .collect();
    if counts.is_empty() {
        format!("{} environment(s)", rows.len())
    } else {
        format!("{} environment(s): {}", rows.len(), counts.join(", "))
    }
}

/// The nodes and their last heartbeats, compact however many there are.
fn nodes_line(nodes: &[Liveness]) -> String {
    let one = |n: &Liveness| {
        format!(
            "{} (seen {} ago{})",
            n.name,
            ago(n.seen_secs_ago),
            if n.gone { ", gone" } else { "" }
        )
    };
    if nodes.len() <= 6 {
        return format!(
            "nodes: {}",
            nodes.iter().map(one).collect::<Vec<_>>().join(", ")
        );
    }
    let live: Vec<&Liveness> = nodes.iter().filter(|n| !n.gone).collect();
    let gone: Vec<&Liveness> = nodes.iter().filter(|n| n.gone).collect();
    let mut line = format!("nodes: {} live", live.len());
    if let Some(oldest) = live
        .iter()
        .map(|n| n.seen_secs_ago)
        .max_by(|a, b| a.total_cmp(b))
    {
        line.push_str(&format!(" (all seen within {})", ago(oldest)));
    }
    if !gone.is_empty() {
        let shown: Vec<String> = gone.iter().take(5).map(|n| one(n)).collect();
        line.push_str(&format!(", {} gone: {}", gone.len(), shown.join(", ")));
        if gone.len() > 5 {
            line.push_str(&format!(" and {} more", gone.len() - 5));
        }
    }
    line
}

/// A line per row a daemon keeps out of its claims because the database refused to claim or
/// record it (and to fail it): the row, its pack and runtime, what was refused and the
/// database's message, and when the daemon tries again.
fn refused_lines(nodes: &[store::RefusedRows], node: Option<&str>) -> Vec<String> {
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("?").to_owned();
    // A live daemon drops a row from its list when the row's backoff is over (at its next
    // claim); an entry well past its backoff is a stopped instance's.
    let stale = chrono::Utc::now() - chrono::Duration::minutes(2);
    let current = move |r: &&serde_json::Value| {
        r["retry_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_none_or(|t| t > stale)
    };
    nodes
        .iter()
        .filter(|n| node.is_none_or(|name| n.node == name))
        .flat_map(|n| {
            n.rows.as_array().into_iter().flatten().filter(current).map(move |r| {
                format!(
                    "node {} leaves row {} (environment {}, {} {}) alone: the database refused its {}: {} (since {}; tried again after {})",
                    n.node,
                    r["id"],
                    r["env_id"],
                    text(r, "pack_ref"),
                    text(r, "runtime_ref"),
                    text(r, "what"),
                    text(r, "error"),
                    text(r, "since"),
                    text(r, "retry_at"),
                )
            })
        })
        .collect()
}

/// Warnings for rows that wait with no daemon to work on them: no node ever registered, or
/// every node gone (or, for `--node`, that node gone).
fn liveness_warnings(rows: &[StatusRow], nodes: &[Liveness], node: Option<&str>) -> Vec<String> {
    let waiting = rows.iter().filter(|r| r.status.is_open()).count();
    if waiting == 0 {
        return Vec::new();
    }
    if let Some(name) = node {
        return nodes
            .iter()
            .filter(|n| n.name == name && n.gone)
            .map(|n| {
                format!(
                    "node {name} has not been seen for {}: its {waiting} waiting row(s) wait until it returns",
                    ago(n.seen_secs_ago)
                )
            })
            .collect();
    }
    if nodes.is_empty() {
        return vec![format!(
            "no packenvd daemon has ever run against this database: {waiting} environment(s) wait until one starts (packenvd run)"
        )];
    }
    if nodes.iter().all(|n| n.gone) {
        let last = nodes
            .iter()
            .min_by(|a, b| a.seen_secs_ago.total_cmp(&b.seen_secs_ago))
            .expect("not empty");
        return vec![format!(
            "no packenvd daemon has been seen for {} (the last was {}): {waiting} environment(s) will wait until one runs",
            ago(last.seen_secs_ago),
            last.name
        )];
    }
    Vec::new()
}

/// `packenvd nodes`.
pub async fn nodes(pool: &PgPool, json: bool) -> anyhow::Result<Exit> {
    let rows = store::nodes(pool).await.context("reading packenvd_node")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(Exit::Ok);
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "node",
        "last seen",
        "envs root",
        "tools",
        "cannot build",
        "rows",
    ]);
    let now = chrono::Utc::now();
    for n in &rows {
        let ago = ago((now - n.last_seen).num_seconds() as f64);
        let seen = if n.gone {
            format!("{ago} ago (gone)")
        } else {
            format!("{ago} ago")
        };
        let lacking: Vec<String> = n
            .runtimes
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v["buildable"] == false)
                    .map(|(k, v)| {
                        format!(
                            "{k} (no {})",
                            v["missing"]
                                .as_array()
                                .map(|a| a
                                    .iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", "))
                                .unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tools: Vec<String> = n
            .tools
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v["version"].as_str() {
                        Some(version) => format!("{k} {version}"),
                        None => k.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let counts: Vec<String> = n
            .rows
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{v} {k}")).collect())
            .unwrap_or_default();
        table.add_row([
            n.name.clone(),
            seen,
            n.envs_root.clone(),
            tools.join(", "),
            if lacking.is_empty() {
                "-".into()
            } else {
                lacking.join("; ")
            },
            if counts.is_empty() {
                "-".into()
            } else {
                counts.join(", ")
            },
        ]);
    }
    println!("{table}");
    println!("{} node(s)", rows.len());
    Ok(Exit::Ok)
}
