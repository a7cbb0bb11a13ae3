//! The interpreter a pack's environment is built on (DESIGN §5): what the pack asks for
//! (`runtime_dependencies` in its `pack.yaml`, the platform's pack row, the runtime's spec),
//! what the host has (`python3.X` on PATH, pyenv's and uv's installed Pythons, configured
//! places), and the choice between them: the newest that satisfies every constraint.
//!
//! Constraints mix the two styles packs use: Python's (`>=3.8`, `~=3.10`, `==3.11.*`,
//! `>=3.8,<3.12`) and npm's (`^18`, `~18.2`, `18.x`, `>=18 <21`, `16 || 18`). A bare version is a
//! prefix: `3.11` and `3.11.x` both mean any 3.11.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::fingerprint::{read_manifest, ManifestError};
use crate::spec::Interpreter;

/// A version as interpreters print it: its numeric parts (`Python 3.11.7` → 3.11.7). Missing
/// parts are zeros: 3.11 equals 3.11.0.
#[derive(Debug, Clone)]
pub struct Version(pub Vec<u64>);

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

impl Version {
    /// The first dotted number in a `--version` line: `Python 3.11.7`, `v20.1.0`,
    /// `Python 3.13.0rc1` (3.13.0).
    pub fn find(line: &str) -> Option<Version> {
        line.split_whitespace()
            .map(|w| w.strip_prefix('v').unwrap_or(w))
            .filter(|w| w.starts_with(|c: char| c.is_ascii_digit()))
            .find_map(|w| Version::parse(w).filter(|v| v.0.len() >= 2))
    }

    /// `3.11.7`, `3.11`, `3`; each part's leading digits (`0rc1` → 0).
    pub fn parse(s: &str) -> Option<Version> {
        let parts: Option<Vec<u64>> = s
            .split('.')
            .map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .collect();
        parts.filter(|p| !p.is_empty()).map(Version)
    }

    fn part(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }

    fn cmp_parts(&self, other: &[u64]) -> Ordering {
        (0..self.0.len().max(other.len()))
            .map(|i| self.part(i).cmp(&other.get(i).copied().unwrap_or(0)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_parts(&other.0)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

/// One comparison: `op` against `parts`; with `prefix`, `==`/`!=` compare only `parts`' length
/// (`==3.11.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    op: Op,
    parts: Vec<u64>,
    prefix: bool,
}

impl Clause {
    fn matches(&self, v: &Version) -> bool {
        let ord = if self.prefix {
            let n = self.parts.len();
            Version(v.0.iter().copied().take(n).collect()).cmp_parts(&self.parts)
        } else {
            v.cmp_parts(&self.parts)
        };
        match self.op {
            Op::Eq => ord.is_eq(),
            Op::Ne => ord.is_ne(),
            Op::Ge => ord.is_ge(),
            Op::Gt => ord.is_gt(),
            Op::Le => ord.is_le(),
            Op::Lt => ord.is_lt(),
        }
    }
}

/// A version constraint: alternatives (`||`), each a list of clauses that must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    text: String,
    any_of: Vec<Vec<Clause>>,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Constraint {
    pub fn parse(text: &str) -> Result<Constraint, String> {
        let text = text.trim();
        if text.is_empty() || text.len() > 200 {
            return Err(format!("{text:?} is not a version constraint"));
        }
        let any_of = text
            .split("||")
            .map(|alt| {
                // `>= 3.8` is one clause: an operator alone joins the next word.
                let mut words: Vec<String> = Vec::new();
                for w in alt.split([',', ' ', '\t']).filter(|w| !w.is_empty()) {
                    match words.last_mut() {
                        Some(last) if last.chars().all(|c| "<>=!~^".contains(c)) => {
                            last.push_str(w)
                        }
                        _ => words.push(w.to_owned()),
                    }
                }
                if words.is_empty() {
                    return Err(format!("{text:?}: an empty alternative"));
                }
                let mut clauses = Vec::new();
                for w in &words {
                    clauses.extend(parse_clause(w).ok_or_else(|| {
                        format!("{text:?}: cannot read {w:?} as a version constraint")
                    })?);
                }
                Ok(clauses)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Constraint {
            text: text.to_owned(),
            any_of,
        })
    }

    pub fn matches(&self, v: &Version) -> bool {
        self.any_of
            .iter()
            .any(|all| all.iter().all(|c| c.matches(v)))
    }
}

/// One word of a constraint as the clauses it stands for.
fn parse_clause(word: &str) -> Option<Vec<Clause>> {
    let (op, rest) = ["~=", "==", "!=", ">=", "<=", "===", ">", "<", "^", "~", "="]
        .iter()
        .filter(|op| word.starts_with(**op))
        .max_by_key(|op| op.len())
        .map_or(("", word), |op| (*op, &word[op.len()..]));
    let rest = rest.strip_prefix('v').unwrap_or(rest);
    if rest.is_empty() || rest == "*" || rest == "x" {
        return (op.is_empty()).then(Vec::new);
    }
    let mut parts = Vec::new();
    let mut wildcard = false;
    for p in rest.split('.') {
        if wildcard {
            return None;
        }
        if matches!(p, "*" | "x" | "X") {
            wildcard = true;
        } else {
            parts.push(p.parse::<u64>().ok()?);
        }
    }
    if parts.is_empty() {
        return None;
    }
    let c = |op, parts: Vec<u64>, prefix| Clause { op, parts, prefix };
    // The next version at the level of part `i`: 3.11 -> 3.12 at i = 1.
    let bump = |i: usize| {
        let mut up: Vec<u64> = parts[..=i].to_vec();
        up[i] += 1;
        up
    };
    Some(match op {
        "" | "=" | "==" | "===" => {
            if wildcard || op.is_empty() {
                vec![c(Op::Eq, parts, true)]
            } else {
                vec![c(Op::Eq, parts, false)]
            }
        }
        "!=" => vec![c(Op::Ne, parts, wildcard)],
        ">=" => vec![c(Op::Ge, parts, false)],
        ">" if wildcard => vec![c(Op::Ge, bump(parts.len() - 1), false)],
        ">" => vec![c(Op::Gt, parts, false)],
        "<=" if wildcard => vec![c(Op::Lt, bump(parts.len() - 1), false)],
        "<=" => vec![c(Op::Le, parts, false)],
        "<" => vec![c(Op::Lt, parts, false)],
        // PEP 440: ~=3.10 is >=3.10, ==3.*; ~=3.10.2 is >=3.10.2, ==3.10.*.
        "~=" if parts.len() >= 2 => {
            let keep = parts.len() - 1;
            vec![
                c(Op::Ge, parts.clone(), false),
                c(Op::Eq, parts[..keep].to_vec(), true),
            ]
        }
        // npm: ~1.2.3 is >=1.2.3 <1.3; ~1 is 1.x.
        "~" => {
            let level = if parts.len() >= 2 { 1 } else { 0 };
            vec![
                c(Op::Ge, parts.clone(), false),
                c(Op::Lt, bump(level), false),
            ]
        }
        // npm: ^18.2 is >=18.2 <19; ^0.2.3 is >=0.2.3 <0.3.0.
        "^" => {
            let level = parts
                .iter()
                .position(|&p| p != 0)
                .unwrap_or(parts.len() - 1);
            vec![
                c(Op::Ge, parts.clone(), false),
                c(Op::Lt, bump(level), false),
            ]
        }
        _ => return None,
    })
}

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
    let Some(bytes) = read_manifest(&path, PACK_YAML_MAX_BYTES)? else {
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
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn ok(c: &str, version: &str) -> bool {
        Constraint::parse(c).unwrap().matches(&v(version))
    }

    #[test]
    fn versions_are_read_from_what_interpreters_print() {
        assert_eq!(Version::find("Python 3.11.7"), Some(v("3.11.7")));
        assert_eq!(Version::find("v20.20.2"), Some(v("20.20.2")));
        assert_eq!(Version::find("Python 3.13.0rc1"), Some(v("3.13.0")));
        assert_eq!(Version::find("no version"), None);
        assert!(v("3.10") > v("3.9.18"));
        assert_eq!(v("3.11"), v("3.11.0"));
    }

    #[test]
    fn python_and_npm_constraints_mean_what_their_users_expect() {
        for (c, yes, no) in [
            (">=3.8", "3.8.0", "3.7.17"),
            ("3.11.x", "3.11.7", "3.12.0"),
            ("3.11", "3.11.2", "3.1.0"),
            ("==3.11.*", "3.11.0", "3.10.9"),
            (">=3.8,<3.12", "3.11.9", "3.12.1"),
            (">= 3.8, < 3.12", "3.8.1", "3.12.0"),
            ("~=3.10", "3.13.1", "3.9.1"),
            ("~=3.10.2", "3.10.5", "3.11.0"),
            ("^18", "18.19.0", "19.0.0"),
            ("^18.2", "18.2.1", "18.1.9"),
            ("~18.2", "18.2.9", "18.3.0"),
            ("18.x", "18.0.1", "20.1.0"),
            (">=18 <21", "20.20.2", "22.0.0"),
            ("16 || 18", "18.1.0", "17.0.0"),
            ("!=3.9.*", "3.10.1", "3.9.2"),
            ("3", "3.13.1", "2.7.18"),
            (">3.9.*", "3.10.0", "3.9.9"),
        ] {
            assert!(ok(c, yes), "{c} should accept {yes}");
            assert!(!ok(c, no), "{c} should refuse {no}");
        }
        for bad in [
            "",
            "python",
            ">=",
            ">=3.x.1",
            "~=3",
            "3.8 ||",
            &"9".repeat(300),
        ] {
            assert!(
                Constraint::parse(bad).is_err(),
                "{bad:?} is not a constraint"
            );
        }
    }

    #[test]
    fn pack_yaml_gives_the_constraints_of_the_interpreter_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pack.yaml"),
            "ref: x\nversion: 1.0.0\nruntime_dependencies:\n  - python: \">=3.8\"\n  - nodejs: ^18\n  - python: 3.10\n",
        )
        .unwrap();
        let py = pack_yaml_requirements(dir.path(), Interpreter::Python).unwrap();
        let texts: Vec<String> = py.iter().map(|r| r.constraint.to_string()).collect();
        assert_eq!(texts, [">=3.8", "3.10"], "3.10 is not the float 3.1");
        let node = pack_yaml_requirements(dir.path(), Interpreter::Node).unwrap();
        assert_eq!(node[0].constraint.to_string(), "^18");

        std::fs::write(
            dir.path().join("pack.yaml"),
            "python_versions:\n  - \"3\"\n",
        )
        .unwrap();
        let py = pack_yaml_requirements(dir.path(), Interpreter::Python).unwrap();
        assert!(py[0].constraint.matches(&v("3.12.1")));
        assert!(!py[0].constraint.matches(&v("2.7.18")));

        std::fs::write(
            dir.path().join("pack.yaml"),
            "runtime_dependencies: {python: '>=3.9'}\n",
        )
        .unwrap();
        let py = pack_yaml_requirements(dir.path(), Interpreter::Python).unwrap();
        assert_eq!(py[0].constraint.to_string(), ">=3.9");
    }

    #[test]
    fn a_hostile_pack_yaml_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let write = |s: &str| std::fs::write(dir.path().join("pack.yaml"), s).unwrap();
        let err = |s: &str| {
            write(s);
            pack_yaml_requirements(dir.path(), Interpreter::Python)
                .unwrap_err()
                .to_string()
        };
        // The billion laughs: refused at the first alias, before anything expands.
        let laughs = "a: &a [\"lol\",\"lol\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n";
        assert!(err(laughs).contains("aliases"), "{}", err(laughs));
        assert!(err("runtime_dependencies: [\"python>=3\"]\n").contains("runtime_dependencies"));
        assert!(err("runtime_dependencies:\n  - python: \">=three\"\n").contains(">=three"));
        assert!(err("key: [unclosed\n").contains("pack.yaml"));
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(err(&deep).contains("deeper"), "{}", err(&deep));
        std::fs::remove_file(dir.path().join("pack.yaml")).unwrap();
        nix_mkfifo(&dir.path().join("pack.yaml"));
        assert!(err_no_write(dir.path()).contains("FIFO"));
    }

    fn nix_mkfifo(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }

    fn err_no_write(dir: &Path) -> String {
        pack_yaml_requirements(dir, Interpreter::Python)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_newest_that_satisfies_every_constraint_is_chosen_or_the_error_says_what_exists() {
        let c = |p: &str, ver: &str| Candidate {
            path: PathBuf::from(p),
            version: v(ver),
        };
        let host = [
            c("/a/3.12", "3.12.1"),
            c("/a/3.9", "3.9.18"),
            c("/a/3.11", "3.11.7"),
        ];
        let req = |t: &str, s: &str| Requirement {
            constraint: Constraint::parse(t).unwrap(),
            source: s.into(),
        };
        assert_eq!(choose(Interpreter::Python, &[], &host).unwrap(), None);
        let chosen = choose(
            Interpreter::Python,
            &[req(">=3.8", "pack.yaml"), req("<3.12", "row")],
            &host,
        )
        .unwrap()
        .unwrap();
        assert_eq!(chosen.path, PathBuf::from("/a/3.11"));
        let err = choose(Interpreter::Python, &[req(">=3.14", "pack.yaml")], &host)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no Python on this host satisfies >=3.14 (from pack.yaml)")
                && err.contains("3.12.1 (/a/3.12)")
                && err.contains("3.9.18 (/a/3.9)"),
            "{err}"
        );
    }

    #[test]
    fn the_host_version_is_asked_once_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("python3.99");
        let counter = dir.path().join("calls");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho x >> {}\necho 'Python 3.99.1'\n",
                counter.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let found = rt.block_on(pythons("", &[dir.path().to_path_buf()]));
        assert_eq!(
            found,
            [Candidate {
                path: exe.clone(),
                version: v("3.99.1")
            }]
        );
        rt.block_on(pythons("", &[dir.path().to_path_buf()]));
        let calls = std::fs::read_to_string(&counter).unwrap();
        assert_eq!(calls.lines().count(), 1, "asked once");
        // A changed file is asked again.
        std::fs::write(&exe, "#!/bin/sh\necho 'Python 3.99.2'\n").unwrap();
        let found = rt.block_on(pythons("", &[dir.path().to_path_buf()]));
        assert_eq!(found[0].version, v("3.99.2"));
    }
}
