//! One typed [`Settings`], layered: built-in defaults < the TOML file < `PACKENVD_*` (and
//! `DATABASE_URL`) environment variables < command-line flags.
//!
//! Every setting is declared once, in the `settings!` block below: its type, its default,
//! whether SIGHUP applies it, its bounds, and its help text (the doc comment). The struct, the
//! list of file keys, the environment variables, the flags of `packenvd run`, the reload rule
//! and the `check-config` output all come from that declaration. Each value is parsed and
//! checked here, once, and an error names the key and where the bad value came from.

mod flags;
mod layers;
mod value;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use flags::SettingFlags;
use layers::Resolver;
pub use layers::{closest_key, Layers, Loaded, Source};
pub use value::{
    between, has_password, mask_url, within, BuildUser, Limit, Ports, Secret, SettingValue,
};

use packenv_core::probe::DEFAULT_PASSTHROUGH;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/packenvd/packenvd.toml";

/// Whether a running daemon applies a new value on SIGHUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied on SIGHUP; builds already running keep the value they started with.
    Live,
    /// Read at start only; a changed value is reported as needing a restart.
    Restart,
}

/// One setting as declared: its name, help text and reload rule.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    /// The declaration's doc comment.
    pub help: &'static str,
    pub reload: Reload,
}

impl Key {
    /// The environment variable that sets it.
    pub fn env_var(&self) -> String {
        if self.name == "database_url" {
            "DATABASE_URL".into()
        } else {
            format!("PACKENVD_{}", self.name.to_uppercase())
        }
    }

    /// The flag of `packenvd run` that sets it, without the leading dashes.
    pub fn flag(&self) -> String {
        self.name.replace('_', "-")
    }

    /// The help text as one line per sentence, without the doc comment's leading spaces.
    pub fn help_text(&self) -> String {
        self.help
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_owned()
    }
}

/// Declares the settings. Each entry: doc comment (the help text), `name: Type = default;`,
/// `Live` or `Restart`, and a check of the parsed value.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident : $ty:ty = $default:expr ; $reload:ident ; $check:expr ;
    )*) => {
        /// packenvd's checked configuration (see the module documentation).
        #[derive(Debug, Clone)]
        pub struct Settings {
            $( $(#[doc = $doc])+ pub $key: $ty, )*
            /// The config file these settings were read from, absolute; not a setting. Steps
            /// may not read it ([`Settings::hidden_paths`]), whatever `step_hidden` says, and
            /// a reload keeps it: the daemon reads the same file again.
            pub config_file: Option<PathBuf>,
        }

        /// Every setting, in declaration order.
        pub const KEYS: &[Key] = &[$(
            Key { name: stringify!($key), help: concat!($($doc, "\n"),+), reload: Reload::$reload },
        )*];

        impl Settings {
            fn resolve(r: &mut Resolver) -> Result<Settings, ConfigError> {
                Ok(Settings { $(
                    $key: r.get::<$ty>(stringify!($key), || $default, $check)?,
                )* config_file: None })
            }

            /// Every setting's value as the config file would hold it.
            pub fn values(&self) -> Vec<(&'static str, toml::Value)> {
                vec![$( (stringify!($key), self.$key.to_toml()), )*]
            }

            /// The settings a reload leads to: the live keys of `new`, the rest of `self`; and
            /// what changed.
            pub fn reloaded(&self, new: &Settings) -> (Settings, Vec<Change>) {
                let mut changes = Vec::new();
                let merged = Settings { $(
                    $key: pick(stringify!($key), Reload::$reload, &self.$key, &new.$key, &mut changes),
                )* config_file: self.config_file.clone() };
                (merged, changes)
            }
        }
    };
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn default_instance_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

fn ok<T>(_: &T) -> Result<(), String> {
    Ok(())
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

/// The user a daemon running as root without `build_user` runs its steps as, when the host has
/// it (the unit's and the package's build user).
pub const ROOTS_BUILD_USER: &str = "packenvd-build";
/// Otherwise this uid and gid, which no account should use: a root daemon never runs a step as
/// root, and picks an id of its own rather than `nobody`, which other services share (and
/// whose processes a step could then signal).
pub const ROOTS_BUILD_ID: u32 = 64900;

settings! {
    /// Where the queue lives: a postgres:// URL. Never logged; masked wherever it is printed.
    /// Prefer database_url_file (or a password in PGPASSFILE): a URL in the environment is
    /// readable wherever the daemon's environment is.
    database_url: Secret = Secret::default(); Restart; ok;
    /// A file holding the database URL, read once at start (mode 0600, or a systemd
    /// credential). Default: $CREDENTIALS_DIRECTORY/database_url when systemd provides one.
    database_url_file: Option<PathBuf> = None; Restart; ok;
    /// Every environment and build is created under this directory, and nowhere else.
    envs_root: PathBuf = PathBuf::from("/var/lib/packenvd/envs"); Restart; not_root;
    /// Where a pack lives when its pack.storage_path is NULL: <packs_dir>/<ref>.
    packs_dir: PathBuf = PathBuf::from("/var/lib/packenvd/packs"); Restart; ok;
    /// Shared download caches (pip, npm, uv), one subdirectory per runtime.
    cache_dir: PathBuf = PathBuf::from("/var/cache/packenvd"); Restart; ok;
    /// Builds at once; a claim never takes more rows than there are free slots. Default: the
    /// number of CPUs.
    concurrency: usize = cpus(); Live; |n| within(*n, 1, 1024);
    /// Fallback claim interval when no NOTIFY arrives (lost connection, missed wake-up).
    poll_interval: Duration = Duration::from_secs(5); Live; |d| between(d, Duration::from_millis(50), HOUR);
    /// Default limit of one installer step; a step's own "timeout" overrides it.
    step_timeout: Duration = Duration::from_secs(15 * 60); Live; |d| between(d, SECOND, 7 * DAY);
    /// How long a claim stays valid without a heartbeat; heartbeats run every third of it.
    lease: Duration = Duration::from_secs(60); Restart; |d| between(d, 3 * SECOND, DAY);
    /// Tries of a build that fails for a retryable reason (network, timeout) before `failed`.
    max_attempts: u32 = 3; Live; |n| within(*n, 1, 100);
    /// First wait before a retry; doubled on every further attempt, with +/-25 % jitter.
    retry_backoff: Duration = Duration::from_secs(10); Live; |d| between(d, Duration::from_millis(10), DAY);
    /// On SIGTERM, running builds get this long to finish before they are killed and handed back.
    shutdown_grace: Duration = Duration::from_secs(30); Live; |d| between(d, Duration::ZERO, HOUR);
    /// Bytes of installer output kept per build in install_log (head and tail).
    log_max_bytes: usize = 1 << 20; Live; |n| within(*n, 4096, 64 << 20);
    /// Variables of the daemon that installer steps may see, besides PATH and LANG (HOME and
    /// TMPDIR are private to each build): proxies, package indexes, CA bundles.
    env_passthrough: Vec<String> = DEFAULT_PASSTHROUGH.iter().map(|s| s.to_string()).collect(); Live; passthrough;
    /// The user installer steps run as: a name or uid:gid; "" runs them as the daemon's user,
    /// or, for a daemon running as root, as packenvd-build (else uid 64900): never as root.
    /// A separate user keeps steps away from the daemon's files and database login; the daemon
    /// then needs CAP_SETUID, CAP_SETGID and CAP_CHOWN (see deploy/packenvd.service).
    build_user: Option<BuildUser> = None; Restart; ok;
    /// The program that supervises every step (packenvd itself, as `packenvd __supervise`):
    /// it kills whatever a step leaves behind and applies the limits below and Landlock.
    /// "" is this binary; "none" runs steps unsupervised (only their process group is killed).
    step_supervisor: String = String::new(); Restart; ok;
    /// Landlock confinement of steps: writes only to their build, cache and private tmp, TCP
    /// connects only to step_tcp_ports, the daemon's credentials unreadable. "best-effort" uses
    /// what the kernel has; "required" fails steps the kernel cannot confine; "off".
    landlock: packenv_core::supervise::LandlockMode = packenv_core::supervise::LandlockMode::BestEffort; Live; not_off_as_root;
    /// TCP ports steps may connect to (registries, proxies), a list or "any".
    step_tcp_ports: Ports = Ports(Some(vec![80, 443])); Live; ok;
    /// More directories steps may write to, beyond their build, cache and private tmp.
    step_writable: Vec<String> = Vec::new(); Live; |v: &Vec<String>| {
        v.iter().try_for_each(|p| PathBuf::from_text(p).map(|_| ()))
    };
    /// Where Pythons are found beyond the steps' PATH (python3, python3.X there): directories
    /// holding interpreters, or installations with a bin/ (pyenv's versions, uv's python), or
    /// interpreters. A pack's runtime_dependencies choose the newest that fits among them.
    /// Default: $PYENV_ROOT/versions (else ~/.pyenv/versions) and ~/.local/share/uv/python.
    python_search: Vec<String> = packenv_core::toolchain::default_python_search().iter().map(|p| p.display().to_string()).collect(); Live; |v: &Vec<String>| {
        v.iter().try_for_each(|p| PathBuf::from_text(p).map(|_| ()))
    };
    /// Files and directories steps may not read, besides those always hidden: the config file,
    /// database_url_file, $CREDENTIALS_DIRECTORY, PGPASSFILE, the daemon's ~/.pgpass and
    /// /etc/packenvd. Enforced with Landlock.
    step_hidden: Vec<String> = Vec::new(); Live; |v: &Vec<String>| {
        v.iter().try_for_each(|p| PathBuf::from_text(p).map(|_| ()))
    };
    /// Address space of each step process (RLIMIT_AS): "4GiB", or "unlimited".
    step_memory_limit: Limit = Limit(Some(4 << 30)); Live; |l: &Limit| at_least(l, 256 << 20);
    /// Processes of the build user at once (RLIMIT_NPROC): a fork bomb's ceiling.
    step_max_processes: Limit = Limit(Some(4096)); Live; |l: &Limit| at_least(l, 16);
    /// Largest file a step may write (RLIMIT_FSIZE).
    step_max_file_size: Limit = Limit(Some(4 << 30)); Live; |l: &Limit| at_least(l, 1 << 20);
    /// This node's name (DESIGN §8): one envs filesystem, whose daemons share its rows. Kept
    /// in the envs root's marker at first start; a marker naming another node stops the
    /// daemon. Default: the host name.
    node_name: String = default_node_name(); Restart; |s: &String| {
        if s.is_empty() || s.len() > 200 || s.chars().any(|c| c.is_control() || c == '"') {
            Err("must be 1 to 200 printable characters, without quotes".to_string())
        } else {
            Ok(())
        }
    };
    /// A node not seen for this long is gone: the environments it was building stop waiting
    /// for it. Its daemons refresh it every third of the lease.
    node_ttl: Duration = Duration::from_secs(600); Restart; |d| between(d, 10 * SECOND, 30 * DAY);
    /// Written to claimed_by: who holds a row. Default: <hostname>:<pid>.
    instance_name: String = default_instance_name(); Restart; |s: &String| {
        if s.is_empty() || s.len() > 200 || s.chars().any(char::is_control) {
            Err("must be 1 to 200 printable characters".to_string())
        } else {
            Ok(())
        }
    };
    /// A superseded build (or an orphaned environment) is kept at least this long, for the
    /// actions still running in it.
    gc_grace: Duration = HOUR; Live; |d| between(d, SECOND, 365 * DAY);
    /// How often the collector looks for builds to remove.
    gc_interval: Duration = Duration::from_secs(600); Live; |d| between(d, SECOND, DAY);
    /// When verification passes run: cron with seconds ("0 0 * * * *" is hourly).
    verify_schedule: String = "0 0 * * * *".into(); Live; |s: &String| check_schedule(s);
    /// A ready environment is checked again once its last check is older than this.
    verify_max_age: Duration = 7 * DAY; Live; |d| between(d, SECOND, 3650 * DAY);
    /// Limit of each check command (--version, pip check, npm ls, the runtime's checks); past it the check fails.
    verify_timeout: Duration = Duration::from_secs(60); Live; |d| between(d, Duration::from_millis(100), HOUR);
    /// Whether Python environments with pip also run `pip check`.
    verify_pip_check: bool = true; Live; ok;
    /// Rows one verification claim takes.
    verify_batch: i64 = 100; Live; |n| within(*n, 1, 10_000);
    /// Where /metrics and /healthz are served, e.g. "127.0.0.1:9187"; "" serves nothing.
    metrics_listen: Option<SocketAddr> = None; Restart; ok;
    /// Log filter (tracing EnvFilter syntax): "info", "debug" (every line of installer output),
    /// "info,packenvd::verify=debug".
    log_level: String = "info,sqlx=warn,tokio_cron_scheduler=warn".into(); Live; |s: &String| {
        tracing_subscriber::EnvFilter::try_new(s).map(|_| ()).map_err(|e| e.to_string())
    };
}

fn at_least(l: &Limit, min: u64) -> Result<(), String> {
    match l.0 {
        Some(v) if v < min => Err(format!("must be at least {min} (or unlimited)")),
        _ => Ok(()),
    }
}

#[allow(clippy::ptr_arg)] // the declaration's check takes the setting's own type
fn not_root(p: &PathBuf) -> Result<(), String> {
    if p.parent().is_none() {
        return Err("must not be the root directory".into());
    }
    Ok(())
}

/// A root daemon's steps lean on Landlock for what no file permission stops (the daemon's
/// config and credential, the builds of other packs); it may not be turned off there.
fn not_off_as_root(m: &packenv_core::supervise::LandlockMode) -> Result<(), String> {
    if *m == packenv_core::supervise::LandlockMode::Off && rustix::process::geteuid().is_root() {
        return Err("\"off\" is refused for a daemon running as root: without Landlock its steps could read its config and credential and write other packs' builds; use \"best-effort\" (docs/operations.md lists what \"off\" gives up)".into());
    }
    Ok(())
}

#[allow(clippy::ptr_arg)]
fn passthrough(names: &Vec<String>) -> Result<(), String> {
    match names.iter().find(|n| {
        *n == "DATABASE_URL"
            || *n == "NOTIFY_SOCKET"
            || n.starts_with("PACKENVD_")
            || n.contains('=')
    }) {
        Some(bad) => Err(format!("{bad} may not be passed to installer steps")),
        None => Ok(()),
    }
}

/// Checks a cron expression the way the scheduler will read it.
pub fn check_schedule(expr: &str) -> Result<(), String> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| format!("{e} (six fields, seconds first: \"0 0 * * * *\" is hourly)"))
}

fn pick<T: SettingValue>(
    key: &'static str,
    reload: Reload,
    old: &T,
    new: &T,
    changes: &mut Vec<Change>,
) -> T {
    if old == new {
        return old.clone();
    }
    let show = |v: &T| {
        if key == "database_url" {
            "***".to_string()
        } else {
            v.to_toml().to_string()
        }
    };
    changes.push(Change {
        key,
        old: show(old),
        new: show(new),
        applied: reload == Reload::Live,
    });
    match reload {
        Reload::Live => new.clone(),
        Reload::Restart => old.clone(),
    }
}

/// A configuration error: exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {}: unknown key `{key}`{hint} (known keys: {known})", path.display())]
    UnknownKey {
        path: PathBuf,
        key: String,
        hint: String,
        known: String,
    },
    #[error("{key} (from {origin}): {message}")]
    Invalid {
        key: &'static str,
        origin: Source,
        message: String,
    },
    #[error("no database URL: set DATABASE_URL in the environment, or `database_url` or `database_url_file` in the config file (`packenvd run` also takes --database-url){}", if *ignored_packenvd_var { "; PACKENVD_DATABASE_URL is set but not read" } else { "" })]
    NoDatabase {
        /// PACKENVD_DATABASE_URL is set: the likely reason, since it is not read.
        ignored_packenvd_var: bool,
    },
}

impl Settings {
    /// The effective configuration as a TOML file that loads back: each key with its help
    /// and where its value came from. A database URL holding a password is written masked
    /// and commented out.
    pub fn to_toml(&self, sources: &BTreeMap<&'static str, Source>) -> String {
        let mut out = String::from(
            "# packenvd's effective configuration (packenvd check-config): every setting, its\n\
             # value and where the value came from. This file loads back as --config.\n",
        );
        for (key, value) in self.values() {
            let decl = KEYS.iter().find(|k| k.name == key).expect("declared key");
            let source = sources.get(key).cloned().unwrap_or(Source::Default);
            out.push('\n');
            for line in decl.help.lines() {
                out.push_str(&format!("#{line}\n"));
            }
            let reload = match decl.reload {
                Reload::Live => "SIGHUP applies it",
                Reload::Restart => "a restart applies it",
            };
            let secret_hidden = key == "database_url" && has_password(self.database_url.expose());
            let unset = key == "database_url" && self.database_url.is_empty();
            let comment = if secret_hidden || unset { "# " } else { "" };
            out.push_str(&format!(
                "{comment}{key} = {value}    # {source}; {reload}{}\n",
                if secret_hidden {
                    "; the password is not printed"
                } else {
                    ""
                }
            ));
        }
        out
    }

    /// What a build or a check reads.
    pub fn build_config(&self) -> packenv_core::target::BuildConfig {
        packenv_core::target::BuildConfig {
            envs_root: self.envs_root.clone(),
            packs_dir: self.packs_dir.clone(),
            cache_dir: self.cache_dir.clone(),
            step_timeout: self.step_timeout,
            env_passthrough: self.env_passthrough.clone(),
            sandbox: self.sandbox_config(),
            python_search: self.python_search.iter().map(PathBuf::from).collect(),
        }
    }

    /// How steps are confined; `None` when they run unsupervised.
    pub fn sandbox_config(&self) -> Option<packenv_core::target::SandboxConfig> {
        Some(packenv_core::target::SandboxConfig {
            supervisor: self.supervisor_command()?,
            landlock: self.landlock,
            user: self.step_user().map(|u| (u.uid, u.gid)),
            memory: self.step_memory_limit.0,
            processes: self.step_max_processes.0,
            file_size: self.step_max_file_size.0,
            tcp_ports: self.step_tcp_ports.0.clone(),
            writable: self.step_writable.iter().map(PathBuf::from).collect(),
            hidden: self.hidden_paths(),
        })
    }

    /// The user steps run as: `build_user`; for a daemon running as root without one,
    /// [`ROOTS_BUILD_USER`] if the host has that user, else the bare [`ROOTS_BUILD_ID`]; `None`
    /// (the daemon's own user) only for a daemon that is not root. Steps never run as root.
    pub fn step_user(&self) -> Option<BuildUser> {
        if self.build_user.is_some() || !rustix::process::geteuid().is_root() {
            return self.build_user.clone();
        }
        static CHOSEN: std::sync::OnceLock<BuildUser> = std::sync::OnceLock::new();
        Some(
            CHOSEN
                .get_or_init(|| match nix::unistd::User::from_name(ROOTS_BUILD_USER) {
                    Ok(Some(u)) => BuildUser {
                        name: ROOTS_BUILD_USER.to_owned(),
                        uid: u.uid.as_raw(),
                        gid: u.gid.as_raw(),
                    },
                    _ => BuildUser {
                        name: format!("{ROOTS_BUILD_ID}:{ROOTS_BUILD_ID}"),
                        uid: ROOTS_BUILD_ID,
                        gid: ROOTS_BUILD_ID,
                    },
                })
                .clone(),
        )
    }

    /// The supervisor's command: `<packenvd> __supervise`; `None` for "none", or when this
    /// binary is not packenvd and none is configured (a test harness).
    pub fn supervisor_command(&self) -> Option<Vec<std::ffi::OsString>> {
        let exe = match self.step_supervisor.as_str() {
            "none" => return None,
            "" => {
                static SELF: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
                SELF.get_or_init(|| {
                    std::env::current_exe().ok().filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("packenvd"))
                    })
                })
                .clone()?
            }
            path => PathBuf::from(path),
        };
        Some(vec![exe.into_os_string(), "__supervise".into()])
    }

    /// What steps may not read: the daemon's secrets and configuration wherever they are.
    pub fn hidden_paths(&self) -> Vec<PathBuf> {
        let mut hidden: Vec<PathBuf> = self.step_hidden.iter().map(PathBuf::from).collect();
        hidden.extend(self.config_file.clone());
        hidden.extend(self.database_url_file.clone());
        hidden.push(PathBuf::from("/etc/packenvd"));
        for var in ["CREDENTIALS_DIRECTORY", "PGPASSFILE"] {
            if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                hidden.push(PathBuf::from(v));
            }
        }
        if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            hidden.push(PathBuf::from(home).join(".pgpass"));
        }
        hidden
    }

    /// What the verification checks read.
    pub fn check_config(&self) -> packenv_core::check::CheckConfig {
        packenv_core::check::CheckConfig {
            build: self.build_config(),
            timeout: self.verify_timeout,
            pip_check: self.verify_pip_check,
        }
    }
}

/// One key whose value a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub old: String,
    pub new: String,
    /// False for keys that need a restart: the old value stays in force.
    pub applied: bool,
}

#[cfg(test)]
mod tests;
