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
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
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
    // A step never holds a capability, whatever the daemon was given to switch users.
    if let Err(e) = drop_capabilities() {
        fail(format!("cannot drop capabilities: {e}"));
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        fail(format!("cannot become a subreaper: {e}"));
    }
    if let Err(e) = set_limits(&conf) {
        fail(e);
    }
    if conf.landlock != LandlockMode::Off {
        match confine(&conf) {
            Ok((RulesetStatus::FullyEnforced, _)) => {}
            Ok((status, _)) if conf.landlock == LandlockMode::Required => fail(format!(
                "Landlock is required but the kernel enforces it only {}",
                describe(status)
            )),
            Ok(_) => {}
            Err(e) => fail(format!("cannot apply Landlock: {e}")),
        }
    }
    // What a step creates is for other users (the action runners) to read, whatever the
    // daemon's own umask (the unit's is 0077).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let child = match Command::new(program)
        .args(step_args)
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            std::process::exit(if e.kind() == std::io::ErrorKind::NotFound {
                let path = std::env::var("PATH").ok();
                let program = program.to_string_lossy();
                let why = crate::runner::describe_missing(&program, path.as_deref());
                eprintln!("packenvd supervisor: cannot start {program:?}: {why}");
                127
            } else {
                eprintln!("packenvd supervisor: cannot start {program:?}: {e}");
                SUPERVISOR_FAILED
            });
        }
    };
    let child = Pid::from_raw(child.id() as i32);
    let status = supervise(child, control);
    kill_descendants(child, &mut None);
    exit_like(status)
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

/// Sets the step's limits. prlimit64 (what rustix calls) and not setrlimit: the unit's system
/// call filter denies the `@resources` group, which holds setrlimit but not prlimit64.
fn set_limits(conf: &Confinement) -> Result<(), String> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let set = |r: Resource, v: u64, what: &str| {
        setrlimit(
            r,
            Rlimit {
                current: Some(v),
                maximum: Some(v),
            },
        )
        .map_err(|e| format!("cannot limit {what} to {v}: {e}"))
    };
    set(Resource::Core, 0, "core dumps")?;
    if let Some(v) = conf.memory {
        set(Resource::As, v, "memory")?;
    }
    if let Some(v) = conf.processes {
        set(Resource::Nproc, v, "processes")?;
    }
    if let Some(v) = conf.file_size {
        set(Resource::Fsize, v, "file size")?;
    }
    Ok(())
}

fn describe(status: RulesetStatus) -> &'static str {
    match status {
        RulesetStatus::FullyEnforced => "fully",
        RulesetStatus::PartiallyEnforced => "partially",
        RulesetStatus::NotEnforced => "not at all",
    }
}

/// What Landlock enforces on this kernel for a step's ruleset ("landlock fully enforced",
/// "partially enforced", "not enforced" or "unavailable: ..."), and on a second line the ABI
/// the kernel offers (`abi 4`; 0 without Landlock). Run in a throwaway process (it confines
/// the caller); [`ProbeAnswer::parse`] reads it.
fn probe() -> String {
    let conf = Confinement {
        landlock: LandlockMode::BestEffort,
        writable: vec![std::env::temp_dir()],
        hidden: Vec::new(),
        tcp_ports: Some(vec![443]),
        memory: None,
        processes: None,
        file_size: None,
    };
    match confine(&conf) {
        Ok((s, abi)) => format!("landlock {} enforced\nabi {abi}", describe(s)),
        Err(e) => format!("landlock unavailable: {e}\nabi 0"),
    }
}

/// The supervisor's answer to `--probe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// E.g. "landlock partially enforced".
    pub status: String,
    /// The Landlock ABI of the kernel, 0 without Landlock; `None` from a supervisor that does
    /// not say (an older binary set as `step_supervisor`).
    pub abi: Option<u32>,
}

impl ProbeAnswer {
    pub fn parse(out: &str) -> ProbeAnswer {
        let mut lines = out.lines().map(str::trim);
        ProbeAnswer {
            status: lines.next().unwrap_or_default().to_owned(),
            abi: lines.find_map(|l| l.strip_prefix("abi ")?.parse().ok()),
        }
    }

    pub fn fully_enforced(&self) -> bool {
        self.status.contains("fully enforced")
    }

    /// What steps are still kept from, and what they are not, when Landlock is not fully
    /// enforced; `ports` says whether `step_tcp_ports` limits connections at all. Empty when
    /// it is fully enforced.
    pub fn shortfall(&self, ports: bool) -> String {
        if self.fully_enforced() {
            return String::new();
        }
        let abi = match self.abi {
            Some(abi) if abi >= 1 && self.status.contains("partially enforced") => abi,
            Some(_) => {
                return "steps are not confined at all: they may write wherever the user may, read the hidden paths, and connect to any port (Landlock needs Linux 5.13+ with landlock in the lsm= boot parameter)".into()
            }
            None => {
                return "steps are not fully confined to their directories and ports (all of it needs Landlock ABI 5, Linux 6.10+)".into()
            }
        };
        let mut missing = Vec::new();
        if abi < 3 {
            missing.push("they may truncate any file the user may write (ABI 3, Linux 6.2)");
        }
        if abi < 4 && ports {
            missing.push("their TCP connects are not limited to step_tcp_ports (ABI 4, Linux 6.7)");
        }
        if abi < 5 {
            missing.push("their ioctls on devices are not restricted (ABI 5, Linux 6.10)");
        }
        format!(
            "ABI {abi}: steps still write only to their build, cache and tmp and cannot read the hidden paths{}, but {}",
            if abi >= 4 && ports { ", and connect only to step_tcp_ports" } else { "" },
            missing.join("; ")
        )
    }
}

/// Confines this process (and so the step it starts) with Landlock; returns how much of the
/// ruleset the kernel enforces and the Landlock ABI it offers (0 without Landlock).
fn confine(conf: &Confinement) -> Result<(RulesetStatus, u32), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let abi = TARGET_ABI;
    // Only what exists can be hidden; with nothing to hide, reads are not restricted at all.
    let hidden: Vec<PathBuf> = conf
        .hidden
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let mut handled = AccessFs::from_write(abi);
    if !hidden.is_empty() {
        handled |= AccessFs::from_read(abi);
    }
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled)
        .map_err(|e| err(&e))?;
    if conf.tcp_ports.is_some() {
        ruleset = ruleset
            .handle_access(AccessNet::ConnectTcp)
            .map_err(|e| err(&e))?;
    }
    let mut wanted: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = conf
        .writable
        .iter()
        .map(|p| (p.clone(), AccessFs::from_all(abi)))
        .collect();
    wanted.push(("/dev/null".into(), AccessFs::from_all(abi)));
    if !hidden.is_empty() {
        wanted.extend(readable_except(&hidden, abi));
    }
    let mut created = ruleset.create().map_err(|e| err(&e))?;
    for (path, access) in wanted {
        // A path that does not exist needs no rule.
        let Ok(fd) = PathFd::new(&path) else {
            continue;
        };
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        created = created
            .add_rule(PathBeneath::new(fd, access & handled))
            .map_err(|e| err(&e))?;
    }
    if let Some(ports) = &conf.tcp_ports {
        for &port in ports {
            created = created
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(|e| err(&e))?;
        }
    }
    let status = created.restrict_self().map_err(|e| err(&e))?;
    let abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => kernel_abi.map_or(effective_abi as u32, |v| u32::try_from(v).unwrap_or(0)),
        _ => 0,
    };
    Ok((status.ruleset, abi))
}

/// Read rules for the whole file system but the `hidden` paths: at each directory on the way
/// to a hidden path, every sibling gets read access beneath it, and the directory itself only
/// its listing. A symlink that leads to a hidden path, or above one, gets nothing.
fn readable_except(hidden: &[PathBuf], abi: ABI) -> Vec<(PathBuf, landlock::BitFlags<AccessFs>)> {
    let hidden: HashSet<PathBuf> = hidden
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let mut above: HashSet<PathBuf> = HashSet::new();
    for h in &hidden {
        let mut p = h.as_path();
        while let Some(parent) = p.parent() {
            above.insert(parent.to_owned());
            p = parent;
        }
    }
    let touches_hidden = |p: &Path| {
        std::fs::canonicalize(p)
            .is_ok_and(|real| above.contains(&real) || hidden.iter().any(|h| real.starts_with(h)))
    };
    let mut rules = Vec::new();
    let mut dirs: Vec<PathBuf> = above.iter().cloned().collect();
    dirs.sort();
    for dir in dirs {
        rules.push((dir.clone(), make_bitflags_read_dir()));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if hidden.contains(&path) || above.contains(&path) || touches_hidden(&path) {
                continue;
            }
            rules.push((path, AccessFs::from_read(abi)));
        }
    }
    rules
}

fn make_bitflags_read_dir() -> landlock::BitFlags<AccessFs> {
    AccessFs::ReadDir.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_through_the_command_line() {
        let c = Confinement {
            landlock: LandlockMode::Required,
            writable: vec!["/envs/p/.python-1".into(), "/cache/python".into()],
            hidden: vec!["/etc/packenvd".into()],
            tcp_ports: Some(vec![80, 443]),
            memory: Some(1 << 30),
            processes: None,
            file_size: Some(1 << 20),
        };
        let mut args = c.to_args();
        args.extend(["--".into(), "pip".into(), "install".into()]);
        let (parsed, command) = Confinement::from_args(&args).unwrap();
        assert_eq!(parsed, c);
        assert_eq!(command, [OsString::from("pip"), OsString::from("install")]);
        assert!(Confinement::from_args(&["--bogus".into()]).is_err());
        assert!(Confinement::from_args(&["--port".into(), "70000".into(), "--".into()]).is_err());
    }

    #[test]
    fn a_partial_landlock_warning_names_exactly_what_the_kernels_abi_lacks() {
        let at = |abi: u32| ProbeAnswer::parse(&format!("landlock partially enforced\nabi {abi}"));
        let v1 = at(1).shortfall(true);
        assert!(
            v1.starts_with("ABI 1: steps still write only to their build"),
            "{v1}"
        );
        for lacks in ["truncate", "TCP connects", "ioctls on devices"] {
            assert!(v1.contains(lacks), "{v1}");
        }
        let v3 = at(3).shortfall(true);
        assert!(
            !v3.contains("truncate") && v3.contains("TCP connects"),
            "{v3}"
        );
        assert!(v3.contains("ioctls on devices"), "{v3}");
        let v4 = at(4).shortfall(true);
        assert_eq!(
            v4,
            "ABI 4: steps still write only to their build, cache and tmp and cannot read the \
             hidden paths, and connect only to step_tcp_ports, but their ioctls on devices are \
             not restricted (ABI 5, Linux 6.10)"
        );
        let v3_any_port = at(3).shortfall(false);
        assert!(
            !v3_any_port.contains("TCP"),
            "no ports are asked for: {v3_any_port}"
        );

        let full = ProbeAnswer::parse("landlock fully enforced\nabi 7\n");
        assert_eq!(
            (full.fully_enforced(), full.shortfall(true)),
            (true, String::new())
        );
        let none = ProbeAnswer::parse("landlock not enforced\nabi 0").shortfall(true);
        assert!(none.starts_with("steps are not confined at all"), "{none}");
        let unavailable = ProbeAnswer::parse("landlock unavailable: x\nabi 0");
        assert_eq!(unavailable.status, "landlock unavailable: x");
        assert!(unavailable.shortfall(true).contains("not confined at all"));
        let old_supervisor = ProbeAnswer::parse("landlock partially enforced");
        assert_eq!(old_supervisor.abi, None);
        assert!(old_supervisor.shortfall(true).contains("ABI 5"));
    }

    #[test]
    fn descendants_are_found_through_the_process_tree() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mine = descendants(std::process::id() as i32);
        assert!(mine.contains(&(child.id() as i32)), "{mine:?}");
        // Only the shell's own tree: other tests of this process have children too.
        let below = descendants(child.id() as i32);
        assert_eq!(below.len(), 1, "the sleep below the shell: {below:?}");
        for p in below {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
