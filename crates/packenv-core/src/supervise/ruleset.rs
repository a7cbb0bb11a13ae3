//! What confines a supervised step: its resource limits, and Landlock (probing what the
//! kernel enforces, and the ruleset that keeps a step to its build directory and its reads).

use super::*;

/// Sets the step's limits. prlimit64 (what rustix calls) and not setrlimit: the unit's system
/// call filter denies the `@resources` group, which holds setrlimit but not prlimit64.
pub(super) fn set_limits(conf: &Confinement) -> Result<(), String> {
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

pub(super) fn describe(status: RulesetStatus) -> &'static str {
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
pub(super) fn probe() -> String {
    let conf = Confinement {
        landlock: LandlockMode::BestEffort,
        writable: vec![std::env::temp_dir()],
        hidden: Vec::new(),
        tcp_ports: Some(vec![443]),
        memory: None,
        processes: None,
        file_size: None,
        namespaces: true,
    };
    // Before Landlock: the namespace probe writes its uid map under /proc.
    let namespaces = match super::namespace::probe() {
        Ok(()) => "namespaces ok".to_string(),
        Err(e) => format!("namespaces unavailable: {e}"),
    };
    match confine(&conf) {
        Ok((s, abi)) => format!("landlock {} enforced\nabi {abi}\n{namespaces}", describe(s)),
        Err(e) => format!("landlock unavailable: {e}\nabi 0\n{namespaces}"),
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
    /// Whether steps get namespaces of their own: `Ok`, or why not; `Err` too from a
    /// supervisor that does not say.
    pub namespaces: Result<(), String>,
}

impl ProbeAnswer {
    pub fn parse(out: &str) -> ProbeAnswer {
        let mut lines = out.lines().map(str::trim);
        let status = lines.next().unwrap_or_default().to_owned();
        let rest: Vec<&str> = lines.collect();
        ProbeAnswer {
            status,
            abi: rest
                .iter()
                .find_map(|l| l.strip_prefix("abi ")?.parse().ok()),
            namespaces: match rest.iter().find_map(|l| l.strip_prefix("namespaces ")) {
                Some("ok") => Ok(()),
                Some(why) => Err(why.trim_start_matches("unavailable: ").to_owned()),
                None => Err("the supervisor does not create them (an older binary)".into()),
            },
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
        if abi < 6 {
            missing.push(
                "they may signal processes of their user outside their build and connect to abstract unix sockets (ABI 6, Linux 6.12)",
            );
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
pub(super) fn confine(conf: &Confinement) -> Result<(RulesetStatus, u32), String> {
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
    // Scoped: no signal to a process outside this step's domain (the daemon, other builds,
    // other users' processes of the same uid), no connect to an abstract socket made outside.
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled)
        .map_err(|e| err(&e))?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
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
pub(super) fn readable_except(
    hidden: &[PathBuf],
    abi: ABI,
) -> Vec<(PathBuf, landlock::BitFlags<AccessFs>)> {
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

pub(super) fn make_bitflags_read_dir() -> landlock::BitFlags<AccessFs> {
    AccessFs::ReadDir.into()
}
