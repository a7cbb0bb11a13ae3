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

mod npm;
mod requirements;

use npm::check_npm;
#[cfg(test)]
use requirements::requirement_refs;
use requirements::{check_requirements, file_url, Target};

#[cfg(test)]
mod tests;
