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

/// Whether openat2 is known to be missing (kernel < 5.6, or a seccomp filter refusing it).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Whether `rel` exists under `root`: Some(false) when it does not, None when that cannot be
/// told without leaving the build (a link that points out of it) or reading what the daemon may
/// not. The last component is never followed, and nothing is opened for reading, so a FIFO or
/// a device listed costs nothing.
fn exists(root: &OwnedFd, rel: &Path) -> Option<bool> {
    match find(root, rel, OFlags::PATH) {
        Lookup::Yes(_) => Some(true),
        Lookup::No => Some(false),
        Lookup::Unknown => None,
    }
}

/// What looking a listed path up found.
enum Lookup {
    /// It is there, opened with the flags asked for.
    Yes(OwnedFd),
    No,
    /// It cannot be told without leaving the build or doing what the daemon may not.
    Unknown,
}

/// Opens `rel` under `root` with `flags` (and never following its last component); links
/// inside the build are followed where openat2 can keep them inside, never out of it.
fn find(root: &OwnedFd, rel: &Path, flags: OFlags) -> Lookup {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match rustix::fs::openat2(
            root,
            rel,
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => return Lookup::Yes(fd),
            Err(Errno::NOENT | Errno::NOTDIR) => return Lookup::No,
            Err(Errno::NOSYS | Errno::PERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
            Err(_) => return Lookup::Unknown,
        }
    }
    find_following_no_link(root, rel, flags)
}

/// [`find`] without openat2: one component at a time, following no link at all, so an entry
/// behind a link is left unjudged.
fn find_following_no_link(root: &OwnedFd, rel: &Path, flags: OFlags) -> Lookup {
    let mut dir: Option<OwnedFd> = None;
    let mut parts = rel.components().peekable();
    while let Some(Component::Normal(part)) = parts.next() {
        let at = dir.as_ref().map_or(root.as_fd(), |d| d.as_fd());
        if parts.peek().is_none() {
            return match rustix::fs::openat(at, part, flags, Mode::empty()) {
                Ok(fd) => Lookup::Yes(fd),
                Err(Errno::NOENT | Errno::NOTDIR) => Lookup::No,
                Err(_) => Lookup::Unknown,
            };
        }
        match rustix::fs::openat(
            at,
            part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => dir = Some(fd),
            Err(Errno::NOENT | Errno::NOTDIR) => {
                // A link where a directory was expected is ENOTDIR too: say nothing of it.
                return match rustix::fs::statat(at, part, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                        Lookup::Unknown
                    }
                    _ => Lookup::No,
                };
            }
            Err(_) => return Lookup::Unknown,
        }
    }
    Lookup::Unknown
}

/// Opens `name` in `dir` for reading if it is a regular file of at most `max` bytes: None when
/// absent. Non-blocking and not following a link, so a FIFO, a device or a link is refused at
/// once (as [`crate::fingerprint::read_manifest`] refuses them in a pack).
fn open_regular_at(
    dir: &OwnedFd,
    name: &str,
    path: &Path,
    max: u64,
) -> Result<Option<std::fs::File>, ManifestError> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => {
            return Err(ManifestError::NotRegular {
                path: path.to_owned(),
                kind: "a symbolic link",
            })
        }
        Err(e) => {
            return Err(ManifestError::Io {
                path: path.to_owned(),
                source: e.into(),
            })
        }
    };
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|source| ManifestError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(ManifestError::NotRegular {
            path: path.to_owned(),
            kind: crate::fingerprint::kind_of(meta.file_type()),
        });
    }
    if meta.len() > max {
        return Err(ManifestError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(Some(file))
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
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn check(build: &Path, budget: Budget) -> Result<(), RecordProblem> {
        check_python(build, budget, &AtomicBool::new(false))
    }

    /// A venv-shaped build with one distribution whose RECORD is `record`.
    fn venv(record: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("build");
        let site = build.join("lib/python3.11/site-packages");
        std::fs::create_dir_all(site.join("demo-0.1.dist-info")).unwrap();
        std::fs::create_dir_all(site.join("demo")).unwrap();
        std::fs::create_dir_all(build.join("bin")).unwrap();
        std::fs::write(site.join("demo/__init__.py"), "").unwrap();
        std::fs::write(build.join("bin/demo"), "").unwrap();
        std::fs::write(
            site.join("demo-0.1.dist-info/METADATA"),
            "Metadata-Version: 2.1\nName: Demo-Pkg\nVersion: 0.1\n\nName: not this\n",
        )
        .unwrap();
        std::fs::write(site.join("demo-0.1.dist-info/RECORD"), record).unwrap();
        std::os::unix::fs::symlink("lib", build.join("lib64")).unwrap();
        (dir, build)
    }

    #[test]
    fn a_complete_distribution_passes_with_scripts_caches_and_outside_paths() {
        let (_dir, build) = venv(
            "demo/__init__.py,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n\
             demo/__pycache__/__init__.cpython-311.pyc,,\n\
             demo/gone.pyc,,\n\
             ../../../bin/demo,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n\
             demo/__init__.py,sha512=not-checked,1\n\
             ../../../../../../etc/passwd,,\n\
             /etc/shadow,,\n\
             \"demo/__init__.py\",,\n\
             demo-0.1.dist-info/RECORD,,\n\
             \n",
        );
        check(&build, Budget::default()).unwrap();
    }

    #[test]
    fn a_missing_file_names_the_package_and_the_file() {
        let (_dir, build) = venv(
            "demo/__init__.py,,\ndemo/a.py,,\n../../../bin/gone,,\ndemo/b.py,,\ndemo/c.py,,\n",
        );
        let absolute = build.join("lib/python3.11/site-packages/demo/abs.py");
        let record = build.join("lib/python3.11/site-packages/demo-0.1.dist-info/RECORD");
        let mut text = std::fs::read_to_string(&record).unwrap();
        text.push_str(&format!("{},,\n", absolute.display()));
        std::fs::write(&record, text).unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "package Demo-Pkg 0.1 is missing demo/a.py, ../../../bin/gone, demo/b.py and 2 more file(s)"
        );
    }

    /// The RECORD hash of an empty file, which `venv` makes `demo/__init__.py`.
    const EMPTY_SHA256: &str = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";

    /// A venv whose RECORD lists `demo/__init__.py` (empty) with its sha256.
    fn hashed_venv() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let (dir, build) = venv(&format!(
            "demo/__init__.py,sha256={EMPTY_SHA256},0\ndemo-0.1.dist-info/RECORD,,\n"
        ));
        let module = build.join("lib/python3.11/site-packages/demo/__init__.py");
        (dir, build, module)
    }

    #[test]
    fn a_file_changed_after_install_names_the_package_the_file_and_both_hashes() {
        let (_dir, build, module) = hashed_venv();
        check(&build, Budget::default()).unwrap();
        std::fs::write(&module, "import os\n").unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        let now = hash::encode(&sha2::Sha256::digest(b"import os\n").into());
        assert_eq!(
            err.to_string(),
            format!("package Demo-Pkg 0.1: demo/__init__.py differs from what was installed (sha256 in RECORD {EMPTY_SHA256}, on disk {now})")
        );
    }

    #[test]
    fn a_missing_file_is_named_before_a_changed_one() {
        let (_dir, build) = venv(&format!(
            "demo/__init__.py,sha256={EMPTY_SHA256},0\ndemo/gone.py,sha256={EMPTY_SHA256},0\n"
        ));
        std::fs::write(
            build.join("lib/python3.11/site-packages/demo/__init__.py"),
            "x",
        )
        .unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "package Demo-Pkg 0.1 is missing demo/gone.py"
        );
    }

    #[test]
    fn a_link_or_a_fifo_in_place_of_a_hashed_file_differs_and_is_not_opened() {
        let (_dir, build, module) = hashed_venv();
        std::fs::remove_file(&module).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &module).unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert!(
            err.to_string().ends_with(&format!(
                "(sha256 in RECORD {EMPTY_SHA256}, on disk a symbolic link)"
            )),
            "{err}"
        );
        std::fs::remove_file(&module).unwrap();
        nix::unistd::mkfifo(&module, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().ends_with("on disk a FIFO)"), "{err}");
    }

    #[test]
    fn a_malformed_hash_fails_the_check_naming_the_file_and_the_hash() {
        let (_dir, build) = venv("demo/__init__.py,sha256=not*base64,0\n");
        let err = check(&build, Budget::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "package Demo-Pkg 0.1: RECORD lists demo/__init__.py with the malformed hash \"sha256=not*base64\" (not sha256=<43 characters of URL-safe base64>): what was installed cannot be told"
        );
        let (_dir, build) = venv("\"demo/__init__.py\",\"sha256\",0\n");
        assert!(matches!(
            check(&build, Budget::default()),
            Err(RecordProblem::MalformedHash { .. })
        ));
    }

    #[test]
    fn past_the_bytes_or_the_time_to_hash_files_are_only_looked_up() {
        let (_dir, build, module) = hashed_venv();
        std::fs::write(&module, "changed").unwrap();
        let no_bytes = Budget {
            hashed: 3,
            ..Budget::default()
        };
        check(&build, no_bytes).unwrap();
        let no_time = Budget {
            deadline: Some(Instant::now()),
            ..Budget::default()
        };
        check(&build, no_time).unwrap();
        std::fs::remove_file(&module).unwrap();
        assert!(matches!(
            check(&build, no_bytes),
            Err(RecordProblem::Missing { .. })
        ));
    }

    #[test]
    fn a_cancelled_check_says_so_instead_of_passing() {
        let (_dir, build, _) = hashed_venv();
        let err = check_python(&build, Budget::default(), &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(err, RecordProblem::Cancelled), "{err}");
    }

    #[test]
    fn a_build_without_site_packages_has_nothing_to_check() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("node_modules")).unwrap();
        check(dir.path(), Budget::default()).unwrap();
    }

    #[test]
    fn a_link_out_of_the_build_is_not_followed_and_not_called_missing() {
        let (_dir, build) = venv("demo/out/secret,,\n");
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            outside.path(),
            build.join("lib/python3.11/site-packages/demo/out"),
        )
        .unwrap();
        // Whether `secret` exists out there is never asked.
        check(&build, Budget::default()).unwrap();
    }

    #[test]
    fn a_fifo_a_link_or_an_oversized_record_is_refused_at_once() {
        let (_dir, build) = venv("");
        let record = build.join("lib/python3.11/site-packages/demo-0.1.dist-info/RECORD");
        std::fs::remove_file(&record).unwrap();
        nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");

        std::fs::remove_file(&record).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &record).unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().contains("a symbolic link"), "{err}");

        std::fs::remove_file(&record).unwrap();
        std::fs::File::create(&record)
            .unwrap()
            .set_len(RECORD_MAX_BYTES + 1)
            .unwrap();
        let err = check(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().contains("is larger than"), "{err}");
    }

    #[test]
    fn past_its_budget_a_check_stops_and_passes() {
        let (_dir, build) = venv("demo/__init__.py,,\ndemo/gone.py,,\n");
        let budget = Budget {
            entries: 1,
            ..Budget::default()
        };
        check(&build, budget).unwrap();
    }

    #[test]
    fn without_openat2_links_are_not_followed_at_all() {
        let (_dir, build) = venv("");
        let root = open_dir(&build).unwrap();
        let site = Path::new("lib/python3.11/site-packages");
        let exists = |rel: &Path| match find_following_no_link(&root, rel, OFlags::PATH) {
            Lookup::Yes(_) => Some(true),
            Lookup::No => Some(false),
            Lookup::Unknown => None,
        };
        assert_eq!(exists(&site.join("demo/__init__.py")), Some(true));
        assert_eq!(exists(&site.join("demo/nope.py")), Some(false));
        assert_eq!(exists(&site.join("nodir/nope.py")), Some(false));
        assert_eq!(
            exists(Path::new("lib64/python3.11/site-packages/demo/__init__.py")),
            None
        );
    }
}
