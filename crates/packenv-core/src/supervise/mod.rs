//! The step supervisor: a small process between the daemon and each step (`packenvd
//! __supervise [options] -- PROGRAM ARGS...`). It makes every step a closed box (DESIGN §6):
//!
//! - it is a child subreaper, so whatever the step leaves behind (a `setsid` daemon, a
//!   double fork) becomes its child, and when the step ends it kills every descendant;
//! - its stdin is a pipe from the daemon: when that pipe closes (the daemon cancels the step,
//!   times it out, shuts down, or dies, even by `kill -9`) it kills the whole tree and exits;
//! - it marks every inherited descriptor but 0, 1 and 2 close-on-exec, drops every capability
//!   (the daemon's CAP_SETUID, CAP_SETGID and CAP_CHOWN included), sets the step's resource
//!   limits (memory, processes, file size; no core dumps), confines the step with Landlock
//!   (writes only to the directories given, TCP connects only to the ports given, no reading of
//!   the paths given as hidden) and sets umask 0022;
//! - it exits as the step did: the same status, or killed by the same signal.
//!
//! It runs on one thread, waiting on the control pipe and on a pidfd of the step with `poll`
//! (a thread more would count against the build user's process limit), and it was started as
//! the build user when the daemon has one, so everything it kills is its own.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// The Landlock ABI this code was written and tested against; newer kernels are asked for no
/// more, older ones give what they have (best effort) unless the mode is `required`.
const TARGET_ABI: ABI = ABI::V7;

/// How strictly Landlock is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockMode {
    Off,
    /// Use what the kernel has; run unconfined where it has nothing.
    BestEffort,
    /// Refuse to run a step that cannot be fully confined.
    Required,
}

impl LandlockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LandlockMode::Off => "off",
            LandlockMode::BestEffort => "best-effort",
            LandlockMode::Required => "required",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(LandlockMode::Off),
            "best-effort" => Some(LandlockMode::BestEffort),
            "required" => Some(LandlockMode::Required),
            _ => None,
        }
    }
}

/// What the supervisor applies to one step; also its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    pub landlock: LandlockMode,
    /// Directories (and files) the step may write beneath; everything else is read-only.
    pub writable: Vec<PathBuf>,
    /// Paths the step may not read (the daemon's credentials and config).
    pub hidden: Vec<PathBuf>,
    /// TCP ports the step may connect to; `None` for any.
    pub tcp_ports: Option<Vec<u16>>,
    /// `RLIMIT_AS` in bytes.
    pub memory: Option<u64>,
    /// `RLIMIT_NPROC`: processes of the step's user.
    pub processes: Option<u64>,
    /// `RLIMIT_FSIZE` in bytes: the largest file the step may write.
    pub file_size: Option<u64>,
    /// Run the step in user, PID and mount namespaces of its own ([`namespace`]), where the
    /// kernel allows it; off only for tests of what happens without them.
    pub namespaces: bool,
}

impl Confinement {
    /// The options of `__supervise`, before `--`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--landlock".into(), self.landlock.as_str().into()];
        for p in &self.writable {
            a.extend(["--write".into(), p.clone().into_os_string()]);
        }
        for p in &self.hidden {
            a.extend(["--hide".into(), p.clone().into_os_string()]);
        }
        match &self.tcp_ports {
            None => a.push("--any-port".into()),
            Some(ports) => {
                for p in ports {
                    a.extend(["--port".into(), p.to_string().into()]);
                }
            }
        }
        if !self.namespaces {
            a.push("--no-namespaces".into());
        }
        for (flag, v) in [
            ("--memory", self.memory),
            ("--processes", self.processes),
            ("--file-size", self.file_size),
        ] {
            if let Some(v) = v {
                a.extend([flag.into(), v.to_string().into()]);
            }
        }
        a
    }

    /// Parses the options of `__supervise`; returns them and the step's command line.
    pub fn from_args(args: &[OsString]) -> Result<(Confinement, Vec<OsString>), String> {
        let mut c = Confinement {
            landlock: LandlockMode::BestEffort,
            writable: Vec::new(),
            hidden: Vec::new(),
            tcp_ports: Some(Vec::new()),
            memory: None,
            processes: None,
            file_size: None,
            namespaces: true,
        };
        let mut it = args.iter();
        let text = |v: Option<&OsString>, flag: &str| {
            v.and_then(|v| v.to_str())
                .map(str::to_owned)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |v: Option<&OsString>, flag: &str| {
            text(v, flag)?
                .parse::<u64>()
                .map_err(|e| format!("{flag}: {e}"))
        };
        while let Some(arg) = it.next() {
            match arg.to_str() {
                Some("--") => return Ok((c, it.cloned().collect())),
                Some("--landlock") => {
                    let v = text(it.next(), "--landlock")?;
                    c.landlock = LandlockMode::parse(&v)
                        .ok_or_else(|| format!("--landlock {v}: off, best-effort or required"))?;
                }
                Some("--write") => c
                    .writable
                    .push(it.next().ok_or("--write needs a path")?.into()),
                Some("--hide") => c
                    .hidden
                    .push(it.next().ok_or("--hide needs a path")?.into()),
                Some("--any-port") => c.tcp_ports = None,
                Some("--no-namespaces") => c.namespaces = false,
                Some("--port") => {
                    let p = number(it.next(), "--port")?;
                    let p = u16::try_from(p).map_err(|_| format!("--port {p}: not a port"))?;
                    c.tcp_ports.get_or_insert_with(Vec::new).push(p);
                }
                Some("--memory") => c.memory = Some(number(it.next(), "--memory")?),
                Some("--processes") => c.processes = Some(number(it.next(), "--processes")?),
                Some("--file-size") => c.file_size = Some(number(it.next(), "--file-size")?),
                _ => return Err(format!("unknown option {arg:?}")),
            }
        }
        Err("no `--` before the step's command".into())
    }
}

/// Exit status of the supervisor when it could not start the step at all (as a shell's 126).
pub const SUPERVISOR_FAILED: i32 = 126;

/// The supervisor's `main`: never returns.
pub fn main(args: &[OsString]) -> ! {
    let fail = |what: String| -> ! {
        eprintln!("packenvd supervisor: {what}");
        std::process::exit(SUPERVISOR_FAILED)
    };
    if args.first().and_then(|a| a.to_str()) == Some("--probe") {
        let status = probe();
        println!("{status}");
        std::process::exit(0);
    }
    let (conf, command) = Confinement::from_args(args).unwrap_or_else(|e| fail(e));
    let Some((program, step_args)) = command.split_first() else {
        fail("no command to run".into())
    };
    // The daemon's end of stdin is the control pipe; keep a private copy of it and give the
    // step /dev/null.
    let control = rustix::io::fcntl_dupfd_cloexec(std::io::stdin().as_fd(), 3)
        .unwrap_or_else(|e| fail(format!("cannot keep the control pipe: {e}")));
    close_inherited_descriptors();
    let entered = conf.namespaces.then(namespace::enter);
    if let Some(Err(e)) = &entered {
        if e.half_way {
            fail(e.why.clone());
        }
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        fail(format!("cannot become a subreaper: {e}"));
    }
    if let Err(e) = set_limits(&conf) {
        fail(e);
    }
    if let Some(Ok(())) = entered {
        match namespace::start_init(&conf, program, step_args) {
            Ok((init, report)) => {
                let status = supervise(init, control);
                // The init's end (or its kill) ended everything in the namespace.
                kill_descendants(init, &mut None);
                let status = match status {
                    WaitStatus::Exited(_, 0) => namespace::read_report(report, init)
                        .unwrap_or(WaitStatus::Signaled(init, Signal::SIGKILL, false)),
                    WaitStatus::Exited(_, code) => namespace::read_report(report, init)
                        .unwrap_or(WaitStatus::Exited(init, code)),
                    other => other,
                };
                exit_like(status)
            }
            Err(e) => fail(e),
        }
    }
    if let Err(e) = strip_privileges() {
        fail(e);
    }
    if let Some(e) = landlock_stage(&conf) {
        fail(e);
    }
    // What a step creates is for other users (the action runners) to read, whatever the
    // daemon's own umask (the unit's is 0077).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let child = match spawn_step(program, step_args) {
        Ok(c) => c,
        Err(code) => std::process::exit(code),
    };
    let child = Pid::from_raw(child.id() as i32);
    let status = supervise(child, control);
    kill_descendants(child, &mut None);
    exit_like(status)
}

/// Leaves the step no way to hold or gain a capability: root's are not granted on exec,
/// every set is emptied (the daemon's CAP_SETUID and friends for a build user included), and
/// no setuid program can raise them again (no_new_privs, even with `landlock = off`).
fn strip_privileges() -> Result<(), String> {
    if rustix::process::geteuid().is_root() {
        lock_out_root().map_err(|e| format!("cannot give up root for the step: {e}"))?;
    }
    drop_capabilities().map_err(|e| format!("cannot drop capabilities: {e}"))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("cannot set no_new_privs: {e}"))
}

/// Applies Landlock as the mode asks; the reason to refuse the step when it cannot.
fn landlock_stage(conf: &Confinement) -> Option<String> {
    if conf.landlock == LandlockMode::Off {
        return None;
    }
    match confine(conf) {
        Ok((RulesetStatus::FullyEnforced, _)) => None,
        Ok((status, _)) if conf.landlock == LandlockMode::Required => Some(format!(
            "Landlock is required but the kernel enforces it only {}",
            describe(status)
        )),
        Ok(_) => None,
        Err(e) => Some(format!("cannot apply Landlock: {e}")),
    }
}

/// Starts the step with /dev/null as stdin; the exit status to end with when it cannot be
/// started (127 when the command does not exist, as a shell says).
fn spawn_step(program: &OsString, args: &[OsString]) -> Result<std::process::Child, i32> {
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                let path = std::env::var("PATH").ok();
                let program = program.to_string_lossy();
                let why = crate::runner::describe_missing(&program, path.as_deref());
                eprintln!("packenvd supervisor: cannot start {program:?}: {why}");
                127
            } else {
                eprintln!("packenvd supervisor: cannot start {program:?}: {e}");
                SUPERVISOR_FAILED
            }
        })
}

/// Makes uid 0 an ordinary uid for this process and everything it starts: no capabilities
/// granted on exec, none kept across a change of uid, and the bits locked (needs
/// CAP_SETPCAP, which root has).
fn lock_out_root() -> std::io::Result<()> {
    use rustix::thread::CapabilitiesSecureBits as B;
    rustix::thread::set_capabilities_secure_bits(
        B::NO_ROOT | B::NO_ROOT_LOCKED | B::NO_SETUID_FIXUP | B::NO_SETUID_FIXUP_LOCKED,
    )
    .map_err(std::io::Error::from)
}

/// Waits for the step to end, or for the daemon to close the control pipe (cancel, timeout,
/// shutdown, death); in that case kills the step and everything it started. One thread: a
/// thread more would count against the build user's process limit, which a fork bomb of
/// another build may have used up.
fn supervise(child: Pid, control: OwnedFd) -> WaitStatus {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let pidfd = rustix::process::Pid::from_raw(child.as_raw())
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let mut control_open = true;
    loop {
        loop {
            match waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                    if pid == child =>
                {
                    return status
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return WaitStatus::Signaled(child, Signal::SIGKILL, false),
            }
        }
        let mut fds = Vec::with_capacity(2);
        if control_open {
            fds.push(PollFd::new(&control, PollFlags::IN));
        }
        if let Some(pidfd) = &pidfd {
            fds.push(PollFd::new(pidfd, PollFlags::IN));
        }
        // Orphans of the step come to us and are reaped on each turn; without a pidfd
        // (kernels before 5.3) the step's end is noticed by polling.
        let timeout = Timespec {
            tv_sec: if pidfd.is_some() { 1 } else { 0 },
            tv_nsec: if pidfd.is_some() { 0 } else { 20_000_000 },
        };
        let _ = poll(&mut fds, Some(&timeout));
        let closed = control_open
            && fds[0]
                .revents()
                .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR);
        if closed {
            let mut buf = [0u8; 64];
            if rustix::io::read(&control, &mut buf).map_or(true, |n| n == 0) {
                control_open = false;
                // The step itself first: a namespace's init takes its whole namespace with it.
                let _ = kill(child, Signal::SIGKILL);
                let mut status = None;
                kill_descendants(child, &mut status);
                if let Some(status) = status {
                    return status;
                }
            }
        }
    }
}

/// Kills every descendant of this process, round after round: a process whose parent dies
/// comes to us (we are a subreaper) and is found in the next round. The status of `main`,
/// if reaped here, goes to `main_status`.
fn kill_descendants(main: Pid, main_status: &mut Option<WaitStatus>) {
    let me = std::process::id() as i32;
    for _ in 0..500 {
        let found = descendants(me);
        if found.is_empty() {
            return;
        }
        for pid in found {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        while let Ok(status) = waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            match status {
                WaitStatus::StillAlive => break,
                WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) if pid == main => {
                    *main_status = Some(status)
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The pids below `root` in the process tree, read from `/proc`.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    let mut seen = HashSet::new();
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(c) {
                out.push(c);
                queue.push(c);
            }
        }
    }
    out
}

/// Ends this process the way the step ended.
fn exit_like(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, sig, _) => {
            reset_disposition(sig);
            let _ = kill(Pid::this(), sig);
            // A signal whose default is not to terminate cannot have ended the step; be sure.
            std::process::exit(128 + sig as i32)
        }
        _ => std::process::exit(SUPERVISOR_FAILED),
    }
}

/// Puts `sig` back to its default action, so that raising it ends this process as it ended
/// the step (Rust ignores SIGPIPE in every program it starts).
#[allow(unsafe_code)]
fn reset_disposition(sig: Signal) {
    if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
        return;
    }
    // SAFETY: SIG_DFL installs no handler; nothing of ours runs on the signal.
    unsafe {
        let _ = nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl);
    }
}

/// Empties every capability set of this process (and so of the step): the ambient set the
/// daemon may carry (CAP_SETUID and friends for a build user) must not reach a step.
fn drop_capabilities() -> std::io::Result<()> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let current = rustix::thread::capabilities(None)?;
    if current.permitted.is_empty() && current.effective.is_empty() {
        return Ok(());
    }
    rustix::thread::clear_ambient_capability_set()?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

/// Marks every descriptor above 2 close-on-exec, so the step inherits only stdin, stdout and
/// stderr whatever the daemon's own parent left open.
pub fn close_inherited_descriptors() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

mod namespace;
mod ruleset;

pub use ruleset::ProbeAnswer;
use ruleset::{confine, describe, probe, set_limits};

#[cfg(test)]
mod tests;
