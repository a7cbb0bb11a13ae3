//! Whether the files Python installers recorded as installed are still there: every
//! `*.dist-info/RECORD` in a build's `site-packages`, read by the daemon itself. Nothing of the
//! environment runs, so a venv whose module file was deleted is found broken even when its
//! interpreter still answers `--version` and `pip check` (which reads only metadata) passes.
//!
//! A RECORD is untrusted input, written by whatever a step installed (DESIGN §6): it is read
//! only when it is a regular file below a size cap, opened non-blocking and without following a
//! symlink; the paths it lists are looked up relative to the open build directory, never
//! outside it, and without reading or running what they name. The whole check is bounded in
//! the number of distributions, RECORD bytes and entries, so a hostile environment costs a
//! bounded amount of work.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::fingerprint::ManifestError;
use crate::fsat;

/// The largest RECORD read. Real ones stay far below (a large ML wheel lists some tens of
/// thousands of files, a few MiB); past this it is not a list of installed files.
pub const RECORD_MAX_BYTES: u64 = 16 << 20;

/// How much one check reads and looks up at most, whatever the environment holds. Past any of
/// these the rest is left unchecked (and logged): a rebuild would not make it smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `*.dist-info` directories looked at.
    pub distributions: usize,
    /// RECORD bytes read, all together.
    pub bytes: u64,
    /// Entries looked up on disk, all together.
    pub entries: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            distributions: 20_000,
            bytes: 256 << 20,
            entries: 1_000_000,
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
    #[error("cannot check the installed files of {dist}: {source}")]
    Unreadable {
        dist: String,
        #[source]
        source: ManifestError,
    },
}

fn name_files(missing: &[String], more: usize) -> String {
    let mut text = missing.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more file(s)"));
    }
    text
}

/// Checks every distribution installed in the Python environment at `build` (a venv:
/// `lib/python*/site-packages`); Ok when all their recorded files exist, or when `build` holds
/// no Python environment. Blocking: call it off the async threads.
pub fn check_python(build: &Path, budget: Budget) -> Result<(), RecordProblem> {
    let unreadable =
        |dist: &str, path: PathBuf, source: std::io::Error| RecordProblem::Unreadable {
            dist: dist.to_owned(),
            source: ManifestError::Io { path, source },
        };
    let root = open_dir(build).map_err(|e| unreadable("the environment", build.to_owned(), e))?;
    let mut left = budget;
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
            if left.distributions == 0 {
                tracing::warn!(build = %build.display(), "more distributions than a check looks at; the rest are not checked");
                return Ok(());
            }
            left.distributions -= 1;
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
                missing_files(&root, build, &site_rel, record, &mut left).map_err(|source| {
                    RecordProblem::Unreadable {
                        dist: name.clone(),
                        source: ManifestError::Io {
                            path: record_path.clone(),
                            source,
                        },
                    }
                })?;
            if let Some((missing, more)) = found {
                return Err(RecordProblem::Missing {
                    package: package_name(&dist, &name),
                    missing,
                    more,
                });
            }
            if left.entries == 0 || left.bytes == 0 {
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

/// Reads `record` line by line and looks each listed file up under `root` (the build at
/// `build`); Some(first missing, how many more) when any is missing.
fn missing_files(
    root: &OwnedFd,
    build: &Path,
    site_rel: &Path,
    record: std::fs::File,
    left: &mut Budget,
) -> std::io::Result<Option<(Vec<String>, usize)>> {
    // The size was checked when it was opened; `take` holds even if the file grows since.
    let mut reader = BufReader::new(record.take(RECORD_MAX_BYTES.min(left.bytes)));
    let (mut missing, mut more) = (Vec::new(), 0usize);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        left.bytes = left.bytes.saturating_sub(n as u64);
        let listed = first_field(&line);
        let Some(rel) = inside_build(listed, build, site_rel) else {
            continue;
        };
        if left.entries == 0 {
            break;
        }
        left.entries -= 1;
        if exists(root, &rel) == Some(false) {
            if missing.len() < NAMED {
                missing.push(String::from_utf8_lossy(listed).into_owned());
            } else {
                more += 1;
            }
        }
    }
    Ok((!missing.is_empty()).then_some((missing, more)))
}

/// The path a RECORD line names: its first CSV field, quotes undone.
fn first_field(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(rest) = line.strip_prefix(b"\"") {
        // A quoted field ends at a quote not doubled. Doubled quotes inside are rare enough
        // in file names that such an entry is skipped rather than unescaped.
        return match rest.iter().position(|&b| b == b'"') {
            Some(end) if rest.get(end + 1) != Some(&b'"') => &rest[..end],
            _ => b"",
        };
    }
    match line.iter().position(|&b| b == b',') {
        Some(end) => &line[..end],
        None => line,
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
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        // Links inside the build are followed, never out of it.
        match rustix::fs::openat2(
            root,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(_) => return Some(true),
            Err(Errno::NOENT | Errno::NOTDIR) => return Some(false),
            Err(Errno::NOSYS | Errno::PERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
            Err(_) => return None,
        }
    }
    exists_following_no_link(root, rel)
}

/// [`exists`] without openat2: one component at a time, following no link at all, so an entry
/// behind a link is left unjudged.
fn exists_following_no_link(root: &OwnedFd, rel: &Path) -> Option<bool> {
    let mut dir: Option<OwnedFd> = None;
    let mut parts = rel.components().peekable();
    while let Some(Component::Normal(part)) = parts.next() {
        let at = dir.as_ref().map_or(root.as_fd(), |d| d.as_fd());
        if parts.peek().is_none() {
            return match rustix::fs::statat(at, part, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Some(true),
                Err(Errno::NOENT | Errno::NOTDIR) => Some(false),
                Err(_) => None,
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
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => None,
                    _ => Some(false),
                };
            }
            Err(_) => return None,
        }
    }
    None
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
            "demo/__init__.py,sha256=x,0\n\
             demo/__pycache__/__init__.cpython-311.pyc,,\n\
             demo/gone.pyc,,\n\
             ../../../bin/demo,sha256=y,1\n\
             ../../../../../../etc/passwd,,\n\
             /etc/shadow,,\n\
             \"demo/__init__.py\",,\n\
             demo-0.1.dist-info/RECORD,,\n\
             \n",
        );
        check_python(&build, Budget::default()).unwrap();
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
        let err = check_python(&build, Budget::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "package Demo-Pkg 0.1 is missing demo/a.py, ../../../bin/gone, demo/b.py and 2 more file(s)"
        );
    }

    #[test]
    fn a_build_without_site_packages_has_nothing_to_check() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("node_modules")).unwrap();
        check_python(dir.path(), Budget::default()).unwrap();
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
        check_python(&build, Budget::default()).unwrap();
    }

    #[test]
    fn a_fifo_a_link_or_an_oversized_record_is_refused_at_once() {
        let (_dir, build) = venv("");
        let record = build.join("lib/python3.11/site-packages/demo-0.1.dist-info/RECORD");
        std::fs::remove_file(&record).unwrap();
        nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = check_python(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");

        std::fs::remove_file(&record).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &record).unwrap();
        let err = check_python(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().contains("a symbolic link"), "{err}");

        std::fs::remove_file(&record).unwrap();
        std::fs::File::create(&record)
            .unwrap()
            .set_len(RECORD_MAX_BYTES + 1)
            .unwrap();
        let err = check_python(&build, Budget::default()).unwrap_err();
        assert!(err.to_string().contains("is larger than"), "{err}");
    }

    #[test]
    fn past_its_budget_a_check_stops_and_passes() {
        let (_dir, build) = venv("demo/__init__.py,,\ndemo/gone.py,,\n");
        let budget = Budget {
            entries: 1,
            ..Budget::default()
        };
        check_python(&build, budget).unwrap();
    }

    #[test]
    fn without_openat2_links_are_not_followed_at_all() {
        let (_dir, build) = venv("");
        let root = open_dir(&build).unwrap();
        let site = Path::new("lib/python3.11/site-packages");
        let exists = |rel: &Path| exists_following_no_link(&root, rel);
        assert_eq!(exists(&site.join("demo/__init__.py")), Some(true));
        assert_eq!(exists(&site.join("demo/nope.py")), Some(false));
        assert_eq!(exists(&site.join("nodir/nope.py")), Some(false));
        assert_eq!(
            exists(Path::new("lib64/python3.11/site-packages/demo/__init__.py")),
            None
        );
    }
}
