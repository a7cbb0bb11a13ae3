//! A requirements file and what it includes, read as pip reads them: every `-r`/`-c`
//! include, `-e` path, `file:` URL and bare local path must stay inside the pack.

use super::*;

/// Checks a requirements file and, breadth first, every file it includes, within the
/// fingerprint's limits: an include past them would be followed by pip unchecked, so it fails.
pub(super) fn check_requirements(
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
pub(super) enum Target {
    /// A local path, as pip would read it (a `file:` URL already turned into one).
    Path(String),
    /// A `file://host/...` URL: a file on another machine's share, never the pack's.
    RemoteFile,
}

/// A file or local path a requirements file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ref {
    /// 1-based, the first physical line of a continued line.
    pub(super) line: usize,
    /// How it is named: `-r`, `-e`, `a local path`, ...
    pub(super) what: &'static str,
    /// As written in the file.
    pub(super) written: String,
    pub(super) target: Target,
    /// A requirements file pip reads and follows (`-r`, `-c`), not a package or a directory.
    pub(super) file: bool,
}

/// The files and local paths a requirements file names, read as pip reads them: `-r`/`-c`
/// includes, `-e` paths, `file:` URLs (also as `name @ file:...`),
/// and bare local paths (`./lib`, `../x.whl`). Remote URLs and plain specifiers are no path.
pub(super) fn requirement_refs(content: &[u8]) -> Vec<Ref> {
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
pub(super) fn file_url(s: &str) -> Option<Target> {
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
