//! Following builds as they run: `request --wait` and `rebuild --wait` (every environment
//! asked for, until its summary is ready or failed), and `logs --follow` (one node's log as it
//! grows).
//!
//! There is nothing to subscribe to: the daemon's log flusher writes a running build's log to
//! its node row every 2 s, so these poll the rows every half second. On a terminal a progress
//! line per environment shows the current step, its time and the last line of output; otherwise
//! each step and each change is one plain line, for logs and CI.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;

use super::explain;
use super::status::ago;
use super::Exit;
use crate::store::{self, Status, Watched, WatchedNode};

/// How often the rows are read again: a quarter of the log flusher's period.
const POLL: Duration = Duration::from_millis(500);

/// What one node's row says, in the words `--wait` prints.
#[derive(Debug, Clone, PartialEq)]
enum NodeState {
    /// Not claimed yet (or, for a gone node, not counted).
    Waiting {
        gone: bool,
    },
    /// Building: the step or phase, seconds since the claim, the last line of output.
    Building {
        phase: String,
        secs: f64,
        last: Option<String>,
    },
    /// An attempt failed; another follows after the backoff.
    Retrying {
        cause: String,
        in_secs: f64,
    },
    Ready {
        unchanged: bool,
        fresh: bool,
    },
    Failed {
        cause: String,
    },
}

impl NodeState {
    fn of(n: &WatchedNode) -> NodeState {
        let marks: Vec<&str> = n.marks.iter().map(String::as_str).collect();
        match n.status {
            Status::Installing => NodeState::Building {
                phase: explain::phase(&marks),
                secs: n.since_secs,
                last: n.tail.as_deref().and_then(explain::last_output_line),
            },
            Status::Pending | Status::Outdated if n.fresh && n.attempts > 0 => {
                match &n.install_error {
                    Some(e) => NodeState::Retrying {
                        cause: explain::cause(e),
                        in_secs: n.retry_in_secs,
                    },
                    None => NodeState::Waiting { gone: n.node_gone },
                }
            }
            Status::Pending | Status::Outdated => NodeState::Waiting { gone: n.node_gone },
            Status::Ready => NodeState::Ready {
                unchanged: marks.iter().any(|m| m.starts_with("==> inputs unchanged")),
                fresh: n.fresh,
            },
            Status::Failed => NodeState::Failed {
                cause: n
                    .install_error
                    .as_deref()
                    .map(explain::cause)
                    .unwrap_or_default(),
            },
        }
    }

    /// The state without what changes every second: a plain line is printed when this changes.
    fn kind(&self) -> String {
        match self {
            NodeState::Building { .. } => "building".into(),
            other => other.short(),
        }
    }

    /// A few words: `step 2/3 'install' 12s`, `ready`, `waiting`.
    fn short(&self) -> String {
        match self {
            NodeState::Waiting { gone: false } => "waiting for a daemon to claim it".into(),
            NodeState::Waiting { gone: true } => "waiting (its node is gone: not counted)".into(),
            NodeState::Building { phase, secs, .. } => format!("{phase} {}", ago(*secs)),
            NodeState::Retrying { cause, in_secs } => {
                format!("attempt failed: {cause}; next attempt in {}", ago(*in_secs))
            }
            NodeState::Ready {
                unchanged: true, ..
            } => "ready (inputs unchanged: the current build stays)".into(),
            NodeState::Ready { fresh: false, .. } => "ready (not rebuilt here)".into(),
            NodeState::Ready { .. } => "ready".into(),
            NodeState::Failed { cause } => format!("failed: {cause}"),
        }
    }
}

/// What `--wait` has shown of one node's build so far.
#[derive(Debug, Default)]
struct Seen {
    /// The attempt whose `==>` lines were printed, and how many of them.
    attempt: i32,
    marks: usize,
    /// The last state printed as a line.
    kind: String,
}

/// Where the lines go: above the progress bars on a terminal, else plain on stdout.
struct Out {
    multi: Option<MultiProgress>,
    bars: HashMap<i64, ProgressBar>,
}

impl Out {
    fn new() -> Out {
        let multi = std::io::stdout()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Out {
            multi,
            bars: HashMap::new(),
        }
    }

    fn line(&self, text: &str) {
        match &self.multi {
            // Printed above the bars, which are drawn again below it.
            Some(m) => {
                let _ = m.println(text);
            }
            None => println!("{text}"),
        }
    }

    fn bar(&mut self, id: i64, prefix: &str) -> Option<&ProgressBar> {
        let multi = self.multi.as_ref()?;
        Some(self.bars.entry(id).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {wide_msg}")
                    .expect("a valid template"),
            );
            bar.set_prefix(prefix.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        }))
    }

    fn finish(&mut self, id: i64, ok: bool, message: String) {
        if let Some(bar) = self.bars.get(&id) {
            bar.set_style(
                ProgressStyle::with_template(if ok {
                    "{prefix:.bold.green} {wide_msg}"
                } else {
                    "{prefix:.bold.red} {wide_msg}"
                })
                .expect("a valid template"),
            );
            bar.finish_with_message(message);
        }
    }
}

/// One environment's line while it builds: its node's state, or the nodes' states compactly.
fn progress_message(states: &[(&WatchedNode, NodeState)]) -> String {
    match states {
        [] => "waiting for a node to take it".into(),
        [(_, s)] => match s {
            NodeState::Building {
                phase, secs, last, ..
            } => match last {
                Some(last) => format!("{phase} · {} · {last}", ago(*secs)),
                None => format!("{phase} · {}", ago(*secs)),
            },
            other => other.short(),
        },
        many if many.len() <= 4 => many
            .iter()
            .map(|(n, s)| format!("{} {}", n.node, s.short()))
            .collect::<Vec<_>>()
            .join(" · "),
        many => {
            let count = |f: fn(&NodeState) -> bool| many.iter().filter(|(_, s)| f(s)).count();
            let mut parts = vec![];
            for (n, what) in [
                (count(|s| matches!(s, NodeState::Ready { .. })), "ready"),
                (
                    count(|s| matches!(s, NodeState::Building { .. })),
                    "building",
                ),
                (
                    count(|s| matches!(s, NodeState::Waiting { .. } | NodeState::Retrying { .. })),
                    "waiting",
                ),
                (count(|s| matches!(s, NodeState::Failed { .. })), "failed"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {what}"));
                }
            }
            if let Some((n, s)) = many
                .iter()
                .find(|(_, s)| matches!(s, NodeState::Building { .. }))
            {
                parts.push(format!("({} {})", n.node, s.short()));
            }
            parts.join(", ")
        }
    }
}

/// A `==>` line as `--wait` prints it, or `None` for the ones it leaves to `logs`.
fn mark_line(mark: &str) -> Option<String> {
    if let Some(step) = explain::current_step([mark]) {
        return Some(step.to_string());
    }
    ["==> interpreter:", "==> inputs "]
        .iter()
        .any(|p| mark.starts_with(p))
        .then(|| mark.trim_start_matches("==> ").to_owned())
}

/// Follows environments `ids` until each summary is `ready` or `failed`; `since` is the
/// database's time just before they were asked for (rows older than that are other builds').
pub async fn wait(
    pool: &PgPool,
    ids: &[i64],
    since: DateTime<Utc>,
    timeout: Option<Duration>,
) -> anyhow::Result<Exit> {
    let started = Instant::now();
    let mut out = Out::new();
    let mut seen: HashMap<(i64, String), Seen> = HashMap::new();
    let mut warned = false;
    let mut finished: HashMap<i64, Watched> = HashMap::new();
    loop {
        let envs = store::watched(pool, ids)
            .await
            .context("reading pack_environment")?;
        let mut nodes = store::watched_nodes(pool, ids, since)
            .await
            .context("reading pack_environment_node")?;
        // An unchanged answer keeps the current build's log below its note: those steps ran
        // for an earlier request, not this one.
        for n in &mut nodes {
            if let Some(i) = n.marks.iter().position(|m| m == store::CURRENT_BUILD_LOG) {
                n.marks.truncate(i);
            }
        }
        if !warned && envs.iter().any(|e| e.status.is_open()) {
            let live = store::liveness(pool)
                .await
                .context("reading packenvd_node")?;
            if live.iter().all(|n| n.gone) {
                warned = true;
                let last = live
                    .iter()
                    .map(|n| n.seen_secs_ago)
                    .min_by(|a, b| a.total_cmp(b));
                out.line(&match last {
                    Some(secs) => format!(
                        "warning: no packenvd daemon has been seen for {}: this waits until one runs",
                        ago(secs)
                    ),
                    None => "warning: no packenvd daemon has ever run against this database: this waits until one starts (packenvd run)".into(),
                });
            }
        }
        for env in &envs {
            if finished.contains_key(&env.id) {
                continue;
            }
            let mine: Vec<&WatchedNode> = nodes
                .iter()
                .filter(|n| n.env_id == env.id && (n.required || n.status == Status::Installing))
                .collect();
            let several = mine.len() > 1;
            let name = format!("{} {}", env.pack_ref, env.runtime_ref);
            let states: Vec<(&WatchedNode, NodeState)> =
                mine.iter().map(|n| (*n, NodeState::of(n))).collect();
            for (n, state) in &states {
                let label = if several {
                    format!("{name} on {}", n.node)
                } else {
                    name.clone()
                };
                let s = seen.entry((env.id, n.node.clone())).or_default();
                // The log is this request's build's only while it runs or once it changed
                // after the request: before its claim a row still holds its last build's log.
                let current = n.status == Status::Installing || (n.fresh && n.attempts > 0);
                if current {
                    if s.attempt != n.attempts {
                        *s = Seen {
                            attempt: n.attempts,
                            kind: std::mem::take(&mut s.kind),
                            ..Seen::default()
                        };
                    }
                    let elapsed = match state {
                        NodeState::Building { secs, .. } => format!(" [{}]", ago(*secs)),
                        _ => String::new(),
                    };
                    for mark in n.marks.iter().skip(s.marks) {
                        if let Some(text) = mark_line(mark) {
                            out.line(&format!("{label}: {text}{elapsed}"));
                        }
                    }
                    s.marks = s.marks.max(n.marks.len());
                }
                let kind = state.kind();
                if kind != s.kind {
                    // A build's start is told by its first step; the end by the summary.
                    let told_elsewhere = matches!(state, NodeState::Building { .. })
                        || (!several
                            && matches!(state, NodeState::Ready { .. } | NodeState::Failed { .. }));
                    if !told_elsewhere {
                        out.line(&format!("{label}: {}", state.short()));
                    }
                    s.kind = kind;
                }
            }
            let done = matches!(env.status, Status::Ready | Status::Failed);
            if done {
                let took = ago(started.elapsed().as_secs_f64());
                let ok = env.status == Status::Ready;
                let message = if ok {
                    match states.as_slice() {
                        [(
                            _,
                            s @ NodeState::Ready {
                                unchanged: true, ..
                            },
                        )] => s.short(),
                        _ => format!("ready after {took}"),
                    }
                } else {
                    format!(
                        "failed after {took}: {}",
                        env.install_error
                            .as_deref()
                            .map(explain::cause)
                            .unwrap_or_default()
                    )
                };
                if out.bar(env.id, &name).is_some() {
                    out.finish(env.id, ok, message);
                } else {
                    out.line(&format!("{name}: {message}"));
                }
                finished.insert(env.id, env.clone());
            } else if let Some(bar) = out.bar(env.id, &name) {
                bar.set_message(progress_message(&states));
            }
        }
        let gone: Vec<i64> = ids
            .iter()
            .filter(|id| !envs.iter().any(|e| e.id == **id) && !finished.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            out.line(&format!(
                "environment {id} was deleted (packenvd remove, or its pack uninstalled)"
            ));
            finished.insert(
                id,
                Watched {
                    id,
                    pack_ref: String::new(),
                    runtime_ref: String::new(),
                    status: Status::Failed,
                    install_error: Some("deleted while waiting for it".into()),
                },
            );
        }
        if finished.len() >= ids.len() {
            break;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            let waiting: Vec<String> = envs
                .iter()
                .filter(|e| !finished.contains_key(&e.id))
                .map(|e| format!("{} {} ({})", e.pack_ref, e.runtime_ref, e.status))
                .collect();
            for id in envs.iter().map(|e| e.id) {
                if let Some(bar) = out.bars.get(&id).filter(|b| !b.is_finished()) {
                    bar.abandon();
                }
            }
            eprintln!(
                "packenvd: gave up after {}: {} still not done; the build goes on",
                ago(started.elapsed().as_secs_f64()),
                waiting.join(", ")
            );
            return Ok(Exit::TimedOut);
        }
        tokio::time::sleep(POLL).await;
    }
    let mut exit = Exit::Ok;
    for env in ids.iter().filter_map(|id| finished.get(id)) {
        if env.status == Status::Failed {
            exit = Exit::Unwell;
            if let Some(e) = &env.install_error {
                println!(
                    "--- {} {}: error ---\n{}",
                    env.pack_ref,
                    env.runtime_ref,
                    e.trim_end()
                );
            }
        }
    }
    Ok(exit)
}

/// What of a log has been printed, to print only what is new when it is read again.
#[derive(Debug, Default)]
struct Printed {
    attempt: i32,
    text: String,
}

impl Printed {
    /// The part of `log` not printed yet. The log normally grows at its end; once it exceeds
    /// `log_max_bytes` its middle is cut and its end moves, so the new part is found after the
    /// end of what was printed.
    fn new_part<'a>(&mut self, attempt: i32, log: &'a str) -> (Option<String>, &'a str) {
        if attempt != self.attempt {
            let note = (!self.text.is_empty()).then(|| format!("--- attempt {attempt} ---"));
            self.attempt = attempt;
            self.text = log.to_owned();
            return (note, log);
        }
        let start = if log.starts_with(&self.text) {
            self.text.len()
        } else {
            // The printed text's last 256 bytes, else its last line, found again in the log.
            let mut cut = self.text.len().saturating_sub(256);
            while !self.text.is_char_boundary(cut) {
                cut += 1;
            }
            let last_line = self
                .text
                .trim_end_matches('\n')
                .rfind('\n')
                .map_or(0, |i| i + 1);
            [cut, last_line]
                .into_iter()
                .find_map(|from| {
                    let end = &self.text[from..];
                    (!end.is_empty())
                        .then(|| log.rfind(end))
                        .flatten()
                        .map(|i| i + end.len())
                })
                .unwrap_or(0)
        };
        self.text = log.to_owned();
        (None, &log[start..])
    }
}

/// `packenvd logs --follow`: prints a node's log as it grows until its build ends; exit status
/// 0 when ready, 1 when failed. Without `node`, the node building it (or its only node).
pub async fn follow_log(
    pool: &PgPool,
    pack: &str,
    runtime: &str,
    node: Option<&str>,
    timeout: Option<Duration>,
) -> anyhow::Result<Exit> {
    let started = Instant::now();
    let mut node = node.map(str::to_owned);
    let mut printed = Printed::default();
    let mut md5: Option<String> = None;
    let mut told_waiting = false;
    loop {
        let Some(name) = node.clone() else {
            let rows = store::logs(pool, pack, runtime).await?;
            let nodes = &rows[rows.len().min(1)..];
            node = nodes
                .iter()
                .find(|l| l.status == Status::Installing)
                .or(if nodes.len() == 1 {
                    nodes.first()
                } else {
                    None
                })
                .and_then(|l| l.node.clone());
            if node.is_none() {
                if !told_waiting {
                    eprintln!("(waiting for a node to start building {pack} {runtime})");
                    told_waiting = true;
                }
                if timeout.is_some_and(|t| started.elapsed() >= t) {
                    return Ok(Exit::TimedOut);
                }
                tokio::time::sleep(POLL).await;
            }
            continue;
        };
        let Some(row) = store::node_log(pool, pack, runtime, &name, md5.as_deref()).await? else {
            return Err(super::usage(format!(
                "node {name} has no row of {pack} {runtime}"
            )));
        };
        let building = row.status == Status::Installing;
        let waiting = row.status.is_open() && !building;
        if let Some(log) = row.install_log.as_deref() {
            // A row reset to pending still holds its last build's log until it is claimed.
            if !(waiting && row.attempts == 0) {
                let (note, new) = printed.new_part(row.attempts, log);
                if let Some(note) = note {
                    println!("{note}");
                }
                print!("{new}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
        md5 = row.log_md5.clone();
        if waiting && !told_waiting {
            eprintln!("(waiting for node {name} to start the build)");
            told_waiting = true;
        }
        if building {
            told_waiting = false;
        }
        if !row.status.is_open() {
            let full = store::node_log(pool, pack, runtime, &name, None)
                .await?
                .unwrap_or(row);
            println!("--- {pack} {runtime} on node {name}: {} ---", full.status);
            if let Some(e) = &full.install_error {
                let (head, tail) = explain::without_tail(e, full.install_log.as_deref());
                println!("{head}");
                if let Some(tail) = tail {
                    println!("--- output tail ---\n{tail}");
                }
            }
            return Ok(if full.status == Status::Failed {
                Exit::Unwell
            } else {
                Exit::Ok
            });
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            eprintln!(
                "packenvd: gave up after {}: {pack} {runtime} is still {}",
                ago(started.elapsed().as_secs_f64()),
                row.status
            );
            return Ok(Exit::TimedOut);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followed_log_prints_only_what_is_new_even_once_its_middle_is_cut() {
        let mut p = Printed::default();
        assert_eq!(p.new_part(1, "a\nb\n").1, "a\nb\n");
        assert_eq!(p.new_part(1, "a\nb\nc\n").1, "c\n");
        assert_eq!(p.new_part(1, "a\nb\nc\n").1, "");
        // The cap cut the middle: the head stays, the end moved on.
        assert_eq!(
            p.new_part(1, "a\n[... 2 bytes elided ...]\nc\nd\n").1,
            "d\n"
        );
        let (note, new) = p.new_part(2, "x\n");
        assert_eq!((note.as_deref(), new), (Some("--- attempt 2 ---"), "x\n"));
    }
}
