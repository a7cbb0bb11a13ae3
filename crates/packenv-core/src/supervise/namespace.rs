//! A step's own user, PID and mount namespaces: the box that the step cannot open from inside.
//!
//! Without them the supervisor runs as the step's user in the step's PID namespace, so a step
//! can `kill -9` its supervisor (then whatever it started in a new session is re-parented to
//! init and outlives the build), signal the daemon or another build's step, and connect to a
//! PostgreSQL socket it finds in `/proc/net/unix`. With them:
//!
//! - the supervisor unshares a user namespace (mapping only its own uid and gid, so files keep
//!   their owners and the step gains no right on the host), a PID namespace and a mount
//!   namespace, and forks the namespace's init: this module's [`init`];
//! - the init is PID 1 there: the kernel never delivers a signal to it from inside its
//!   namespace that it has no handler for, `SIGKILL` included, and when it exits (the step
//!   ended) or is killed (the supervisor was told to stop, or died: `PR_SET_PDEATHSIG`) the
//!   kernel kills every process left in the namespace. Nothing a step starts survives it.
//! - processes outside the namespace (the daemon, the supervisor, other builds) have no PID the
//!   step can name: no signal, no ptrace, no `pidfd`; the init mounts a `/proc` of its own;
//! - every PostgreSQL socket the host listens on (read from `/proc/net/unix`, `.s.PGSQL.*`) has
//!   `/dev/null` mounted over it, so a step cannot reach the database through the local socket,
//!   whatever the authentication (peer, trust) would have let it do.
//!
//! Then the init applies Landlock (after mounting: a Landlock domain may not mount) and starts
//! the step. Unprivileged user namespaces must be allowed (they are on current distributions;
//! `sysctl user.max_user_namespaces` > 0, and `kernel.unprivileged_userns_clone` = 1 on
//! Debian's older kernels); where they are not, [`enter`] fails and the supervisor falls back to
//! supervising from the step's own namespace, and says so in its probe.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Why [`enter`] failed, and whether it left this process half inside (unshared but not
/// mapped: no way back, so the step must not run).
#[derive(Debug)]
pub(super) struct NotEntered {
    pub(super) why: String,
    pub(super) half_way: bool,
}

/// Enters new user, PID and mount namespaces (the PID namespace holds the next child). The
/// user namespace maps this process's uid and gid to themselves only. Called before the
/// capabilities are dropped: mapping uid 0 (a supervisor left as root) needs CAP_SETFCAP.
pub(super) fn enter() -> Result<(), NotEntered> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    nix::sched::unshare(
        CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS,
    )
    .map_err(|e| NotEntered {
        why: format!("cannot create user, PID and mount namespaces: {e}"),
        half_way: false,
    })?;
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text).map_err(|e| NotEntered {
            why: format!("cannot write /proc/self/{file}: {e}"),
            half_way: true,
        })
    };
    // An unprivileged process may map a gid only after giving up setgroups(2).
    write("setgroups", "deny".into())?;
    write("uid_map", format!("{uid} {uid} 1\n"))?;
    write("gid_map", format!("{gid} {gid} 1\n"))?;
    Ok(())
}

/// What the init tells the supervisor of the step's end: `E<code>` or `S<signal>`. The init
/// cannot end by the step's signal itself (PID 1 ignores it), so it says it through a pipe.
fn report(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("E{code}"),
        WaitStatus::Signaled(_, sig, _) => format!("S{}", sig as i32),
        _ => format!("E{}", super::SUPERVISOR_FAILED),
    }
}

/// Reads the init's report; `None` when it said nothing (it was killed).
pub(super) fn read_report(from: OwnedFd, init: Pid) -> Option<WaitStatus> {
    let mut buf = [0u8; 16];
    let n = rustix::io::read(&from, &mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let (kind, value) = text.split_at_checked(1)?;
    let value: i32 = value.trim().parse().ok()?;
    match kind {
        "E" => Some(WaitStatus::Exited(init, value)),
        "S" => Some(WaitStatus::Signaled(
            init,
            Signal::try_from(value).ok()?,
            false,
        )),
        _ => None,
    }
}

/// The PostgreSQL sockets this host listens on, from `/proc/net/unix` (the last column is the
/// path of a bound socket).
pub(super) fn postgres_sockets() -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| {
            p.starts_with('/')
                && p.rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with(".s.PGSQL."))
        })
        .map(PathBuf::from)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The namespace's PID 1: mounts what the step must not reach, confines itself, starts the
/// step, reaps every orphan, and reports how the step ended through `report_to`. Its exit
/// takes everything left in the namespace with it.
pub(super) fn init(
    conf: &super::Confinement,
    program: &OsString,
    args: &[OsString],
    report_to: OwnedFd,
) -> ! {
    let fail = |what: String| -> ! {
        eprintln!("packenvd supervisor: {what}");
        let _ = rustix::io::write(
            &report_to,
            format!("E{}", super::SUPERVISOR_FAILED).as_bytes(),
        );
        std::process::exit(super::SUPERVISOR_FAILED)
    };
    // The supervisor is our only way back to the daemon: without it, end the namespace.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        fail(format!("cannot set the parent-death signal: {e}"));
    }
    // A session and process group of the namespace's own: `kill(0, ...)` from a step would
    // otherwise reach the supervisor, whose group it shared, across the namespace boundary.
    if let Err(e) = nix::unistd::setsid() {
        fail(format!("cannot start a session: {e}"));
    }
    if let Err(e) = seal_mounts().and_then(|()| super::strip_privileges()) {
        fail(e);
    }
    if let Some(status) = super::landlock_stage(conf) {
        fail(status);
    }
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let child = match super::spawn_step(program, args) {
        Ok(c) => c,
        Err(code) => {
            let _ = rustix::io::write(&report_to, format!("E{code}").as_bytes());
            std::process::exit(code)
        }
    };
    let step = Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(None, None) {
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                if pid == step =>
            {
                let _ = rustix::io::write(&report_to, report(status).as_bytes());
                // Exiting as PID 1 kills whatever the step left in the namespace.
                std::process::exit(0)
            }
            Err(nix::errno::Errno::ECHILD) => {
                let _ = rustix::io::write(&report_to, b"E126");
                std::process::exit(0)
            }
            _ => {}
        }
    }
}

/// In the step's mount namespace: nothing propagates back to the host, every PostgreSQL socket
/// is covered, and `/proc` shows only the namespace's processes. A `/proc` the kernel refuses
/// to mount (a host whose own is partly covered) leaves the host's: its other processes are
/// listed but cannot be signalled or traced from here.
fn seal_mounts() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    // A mount namespace below the supervisor's: the supervisor keeps the host's `/proc`, where
    // it finds (and kills) this init by its host pid.
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot create the step's mount namespace: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the step's mounts private: {e}"))?;
    for socket in postgres_sockets() {
        // Only the socket files themselves: their directory (often /tmp) may hold the build.
        if let Err(e) = mount(
            Some("/dev/null"),
            &socket,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            // A socket we cannot cover must not stay reachable: refuse to run the step. One we
            // cannot even look up (gone, or in a directory we may not search) the step, with
            // fewer rights than ours, cannot reach either.
            use nix::errno::Errno;
            if !matches!(e, Errno::ENOENT | Errno::EACCES | Errno::ENOTDIR) {
                return Err(format!(
                    "cannot cover the database socket {}: {e}",
                    socket.display()
                ));
            }
        }
    }
    let _ = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    );
    Ok(())
}

/// Forks the namespace's init (the first process of the new PID namespace) and returns its
/// pid and the read end of its report pipe.
#[allow(unsafe_code)]
pub(super) fn start_init(
    conf: &super::Confinement,
    program: &OsString,
    args: &[OsString],
) -> Result<(Pid, OwnedFd), String> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: the supervisor is single-threaded (it starts no thread before this point), so
    // the child may run any code after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read);
            init(conf, program, args, write)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(write);
            Ok((child, read))
        }
        Err(e) => Err(format!("cannot start the namespace's init: {e}")),
    }
}

/// Whether this kernel lets the supervisor's user create the namespaces, asked in a throwaway
/// child so the caller stays where it is.
#[allow(unsafe_code)]
pub(super) fn probe() -> Result<(), String> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: the probing supervisor is single-threaded.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read);
            let answer = match enter() {
                Ok(()) => "ok".to_string(),
                Err(e) => e.why,
            };
            let _ = rustix::io::write(&write, answer.as_bytes());
            std::process::exit(0)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(write);
            let mut answer = Vec::new();
            let mut buf = [0u8; 512];
            while let Ok(n) = rustix::io::read(read.as_fd(), &mut buf) {
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            let _ = waitpid(child, None);
            match String::from_utf8_lossy(&answer).as_ref() {
                "ok" => Ok(()),
                "" => Err("the probe died".into()),
                e => Err(e.to_owned()),
            }
        }
        Err(e) => Err(format!("cannot fork: {e}")),
    }
}
