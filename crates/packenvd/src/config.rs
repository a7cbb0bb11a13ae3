//! One typed [`Settings`], layered: built-in defaults < the TOML file < `PACKENVD_*` (and
//! `DATABASE_URL`) environment variables < command-line flags. Every value is parsed and checked
//! here, once, and an error names the key and where the bad value came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/packenvd/packenvd.toml";

/// Variables a step may inherit from the daemon besides PATH, HOME and LANG (DESIGN §6):
/// proxies, package indexes and CA bundles. Anything else, `DATABASE_URL` included, is dropped.
pub const DEFAULT_PASSTHROUGH: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "npm_config_registry",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PYENV_ROOT",
    "PYENV_VERSION",
    "TMPDIR",
];

/// A string that never prints: the database URL holds a password.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// packenvd's checked configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the queue lives. Never logged.
    pub database_url: Secret,
    /// Every environment and build is created under this directory, and nowhere else.
    pub envs_root: PathBuf,
    /// Where a pack lives when its `storage_path` is NULL: `<packs_dir>/<ref>`.
    pub packs_dir: PathBuf,
    /// Shared download caches, one subdirectory per runtime, so rebuilds download less.
    pub cache_dir: PathBuf,
    /// Builds run at once; the claim never takes more rows than free slots.
    pub concurrency: usize,
    /// Fallback claim interval when no NOTIFY arrives (lost connection, missed wake-up).
    pub poll_interval: Duration,
    /// Default limit of one installer step; a step's own `timeout` overrides it.
    pub step_timeout: Duration,
    /// How long a claim stays valid without a heartbeat; heartbeats run every third of it.
    pub lease: Duration,
    /// Tries of a build that fails for a retryable reason before the row becomes `failed`.
    pub max_attempts: u32,
    /// First wait before a retry; doubled on every further attempt, with jitter.
    pub retry_backoff: Duration,
    /// How long running builds may finish after SIGTERM before they are killed.
    pub shutdown_grace: Duration,
    /// Bytes of installer output kept per build in `install_log` (head and tail).
    pub log_max_bytes: usize,
    /// Daemon variables steps may see, beyond PATH, HOME and LANG.
    pub env_passthrough: Vec<String>,
    /// Written to `claimed_by`: who holds a row.
    pub instance_name: String,
    /// A superseded build (or an orphaned environment) is kept at least this long, for the
    /// actions still running in it.
    pub gc_grace: Duration,
    /// How often the collector looks for builds to remove.
    pub gc_interval: Duration,
    /// When verification passes run: cron with seconds, e.g. "0 0 * * * *" (hourly).
    pub verify_schedule: String,
    /// A ready environment is checked again once its last check is older than this.
    pub verify_max_age: Duration,
    /// Limit of each check command (`--version`, `pip check`); past it the check fails.
    pub verify_timeout: Duration,
    /// Whether Python environments with pip also run `pip check`.
    pub verify_pip_check: bool,
    /// Rows a verification claim takes at once.
    pub verify_batch: i64,
    /// Where `/metrics` and `/healthz` are served; `None` (the default) serves nothing.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log filter (tracing `EnvFilter` syntax): "info", "debug" (every line of installer
    /// output), "info,packenvd::verify=debug".
    pub log_level: String,
}

/// A configuration error: exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path}: unknown key `{key}` (known keys: {known})")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("{key} (from {origin}): {message}")]
    Invalid {
        key: &'static str,
        origin: String,
        message: String,
    },
    #[error("DATABASE_URL is not set (environment, `database_url` in the config file, or --database-url)")]
    NoDatabase,
}

/// Keys of the file; the environment variable is `PACKENVD_<KEY>` except for the database URL.
const KEYS: &[&str] = &[
    "database_url",
    "envs_root",
    "packs_dir",
    "cache_dir",
    "concurrency",
    "poll_interval",
    "step_timeout",
    "lease",
    "max_attempts",
    "retry_backoff",
    "shutdown_grace",
    "log_max_bytes",
    "env_passthrough",
    "instance_name",
    "gc_grace",
    "gc_interval",
    "verify_schedule",
    "verify_max_age",
    "verify_timeout",
    "verify_pip_check",
    "verify_batch",
    "metrics_listen",
    "log_level",
];

fn env_name(key: &str) -> String {
    if key == "database_url" {
        "DATABASE_URL".into()
    } else {
        format!("PACKENVD_{}", key.to_uppercase())
    }
}

/// Where a setting's value came from, for `check-config` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(p) => write!(f, "config file {}", p.display()),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag(v) => write!(f, "flag --{v}"),
        }
    }
}

/// The raw layers before checking.
#[derive(Debug, Default)]
pub struct Layers {
    /// `--config`; when `None`, [`DEFAULT_CONFIG_FILE`] is read if it exists.
    pub file: Option<PathBuf>,
    /// Values from command-line flags, by key.
    pub flags: BTreeMap<&'static str, String>,
    /// The environment (a map so tests do not touch the process's own).
    pub env: BTreeMap<String, String>,
}

impl Layers {
    pub fn from_process_env(file: Option<PathBuf>, flags: BTreeMap<&'static str, String>) -> Self {
        Layers {
            file,
            flags,
            env: std::env::vars().collect(),
        }
    }
}

struct Resolver {
    file_path: Option<PathBuf>,
    file: toml::Table,
    layers: Layers,
    sources: BTreeMap<&'static str, Source>,
}

impl Resolver {
    /// The winning raw value of `key` and its source.
    fn raw(&mut self, key: &'static str) -> Option<(String, Source)> {
        let found = if let Some(v) = self.layers.flags.get(key) {
            Some((v.clone(), Source::Flag(key.replace('_', "-"))))
        } else if let Some(v) = self
            .layers
            .env
            .get(&env_name(key))
            .filter(|v| !v.is_empty())
        {
            Some((v.clone(), Source::Env(env_name(key))))
        } else {
            self.file.get(key).map(|v| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(","),
                    other => other.to_string(),
                };
                (
                    text,
                    Source::File(self.file_path.clone().unwrap_or_default()),
                )
            })
        };
        let source = found.as_ref().map_or(Source::Default, |(_, s)| s.clone());
        self.sources.insert(key, source);
        found
    }

    fn get<T>(
        &mut self,
        key: &'static str,
        default: impl FnOnce() -> T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.raw(key) {
            None => Ok(default()),
            Some((raw, source)) => parse(raw.trim()).map_err(|message| ConfigError::Invalid {
                key,
                origin: source.to_string(),
                message: format!("invalid value {raw:?}: {message}"),
            }),
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (use e.g. \"30s\", \"15m\", \"7d\")"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err("expected a whole number greater than zero".into()),
    }
}

fn absolute(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err("must be an absolute path".into())
    }
}

impl Settings {
    /// Reads and checks every layer. `require_database` is false for commands that do not
    /// connect (`check-config`).
    pub fn load(
        layers: Layers,
        require_database: bool,
    ) -> Result<(Self, BTreeMap<&'static str, Source>), ConfigError> {
        let (file_path, file) = match &layers.file {
            Some(p) => (Some(p.clone()), Some(p.clone())),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => (
                Some(PathBuf::from(DEFAULT_CONFIG_FILE)),
                Some(PathBuf::from(DEFAULT_CONFIG_FILE)),
            ),
            None => (None, None),
        };
        let table = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let table: toml::Table = text.parse().map_err(|source| ConfigError::Toml {
                    path: path.clone(),
                    source,
                })?;
                if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
                    return Err(ConfigError::UnknownKey {
                        path: path.clone(),
                        key: key.clone(),
                        known: KEYS.join(", "),
                    });
                }
                table
            }
            None => toml::Table::new(),
        };
        let mut r = Resolver {
            file_path,
            file: table,
            layers,
            sources: BTreeMap::new(),
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let database_url = r.get("database_url", String::new, |s| Ok(s.to_owned()))?;
        if require_database && database_url.is_empty() {
            return Err(ConfigError::NoDatabase);
        }
        let settings = Settings {
            database_url: Secret(database_url),
            envs_root: r.get("envs_root", || "/var/lib/packenvd/envs".into(), absolute)?,
            packs_dir: r.get("packs_dir", || "/var/lib/packenvd/packs".into(), absolute)?,
            cache_dir: r.get("cache_dir", || "/var/cache/packenvd".into(), absolute)?,
            concurrency: r.get("concurrency", || cpus, positive)?,
            poll_interval: r.get("poll_interval", || Duration::from_secs(5), duration)?,
            step_timeout: r.get("step_timeout", || Duration::from_secs(15 * 60), duration)?,
            lease: r.get(
                "lease",
                || Duration::from_secs(60),
                |s| {
                    let d = duration(s)?;
                    if d < Duration::from_secs(3) {
                        return Err("must be at least 3s (heartbeats run every third of it)".into());
                    }
                    Ok(d)
                },
            )?,
            max_attempts: r.get("max_attempts", || 3, positive)?,
            retry_backoff: r.get("retry_backoff", || Duration::from_secs(10), duration)?,
            shutdown_grace: r.get("shutdown_grace", || Duration::from_secs(30), duration)?,
            log_max_bytes: r.get(
                "log_max_bytes",
                || 1 << 20,
                |s| {
                    let n: usize = positive(s)?;
                    if n < 4096 {
                        return Err("must be at least 4096".into());
                    }
                    Ok(n)
                },
            )?,
            env_passthrough: r.get(
                "env_passthrough",
                || DEFAULT_PASSTHROUGH.iter().map(|s| s.to_string()).collect(),
                |s| {
                    let names: Vec<String> = s
                        .split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect();
                    if let Some(bad) = names.iter().find(|n| {
                        *n == "DATABASE_URL"
                            || *n == "NOTIFY_SOCKET"
                            || n.starts_with("PACKENVD_")
                            || n.contains('=')
                    }) {
                        return Err(format!("{bad} may not be passed to installer steps"));
                    }
                    Ok(names)
                },
            )?,
            instance_name: r.get("instance_name", default_instance_name, |s| Ok(s.to_owned()))?,
            gc_grace: r.get("gc_grace", || Duration::from_secs(3600), duration)?,
            gc_interval: r.get("gc_interval", || Duration::from_secs(600), duration)?,
            verify_schedule: r.get(
                "verify_schedule",
                || "0 0 * * * *".into(),
                |s| crate::verify::check_schedule(s).map(|()| s.to_owned()),
            )?,
            verify_max_age: r.get(
                "verify_max_age",
                || Duration::from_secs(7 * 86400),
                duration,
            )?,
            verify_timeout: r.get("verify_timeout", || Duration::from_secs(60), duration)?,
            verify_pip_check: r.get(
                "verify_pip_check",
                || true,
                |s| match s {
                    "true" | "1" | "yes" | "on" => Ok(true),
                    "false" | "0" | "no" | "off" => Ok(false),
                    _ => Err("expected true or false".into()),
                },
            )?,
            verify_batch: r.get("verify_batch", || 100, positive)?,
            metrics_listen: r.get(
                "metrics_listen",
                || None,
                |s| {
                    s.parse()
                        .map(Some)
                        .map_err(|e| format!("{e} (use e.g. \"127.0.0.1:9187\")"))
                },
            )?,
            log_level: r.get(
                "log_level",
                || "info,sqlx=warn,tokio_cron_scheduler=warn".into(),
                |s| {
                    tracing_subscriber::EnvFilter::try_new(s)
                        .map(|_| s.to_owned())
                        .map_err(|e| e.to_string())
                },
            )?,
        };
        Ok((settings, r.sources))
    }

    /// Everything but secrets, as `key = value` lines with their source, for `check-config`.
    pub fn describe(&self, sources: &BTreeMap<&'static str, Source>) -> String {
        let masked = mask_url(self.database_url.expose());
        let rows: Vec<(&str, String)> = vec![
            ("database_url", masked),
            ("envs_root", self.envs_root.display().to_string()),
            ("packs_dir", self.packs_dir.display().to_string()),
            ("cache_dir", self.cache_dir.display().to_string()),
            ("concurrency", self.concurrency.to_string()),
            (
                "poll_interval",
                humantime::format_duration(self.poll_interval).to_string(),
            ),
            (
                "step_timeout",
                humantime::format_duration(self.step_timeout).to_string(),
            ),
            ("lease", humantime::format_duration(self.lease).to_string()),
            ("max_attempts", self.max_attempts.to_string()),
            (
                "retry_backoff",
                humantime::format_duration(self.retry_backoff).to_string(),
            ),
            (
                "shutdown_grace",
                humantime::format_duration(self.shutdown_grace).to_string(),
            ),
            ("log_max_bytes", self.log_max_bytes.to_string()),
            ("env_passthrough", self.env_passthrough.join(",")),
            ("instance_name", self.instance_name.clone()),
            (
                "gc_grace",
                humantime::format_duration(self.gc_grace).to_string(),
            ),
            (
                "gc_interval",
                humantime::format_duration(self.gc_interval).to_string(),
            ),
            ("verify_schedule", self.verify_schedule.clone()),
            (
                "verify_max_age",
                humantime::format_duration(self.verify_max_age).to_string(),
            ),
            (
                "verify_timeout",
                humantime::format_duration(self.verify_timeout).to_string(),
            ),
            ("verify_pip_check", self.verify_pip_check.to_string()),
            ("verify_batch", self.verify_batch.to_string()),
            (
                "metrics_listen",
                self.metrics_listen
                    .map_or_else(|| "(off)".into(), |a| a.to_string()),
            ),
            ("log_level", self.log_level.clone()),
        ];
        rows.into_iter()
            .map(|(k, v)| {
                let src = sources.get(k).cloned().unwrap_or(Source::Default);
                format!("{k} = {v:?}    # {src}\n")
            })
            .collect()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn mask_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn default_instance_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

impl Settings {
    /// The collector's part of the settings.
    pub fn gc(&self) -> crate::gc::GcConfig {
        crate::gc::GcConfig {
            envs_root: self.envs_root.clone(),
            grace: self.gc_grace,
        }
    }
}

/// Keys whose new value SIGHUP applies; the others need a restart.
pub const RELOADABLE: &[&str] = &[
    "concurrency",
    "poll_interval",
    "step_timeout",
    "max_attempts",
    "retry_backoff",
    "shutdown_grace",
    "log_max_bytes",
    "env_passthrough",
    "gc_grace",
    "gc_interval",
    "verify_schedule",
    "verify_max_age",
    "verify_timeout",
    "verify_pip_check",
    "verify_batch",
    "log_level",
];

/// One key whose value a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub old: String,
    pub new: String,
    /// False for keys that need a restart: the old value stays in force.
    pub applied: bool,
}

impl Settings {
    /// The settings a reload leads to: the reloadable keys of `new`, the rest of `self`; and
    /// what changed.
    pub fn reloaded(&self, new: &Settings) -> (Settings, Vec<Change>) {
        let mut changes = Vec::new();
        macro_rules! compare {
            ($($field:ident),*) => {$(
                let (old, new_value) = (format!("{:?}", self.$field), format!("{:?}", new.$field));
                if old != new_value {
                    let key = stringify!($field);
                    changes.push(Change { key, old, new: new_value, applied: RELOADABLE.contains(&key) });
                }
            )*};
        }
        compare!(
            envs_root,
            packs_dir,
            cache_dir,
            concurrency,
            poll_interval,
            step_timeout,
            lease,
            max_attempts,
            retry_backoff,
            shutdown_grace,
            log_max_bytes,
            env_passthrough,
            instance_name,
            gc_grace,
            gc_interval,
            verify_schedule,
            verify_max_age,
            verify_timeout,
            verify_pip_check,
            verify_batch,
            metrics_listen,
            log_level
        );
        if self.database_url.expose() != new.database_url.expose() {
            changes.push(Change {
                key: "database_url",
                old: "***".into(),
                new: "***".into(),
                applied: false,
            });
        }
        let merged = Settings {
            database_url: self.database_url.clone(),
            envs_root: self.envs_root.clone(),
            packs_dir: self.packs_dir.clone(),
            cache_dir: self.cache_dir.clone(),
            lease: self.lease,
            instance_name: self.instance_name.clone(),
            metrics_listen: self.metrics_listen,
            ..new.clone()
        };
        (merged, changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(env: &[(&str, &str)], flags: &[(&'static str, &str)]) -> Layers {
        Layers {
            file: None,
            flags: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn flags_beat_environment_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "concurrency = 3\npoll_interval = \"9s\"\nstep_timeout = \"1m\"\n",
        )
        .unwrap();
        let mut l = layers(
            &[
                ("DATABASE_URL", "postgres://x"),
                ("PACKENVD_POLL_INTERVAL", "2s"),
                ("PACKENVD_STEP_TIMEOUT", "2m"),
            ],
            &[("step_timeout", "3m")],
        );
        l.file = Some(file.clone());
        let (s, src) = Settings::load(l, true).unwrap();
        assert_eq!(s.concurrency, 3);
        assert_eq!(s.poll_interval, Duration::from_secs(2));
        assert_eq!(s.step_timeout, Duration::from_secs(180));
        assert_eq!(s.lease, Duration::from_secs(60));
        assert_eq!(src["concurrency"], Source::File(file));
        assert_eq!(src["lease"], Source::Default);
    }

    #[test]
    fn a_bad_value_names_the_key_and_its_source() {
        let err = Settings::load(
            layers(
                &[("DATABASE_URL", "x"), ("PACKENVD_CONCURRENCY", "many")],
                &[],
            ),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("concurrency")
                && err.contains("PACKENVD_CONCURRENCY")
                && err.contains("many"),
            "{err}"
        );
        let err = Settings::load(
            layers(
                &[("DATABASE_URL", "x"), ("PACKENVD_POLL_INTERVAL", "soon")],
                &[],
            ),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("poll_interval") && err.contains("soon"),
            "{err}"
        );
        let err = Settings::load(
            layers(&[("DATABASE_URL", "x"), ("PACKENVD_ENVS_ROOT", "rel")], &[]),
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("absolute"), "{err}");
    }

    #[test]
    fn unknown_file_keys_and_missing_database_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "concurency = 3\n").unwrap();
        let mut l = layers(&[("DATABASE_URL", "x")], &[]);
        l.file = Some(file);
        assert!(Settings::load(l, true)
            .unwrap_err()
            .to_string()
            .contains("`concurency`"));
        assert!(matches!(
            Settings::load(layers(&[], &[]), true),
            Err(ConfigError::NoDatabase)
        ));
    }

    #[test]
    fn secrets_never_print() {
        let (s, src) = Settings::load(
            layers(&[("DATABASE_URL", "postgres://u:hunter2@h/db")], &[]),
            true,
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!s.describe(&src).contains("hunter2"));
        assert!(s.describe(&src).contains("postgres://u:***@h/db"));
    }

    #[test]
    fn a_reload_applies_reloadable_keys_and_keeps_the_others() {
        let (old, _) =
            Settings::load(layers(&[("DATABASE_URL", "postgres://a")], &[]), true).unwrap();
        let (new, _) = Settings::load(
            layers(
                &[
                    ("DATABASE_URL", "postgres://b"),
                    ("PACKENVD_CONCURRENCY", "9"),
                    ("PACKENVD_ENVS_ROOT", "/elsewhere"),
                ],
                &[],
            ),
            true,
        )
        .unwrap();
        let (merged, changes) = old.reloaded(&new);
        assert_eq!(merged.concurrency, 9);
        assert_eq!(merged.envs_root, old.envs_root);
        assert_eq!(merged.database_url.expose(), "postgres://a");
        let applied: Vec<_> = changes
            .iter()
            .filter(|c| c.applied)
            .map(|c| c.key)
            .collect();
        let ignored: Vec<_> = changes
            .iter()
            .filter(|c| !c.applied)
            .map(|c| c.key)
            .collect();
        assert_eq!(applied, ["concurrency"]);
        assert_eq!(ignored, ["envs_root", "database_url"]);
    }

    #[test]
    fn every_setting_is_a_known_file_key_and_the_example_config_loads() {
        let (s, src) =
            Settings::load(layers(&[("DATABASE_URL", "postgres://x")], &[]), true).unwrap();
        let described: Vec<String> = s
            .describe(&src)
            .lines()
            .map(|l| l.split(" = ").next().unwrap().to_owned())
            .collect();
        assert_eq!(
            described, KEYS,
            "describe() and KEYS list the same settings in the same order"
        );
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/packenvd.toml");
        let mut l = layers(&[("DATABASE_URL", "postgres://x")], &[]);
        l.file = Some(example.clone());
        let (from_file, src) =
            Settings::load(l, true).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
        assert_eq!(src["gc_grace"], Source::File(example));
        assert_eq!(from_file.verify_max_age, Duration::from_secs(7 * 86400));
    }
}
