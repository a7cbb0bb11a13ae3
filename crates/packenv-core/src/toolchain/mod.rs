//! The interpreter a pack's environment is built on (DESIGN §5): what the pack asks for
//! (`runtime_dependencies` in its `pack.yaml`, the platform's pack row, the runtime's spec),
//! what the host has (`python3.X` on PATH, pyenv's and uv's installed Pythons, configured
//! places), and the choice between them: the newest that satisfies every constraint.
//!
//! Constraints mix the two styles packs use: Python's (`>=3.8`, `~=3.10`, `==3.11.*`,
//! `>=3.8,<3.12`) and npm's (`^18`, `~18.2`, `18.x`, `>=18 <21`, `16 || 18`). A bare version is a
//! prefix: `3.11` and `3.11.x` both mean any 3.11.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::fingerprint::ManifestError;
use crate::spec::Interpreter;

pub use version::{Constraint, Version};

mod version;

/// One constraint and where it came from, for the error that names both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub constraint: Constraint,
    pub source: String,
}

/// What went wrong choosing an interpreter: permanent for the row (retrying changes nothing
/// until the host or the pack does).
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("{path}: {problem}", path = path.display())]
    PackYaml { path: PathBuf, problem: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{source_}: {problem}")]
    Constraint { source_: String, problem: String },
    #[error("no {interpreter} on this host satisfies {wanted}; it has {found}")]
    Unsatisfied {
        interpreter: &'static str,
        wanted: String,
        found: String,
    },
}

/// The largest `pack.yaml` read: its runtime dependencies are a few lines.
pub const PACK_YAML_MAX_BYTES: u64 = 256 << 10;

/// The names a pack's `runtime_dependencies` may use for an interpreter.
fn names(interp: Interpreter) -> &'static [&'static str] {
    match interp {
        Interpreter::Python => &["python", "python3"],
        Interpreter::Node => &["node", "nodejs"],
    }
}

/// The constraints on `interp` in the pack's `pack.yaml`: `runtime_dependencies` as a list of
/// one-key maps (`- python: ">=3.8"`) or a map, and `python_versions: ["3"]`. No file, no
/// constraint. Aliases and anchors are refused: a few lines of dependencies need none, and
/// they are how a small YAML file expands into gigabytes.
pub fn pack_yaml_requirements(
    pack_path: &Path,
    interp: Interpreter,
) -> Result<Vec<Requirement>, ToolchainError> {
    let path = pack_path.join("pack.yaml");
    // Beneath the pack: a pack.yaml linked to a host file would show its lines in a parse error.
    let Some(bytes) = crate::manifest::read_pack_file(pack_path, "pack.yaml", PACK_YAML_MAX_BYTES)?
    else {
        return Ok(Vec::new());
    };
    let bad = |problem: String| ToolchainError::PackYaml {
        path: path.clone(),
        problem,
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8".into()))?;
    let doc = yaml::parse(&text).map_err(bad)?;
    let mut out = Vec::new();
    let Some(top) = doc.as_ref().and_then(yaml::Node::as_map) else {
        return Ok(out);
    };
    let source = "pack.yaml runtime_dependencies";
    for (key, value) in top {
        match key.as_str() {
            "runtime_dependencies" => {
                for (name, text) in dependency_pairs(value)
                    .map_err(|p| bad(format!("runtime_dependencies: {p}")))?
                {
                    if names(interp).contains(&name.to_lowercase().as_str()) {
                        let constraint = Constraint::parse(&text)
                            .map_err(|p| bad(format!("runtime_dependencies.{name}: {p}")))?;
                        out.push(Requirement {
                            constraint,
                            source: source.into(),
                        });
                    }
                }
            }
            "python_versions" if interp == Interpreter::Python => {
                let versions = value
                    .as_scalars()
                    .ok_or_else(|| bad("python_versions: expected a list of versions".into()))?;
                if !versions.is_empty() {
                    let text = versions.join(" || ");
                    let constraint = Constraint::parse(&text)
                        .map_err(|p| bad(format!("python_versions: {p}")))?;
                    out.push(Requirement {
                        constraint,
                        source: "pack.yaml python_versions".into(),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `[{python: ">=3.8"}, {nodejs: "18"}]` or `{python: ">=3.8"}` as (name, constraint) pairs.
fn dependency_pairs(value: &yaml::Node) -> Result<Vec<(String, String)>, String> {
    let one_map = |m: &[(String, yaml::Node)]| {
        m.iter()
            .map(|(k, v)| match v {
                yaml::Node::Scalar(s) => Ok((k.clone(), s.clone())),
                _ => Err(format!("{k}: expected a version constraint")),
            })
            .collect::<Result<Vec<_>, String>>()
    };
    match value {
        yaml::Node::Map(m) => one_map(m),
        yaml::Node::Seq(items) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    yaml::Node::Map(m) => out.extend(one_map(m)?),
                    _ => return Err("expected a list of `name: constraint` entries".into()),
                }
            }
            Ok(out)
        }
        yaml::Node::Scalar(s) if s.is_empty() || s == "~" || s == "null" => Ok(Vec::new()),
        yaml::Node::Scalar(_) => Err("expected a list of `name: constraint` entries".into()),
    }
}

/// The constraints on `interp` in a JSON value shaped like `runtime_dependencies` (the
/// platform's pack row may keep them): a list of one-key objects or an object.
pub fn json_requirements(
    value: &serde_json::Value,
    interp: Interpreter,
    source: &str,
) -> Result<Vec<Requirement>, ToolchainError> {
    let bad = |problem: String| ToolchainError::Constraint {
        source_: source.to_owned(),
        problem,
    };
    let mut pairs = Vec::new();
    let mut add = |m: &serde_json::Map<String, serde_json::Value>| -> Result<(), ToolchainError> {
        for (k, v) in m {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => return Err(bad(format!("{k}: expected a version constraint"))),
            };
            pairs.push((k.clone(), text));
        }
        Ok(())
    };
    match value {
        serde_json::Value::Null => {}
        serde_json::Value::Object(m) => add(m)?,
        serde_json::Value::Array(items) => {
            for item in items {
                match item {
                    serde_json::Value::Object(m) => add(m)?,
                    _ => return Err(bad("expected a list of {name: constraint} objects".into())),
                }
            }
        }
        _ => return Err(bad("expected a list of {name: constraint} objects".into())),
    }
    pairs
        .into_iter()
        .filter(|(k, _)| names(interp).contains(&k.to_lowercase().as_str()))
        .map(|(k, text)| {
            Ok(Requirement {
                constraint: Constraint::parse(&text).map_err(|p| bad(format!("{k}: {p}")))?,
                source: source.to_owned(),
            })
        })
        .collect()
}

/// An interpreter found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub version: Version,
}

/// The interpreter a build uses: its path (what `{python}` renders to) and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub path: PathBuf,
    pub version: Version,
}

/// Every Python the host has: `python3` and `python3.X` on `path_var`, and those under each of
/// `search` (a directory holding interpreters, or holding installations with a `bin/`, as
/// pyenv's `versions` and uv's `python` directories do; or an interpreter itself). Each is
/// asked its version once per file (see [`host_version`]); one that does not answer is left
/// out. Equal versions are kept once, preferring a real binary to a wrapper script (a pyenv
/// shim answers for whichever version is selected, not its own).
pub async fn pythons(path_var: &str, search: &[PathBuf]) -> Vec<Candidate> {
    let (p, s) = (path_var.to_owned(), search.to_vec());
    let files = crate::blocking(move || python_files(&p, &s)).await;
    let mut found: Vec<Candidate> = Vec::new();
    for path in files {
        let Some(version) = host_version(path.clone())
            .await
            .as_deref()
            .and_then(Version::find)
        else {
            continue;
        };
        match found.iter_mut().find(|c| c.version == version) {
            Some(existing) if is_wrapper(&existing.path) && !is_wrapper(&path) => {
                existing.path = path
            }
            Some(_) => {}
            None => found.push(Candidate { path, version }),
        }
    }
    found.sort_by(|a, b| b.version.cmp(&a.version));
    found
}

fn is_wrapper(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "shims")
}

fn is_python_name(name: &str) -> bool {
    name == "python3"
        || name
            .strip_prefix("python3.")
            .is_some_and(|minor| !minor.is_empty() && minor.chars().all(|c| c.is_ascii_digit()))
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pythons_in(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_python_name))
        .map(|e| e.path())
        .filter(|p| is_executable_file(p))
        .collect();
    names.sort();
    out.extend(names);
}

fn python_files(path_var: &str, search: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::env::split_paths(path_var) {
        pythons_in(&dir, &mut out);
    }
    for place in search {
        if is_executable_file(place) {
            out.push(place.clone());
            continue;
        }
        pythons_in(place, &mut out);
        pythons_in(&place.join("bin"), &mut out);
        if let Ok(entries) = std::fs::read_dir(place) {
            let mut installs: Vec<PathBuf> =
                entries.flatten().map(|e| e.path().join("bin")).collect();
            installs.sort();
            for bin in installs {
                pythons_in(&bin, &mut out);
            }
        }
    }
    // The same file reached twice (a symlink, a PATH entry listed twice) is asked once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())));
    out
}

/// The newest of `candidates` that satisfies every requirement. Without requirements, None:
/// the runtime's default (`python3` on PATH) stands.
pub fn choose(
    interp: Interpreter,
    requirements: &[Requirement],
    candidates: &[Candidate],
) -> Result<Option<Chosen>, ToolchainError> {
    if requirements.is_empty() {
        return Ok(None);
    }
    let ok = |v: &Version| requirements.iter().all(|r| r.constraint.matches(v));
    match candidates
        .iter()
        .filter(|c| ok(&c.version))
        .max_by(|a, b| a.version.cmp(&b.version))
    {
        Some(c) => Ok(Some(Chosen {
            path: c.path.clone(),
            version: c.version.clone(),
        })),
        None => Err(unsatisfied(interp, requirements, candidates)),
    }
}

/// The error that names what was asked and what the host has.
pub fn unsatisfied(
    interp: Interpreter,
    requirements: &[Requirement],
    candidates: &[Candidate],
) -> ToolchainError {
    let wanted: Vec<String> = requirements
        .iter()
        .map(|r| format!("{} (from {})", r.constraint, r.source))
        .collect();
    let found: Vec<String> = candidates
        .iter()
        .map(|c| format!("{} ({})", c.version, c.path.display()))
        .collect();
    ToolchainError::Unsatisfied {
        interpreter: match interp {
            Interpreter::Python => "Python",
            Interpreter::Node => "Node.js",
        },
        wanted: wanted.join(" and "),
        found: if found.is_empty() {
            "none".into()
        } else {
            found.join(", ")
        },
    }
}

/// What `--version` of a host's interpreter said, asked once per file: the answer is kept
/// while the file (through its symlinks) is the same inode, size and modification time. It
/// runs unconfined, with cwd `/` and no variables beyond PATH: the file is the host's (on the
/// daemon's PATH or a configured place), never one a row or a pack names.
pub async fn host_version(path: PathBuf) -> Option<String> {
    let key = crate::blocking({
        let p = path.clone();
        move || file_key(&p)
    })
    .await?;
    if let Some(v) = VERSIONS.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Some(v.clone());
    }
    let mut cmd = tokio::process::Command::new(&path);
    cmd.arg("--version")
        .current_dir("/")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for k in ["HOME", "PYENV_ROOT"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // Python 2 printed its version on stderr.
    let text = [out.stdout, out.stderr].concat();
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    VERSIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, line.clone());
    Some(line)
}

/// A file's identity: where its symlinks lead, and that file's inode, size and mtime.
pub fn file_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(path).ok()?;
    let m = real.metadata().ok()?;
    Some(FileKey {
        path: real,
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    })
}

/// See [`file_key`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

static VERSIONS: LazyLock<Mutex<HashMap<FileKey, String>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Where to look for Pythons beyond PATH when nothing is configured: pyenv's versions
/// directory (`$PYENV_ROOT`, else `~/.pyenv`) and uv's managed Pythons.
pub fn default_python_search() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut out = Vec::new();
    match std::env::var_os("PYENV_ROOT") {
        Some(root) => out.push(PathBuf::from(root).join("versions")),
        None => out.extend(home.iter().map(|h| h.join(".pyenv/versions"))),
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) => out.push(PathBuf::from(d).join("uv/python")),
        None => out.extend(home.iter().map(|h| h.join(".local/share/uv/python"))),
    }
    out
}

/// The minimal YAML reading `pack.yaml` needs: mappings, sequences and scalars as written.
mod yaml {
    use yaml_rust2::parser::{Event, Parser};

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Node {
        /// As written: `3.10` stays `3.10` (a YAML float would be 3.1).
        Scalar(String),
        Seq(Vec<Node>),
        Map(Vec<(String, Node)>),
    }

    impl Node {
        pub fn as_map(&self) -> Option<&[(String, Node)]> {
            match self {
                Node::Map(m) => Some(m),
                _ => None,
            }
        }

        /// A sequence of scalars (or one scalar) as strings.
        pub fn as_scalars(&self) -> Option<Vec<String>> {
            match self {
                Node::Scalar(s) => Some(vec![s.clone()]),
                Node::Seq(items) => items
                    .iter()
                    .map(|i| match i {
                        Node::Scalar(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
                Node::Map(_) => None,
            }
        }
    }

    const MAX_NODES: usize = 20_000;
    const MAX_DEPTH: usize = 64;

    /// The first document, or None for an empty file.
    pub fn parse(text: &str) -> Result<Option<Node>, String> {
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<(Node, Option<String>)> = Vec::new();
        let mut pending_key: Option<String> = None;
        let mut nodes = 0usize;
        loop {
            let (event, mark) = parser.next_token().map_err(|e| e.to_string())?;
            let line = mark.line();
            let value = match event {
                Event::StreamStart | Event::DocumentStart | Event::Nothing => continue,
                Event::StreamEnd | Event::DocumentEnd => return Ok(None),
                Event::Alias(_) => {
                    return Err(format!("line {line}: aliases (*name) are not accepted"))
                }
                Event::Scalar(s, ..) => Node::Scalar(s),
                Event::SequenceStart(..) | Event::MappingStart(..) => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(format!("line {line}: nested deeper than {MAX_DEPTH}"));
                    }
                    let node = if matches!(event, Event::SequenceStart(..)) {
                        Node::Seq(Vec::new())
                    } else {
                        Node::Map(Vec::new())
                    };
                    stack.push((node, pending_key.take()));
                    continue;
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    let (node, key) = stack.pop().ok_or("unbalanced document")?;
                    pending_key = key;
                    node
                }
            };
            nodes += 1;
            if nodes > MAX_NODES {
                return Err(format!("more than {MAX_NODES} values"));
            }
            match stack.last_mut() {
                None => return Ok(Some(value)),
                Some((Node::Seq(items), _)) => items.push(value),
                Some((Node::Map(entries), _)) => match pending_key.take() {
                    None => match value {
                        Node::Scalar(k) => pending_key = Some(k),
                        _ => return Err(format!("line {line}: a key must be a plain value")),
                    },
                    Some(k) => entries.push((k, value)),
                },
                Some((Node::Scalar(_), _)) => unreachable!("scalars are never on the stack"),
            }
        }
    }
}

/// The requirements on `interp` from every place a platform may keep them, in order: the
/// runtime's spec (`interpreter_version`), the pack row (`runtime_dependencies`, when the
/// platform's `pack` table has such a column), the pack's `pack.yaml`.
pub fn requirements(
    interp: Interpreter,
    runtime_ref: &str,
    spec_version: Option<&str>,
    pack_row: Option<&serde_json::Value>,
    pack_path: &Path,
) -> Result<Vec<Requirement>, ToolchainError> {
    let mut out = Vec::new();
    if let Some(text) = spec_version {
        let source = format!("runtime {runtime_ref} interpreter_version");
        out.push(Requirement {
            constraint: Constraint::parse(text).map_err(|problem| ToolchainError::Constraint {
                source_: source.clone(),
                problem,
            })?,
            source,
        });
    }
    if let Some(row) = pack_row {
        out.extend(json_requirements(
            row,
            interp,
            "the pack row's runtime_dependencies",
        )?);
    }
    out.extend(pack_yaml_requirements(pack_path, interp)?);
    Ok(out)
}

/// Requirements as one line for logs and metadata: `>=3.8 (pack.yaml runtime_dependencies)`.
pub fn describe(requirements: &[Requirement]) -> BTreeMap<String, String> {
    requirements
        .iter()
        .map(|r| (r.source.clone(), r.constraint.to_string()))
        .collect()
}

#[cfg(test)]
mod tests;
