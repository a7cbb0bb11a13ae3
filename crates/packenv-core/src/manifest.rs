//! A pack's files read beneath the pack's directory, and the check that every file and path a
//! build's dependency manifests make an installer read stays inside the pack (DESIGN §6,
//! "Input files"; issue 21).
//!
//! pip, uv and npm follow what a manifest names: `-r /etc/shadow`, a `requirements.txt` that
//! is a symlink, `-e ../elsewhere`, `"file:../x"`. Running as the daemon's (or the build's)
//! user, they read the file and print its lines in their errors, which land in the row's
//! `install_log` and `install_error`. So before a step runs, [`check_steps`] reads each
//! manifest the steps name, and what it includes, with `openat2(RESOLVE_BENEATH)` from the
//! pack's open directory: the kernel resolves every component and every symlink and refuses
//! any step out of the pack, so no byte of an outside file is ever read here, and a path an
//! installer would follow out of the pack fails the row before the installer runs.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::fingerprint::MANIFEST_MAX_BYTES;
use crate::fingerprint::{read_opened, ManifestError, INCLUDE_DEPTH, INCLUDE_FILES};

/// A pack's directory, open, that paths are resolved beneath.
#[derive(Debug)]
pub struct PackDir {
    fd: OwnedFd,
    /// The path the pack was opened by, and the same without symlinks: an absolute path in a
    /// manifest may name the pack either way.
    named: PathBuf,
    real: PathBuf,
}

/// What a path names, resolved beneath the pack.
#[derive(Debug)]
pub enum Found<T> {
    Inside(T),
    /// Absent inside the pack (an installer reports that itself, without reading anything).
    Missing,
    /// Absolute, `..` past the pack's root, or through a symlink that leads out of it.
    Outside,
}

impl PackDir {
    /// Opens the pack's directory. The pack's own path comes from the row and the config, not
    /// from the pack, so it is followed.
    pub fn open(path: &Path) -> io::Result<PackDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        }))
        .or_else(|_| std::fs::canonicalize(path))?;
        Ok(PackDir {
            fd,
            named: path.to_owned(),
            real,
        })
    }

    /// `path` relative to the pack, or None when it lies outside lexically (an absolute path
    /// elsewhere). `..` is left to the kernel, which knows where it leads.
    fn relative(&self, path: &Path) -> Option<PathBuf> {
        if !path.is_absolute() {
            return Some(path.to_owned());
        }
        let rel = path
            .strip_prefix(&self.named)
            .or_else(|_| path.strip_prefix(&self.real))
            .ok()?;
        Some(rel.to_owned())
    }

    /// Opens `path` (relative to the pack, or absolute) with `flags`, never leaving the pack.
    pub fn open_beneath(&self, path: &Path, flags: OFlags) -> io::Result<Found<OwnedFd>> {
        let Some(rel) = self.relative(path) else {
            return Ok(Found::Outside);
        };
        match self.openat2(&rel, flags)? {
            Found::Outside => {}
            found => return Ok(found),
        }
        // RESOLVE_BENEATH refuses every absolute symlink, even one into the pack. Such a
        // link is followed once more by its real path, which must be inside; opened again
        // beneath, so a link swapped in between is refused all the same.
        match std::fs::canonicalize(self.real.join(&rel)) {
            Ok(real) => match real.strip_prefix(&self.real) {
                Ok(inner) => self.openat2(inner, flags),
                Err(_) => Ok(Found::Outside),
            },
            Err(_) => Ok(Found::Outside),
        }
    }

    fn openat2(&self, rel: &Path, flags: OFlags) -> io::Result<Found<OwnedFd>> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        // openat2 refuses O_PATH with any flag it ignores.
        let flags = if flags.contains(OFlags::PATH) {
            flags | OFlags::CLOEXEC
        } else {
            flags | OFlags::CLOEXEC | OFlags::NOCTTY
        };
        for _ in 0..8 {
            match rustix::fs::openat2(&self.fd, rel, flags, Mode::empty(), resolve) {
                Ok(fd) => return Ok(Found::Inside(fd)),
                Err(rustix::io::Errno::XDEV) => return Ok(Found::Outside),
                // A link loop inside the pack: the installer fails on it the same way, with
                // nothing to show, and another attempt would not help.
                Err(
                    rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP,
                ) => return Ok(Found::Missing),
                // A rename elsewhere on the system raced the lookup: the kernel asks to retry.
                Err(rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::from(io::ErrorKind::Interrupted))
    }

    /// Reads the pack file `path` as a manifest: a regular file of at most `max` bytes, opened
    /// non-blocking beneath the pack. `Outside` when it leads out of the pack: then nothing of
    /// it is read.
    pub fn read(&self, path: &Path, max: u64) -> Result<Found<Vec<u8>>, ManifestError> {
        let shown = self.named.join(path);
        let flags = OFlags::RDONLY | OFlags::NONBLOCK;
        match self.open_beneath(path, flags) {
            Ok(Found::Inside(fd)) => Ok(Found::Inside(read_opened(File::from(fd), &shown, max)?)),
            Ok(Found::Missing) => Ok(Found::Missing),
            Ok(Found::Outside) => Ok(Found::Outside),
            Err(source) => Err(ManifestError::Io {
                path: shown,
                source,
            }),
        }
    }

    /// Whether `path` (a file or a directory) stays inside the pack; nothing of it is read.
    fn stays_inside(&self, path: &Path) -> io::Result<bool> {
        Ok(!matches!(
            self.open_beneath(path, OFlags::PATH)?,
            Found::Outside
        ))
    }
}

/// Reads the pack file `name` (relative to the pack) as [`crate::fingerprint::read_manifest`]
/// does, but beneath the pack: `None` when absent, an error when it leads out of the pack
/// (then nothing of it is read).
pub fn read_pack_file(
    pack_path: &Path,
    name: &str,
    max: u64,
) -> Result<Option<Vec<u8>>, ManifestError> {
    let pack = match PackDir::open(pack_path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ManifestError::Io {
                path: pack_path.to_owned(),
                source,
            })
        }
    };
    match pack.read(Path::new(name), max)? {
        Found::Inside(c) => Ok(Some(c)),
        Found::Missing => Ok(None),
        Found::Outside => Err(ManifestError::Outside {
            path: pack_path.join(name),
        }),
    }
}

/// A path a manifest or a step makes an installer read that leads out of the pack, or a
/// manifest that cannot be checked.
#[derive(Debug, thiserror::Error)]
pub enum IncludeError {
    #[error("{manifest} (read by step '{step}') resolves outside the pack directory {}: a symlink leading out of the pack; refused before any step ran, and not read", pack.display())]
    ManifestOutside {
        pack: PathBuf,
        manifest: String,
        step: String,
    },
    #[error("{manifest}, line {line}: {what} '{include}' resolves outside the pack directory {}: includes and local paths must stay inside the pack (symlinks followed); refused before any step ran, and not read", pack.display())]
    Outside {
        pack: PathBuf,
        manifest: String,
        line: usize,
        what: String,
        include: String,
    },
    #[error("{manifest}, line {line}: {what} '{include}' cannot be checked ({why}); refused before any step ran")]
    Unchecked {
        manifest: String,
        line: usize,
        what: String,
        include: String,
        why: &'static str,
    },
    #[error("{manifest} includes more than {limit} (packenvd checks every include before an installer follows it)")]
    TooMany { manifest: String, limit: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl IncludeError {
    /// Only an I/O error may pass; a path that leads out of the pack leads out again.
    pub fn retryable(&self) -> bool {
        matches!(self, IncludeError::Manifest(e) if e.retryable())
    }
}

/// How a step's argument names a file of the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requirements,
    PackageJson,
    NpmLock,
    /// Any other pack path a step names (`cp {pack_path}/x`): only where it leads is checked.
    Other,
}

fn kind_of(path: &Path) -> Kind {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    match &*name {
        "package.json" => Kind::PackageJson,
        "package-lock.json" | "npm-shrinkwrap.json" => Kind::NpmLock,
        n if n.ends_with(".txt") || n.ends_with(".in") => Kind::Requirements,
        _ => Kind::Other,
    }
}

const FILE_OPTIONS: &[&str] = &["-r", "-c", "--requirement", "--constraint"];

/// Checks, before anything runs, every pack file the steps name and everything those
/// manifests make an installer read: `steps` are (step name, working directory, arguments),
/// rendered. Blocking: call it off the async threads.
pub fn check_steps(
    pack_path: &Path,
    steps: &[(String, PathBuf, Vec<String>)],
) -> Result<(), IncludeError> {
    let pack = match PackDir::open(pack_path) {
        Ok(p) => p,
        Err(source) => {
            return Err(ManifestError::Io {
                path: pack_path.to_owned(),
                source,
            }
            .into())
        }
    };
    let io = |path: &Path| {
        let path = pack_path.join(path);
        move |source| IncludeError::Manifest(ManifestError::Io { path, source })
    };
    let mut named: Vec<(String, PathBuf)> = Vec::new();
    for (step, cwd, args) in steps {
        for (i, arg) in args.iter().enumerate() {
            let after_file_option = i > 0 && FILE_OPTIONS.contains(&args[i - 1].as_str());
            let value = match arg.split_once('=') {
                Some((opt, v)) if opt.starts_with('-') => v,
                _ => arg.as_str(),
            };
            let path = Path::new(value);
            let path = if path.is_absolute() {
                path.to_owned()
            } else if after_file_option {
                cwd.join(path)
            } else {
                continue;
            };
            // The spec's own paths elsewhere (`{env_path}`, a system file an operator chose)
            // are the operator's; only what lies in the pack is the pack's to choose.
            if let Some(rel) = pack.relative(&path).filter(|_| path.starts_with(pack_path)) {
                named.push((step.clone(), rel));
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut files = 0;
    for (step, rel) in named {
        if !seen.insert(rel.clone()) {
            continue;
        }
        let shown = rel.display().to_string();
        let kind = kind_of(&rel);
        if kind == Kind::Other {
            if !pack.stays_inside(&rel).map_err(io(&rel))? {
                return Err(IncludeError::ManifestOutside {
                    pack: pack_path.to_owned(),
                    manifest: shown,
                    step,
                });
            }
            continue;
        }
        let content = match pack.read(&rel, MANIFEST_MAX_BYTES)? {
            Found::Inside(c) => c,
            Found::Missing => continue,
            Found::Outside => {
                return Err(IncludeError::ManifestOutside {
                    pack: pack_path.to_owned(),
                    manifest: shown,
                    step,
                })
            }
        };
        match kind {
            Kind::Requirements => check_requirements(&pack, pack_path, &rel, content, &mut files)?,
            Kind::PackageJson | Kind::NpmLock => {
                check_npm(&pack, pack_path, &rel, &content, kind == Kind::NpmLock)?
            }
            Kind::Other => {}
        }
    }
    Ok(())
}

/// Checks a requirements file and, breadth first, every file it includes, within the
/// fingerprint's limits: an include past them would be followed by pip unchecked, so it fails.
fn check_requirements(
    pack: &PackDir,
    pack_path: &Path,
    top: &Path,
    content: Vec<u8>,
    files: &mut usize,
) -> Result<(), IncludeError> {
    let mut queue = vec![(top.to_owned(), content)];
    let mut seen = BTreeSet::from([lexical(top)]);
    let mut depth = 0;
    while !queue.is_empty() {
        let mut next = Vec::new();
        for (rel, content) in queue {
            *files += 1;
            let manifest = rel.display().to_string();
            if *files > INCLUDE_FILES {
                return Err(IncludeError::TooMany {
                    manifest,
                    limit: format!("{INCLUDE_FILES} requirements files"),
                });
            }
            let dir = rel.parent().unwrap_or(Path::new("")).to_owned();
            for r in requirement_refs(&content) {
                let outside = |include: &str| IncludeError::Outside {
                    pack: pack_path.to_owned(),
                    manifest: manifest.clone(),
                    line: r.line,
                    what: r.what.to_string(),
                    include: include.to_owned(),
                };
                let target = match &r.target {
                    Target::Path(p) => p.clone(),
                    Target::RemoteFile => return Err(outside(&r.written)),
                };
                if target.contains("${") || target.starts_with('~') {
                    return Err(IncludeError::Unchecked {
                        manifest,
                        line: r.line,
                        what: r.what.to_string(),
                        include: r.written.clone(),
                        why: "pip expands `~` and `${VAR}` to places outside the pack",
                    });
                }
                let path = Path::new(&target);
                if r.file {
                    // pip reads `-r`/`-c` relative to the including file.
                    let at = dir.join(path);
                    match pack.read(&at, MANIFEST_MAX_BYTES)? {
                        Found::Inside(c) => {
                            if depth + 1 > INCLUDE_DEPTH {
                                return Err(IncludeError::TooMany {
                                    manifest,
                                    limit: format!("{INCLUDE_DEPTH} levels of -r/-c includes"),
                                });
                            }
                            let key = lexical(&at);
                            if seen.insert(key.clone()) {
                                next.push((key, c));
                            }
                        }
                        Found::Missing => {}
                        Found::Outside => return Err(outside(&r.written)),
                    }
                } else {
                    // Other local paths are read relative to pip's working directory (the
                    // pack, for the default runtimes); both readings must stay inside.
                    for base in [Path::new(""), dir.as_path()] {
                        let at = base.join(path);
                        if !pack.stays_inside(&at).map_err(|source| ManifestError::Io {
                            path: pack_path.join(&at),
                            source,
                        })? {
                            return Err(outside(&r.written));
                        }
                    }
                }
            }
        }
        queue = next;
        depth += 1;
    }
    Ok(())
}

/// `path` with `.` dropped and `a/..` folded, to name an include once.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// What a line of a requirements file names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A local path, as pip would read it (a `file:` URL already turned into one).
    Path(String),
    /// A `file://host/...` URL: a file on another machine's share, never the pack's.
    RemoteFile,
}

/// A file or local path a requirements file names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ref {
    /// 1-based, the first physical line of a continued line.
    line: usize,
    /// How it is named: `-r`, `-e`, `a local path`, ...
    what: &'static str,
    /// As written in the file.
    written: String,
    target: Target,
    /// A requirements file pip reads and follows (`-r`, `-c`), not a package or a directory.
    file: bool,
}

/// The files and local paths a requirements file names, read as pip reads them: `-r`/`-c`
/// includes, `-e` paths, `file:` URLs (also as `name @ file:...`),
/// and bare local paths (`./lib`, `../x.whl`). Remote URLs and plain specifiers are no path.
fn requirement_refs(content: &[u8]) -> Vec<Ref> {
    let text = String::from_utf8_lossy(content);
    let mut out = Vec::new();
    let mut logical = String::new();
    let mut first_line = 0;
    for (i, physical) in text.lines().enumerate() {
        if logical.is_empty() {
            first_line = i + 1;
        }
        if let Some(cont) = physical.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(physical);
        let line = std::mem::take(&mut logical);
        refs_of_line(&line, first_line, &mut out);
    }
    if !logical.is_empty() {
        refs_of_line(&logical, first_line, &mut out);
    }
    out
}

fn refs_of_line(line: &str, n: usize, out: &mut Vec<Ref>) {
    let line = strip_comment(line).trim();
    if line.is_empty() {
        return;
    }
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let mut push = |what: &'static str, written: &str, file: bool, dir_like: bool| {
        let written = written.trim_matches(['"', '\'']);
        let target = if let Some(t) = file_url(written) {
            t
        } else if has_scheme(written) {
            return;
        } else if dir_like || file || looks_like_path(written) {
            Target::Path(strip_extras(written).to_owned())
        } else {
            return;
        };
        out.push(Ref {
            line: n,
            what,
            written: written.to_owned(),
            target,
            file,
        });
    };
    if tokens[0].starts_with('-') {
        let mut i = 0;
        while i < tokens.len() {
            let tok = tokens[i];
            let opt = OPTIONS
                .iter()
                .find(|(name, ..)| tok == *name || option_value(tok, name).is_some());
            let Some(&(name, what, file, dir_like)) = opt else {
                i += 1;
                continue;
            };
            let value = match option_value(tok, name) {
                Some(v) => Some(v),
                None => {
                    i += 1;
                    tokens.get(i).copied()
                }
            };
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                push(what, v, file, dir_like);
            }
            i += 1;
        }
        return;
    }
    if let Some(url) = pep508_url(line) {
        if let Some(t) = file_url(url) {
            out.push(Ref {
                line: n,
                what: "a direct reference",
                written: url.to_owned(),
                target: t,
                file: false,
            });
        } else if !has_scheme(url) {
            push("a direct reference", url, false, true);
        }
        return;
    }
    let first = tokens[0].split(';').next().unwrap_or_default();
    push("a local path", first, false, false);
}

/// The options whose value pip reads as a file or a path: (name, how the error calls it,
/// followed as a requirements file, always a path when it has no scheme). `--find-links`
/// and the index options are left out: pip lists a directory there and reads only
/// distributions from it, never prints a file's content, and a wheelhouse on the host is
/// a common, legitimate use.
const OPTIONS: &[(&str, &str, bool, bool)] = &[
    ("--requirement", "-r", true, true),
    ("--constraint", "-c", true, true),
    ("--editable", "-e", false, true),
    ("-r", "-r", true, true),
    ("-c", "-c", true, true),
    ("-e", "-e", false, true),
];

/// The value attached to `tok` for option `name`: `--name=v`, or `-rv` for a short option.
fn option_value<'a>(tok: &'a str, name: &str) -> Option<&'a str> {
    let rest = tok.strip_prefix(name)?;
    if name.starts_with("--") {
        rest.strip_prefix('=')
    } else if rest.is_empty() {
        None
    } else {
        Some(rest.strip_prefix('=').unwrap_or(rest))
    }
}

/// A comment starts a line or follows whitespace.
fn strip_comment(line: &str) -> &str {
    if line.trim_start().starts_with('#') {
        return "";
    }
    let b = line.as_bytes();
    for i in 1..b.len() {
        if b[i] == b'#' && (b[i - 1] == b' ' || b[i - 1] == b'\t') {
            return &line[..i];
        }
    }
    line
}

fn has_scheme(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, _)) => {
            scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

fn looks_like_path(s: &str) -> bool {
    const ARCHIVES: &[&str] = &[
        ".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar",
    ];
    s.starts_with(['.', '/', '~']) || s.contains('/') || ARCHIVES.iter().any(|a| s.ends_with(a))
}

/// `./lib[extra]` names `./lib`.
fn strip_extras(s: &str) -> &str {
    match s.rfind('[') {
        Some(i) if s.ends_with(']') => &s[..i],
        _ => s,
    }
}

/// The URL of a PEP 508 direct reference, `name[extras] @ url`.
fn pep508_url(line: &str) -> Option<&str> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
        .unwrap_or(line.len());
    if name_end == 0 {
        return None;
    }
    let mut rest = line[name_end..].trim_start();
    if rest.starts_with('[') {
        rest = rest[rest.find(']')? + 1..].trim_start();
    }
    let url = rest.strip_prefix('@')?.trim_start();
    let url = url.split_whitespace().next()?;
    Some(url.split(';').next().unwrap_or(url))
}

/// The local path of a `file:` URL (`file:///p`, `file://localhost/p`, `file:rel`, also as
/// the tail of `git+file://`), percent-decoded; `None` when `s` is no file URL.
fn file_url(s: &str) -> Option<Target> {
    let lower = s.to_ascii_lowercase();
    let at = if lower.starts_with("file:") {
        0
    } else {
        lower.find("+file:")? + 1
    };
    let rest = &s[at + "file:".len()..];
    let rest = rest.split(['#', '?']).next().unwrap_or_default();
    let path = match rest.strip_prefix("//") {
        Some(after) => {
            let (host, path) = after.split_at(after.find('/').unwrap_or(after.len()));
            if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
                return Some(Target::RemoteFile);
            }
            path
        }
        None => rest,
    };
    Some(Target::Path(percent_decode(path)))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a `package.json` (its dependencies' `file:`/`link:`/path specs and its workspaces)
/// or an npm lock file (its packages' locations and `file:`/linked `resolved` paths): each
/// must stay inside the pack, read from the manifest's directory.
fn check_npm(
    pack: &PackDir,
    pack_path: &Path,
    rel: &Path,
    content: &[u8],
    lock: bool,
) -> Result<(), IncludeError> {
    // Not JSON: npm fails on it by itself, with nothing outside the pack to show.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(content) else {
        return Ok(());
    };
    let mut found: Vec<(String, String)> = Vec::new();
    if lock {
        npm_lock_paths(&value, "", &mut found);
    } else {
        for section in [
            "dependencies",
            "devDependencies",
            "optionalDependencies",
            "peerDependencies",
            "overrides",
            "resolutions",
        ] {
            npm_spec_paths(&value[section], section, &mut found);
        }
        let workspaces = match &value["workspaces"] {
            serde_json::Value::Array(a) => a.clone(),
            other => other["packages"].as_array().cloned().unwrap_or_default(),
        };
        for w in workspaces.iter().filter_map(|w| w.as_str()) {
            // A glob's fixed prefix is where npm starts looking.
            let prefix = w.split(['*', '?', '[', '{']).next().unwrap_or_default();
            found.push(("workspaces".into(), prefix.to_owned()));
        }
    }
    let text = String::from_utf8_lossy(content);
    let dir = rel.parent().unwrap_or(Path::new(""));
    for (what, written) in found {
        let path = match file_url(&written) {
            Some(Target::Path(p)) => p,
            Some(Target::RemoteFile) => String::from("/"),
            None => written.strip_prefix("link:").unwrap_or(&written).to_owned(),
        };
        let at = dir.join(&path);
        let inside = !path.starts_with('~')
            && pack.stays_inside(&at).map_err(|source| ManifestError::Io {
                path: pack_path.join(&at),
                source,
            })?;
        if !inside {
            let quoted = serde_json::to_string(&written).unwrap_or_default();
            let line = text
                .find(&quoted)
                .map_or(0, |i| text[..i].matches('\n').count() + 1);
            return Err(IncludeError::Outside {
                pack: pack_path.to_owned(),
                manifest: rel.display().to_string(),
                line,
                what,
                include: written,
            });
        }
    }
    Ok(())
}

/// An npm dependency spec that names a local path.
fn npm_local(spec: &str) -> bool {
    let lower = spec.to_ascii_lowercase();
    lower.starts_with("file:")
        || lower.starts_with("link:")
        || lower.contains("+file:")
        || spec.starts_with(['.', '/', '~'])
}

fn npm_spec_paths(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::String(s) if npm_local(s) => out.push((at.to_owned(), s.clone())),
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                npm_spec_paths(v, &format!("{at}.{k}"), out);
            }
        }
        _ => {}
    }
}

fn npm_lock_paths(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    let serde_json::Value::Object(m) = v else {
        return;
    };
    for (k, v) in m {
        let here = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        if at == "packages" && !k.is_empty() && !k.starts_with("node_modules/") {
            // A package's location relative to the lock file: a workspace or a linked dir.
            out.push((format!("packages[{k:?}]"), k.clone()));
        }
        let linked = v["link"].as_bool() == Some(true);
        if let Some(resolved) = v["resolved"].as_str() {
            if linked || npm_local(resolved) {
                out.push((format!("{here}.resolved"), resolved.to_owned()));
            }
        }
        if let Some(version) = v["version"].as_str().filter(|s| npm_local(s)) {
            out.push((format!("{here}.version"), version.to_owned()));
        }
        npm_lock_paths(v, &here, out);
    }
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
