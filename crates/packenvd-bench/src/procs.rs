//! The processes under test: `packenvd run` and the peer, each with its output read by a task
//! of ours (a pipe nobody drains would stall the process), and what /proc says about them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// What a process's output told us.
#[derive(Debug, Clone)]
pub enum Event {
    /// Initialised and waiting for work.
    Ready,
    /// A job/row started running in the worker (packenvd: its `installing` line).
    Started { id: i64, at: DateTime<Utc> },
    /// A job/row's result is committed (packenvd: `build finished`; peer: `JobComplete`).
    Done { id: i64, at: DateTime<Utc> },
}

/// Where `packenvd run` keeps its files, and its binary.
#[derive(Debug, Clone)]
pub struct DaemonDirs {
    pub exe: PathBuf,
    pub envs_root: PathBuf,
    pub packs_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// An empty config file, so /etc/packenvd/packenvd.toml cannot change the defaults.
    pub config: PathBuf,
    /// `PACKENVD_NODE_NAME`, for rows that run several nodes. None sends no variable: a build
    /// from before nodes refuses `PACKENVD_*` variables it does not know.
    pub node_name: Option<String>,
    /// More settings as `PACKENVD_*` variables: a row's exceptions to the defaults.
    pub settings: Vec<(String, String)>,
}

impl DaemonDirs {
    pub fn new(exe: PathBuf, root: &Path) -> anyhow::Result<DaemonDirs> {
        DaemonDirs::with_packs(exe, root, root.join("packs"))
    }

    /// A host of a many-node row: its own envs root, cache and name; the platform's packs,
    /// which every node reads.
    pub fn node(
        exe: PathBuf,
        root: &Path,
        packs_dir: &Path,
        name: &str,
    ) -> anyhow::Result<DaemonDirs> {
        let mut d = DaemonDirs::with_packs(exe, root, packs_dir.to_owned())?;
        d.node_name = Some(name.to_owned());
        Ok(d)
    }

    fn with_packs(exe: PathBuf, root: &Path, packs_dir: PathBuf) -> anyhow::Result<DaemonDirs> {
        let d = DaemonDirs {
            exe,
            envs_root: root.join("envs"),
            packs_dir,
            cache_dir: root.join("cache"),
            config: root.join("packenvd.toml"),
            node_name: None,
            settings: Vec::new(),
        };
        for dir in [&d.envs_root, &d.packs_dir, &d.cache_dir] {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&d.config, "")?;
        Ok(d)
    }
}

/// `packenvd migrate` with `dirs`' binary: a build brings its own schema, which the harness's
/// migrations (this build's) must not pre-empt.
pub async fn migrate(dirs: &DaemonDirs, url: &str) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new(&dirs.exe);
    cmd.arg("--config").arg(&dirs.config).arg("migrate");
    scrub_packenvd_vars(&mut cmd);
    let out = cmd
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot start {}", dirs.exe.display()))?;
    if !out.status.success() {
        bail!(
            "{} migrate: {}; {}",
            dirs.exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: tokio::process::Child,
    pid: u32,
    events: mpsc::UnboundedReceiver<Event>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Spawns `packenvd run`. `json_events`: log as JSON and report `installing`/`build finished`
/// lines as events (the pickup measurement needs the daemon's own timestamps).
pub fn spawn_packenvd(
    dirs: &DaemonDirs,
    url: &str,
    name: &str,
    concurrency: Option<usize>,
    json_events: bool,
) -> anyhow::Result<Proc> {
    let mut cmd = tokio::process::Command::new(&dirs.exe);
    cmd.arg("--config").arg(&dirs.config);
    if json_events {
        cmd.args(["--log-format", "json"]);
    }
    cmd.arg("run");
    scrub_packenvd_vars(&mut cmd);
    cmd.env("DATABASE_URL", url)
        .env("PACKENVD_ENVS_ROOT", &dirs.envs_root)
        .env("PACKENVD_PACKS_DIR", &dirs.packs_dir)
        .env("PACKENVD_CACHE_DIR", &dirs.cache_dir)
        .env("PACKENVD_INSTANCE_NAME", name);
    if let Some(c) = concurrency {
        cmd.env("PACKENVD_CONCURRENCY", c.to_string());
    }
    if let Some(node) = &dirs.node_name {
        cmd.env("PACKENVD_NODE_NAME", node);
    }
    for (k, v) in &dirs.settings {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", dirs.exe.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let parse = if json_events {
        parse_packenvd_json
    } else {
        parse_packenvd_text
    };
    Ok(Proc::new(name, child, stderr, parse))
}

/// Options of one peer process.
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    pub concurrency: Option<usize>,
    pub best: bool,
    pub local_queue_size: Option<usize>,
    pub batch_delay_ms: Option<u64>,
    pub record_times: bool,
}

pub fn spawn_peer(exe: &Path, url: &str, name: &str, o: &PeerOptions) -> anyhow::Result<Proc> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--database-url").arg(url);
    if let Some(c) = o.concurrency {
        cmd.arg("--concurrency").arg(c.to_string());
    }
    if o.best {
        cmd.arg("--best");
    }
    if let Some(n) = o.local_queue_size {
        cmd.arg("--local-queue-size").arg(n.to_string());
    }
    if let Some(ms) = o.batch_delay_ms {
        cmd.arg("--batch-delay-ms").arg(ms.to_string());
    }
    if o.record_times {
        cmd.arg("--record-times");
    }
    scrub_packenvd_vars(&mut cmd);
    cmd.env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    Ok(Proc::new(name, child, stdout, parse_peer))
}

/// The harness runs under scripts/with-postgres.sh, whose exports and any PACKENVD_* of the
/// caller must not change the settings under test.
fn scrub_packenvd_vars(cmd: &mut tokio::process::Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("PACKENVD_") {
            cmd.env_remove(k);
        }
    }
}

impl Proc {
    fn new(
        name: &str,
        child: tokio::process::Child,
        out: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        parse: fn(&str) -> Option<Event>,
    ) -> Proc {
        let (tx, events) = mpsc::unbounded_channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ev) = parse(&line) {
                    let _ = tx.send(ev);
                }
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == 40 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let pid = child.id().unwrap_or(0);
        Proc {
            name: name.to_owned(),
            child,
            pid,
            events,
            tail,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines of output, for error messages.
    pub fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The next event, or an error (with the output's tail) after `limit` or when the process
    /// died.
    pub async fn next_event(&mut self, limit: Duration) -> anyhow::Result<Event> {
        match tokio::time::timeout(limit, self.events.recv()).await {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => {
                let status = self.child.wait().await.ok();
                bail!(
                    "{} exited ({status:?}); its last output:\n{}",
                    self.name,
                    self.tail()
                )
            }
            Err(_) => bail!(
                "{}: nothing after {limit:?}; its last output:\n{}",
                self.name,
                self.tail()
            ),
        }
    }

    /// The next event, or None when `limit` passes without one (an exit is still an error).
    pub async fn try_event(&mut self, limit: Duration) -> anyhow::Result<Option<Event>> {
        match tokio::time::timeout(limit, self.events.recv()).await {
            Ok(Some(ev)) => Ok(Some(ev)),
            Ok(None) => {
                let status = self.child.wait().await.ok();
                bail!(
                    "{} exited ({status:?}); its last output:\n{}",
                    self.name,
                    self.tail()
                )
            }
            Err(_) => Ok(None),
        }
    }

    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        loop {
            if let Event::Ready = self.next_event(Duration::from_secs(60)).await? {
                return Ok(());
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "warning: {} ignored SIGTERM for {grace:?}; killing it",
                self.name
            );
            let _ = self.child.kill().await;
        }
    }
}

fn parse_packenvd_text(line: &str) -> Option<Event> {
    line.contains("packenvd started").then_some(Event::Ready)
}

fn parse_packenvd_json(line: &str) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = v.pointer("/fields/message")?.as_str()?;
    if message == "packenvd started" {
        return Some(Event::Ready);
    }
    let id = v.pointer("/span/env_id")?.as_i64()?;
    let at = DateTime::parse_from_rfc3339(v.get("timestamp")?.as_str()?)
        .ok()?
        .with_timezone(&Utc);
    match message {
        "installing" => Some(Event::Started { id, at }),
        "build finished" => Some(Event::Done { id, at }),
        _ => None,
    }
}

fn parse_peer(line: &str) -> Option<Event> {
    if line == "ready" {
        return Some(Event::Ready);
    }
    let mut parts = line.split(' ');
    let kind = parts.next()?;
    let id = parts.next()?.parse().ok()?;
    let micros: i64 = parts.next()?.parse().ok()?;
    let at = DateTime::from_timestamp_micros(micros)?;
    match kind {
        "S" => Some(Event::Started { id, at }),
        "C" => Some(Event::Done { id, at }),
        _ => None,
    }
}

/// CPU seconds (user + system) the process has used.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses; the fields follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Ok(ticks as f64 / hz as f64)
}

/// CPU seconds used by every process named `postgres` (the server on this machine: its
/// backends, walwriter, autovacuum). A backend that exits between two readings takes its
/// share with it, so callers read before and after a run whose connections stay open.
pub fn server_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|pid| cpu_seconds(pid).ok())
        .sum()
}

/// A `/proc/PID/status` value in kB (`VmHWM`: peak resident set).
pub fn status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(line[key.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_packenvd_json_lines() {
        let line = r#"{"timestamp":"2026-11-27T09:15:02.123456Z","level":"INFO","fields":{"message":"installing","attempt":1},"target":"packenvd::worker","span":{"claim_token":"x","env_id":42,"pack_ref":"p","runtime_ref":"core.shell","name":"build"},"spans":[]}"#;
        match parse_packenvd_json(line) {
            Some(Event::Started { id: 42, at }) => {
                assert_eq!(at.timestamp_subsec_micros(), 123_456)
            }
            other => panic!("{other:?}"),
        }
        let started = r#"{"timestamp":"2026-11-27T09:15:02.1Z","level":"INFO","fields":{"message":"packenvd started","instance":"a"},"target":"packenvd::worker"}"#;
        assert!(matches!(parse_packenvd_json(started), Some(Event::Ready)));
    }

    #[test]
    fn reads_peer_lines() {
        assert!(matches!(parse_peer("ready"), Some(Event::Ready)));
        assert!(matches!(
            parse_peer("C 7 1764234902123456"),
            Some(Event::Done { id: 7, .. })
        ));
        assert!(parse_peer("something else").is_none());
    }

    #[test]
    fn reads_own_proc_stats() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(status_kb(me, "VmHWM").unwrap() > 0);
    }
}
