//! The layers a configuration is read from (defaults < file < environment < flags), and
//! loading: every declared key resolved from the highest layer that has it, parsed, checked.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{mask_url, ConfigError, SettingValue, Settings, DEFAULT_CONFIG_FILE, KEYS};

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
#[derive(Debug, Default, Clone)]
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

/// The loaded settings, where each value came from, and warnings worth a line at start-up.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub sources: BTreeMap<&'static str, Source>,
    /// E.g. a `PACKENVD_*` variable that names no setting.
    pub warnings: Vec<String>,
}

pub(super) struct Resolver {
    file_path: Option<PathBuf>,
    file: toml::Table,
    layers: Layers,
    sources: BTreeMap<&'static str, Source>,
}

impl Resolver {
    pub(super) fn get<T: SettingValue>(
        &mut self,
        name: &'static str,
        default: impl FnOnce() -> T,
        check: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, ConfigError> {
        let key = KEYS.iter().find(|k| k.name == name).expect("declared key");
        let (parsed, source, raw) = if let Some(v) = self.layers.flags.get(name) {
            (T::from_text(v.trim()), Source::Flag(key.flag()), v.clone())
        } else if let Some(v) = self
            .layers
            .env
            .get(&key.env_var())
            .filter(|v| !v.is_empty())
        {
            (
                T::from_text(v.trim()),
                Source::Env(key.env_var()),
                v.clone(),
            )
        } else if let Some(v) = self.file.get(name) {
            let path = self.file_path.clone().unwrap_or_default();
            (T::from_toml(v), Source::File(path), v.to_string())
        } else {
            self.sources.insert(name, Source::Default);
            return Ok(default());
        };
        let shown = if name == "database_url" {
            mask_url(&raw)
        } else {
            raw
        };
        let invalid = |message: String| ConfigError::Invalid {
            key: name,
            origin: source.clone(),
            message: format!("invalid value {shown:?}: {message}"),
        };
        let value = parsed.map_err(invalid)?;
        check(&value).map_err(invalid)?;
        self.sources.insert(name, source);
        Ok(value)
    }
}

/// The known key closest to `name` (for "did you mean" hints), if any is close.
pub fn closest_key(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim_distance(name, k.name), k.name))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance, small strings only.
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Settings {
    /// Reads and checks every layer. `require_database` is false for commands that do not
    /// connect (`check-config`) and for reloads (the URL is not reloadable).
    pub fn load(layers: Layers, require_database: bool) -> Result<Loaded, ConfigError> {
        let file_path = match &layers.file {
            Some(p) => Some(p.clone()),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Some(PathBuf::from(DEFAULT_CONFIG_FILE))
            }
            None => None,
        };
        let table = match &file_path {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        let mut warnings = Vec::new();
        for var in layers.env.keys() {
            let Some(name) = var.strip_prefix("PACKENVD_") else {
                continue;
            };
            if var == "PACKENVD_DATABASE_URL" {
                // Not read: one name for a URL in the environment is enough (DATABASE_URL, as
                // sqlx and psql tools spell it), and better none, in a file. It is still
                // scrubbed from the environment like the others, in case it holds a password.
                warnings.push(
                    "environment variable PACKENVD_DATABASE_URL is ignored: set DATABASE_URL, \
                     or better database_url_file (PACKENVD_DATABASE_URL_FILE)"
                        .into(),
                );
                continue;
            }
            let name = name.to_lowercase();
            if KEYS.iter().any(|k| k.name == name) || PRIVATE_ENV.contains(&var.as_str()) {
                continue;
            }
            let hint = closest_key(&name)
                .map(|k| format!("; did you mean PACKENVD_{}?", k.to_uppercase()))
                .unwrap_or_default();
            warnings.push(format!(
                "environment variable {var} names no setting and is ignored{hint}"
            ));
        }
        let mut r = Resolver {
            file_path,
            file: table,
            layers,
            sources: BTreeMap::new(),
        };
        let mut settings = Settings::resolve(&mut r)?;
        // Absolute: steps run elsewhere, and Landlock takes paths as they are.
        settings.config_file = r
            .file_path
            .as_deref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()));
        let credential = r
            .layers
            .env
            .get("CREDENTIALS_DIRECTORY")
            .map(|d| Path::new(d).join("database_url"))
            .filter(|p| p.is_file());
        if settings.database_url.is_empty() {
            if let Some(file) = settings.database_url_file.clone().or(credential) {
                settings.database_url = read_url_file(&file)?;
                r.sources.insert("database_url", Source::File(file));
            }
        }
        if require_database && settings.database_url.is_empty() {
            return Err(ConfigError::NoDatabase {
                ignored_packenvd_var: r.layers.env.contains_key("PACKENVD_DATABASE_URL"),
            });
        }
        Ok(Loaded {
            settings,
            sources: r.sources,
            warnings,
        })
    }
}

/// Reads a database URL kept in a file (a credential): the first line, trimmed.
fn read_url_file(path: &Path) -> Result<super::Secret, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: "database_url_file",
        origin: Source::File(path.to_owned()),
        message,
    };
    let bytes = packenv_core::fingerprint::read_manifest(path, 64 << 10)
        .map_err(|e| invalid(e.to_string()))?
        .ok_or_else(|| invalid("the file does not exist".into()))?;
    let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
    let url = text.lines().next().unwrap_or_default().trim();
    if url.is_empty() {
        return Err(invalid("the file is empty".into()));
    }
    super::Secret::from_text(url).map_err(invalid)
}

/// `PACKENVD_*` variables that are not settings but are read elsewhere (test harnesses).
const PRIVATE_ENV: &[&str] = &["PACKENVD_PG_DATA", "PACKENVD_PG_CTL"];

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Toml {
        path: path.to_owned(),
        source,
    })?;
    if let Some(key) = table
        .keys()
        .find(|k| !KEYS.iter().any(|d| d.name == k.as_str()))
    {
        return Err(ConfigError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
            hint: closest_key(key)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default(),
            known: KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "),
        });
    }
    Ok(table)
}
