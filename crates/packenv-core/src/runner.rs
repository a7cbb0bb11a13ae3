//! Runs one installer command: an argument vector (never a shell), a scrubbed environment given
//! by the caller, output merged into a [`CappedLog`] as it is read, and a timeout or
//! cancellation that kills it with everything it started.
//!
//! With a [`Supervised`] setting (what the daemon uses) the command runs under the step
//! supervisor ([`crate::supervise`]), as the build user when there is one: the supervisor applies
//! the limits and Landlock, and kills the step's whole tree (`setsid` and double forks included)
//! when the step ends or when the runner closes its control pipe (timeout, cancel). The
//! supervisor's process group is killed from here only if it does not exit within
//! [`SUPERVISOR_GRACE`]. Without one (`step_supervisor = "none"`, unit tests) the command gets
//! a process group of its own, which is killed, and `PR_SET_PDEATHSIG`: what leaves the group
//! survives.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::log::BuildLog;
use crate::supervise::Confinement;

/// A command ready to run: everything rendered, the environment complete.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The whole environment of the child; nothing is inherited from the daemon.
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Run under the step supervisor; `None` runs the command directly.
    pub supervised: Option<Supervised>,
}

/// How a command runs under the step supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervised {
    /// The supervisor's program and its first arguments, e.g. `packenvd __supervise`.
    pub supervisor: Vec<OsString>,
    pub confinement: Confinement,
    /// The build user `(uid, gid)` the supervisor and the step run as.
    pub user: Option<(u32, u32)>,
}

/// After a supervised command was told to stop (its control pipe closed), how long the
/// supervisor gets to kill its tree before its process group is killed from here.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(5);

impl Invocation {
    /// The command line as one would type it, for logs and error messages.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c))
                {
                    format!("'{}'", a.replace('\'', r"'\''"))
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How a command ended.
#[derive(Debug)]
pub enum Outcome {
    /// It exited; `status.success()` says whether with 0.
    Exited(ExitStatus),
    /// It ran past its timeout and was killed with everything it started.
    TimedOut(Duration),
    /// The build was cancelled (shutdown, lost claim) and the step was killed with everything
    /// it started.
    Cancelled,
    /// It could not be started (no such command, not executable, bad working directory).
    SpawnFailed(std::io::Error),
}

impl Outcome {
    pub fn success(&self) -> bool {
        matches!(self, Outcome::Exited(s) if s.success())
    }

    /// "exited with status 1", "was killed by signal 9", "timed out after 15m", ...
    pub fn describe(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::unix::process::ExitStatusExt;
        let text = match self {
            Outcome::Exited(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => {
                    let name = Signal::try_from(sig).map_or_else(|_| "?".into(), |s| s.to_string());
                    format!("was killed by signal {sig} ({name})")
                }
                _ => format!("ended with {s}"),
            },
            Outcome::TimedOut(t) => {
                format!(
                    "timed out after {} and was killed",
                    humantime::format_duration(*t)
                )
            }
            Outcome::Cancelled => "was cancelled and killed".into(),
            Outcome::SpawnFailed(e) => format!("could not be started: {e}"),
        };
        f.write_str(&text)
    }
}

/// Why `program` cannot be started for want of a file, if that can be told without running
/// anything: a bare name on no directory of `path_var`, a path that does not exist (a dangling
/// link included), or a script whose `#!` interpreter does not exist (a venv whose Python was
/// removed; `#!/usr/bin/env NAME` with NAME on no directory of `path_var`). None when it may
/// start, or when a file cannot be looked at (the kernel will say). Blocking.
pub fn missing(program: &str, path_var: Option<&str>) -> Option<String> {
    let path = match (
        crate::probe::resolve_executable(program, path_var.unwrap_or("")),
        path_var,
    ) {
        (Some(p), _) => p,
        // A relative or empty entry is looked up from the child's working directory, not
        // this process's: no verdict then.
        (None, Some(p)) if std::env::split_paths(p).any(|d| !d.is_absolute()) => return None,
        (None, Some(_)) => return Some(not_on_path(program, path_var)),
        // Where an unset PATH looks is the C library's business.
        (None, None) => return None,
    };
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(match std::fs::read_link(&path) {
                Ok(target) => format!(
                    "`{}` is a link to `{}`, which does not exist",
                    path.display(),
                    target.display()
                ),
                Err(_) => format!("`{}` does not exist", path.display()),
            })
        }
        Err(_) => return None,
    }
    let (interpreter, arg) = shebang(&path)?;
    if !interpreter.starts_with('/') {
        return None;
    }
    let shown = path.display();
    let gone = |p: &std::path::Path| {
        std::fs::metadata(p).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    };
    if gone(std::path::Path::new(&interpreter)) {
        return Some(format!(
            "`{shown}` names `{interpreter}` in its #! line, which does not exist"
        ));
    }
    let name = arg.filter(|a| !a.starts_with('-') && !a.contains('/'))?;
    if interpreter.ends_with("/env")
        && crate::probe::resolve_executable(&name, path_var.unwrap_or("")).is_none()
    {
        return Some(format!(
            "`{shown}` runs `{name}` through `{interpreter}` (its #! line), and {}",
            not_on_path(&name, path_var)
        ));
    }
    None
}

/// [`missing`], or the kernel's words when nothing better is known: for a command that did not
/// start with ENOENT.
pub fn describe_missing(program: &str, path_var: Option<&str>) -> String {
    missing(program, path_var).unwrap_or_else(|| {
        if path_var.is_none() && !program.contains('/') {
            return not_on_path(program, path_var);
        }
        format!("`{program}` could not be started: a file it needs (its #! interpreter or its dynamic loader) does not exist")
    })
}

fn not_on_path(name: &str, path_var: Option<&str>) -> String {
    match path_var {
        Some(p) => format!("`{name}` not found on PATH (PATH={p})"),
        None => format!("`{name}` not found: PATH is not set"),
    }
}

/// The interpreter of a script's `#!` line and its one argument. The file may be the
/// environment's (untrusted): read only if it is a regular file, without blocking, and at most
/// the first line's worth of bytes.
fn shebang(path: &std::path::Path) -> Option<(String, Option<String>)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(open_flags())
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut head = Vec::with_capacity(256);
    file.take(256).read_to_end(&mut head).ok()?;
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let interpreter = words.next()?.to_owned();
    Some((interpreter, words.next().map(str::to_owned)))
}

/// Not blocking on a FIFO, not taking a terminal.
fn open_flags() -> i32 {
    (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32
}

/// After the main process ends, how long to wait for the output pipes to drain. A grandchild
/// that left the process group (setsid) can hold them open forever.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs `inv`, appending its stdout and stderr to `log`.
pub async fn run(inv: &Invocation, log: &BuildLog, cancel: &CancellationToken) -> Outcome {
    // Asked before starting so that a missing command reads as one whether or not it runs
    // under the supervisor (whose own failure to start it would be only an exit status).
    let (program, path_var) = (inv.program.clone(), inv.env.get("PATH").cloned());
    if let Some(why) = crate::blocking(move || missing(&program, path_var.as_deref())).await {
        return Outcome::SpawnFailed(std::io::Error::new(std::io::ErrorKind::NotFound, why));
    }
    let mut cmd = match &inv.supervised {
        None => {
            let mut cmd = tokio::process::Command::new(&inv.program);
            cmd.args(&inv.args).stdin(Stdio::null());
            die_with_parent(&mut cmd);
            cmd
        }
        Some(s) => {
            let mut cmd = tokio::process::Command::new(&s.supervisor[0]);
            cmd.args(&s.supervisor[1..])
                .args(s.confinement.to_args())
                .arg("--")
                .arg(&inv.program)
                .args(&inv.args)
                // The control pipe: the supervisor kills the step's tree when it closes.
                .stdin(Stdio::piped());
            if let Some((uid, gid)) = s.user {
                cmd.uid(uid).gid(gid);
            }
            cmd
        }
    };
    cmd.current_dir(&inv.cwd)
        .env_clear()
        .envs(&inv.env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let why = describe_missing(&inv.program, inv.env.get("PATH").map(String::as_str));
            return Outcome::SpawnFailed(std::io::Error::new(e.kind(), why));
        }
        Err(e) => return Outcome::SpawnFailed(e),
    };
    let mut control = child.stdin.take();
    // With process_group(0) the group id is the child's pid.
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let readers = [
        child
            .stdout
            .take()
            .map(|r| tokio::spawn(pump(r, log.clone()))),
        child
            .stderr
            .take()
            .map(|r| tokio::spawn(pump(r, log.clone()))),
    ];

    let started = Instant::now();
    let outcome = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => Outcome::Exited(status),
            Err(e) => Outcome::SpawnFailed(e),
        },
        () = tokio::time::sleep(inv.timeout) => Outcome::TimedOut(started.elapsed()),
        () = cancel.cancelled() => Outcome::Cancelled,
    };
    if control.take().is_some() && !matches!(outcome, Outcome::Exited(_)) {
        // Closing the control pipe tells the supervisor to kill the step's whole tree; the
        // group kill below is the fallback if it does not exit in time.
        let _ = tokio::time::timeout(SUPERVISOR_GRACE, child.wait()).await;
    }
    // Kill the whole group in every case: on timeout or cancel to stop the work, and after a
    // normal exit so that nothing the step left in the background outlives it.
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let _ = child.wait().await;
    for reader in readers.into_iter().flatten() {
        let abort = reader.abort_handle();
        if tokio::time::timeout(DRAIN_GRACE, reader).await.is_err() {
            abort.abort();
        }
    }
    outcome
}

/// Asks the kernel to kill the step's process if the daemon dies (`kill -9`, OOM), when no
/// cleanup of ours can run. It covers the process we start; the grandchildren it starts in
/// its process group are killed by the group kill of a daemon that is still alive.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl(2),
    // which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

async fn pump(mut reader: impl AsyncRead + Unpin, log: BuildLog) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                tracing::debug!(output = %String::from_utf8_lossy(&buf[..n]).trim_end(), "step output");
                log.lock().write(&buf[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(program: &str, args: &[&str], timeout: Duration) -> Invocation {
        Invocation {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            cwd: std::env::temp_dir(),
            env: [("PATH".to_string(), "/usr/bin:/bin".to_string())].into(),
            timeout,
            supervised: None,
        }
    }

    #[tokio::test]
    async fn output_of_both_streams_reaches_the_log() {
        let log = BuildLog::new(4096);
        let out = run(
            &inv(
                "sh",
                &["-c", "echo out; echo err >&2; exit 3"],
                Duration::from_secs(10),
            ),
            &log,
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(out.describe(), "exited with status 3");
        let text = log.render();
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
    }

    #[tokio::test]
    async fn the_environment_is_exactly_what_was_given() {
        std::env::set_var("PACKENV_SECRET_FOR_TEST", "leak");
        let log = BuildLog::new(4096);
        let out = run(
            &inv("env", &[], Duration::from_secs(10)),
            &log,
            &CancellationToken::new(),
        )
        .await;
        assert!(out.success());
        assert_eq!(log.render().trim(), "PATH=/usr/bin:/bin");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-alive");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let log = BuildLog::new(4096);
        let started = Instant::now();
        let out = run(
            &inv("sh", &["-c", &script], Duration::from_millis(300)),
            &log,
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(out, Outcome::TimedOut(_)), "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the grandchild outlived the timeout");
    }

    #[tokio::test]
    async fn a_missing_command_fails_to_spawn() {
        let log = BuildLog::new(4096);
        let out = run(
            &inv("no-such-command-xyz", &[], Duration::from_secs(1)),
            &log,
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(out, Outcome::SpawnFailed(_)), "{out:?}");
        assert_eq!(
            out.to_string(),
            "could not be started: `no-such-command-xyz` not found on PATH (PATH=/usr/bin:/bin)"
        );
    }

    #[test]
    fn a_missing_file_is_named_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let path = Some("/usr/bin:/bin");
        assert_eq!(missing("sh", path), None);
        assert_eq!(
            missing("uv-xyz", Some("/nonexistent")),
            Some("`uv-xyz` not found on PATH (PATH=/nonexistent)".into())
        );
        assert_eq!(missing("uv-xyz", None), None);
        assert_eq!(missing("uv-xyz", Some("/nonexistent:bin")), None);
        assert_eq!(
            describe_missing("uv-xyz", None),
            "`uv-xyz` not found: PATH is not set"
        );
        assert_eq!(
            missing(&format!("{d}/bin/pip"), path),
            Some(format!("`{d}/bin/pip` does not exist"))
        );
        let link = dir.path().join("python");
        std::os::unix::fs::symlink("/nonexistent/python3", &link).unwrap();
        assert_eq!(
            missing(&link.display().to_string(), path),
            Some(format!(
                "`{d}/python` is a link to `/nonexistent/python3`, which does not exist"
            ))
        );
        let script = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            p.display().to_string()
        };
        let pip = script("pip", "#!/old/venv/bin/python -E\nimport pip\n");
        assert_eq!(
            missing(&pip, path),
            Some(format!(
                "`{pip}` names `/old/venv/bin/python` in its #! line, which does not exist"
            ))
        );
        let tool = script("tool", "#!/usr/bin/env no-such-python-xyz\n");
        assert_eq!(
            missing(&tool, path),
            Some(format!("`{tool}` runs `no-such-python-xyz` through `/usr/bin/env` (its #! line), and `no-such-python-xyz` not found on PATH (PATH=/usr/bin:/bin)"))
        );
        assert_eq!(missing(&script("ok", "#!/bin/sh\ntrue\n"), path), None);
        // A FIFO is not read (it would block) and is left for the kernel to judge.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o755)).unwrap();
        assert_eq!(missing(&fifo.display().to_string(), path), None);
    }

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let i = inv(
            "pip",
            &["install", "-r", "/a b/req.txt", ""],
            Duration::from_secs(1),
        );
        assert_eq!(i.display(), "pip install -r '/a b/req.txt' ''");
    }
}
