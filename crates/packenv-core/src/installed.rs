//! Whether the files Python installers recorded as installed are still there and still what
//! was installed: every `*.dist-info/RECORD` in a build's `site-packages`, read by the daemon
//! itself. Nothing of the environment runs, so a venv whose module file was deleted or
//! rewritten (by a step of another pack, through a shared cache: DESIGN §6) is found broken
//! even when its interpreter still answers `--version` and `pip check` (which reads only
//! metadata) passes. Each file listed with a `sha256=` hash is hashed and compared; files
//! listed without one (the RECORD itself, bytecode) are only looked up.
//!
//! A RECORD is untrusted input, written by whatever a step installed (DESIGN §6): it is read
//! only when it is a regular file below a size cap, opened non-blocking and without following a
//! symlink; the paths it lists are looked up relative to the open build directory, never
//! outside it, and without running what they name; only regular files are read, opened without
//! following a link out of the build. The whole check is bounded in the number of
//! distributions, RECORD bytes and entries, bytes hashed and time, so a hostile environment
//! costs a bounded amount of work.

mod hash;
mod lookup;

#[cfg(test)]
use lookup::find_following_no_link;
use lookup::{exists, find, open_regular_at, Lookup};

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::fingerprint::ManifestError;
use crate::fsat;

/// The largest RECORD read. Real ones stay far below (a large ML wheel lists some tens of
/// thousands of files, a few MiB); past this it is not a list of installed files.
pub const RECORD_MAX_BYTES: u64 = 16 << 20;

/// How much one check reads, looks up and hashes at most, whatever the environment holds.
/// Past any of these the rest is left unchecked (and logged): a rebuild would not make it
/// smaller. Past `hashed` or `deadline` the rest is still looked up, only not hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `*.dist-info` directories looked at.
    pub distributions: usize,
    /// RECORD bytes read, all together.
    pub bytes: u64,
    /// Entries looked up on disk, all together.
    pub entries: usize,
    /// Bytes of installed files hashed, all together. The default covers the largest
    /// environments in use (a CUDA build of torch is some 5 GB) at a few seconds of one core.
    pub hashed: u64,
    /// When hashing stops (the checks' timeout): a slow disk is not the environment's fault.
    pub deadline: Option<Instant>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            distributions: 20_000,
            bytes: 256 << 20,
            entries: 1_000_000,
            hashed: 8 << 30,
            deadline: None,
        }
    }
}

/// How many missing files an error names; the rest are counted.
const NAMED: usize = 3;

/// What the check found wrong with an installed distribution.
#[derive(Debug, thiserror::Error)]
pub enum RecordProblem {
    #[error("package {package} is missing {}", name_files(missing, *more))]
    Missing {
        /// `name version`, from the distribution's METADATA (or its directory's name).
        package: String,
        /// The first missing files, as the RECORD lists them.
        missing: Vec<String>,
        /// How many more are missing.
        more: usize,
    },
    #[error("package {package}: {path} differs from what was installed (sha256 in RECORD {recorded}, {found})")]
    Differs {
        /// `name version`, as for [`RecordProblem::Missing`].
        package: String,
        /// The file, as the RECORD lists it.
        path: String,
        /// The sha256 the RECORD gives, in its encoding.
        recorded: String,
        /// What is there now: `on disk <sha256>`, or `on disk a symbolic link`...
        found: String,
    },
    #[error("package {package}: RECORD lists {path} with the malformed hash {hash:?} (not sha256=<43 characters of URL-safe base64>): what was installed cannot be told")]
    MalformedHash {
        package: String,
        path: String,
        hash: String,
    },
    #[error("cannot check the installed files of {dist}: {source}")]
    Unreadable {
        dist: String,
        #[source]
        source: ManifestError,
    },
    /// The caller gave up on the check (its future was dropped).
    #[error("the check of the installed files was cancelled")]
    Cancelled,
}

fn name_files(missing: &[String], more: usize) -> String {
    let mut text = missing.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more file(s)"));
    }
    text
}

/// Checks every distribution installed in the Python environment at `build` (a venv:
/// `lib/python*/site-packages`); Ok when all their recorded files exist and those recorded
/// with a sha256 still have it, or when `build` holds no Python environment. Blocking: call it
/// off the async threads; setting `cancelled` stops it at the next file or chunk.
pub fn check_python(
    build: &Path,
    budget: Budget,
    cancelled: &AtomicBool,
) -> Result<(), RecordProblem> {
    let unreadable =
        |dist: &str, path: PathBuf, source: std::io::Error| RecordProblem::Unreadable {
            dist: dist.to_owned(),
            source: ManifestError::Io { path, source },
        };
    let root = open_dir(build).map_err(|e| unreadable("the environment", build.to_owned(), e))?;
    let mut walk = Walk {
        root: &root,
        build,
        left: budget,
        hashing: true,
        hash_cap: budget.hashed,
        cancelled,
    };
    for (site_rel, site) in
        site_packages(&root).map_err(|e| unreadable("the environment", build.to_owned(), e))?
    {
        let site_path = build.join(&site_rel);
        let mut dists: Vec<_> = fsat::entries(&site)
            .map_err(|e| unreadable("the environment", site_path.clone(), e))?
            .into_iter()
            .filter(|n| n.to_bytes().ends_with(b".dist-info"))
            .collect();
        // The same environment always reports the same first broken distribution.
        dists.sort();
        for name in dists {
            if walk.left.distributions == 0 {
                tracing::warn!(build = %build.display(), "more distributions than a check looks at; the rest are not checked");
                return Ok(());
            }
            walk.left.distributions -= 1;
            let name = OsStr::from_bytes(name.to_bytes())
                .to_string_lossy()
                .into_owned();
            // Installers make dist-info directories, never links to one: anything else is not
            // followed.
            let Ok(dist) = fsat::open_dir_at(&site, &name) else {
                continue;
            };
            let record_path = site_path.join(&name).join("RECORD");
            let Some(record) = open_regular_at(&dist, "RECORD", &record_path, RECORD_MAX_BYTES)
                .map_err(|source| RecordProblem::Unreadable {
                    dist: name.clone(),
                    source,
                })?
            else {
                // Installed without a RECORD (some system packagers): nothing says what
                // should be there.
                continue;
            };
            let found =
                walk.record(&site_rel, record)
                    .map_err(|source| RecordProblem::Unreadable {
                        dist: name.clone(),
                        source: ManifestError::Io {
                            path: record_path.clone(),
                            source,
                        },
                    })?;
            if cancelled.load(Ordering::Relaxed) {
                return Err(RecordProblem::Cancelled);
            }
            let package = || package_name(&dist, &name);
            if !found.missing.is_empty() {
                return Err(RecordProblem::Missing {
                    package: package(),
                    missing: found.missing,
                    more: found.more,
                });
            }
            match found.changed {
                Some(Changed::Differs {
                    path,
                    recorded,
                    found,
                }) => {
                    return Err(RecordProblem::Differs {
                        package: package(),
                        path,
                        recorded,
                        found,
                    })
                }
                Some(Changed::Malformed { path, hash }) => {
                    return Err(RecordProblem::MalformedHash {
                        package: package(),
                        path,
                        hash,
                    })
                }
                None => {}
            }
            if walk.left.entries == 0 || walk.left.bytes == 0 {
                tracing::warn!(build = %build.display(), "more installed files than a check looks at; the rest are not checked");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The `site-packages` directories of a venv, relative to it: `lib/<python or pypy
/// version>/site-packages`, and the same under `lib64` where that is a directory of its own
/// (usually it is a link to `lib`, not followed).
fn site_packages(root: &OwnedFd) -> std::io::Result<Vec<(PathBuf, OwnedFd)>> {
    let mut found = Vec::new();
    for lib in ["lib", "lib64"] {
        let Some(lib_fd) = optional_dir(root, lib)? else {
            continue;
        };
        let mut versions: Vec<_> = fsat::entries(&lib_fd)?
            .into_iter()
            .filter(|n| n.to_bytes().starts_with(b"python") || n.to_bytes().starts_with(b"pypy"))
            .collect();
        versions.sort();
        for v in versions {
            let v = OsStr::from_bytes(v.to_bytes())
                .to_string_lossy()
                .into_owned();
            let Some(version_fd) = optional_dir(&lib_fd, &v)? else {
                continue;
            };
            if let Some(site) = optional_dir(&version_fd, "site-packages")? {
                found.push((Path::new(lib).join(&v).join("site-packages"), site));
            }
        }
    }
    Ok(found)
}

/// The directory `name` in `dir`; None when it is absent, or is not a directory (a link
/// included: never followed).
fn optional_dir(dir: &OwnedFd, name: &str) -> std::io::Result<Option<OwnedFd>> {
    match fsat::open_dir_at(dir, name) {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if matches!(
                Errno::from_io_error(&e),
                Some(Errno::NOENT | Errno::NOTDIR | Errno::LOOP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One check's walk over the RECORDs of a build: where it is, and what it may still spend.
struct Walk<'a> {
    /// The build, open.
    root: &'a OwnedFd,
    /// The build's path, for absolute RECORD entries and logs.
    build: &'a Path,
    left: Budget,
    /// False once `left.hashed` or the deadline ran out: the rest is only looked up.
    hashing: bool,
    /// `Budget::hashed` at the start, for the log.
    hash_cap: u64,
    cancelled: &'a AtomicBool,
}

/// What one RECORD's files are like on disk.
#[derive(Debug, Default)]
struct Found {
    /// The first missing files, as the RECORD lists them.
    missing: Vec<String>,
    /// How many more are missing.
    more: usize,
    /// The first file that is not what was installed.
    changed: Option<Changed>,
}

#[derive(Debug)]
enum Changed {
    Differs {
        path: String,
        recorded: String,
        found: String,
    },
    Malformed {
        path: String,
        hash: String,
    },
}

impl Walk<'_> {
    /// Reads `record` line by line, looks each listed file up and hashes those listed with a
    /// sha256, until the first one that differs (the rest are still looked up).
    fn record(&mut self, site_rel: &Path, record: std::fs::File) -> std::io::Result<Found> {
        // The size was checked when it was opened; `take` holds even if the file grows since.
        let mut reader = BufReader::new(record.take(RECORD_MAX_BYTES.min(self.left.bytes)));
        let mut found = Found::default();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || self.cancelled.load(Ordering::Relaxed) {
                break;
            }
            self.left.bytes = self.left.bytes.saturating_sub(n as u64);
            let (listed, hash_field) = fields(&line);
            let Some(rel) = inside_build(listed, self.build, site_rel) else {
                continue;
            };
            if self.left.entries == 0 {
                break;
            }
            self.left.entries -= 1;
            let listed_text = || String::from_utf8_lossy(listed).into_owned();
            let recorded = match hash::parse(hash_field) {
                Ok(hash::Recorded::Sha256(d)) if found.changed.is_none() && self.hashing => Some(d),
                Ok(_) => None,
                Err(hash::Malformed) => {
                    found.changed.get_or_insert_with(|| Changed::Malformed {
                        path: listed_text(),
                        hash: String::from_utf8_lossy(hash_field).into_owned(),
                    });
                    None
                }
            };
            let on_disk = match recorded {
                Some(digest) => self.compare(&rel, &digest),
                None => match exists(self.root, &rel) {
                    Some(false) => OnDisk::Missing,
                    _ => OnDisk::Same,
                },
            };
            match on_disk {
                OnDisk::Same => {}
                OnDisk::Missing if found.missing.len() < NAMED => found.missing.push(listed_text()),
                OnDisk::Missing => found.more += 1,
                OnDisk::Differs(what) => {
                    found.changed = Some(Changed::Differs {
                        path: listed_text(),
                        recorded: hash::encode(recorded.as_ref().expect("hashed")),
                        found: what,
                    })
                }
            }
        }
        Ok(found)
    }

    /// Whether the file at `rel` still has the sha256 `recorded`. A file that cannot be judged
    /// without leaving the build, or once the hashing budget is spent, counts as the same.
    fn compare(&mut self, rel: &Path, recorded: &[u8; 32]) -> OnDisk {
        let st = match find(self.root, rel, OFlags::PATH) {
            Lookup::No => return OnDisk::Missing,
            Lookup::Unknown => return OnDisk::Same,
            Lookup::Yes(fd) => match rustix::fs::fstat(&fd) {
                Ok(st) => st,
                Err(_) => return OnDisk::Same,
            },
        };
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::RegularFile {
            // Installers record hashes of the regular files they wrote; a link, a FIFO or a
            // directory in the place of one is not what was installed, and is not opened.
            return OnDisk::Differs(format!("on disk {}", describe(kind)));
        }
        if st.st_size as u64 > self.left.hashed {
            self.stop_hashing("bytes");
            return OnDisk::Same;
        }
        // Opened again to read: the first open only looked. It must be the same file.
        let file = match find(
            self.root,
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        ) {
            Lookup::Yes(fd) => std::fs::File::from(fd),
            Lookup::No => return OnDisk::Missing,
            Lookup::Unknown => return OnDisk::Same,
        };
        match rustix::fs::fstat(&file) {
            Ok(again) if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino) => {}
            _ => return OnDisk::Same,
        }
        match hash::sha256(
            &file,
            &mut self.left.hashed,
            self.left.deadline,
            self.cancelled,
        ) {
            Ok(d) if &d == recorded => OnDisk::Same,
            Ok(d) => OnDisk::Differs(format!("on disk {}", hash::encode(&d))),
            Err(hash::Unhashed::Budget) => {
                self.stop_hashing("bytes");
                OnDisk::Same
            }
            Err(hash::Unhashed::Deadline) => {
                self.stop_hashing("time");
                OnDisk::Same
            }
            Err(hash::Unhashed::Cancelled) => OnDisk::Same,
            // Read errors of a file that opened as a regular file of the build: the disk's
            // fault, not a sign that the file changed.
            Err(hash::Unhashed::Io(e)) => {
                tracing::warn!(build = %self.build.display(), file = %rel.display(), error = %e, "cannot read an installed file to hash it; not compared");
                OnDisk::Same
            }
        }
    }

    fn stop_hashing(&mut self, what: &str) {
        if self.hashing {
            self.hashing = false;
            tracing::warn!(
                build = %self.build.display(),
                hashed_bytes_cap = self.hash_cap,
                "the {what} one verification may spend hashing installed files ran out; the rest are only checked for presence"
            );
        }
    }
}

/// What one listed file is like on disk.
enum OnDisk {
    Same,
    Missing,
    /// Not what was installed: what is there instead.
    Differs(String),
}

fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::Symlink => "a symbolic link",
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice | FileType::BlockDevice => "a device",
        _ => "not a regular file",
    }
}

/// The path a RECORD line names and its hash: its first two CSV fields, quotes undone.
fn fields(line: &[u8]) -> (&[u8], &[u8]) {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (path, rest) = field(line);
    let (hash, _) = rest.strip_prefix(b",").map_or((&b""[..], &b""[..]), field);
    (path, hash)
}

/// The first CSV field of `text` and what follows it (from the comma on).
fn field(text: &[u8]) -> (&[u8], &[u8]) {
    if let Some(rest) = text.strip_prefix(b"\"") {
        // A quoted field ends at a quote not doubled. Doubled quotes inside are rare enough
        // in file names that such an entry is skipped rather than unescaped.
        return match rest.iter().position(|&b| b == b'"') {
            Some(end) if rest.get(end + 1) != Some(&b'"') => (&rest[..end], &rest[end + 1..]),
            _ => (b"", b""),
        };
    }
    match text.iter().position(|&b| b == b',') {
        Some(end) => text.split_at(end),
        None => (text, b""),
    }
}

/// Where a listed path lies in the build, relative to it. Relative entries are relative to
/// `site-packages` (`../../../bin/tool` is the build's `bin/tool`); absolute ones count only
/// under `build`. None for what is outside the build, and for bytecode caches, which the
/// interpreter writes and deletes as it likes.
fn inside_build(listed: &[u8], build: &Path, site_rel: &Path) -> Option<PathBuf> {
    if listed.is_empty() {
        return None;
    }
    let listed = Path::new(OsStr::from_bytes(listed));
    let joined = if listed.is_absolute() {
        listed.strip_prefix(build).ok()?.to_owned()
    } else {
        site_rel.join(listed)
    };
    let mut rel = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::Normal(part) => {
                if part == "__pycache__" {
                    return None;
                }
                rel.push(part);
            }
            Component::CurDir => {}
            // Leaves the build: not this environment's file.
            Component::ParentDir if !rel.pop() => return None,
            Component::ParentDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    if rel.as_os_str().is_empty() || rel.extension().is_some_and(|e| e == "pyc") {
        return None;
    }
    Some(rel)
}

/// `name version` of a distribution, from the head of its METADATA; its directory's name
/// (`name-version.dist-info`) when that cannot be read.
fn package_name(dist: &OwnedFd, dir_name: &str) -> String {
    let from_dir = || {
        let stem = dir_name.trim_end_matches(".dist-info");
        match stem.split_once('-') {
            Some((n, v)) => format!("{n} {v}"),
            None => stem.to_owned(),
        }
    };
    // The headers come first; the description after them may be long and is not needed.
    let Ok(Some(file)) = open_regular_at(dist, "METADATA", Path::new("METADATA"), u64::MAX) else {
        return from_dir();
    };
    let mut head = Vec::new();
    if file.take(64 << 10).read_to_end(&mut head).is_err() {
        return from_dir();
    }
    let text = String::from_utf8_lossy(&head);
    let (mut name, mut version) = (None, None);
    for line in text.lines() {
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Name:") {
            name.get_or_insert(v.trim());
        } else if let Some(v) = line.strip_prefix("Version:") {
            version.get_or_insert(v.trim());
        }
    }
    match (name, version) {
        (Some(n), Some(v)) if !n.is_empty() => format!("{n} {v}"),
        _ => from_dir(),
    }
}

/// Opens a directory, never through a symlink.
fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

#[cfg(test)]
mod tests;
