//! What the daemon does to itself so that the code it runs cannot reach its secrets (DESIGN §6):
//! it is not dumpable (no other process of its user may read its memory or
//! `/proc/<pid>/environ`), it passes on no descriptor it inherited, and once the
//! configuration is read it keeps no secret in its environment.

/// Makes this process non-dumpable and every inherited descriptor above 2 close-on-exec.
/// Returns what could not be done, as warnings to log once logging is set up.
pub fn harden_process() -> Vec<String> {
    let mut warnings = Vec::new();
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warnings.push(format!(
            "cannot make the process non-dumpable ({e}): processes of this user could read its memory"
        ));
    }
    packenv_core::supervise::close_inherited_descriptors();
    warnings
}

/// Variables that hold database credentials: removed from this process's environment once the
/// configuration is loaded, so nothing started later can inherit them by mistake.
pub const SECRET_VARS: &[&str] = &["DATABASE_URL", "PACKENVD_DATABASE_URL", "PGPASSWORD"];

/// What [`forget_secrets`] took out of the environment that the database library would have
/// read from it when it connects. Of the variables sqlx's `PgConnectOptions` reads (`PGHOST`,
/// `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`,
/// `PGSSLCERT`, `PGSSLKEY`, `PGAPPNAME`, `PGOPTIONS`, `PGPASSFILE`), only `PGPASSWORD` holds a
/// secret, so only it is scrubbed and kept here.
#[derive(Debug, Default, Clone)]
pub struct Forgotten {
    /// `PGPASSWORD`: the password when the URL has none (before `~/.pgpass`, as in libpq).
    pub pg_password: Option<crate::config::Secret>,
}

/// Removes [`SECRET_VARS`] from the environment and returns what the database connection
/// still needs of them. Call it before any other thread starts.
pub fn forget_secrets() -> Forgotten {
    let pg_password = std::env::var("PGPASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(crate::config::Secret::new);
    for var in SECRET_VARS {
        std::env::remove_var(var);
    }
    Forgotten { pg_password }
}

/// Whether this process is dumpable (false once [`harden_process`] ran).
pub fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(true)
}

/// What a daemon with a build user needs, as the errors that refuse to start without it say.
const BUILD_USER_NEEDS: &str =
    "it needs CAP_SETUID, CAP_SETGID and CAP_CHOWN (see deploy/packenvd.service)";

/// Gives a scratch file in `tmp_root` to the build user and takes it back, as every build
/// does with its directories (CAP_CHOWN): a daemon that cannot would fail every build and
/// every check, so it is found out before the first.
fn can_give_files(tmp_root: &std::path::Path, uid: u32, gid: u32) -> Result<(), String> {
    use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid};
    let cannot = |what: &str, e: &dyn std::fmt::Display| {
        format!("cannot {what} {}: {e}", tmp_root.display())
    };
    std::fs::create_dir_all(tmp_root).map_err(|e| cannot("create", &e))?;
    let root = rustix::fs::open(
        tmp_root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| cannot("open", &e))?;
    let name = format!(".chown-check-{}", std::process::id());
    let _ = rustix::fs::unlinkat(&root, name.as_str(), AtFlags::empty());
    let file = rustix::fs::openat(
        &root,
        name.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| cannot("create a file in", &e))?;
    let me = (rustix::process::geteuid(), rustix::process::getegid());
    let given = rustix::fs::fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .and_then(|()| rustix::fs::fchown(&file, Some(me.0), Some(me.1)));
    let _ = rustix::fs::unlinkat(&root, name.as_str(), AtFlags::empty());
    given.map_err(|e| {
        format!("build_user is set, but this daemon may not give files to it (chown: {e}): {BUILD_USER_NEEDS}")
    })
}

/// Why a step could open a TCP connection to the daemon's database, if it could: the local
/// socket is covered in every step's namespace, but a TCP port is closed to steps only by
/// Landlock (ABI 4) and only when `step_tcp_ports` leaves it out.
fn database_reachable_over_tcp(
    settings: &crate::config::Settings,
    sandbox: &packenv_core::target::SandboxConfig,
    abi: Option<u32>,
) -> Option<String> {
    let options: sqlx::postgres::PgConnectOptions = settings.database_url.expose().parse().ok()?;
    if options.get_socket().is_some() {
        return None;
    }
    let (host, port) = (options.get_host(), options.get_port());
    let why = if sandbox.landlock == packenv_core::supervise::LandlockMode::Off
        || abi.is_some_and(|a| a < 4)
    {
        "Landlock does not limit their TCP connects here"
    } else if sandbox.tcp_ports.as_ref().is_none_or(|p| p.contains(&port)) {
        "step_tcp_ports lets them"
    } else {
        return None;
    };
    Some(format!(
        "steps may connect to the database at {host}:{port} over TCP ({why}): only its password keeps them out; connect through the local socket, which steps cannot reach, or keep port {port} out of step_tcp_ports"
    ))
}

/// What protects the host from the steps of this daemon, found out at start-up.
#[derive(Debug, Clone)]
pub struct Protections {
    /// One line per protection, e.g. "landlock fully enforced".
    pub active: Vec<String>,
    /// What is missing and what that means.
    pub missing: Vec<String>,
}

impl Protections {
    /// Checks each protection the settings ask for; an error when one that is required is
    /// not available (Landlock with `landlock = "required"`, a build user the daemon cannot
    /// switch to or give files to). `packenvd verify` asks the same before it checks anything.
    pub async fn detect(settings: &crate::config::Settings) -> Result<Protections, String> {
        let mut p = Protections {
            active: Vec::new(),
            missing: Vec::new(),
        };
        if is_dumpable() {
            p.missing
                .push("the daemon is dumpable: processes of its user can read its memory".into());
        } else {
            p.active.push("the daemon is not dumpable".into());
        }
        let Some(sandbox) = settings.sandbox_config() else {
            p.missing.push(
                "steps run unsupervised (step_supervisor): what they leave behind survives them, and no limit or Landlock applies"
                    .into(),
            );
            return Ok(p);
        };
        let mut probe = tokio::process::Command::new(&sandbox.supervisor[0]);
        probe
            .args(&sandbox.supervisor[1..])
            .arg("--probe")
            .env_clear()
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some((uid, gid)) = sandbox.user {
            probe.uid(uid).gid(gid);
        }
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), probe.output()).await;
        let out = match answer {
            Ok(Ok(out)) if out.status.success() => out,
            Ok(Ok(out)) => {
                return Err(format!(
                    "the step supervisor {:?} failed: {}",
                    sandbox.supervisor[0],
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Ok(Err(e))
                if sandbox.user.is_some() && e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return Err(format!(
                    "cannot start the step supervisor {:?} as the build user ({e}): either this daemon may not switch to that user ({BUILD_USER_NEEDS}), or that user cannot reach the program (every directory on its path must be searchable by it; install packenvd where every user can run it, e.g. /usr/local/bin, or set step_supervisor to such a copy)",
                    sandbox.supervisor[0]
                ))
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot start the step supervisor {:?}: {e}",
                    sandbox.supervisor[0]
                ))
            }
            Err(_) => return Err("the step supervisor did not answer within 10 s".into()),
        };
        if let Some((uid, gid)) = sandbox.user {
            let tmp_root = settings.build_config().tmp_root();
            packenv_core::blocking(move || can_give_files(&tmp_root, uid, gid)).await?;
        }
        let probed =
            packenv_core::supervise::ProbeAnswer::parse(&String::from_utf8_lossy(&out.stdout));
        let landlock = &probed.status;
        p.active.push(format!(
            "steps supervised by {} (every process a step starts dies with it)",
            sandbox.supervisor[0].to_string_lossy()
        ));
        let limit = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |v| v.to_string());
        p.active.push(format!(
            "step limits: address space {} bytes, {} processes, files of {} bytes",
            limit(sandbox.memory),
            limit(sandbox.processes),
            limit(sandbox.file_size)
        ));
        match (&settings.build_user, settings.step_user()) {
            (Some(u), _) => p
                .active
                .push(format!("steps run as build user {} (uid {})", u.name, u.uid)),
            (None, Some(u)) => p.active.push(format!(
                "steps run as uid {} ({}), packenvd's choice: the daemon is root and no build_user is set, and steps never run as root",
                u.uid, u.name
            )),
            (None, None) => p.missing.push(
                "no build_user: steps run as the daemon's user, so only Landlock and their namespaces keep them from its files; concurrent builds share one identity"
                    .into(),
            ),
        }
        match &probed.namespaces {
            Ok(()) => p.active.push(
                "steps run in user, PID and mount namespaces of their own: they cannot kill their supervisor, outlive their build, signal or trace the daemon or other builds, or reach a PostgreSQL socket"
                    .into(),
            ),
            Err(why) => p.missing.push(format!(
                "no namespaces for steps ({why}): a step can kill its supervisor and leave processes behind, and can reach PostgreSQL's local socket (enable unprivileged user namespaces: sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone)"
            )),
        }
        use packenv_core::supervise::LandlockMode;
        let shortfall = probed.shortfall(sandbox.tcp_ports.is_some());
        match (sandbox.landlock, probed.fully_enforced()) {
            (LandlockMode::Off, _) => p.missing.push(
                "landlock = off: steps may write wherever their user may (other builds of the same user, the cache of every runtime), read the daemon's config and credentials, connect to any port (the database's too), and signal processes of their user"
                    .into(),
            ),
            (_, true) => p.active.push(format!(
                "{landlock}: steps write only to their build, cache and tmp; TCP connects only to ports {}",
                sandbox
                    .tcp_ports
                    .as_ref()
                    .map_or_else(|| "(any)".to_string(), |v| format!("{v:?}"))
            )),
            (LandlockMode::Required, false) => {
                return Err(format!(
                    "landlock = \"required\", but on this kernel: {landlock} ({shortfall})"
                ))
            }
            (LandlockMode::BestEffort, false) => p.missing.push(format!("{landlock}: {shortfall}")),
        }
        if let Some(why) = database_reachable_over_tcp(settings, &sandbox, probed.abi) {
            p.missing.push(why);
        }
        Ok(p)
    }

    /// Logs one line saying what is active, and a warning for each missing protection.
    pub fn log(&self) {
        tracing::info!(protections = %self.active.join("; "), "protections");
        for m in &self.missing {
            tracing::warn!("protection missing: {m}");
        }
    }
}
