//! Where environments live on disk (DESIGN §4, §6).
//!
//! ```text
//! <envs_root>/<pack_ref>/<runtime>            symlink → .<runtime>-<token>  (env_path)
//! <envs_root>/<pack_ref>/.<runtime>-<token>/  one build, created at its final place
//! ```
//!
//! A venv holds absolute paths, so a build is never moved: it is made where it will be used and
//! `env_path` is switched to it atomically (symlink to a temporary name, then `rename`).
//!
//! Every change on disk goes through an open envs root and an open pack directory, relative to
//! them and without following a symlink ([`crate::fsat`]), so nothing outside the envs root can
//! be created, switched or deleted, even by a step racing to swap a directory for a link. The
//! envs root must be packenvd's: a real directory owned by this user, holding [`ROOT_MARKER`]
//! (written when packenvd creates it, or finds it empty). Each pack directory records the
//! environments packenvd made in it ([`PACK_RECORD`]); the collector touches nothing else.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::fsat;

/// The file in the envs root that says packenvd owns it.
pub const ROOT_MARKER: &str = ".packenvd-root";
/// The file in a pack directory that lists, one per line, the environments packenvd made there.
pub const PACK_RECORD: &str = ".packenvd-envs";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("pack_ref {0:?} is not allowed: use letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most 128 characters, no '..'")]
    BadPackRef(String),
    #[error("runtime name {0:?} gives no usable directory name (letters, digits, '_', '-' and '.' only)")]
    BadRuntimeName(String),
    #[error("env_path {path:?} is outside the envs root {root:?}")]
    OutsideRoot { path: String, root: PathBuf },
    #[error("env_path {0:?} must be <envs_root>/<pack_ref>/<name>")]
    BadEnvPath(String),
    #[error("envs root {path:?} {problem}")]
    NotOurs { path: PathBuf, problem: String },
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A name that is safe as one path component: no separators, no `..`, no leading dot.
fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.contains("..")
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// Checks `pack_ref` against the strict pattern of DESIGN §6.
pub fn validate_pack_ref(pack_ref: &str) -> Result<(), LayoutError> {
    if is_safe_component(pack_ref) {
        Ok(())
    } else {
        Err(LayoutError::BadPackRef(pack_ref.to_owned()))
    }
}

/// The directory name of a runtime: its name, lower-cased.
pub fn runtime_dir_name(runtime_name: &str) -> Result<String, LayoutError> {
    let lower = runtime_name.to_lowercase();
    if is_safe_component(&lower) {
        Ok(lower)
    } else {
        Err(LayoutError::BadRuntimeName(runtime_name.to_owned()))
    }
}

/// Lexically normalises an absolute path; `None` when it is relative or climbs with `..`.
fn normalise(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The envs root, opened and checked.
#[derive(Debug)]
pub struct EnvsRoot {
    path: PathBuf,
    fd: OwnedFd,
}

impl EnvsRoot {
    /// Opens the envs root. It must be a real directory (not a symlink) owned by this user and
    /// hold [`ROOT_MARKER`]; with `create`, a missing or empty one is created and marked.
    /// `Ok(None)` when it does not exist and `create` is false.
    pub fn open(path: &Path, create: bool) -> Result<Option<EnvsRoot>, LayoutError> {
        let not_ours = |problem: &str| LayoutError::NotOurs {
            path: path.to_owned(),
            problem: problem.to_owned(),
        };
        if path.parent().is_none() {
            return Err(not_ours("is the root directory"));
        }
        let mut created = false;
        if create && std::fs::symlink_metadata(path).is_err() {
            match std::fs::create_dir_all(path) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("cannot create", path)(e)),
            }
        }
        let fd = match rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) if !create => return Ok(None),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(not_ours("is a symlink or not a directory"))
            }
            Err(e) => return Err(io_err("cannot open", path)(e.into())),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| io_err("cannot stat", path)(e.into()))?;
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != me {
            return Err(not_ours(&format!(
                "is owned by uid {}, not by this user (uid {me}): packenvd works only in a directory of its own",
                st.st_uid
            )));
        }
        if created {
            // Readable by the action runners (other users), whatever the daemon's umask.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                .map_err(|e| io_err("cannot set the mode of", path)(e.into()))?;
        }
        let root = EnvsRoot {
            path: path.to_owned(),
            fd,
        };
        let marked = fsat::type_at(&root.fd, ROOT_MARKER)
            .map_err(io_err("cannot read", path))?
            .is_some();
        if !marked {
            let empty = fsat::entries(&root.fd)
                .map_err(io_err("cannot list", path))?
                .is_empty();
            // Another instance may be marking it right now; then the marker is there after it.
            let marked_meanwhile =
                || fsat::type_at(&root.fd, ROOT_MARKER).is_ok_and(|t| t.is_some());
            if !(create && empty) {
                if marked_meanwhile() {
                    return Ok(Some(root));
                }
                return Err(not_ours(&format!(
                    "is not empty and has no {ROOT_MARKER} marker: point envs_root at an empty directory packenvd may own"
                )));
            }
            match rustix::fs::openat(
                &root.fd,
                ROOT_MARKER,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            ) {
                Ok(fd) => std::fs::File::from(fd)
                    .write_all(
                        b"packenvd envs root: packenvd creates and deletes environments here\n",
                    )
                    .map_err(io_err("cannot write the marker in", path))?,
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_err("cannot create the marker in", path)(e.into())),
            }
        }
        Ok(Some(root))
    }

    /// Makes this envs root node `name`'s (DESIGN §8): the marker names the node, written at
    /// first start; a marker that names another node is an error, so two nodes never share a
    /// disk under two names and one disk is never registered twice.
    pub fn claim_node(&self, name: &str) -> Result<(), LayoutError> {
        let marker = self.path.join(ROOT_MARKER);
        let text = crate::fingerprint::read_manifest(&marker, 1 << 16)
            .map_err(|e| io_err("cannot read", &marker)(io::Error::other(e.to_string())))?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let recorded = text.lines().find_map(|l| {
            l.strip_prefix("node = \"")
                .and_then(|rest| rest.strip_suffix('"'))
                .map(str::to_owned)
        });
        match recorded {
            Some(n) if n == name => Ok(()),
            Some(n) => Err(LayoutError::NotOurs {
                path: self.path.clone(),
                problem: format!(
                    "belongs to node {n:?} (its {ROOT_MARKER} says so), not to {name:?}: set node_name = {n:?}, or give this node an envs root of its own"
                ),
            }),
            None => {
                let fd = rustix::fs::openat(
                    &self.fd,
                    ROOT_MARKER,
                    OFlags::WRONLY | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("cannot open", &marker)(e.into()))?;
                std::fs::File::from(fd)
                    .write_all(format!("node = \"{name}\"\n").as_bytes())
                    .map_err(io_err("cannot write", &marker))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pack directory of `pack_ref`, opened without following a symlink; created with
    /// `create`. `Ok(None)` when it does not exist and `create` is false.
    pub fn pack_dir(&self, pack_ref: &str, create: bool) -> Result<Option<PackDir>, LayoutError> {
        validate_pack_ref(pack_ref)?;
        let path = self.path.join(pack_ref);
        let mut created = false;
        if create {
            match rustix::fs::mkdirat(&self.fd, pack_ref, Mode::from_raw_mode(0o755)) {
                Ok(()) => created = true,
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_err("cannot create", &path)(e.into())),
            }
        }
        match fsat::open_dir_at(&self.fd, pack_ref) {
            Ok(fd) => {
                if created {
                    // The umask may be strict (the unit's is 0077): environments are for
                    // action runners of other users to read.
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(|e| io_err("cannot set the mode of", &path)(e.into()))?;
                }
                Ok(Some(PackDir { path, fd }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => Ok(None),
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
            {
                Err(LayoutError::OutsideRoot {
                    path: path.display().to_string(),
                    root: self.path.clone(),
                })
            }
            Err(e) => Err(io_err("cannot open", &path)(e)),
        }
    }

    /// The pack directories in the root: real directories with a valid pack ref as name.
    pub fn packs(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for name in fsat::entries(&self.fd)? {
            let Ok(name) = name.into_string() else {
                continue;
            };
            if validate_pack_ref(&name).is_ok()
                && fsat::type_at(&self.fd, &name)? == Some(FileType::Directory)
            {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Removes a pack directory that holds nothing but packenvd's record.
    pub fn remove_pack_if_empty(&self, pack_ref: &str) {
        let Ok(Some(dir)) = self.pack_dir(pack_ref, false) else {
            return;
        };
        let only_record = fsat::entries(&dir.fd)
            .is_ok_and(|e| e.iter().all(|n| n.to_bytes() == PACK_RECORD.as_bytes()));
        if only_record {
            let _ = rustix::fs::unlinkat(&dir.fd, PACK_RECORD, AtFlags::empty());
            let _ = rustix::fs::unlinkat(&self.fd, pack_ref, AtFlags::REMOVEDIR);
        }
    }
}

/// One pack's directory, opened and checked.
#[derive(Debug)]
pub struct PackDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl PackDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The environment names packenvd recorded here.
    pub fn recorded(&self) -> io::Result<Vec<String>> {
        let fd = match rustix::fs::openat(
            &self.fd,
            PACK_RECORD,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let file = std::fs::File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{PACK_RECORD} is not a regular file"
            )));
        }
        let mut text = String::new();
        io::Read::read_to_string(&mut io::Read::take(file, 1 << 16), &mut text)?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| is_safe_component(l))
            .map(str::to_owned)
            .collect())
    }

    /// Adds `name` to the record of environments made here.
    fn record(&self, name: &str) -> io::Result<()> {
        if self.recorded()?.iter().any(|n| n == name) {
            return Ok(());
        }
        let fd = rustix::fs::openat(
            &self.fd,
            PACK_RECORD,
            OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        std::fs::File::from(fd).write_all(format!("{name}\n").as_bytes())
    }

    /// The type of an entry, not following a symlink.
    pub fn type_of(&self, entry: &str) -> io::Result<Option<FileType>> {
        fsat::type_at(&self.fd, entry)
    }

    /// The names in the directory.
    pub fn entries(&self) -> io::Result<Vec<String>> {
        Ok(fsat::entries(&self.fd)?
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .collect())
    }

    /// How long ago an entry was last modified (a link's own time, not its target's).
    pub fn age(&self, entry: &str) -> Option<std::time::Duration> {
        let st = rustix::fs::statat(&self.fd, entry, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let modified = std::time::UNIX_EPOCH
            + std::time::Duration::new(st.st_mtime as u64, st.st_mtime_nsec as u32);
        std::time::SystemTime::now().duration_since(modified).ok()
    }

    /// The build directory the link `name` points to, if it is a sibling build directory of
    /// that environment.
    pub fn link_target(&self, name: &str) -> Option<String> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new()).ok()?;
        let target = target.into_string().ok()?;
        let is_build = !target.contains('/')
            && target
                .strip_prefix('.')
                .and_then(|t| t.strip_prefix(name))
                .is_some_and(|rest| rest.starts_with('-'));
        (is_build && self.type_of(&target).ok()? == Some(FileType::Directory)).then_some(target)
    }

    /// Removes an entry and everything beneath it, never following a symlink.
    pub fn remove(&self, entry: &str) -> io::Result<()> {
        fsat::remove_all_at(&self.fd, entry)
    }

    /// Gives an entry and everything beneath it to `uid:gid`, never following a symlink.
    pub fn chown_all(&self, entry: &str, uid: u32, gid: u32) -> io::Result<()> {
        fsat::chown_all_at(&self.fd, entry, uid, gid)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The place of one (pack, runtime) environment under the envs root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvLocation {
    /// The envs root, normalised.
    pub root: PathBuf,
    pub pack_ref: String,
    /// `<envs_root>/<pack_ref>`: holds the symlink and the builds.
    pub pack_dir: PathBuf,
    /// `<pack_dir>/<runtime>`: the symlink that names the current build.
    pub env_path: PathBuf,
}

impl EnvLocation {
    /// Where packenvd puts the environment, or checks the `env_path` a row arrived with: it
    /// must be `<envs_root>/<pack_ref>/<name>` exactly, so nothing is ever written elsewhere.
    pub fn new(
        envs_root: &Path,
        pack_ref: &str,
        runtime_name: &str,
        row_env_path: Option<&str>,
    ) -> Result<Self, LayoutError> {
        validate_pack_ref(pack_ref)?;
        let root = normalise(envs_root).ok_or_else(|| LayoutError::OutsideRoot {
            path: envs_root.display().to_string(),
            root: envs_root.to_owned(),
        })?;
        let pack_dir = root.join(pack_ref);
        let env_path = match row_env_path {
            None => pack_dir.join(runtime_dir_name(runtime_name)?),
            Some(given) => {
                let path = normalise(Path::new(given))
                    .filter(|p| p.starts_with(&root))
                    .ok_or_else(|| LayoutError::OutsideRoot {
                        path: given.to_owned(),
                        root: root.clone(),
                    })?;
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if path.parent() != Some(pack_dir.as_path()) || !is_safe_component(name) {
                    return Err(LayoutError::BadEnvPath(given.to_owned()));
                }
                path
            }
        };
        Ok(EnvLocation {
            root,
            pack_ref: pack_ref.to_owned(),
            pack_dir,
            env_path,
        })
    }

    /// The environment's directory name: the last component of `env_path`.
    pub fn name(&self) -> &str {
        self.env_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// The directory of the build identified by `token`.
    pub fn build_dir(&self, token: &str) -> PathBuf {
        self.pack_dir.join(format!(".{}-{token}", self.name()))
    }

    /// Opens the envs root and this environment's pack directory (creating both with
    /// `create`); `Ok(None)` when they do not exist.
    pub fn open(&self, create: bool) -> Result<Option<PackDir>, LayoutError> {
        match EnvsRoot::open(&self.root, create)? {
            Some(root) => root.pack_dir(&self.pack_ref, create),
            None => Ok(None),
        }
    }

    fn open_created(&self) -> Result<PackDir, LayoutError> {
        self.open(true)?
            .ok_or_else(|| LayoutError::BadEnvPath(self.env_path.display().to_string()))
    }

    /// Creates the pack directory and a fresh, empty build directory, relative to the open
    /// envs root and never through a symlink; records the environment in the pack directory.
    pub fn create_build_dir(&self, token: &str) -> Result<PathBuf, LayoutError> {
        let pack = self.open_created()?;
        pack.record(self.name())
            .map_err(io_err("cannot record the environment in", &self.pack_dir))?;
        let name = format!(".{}-{token}", self.name());
        let dir = self.pack_dir.join(&name);
        rustix::fs::mkdirat(pack.as_fd(), name.as_str(), Mode::from_raw_mode(0o755))
            .map_err(|e| io_err("cannot create build directory", &dir)(e.into()))?;
        let fd = fsat::open_dir_at(pack.as_fd(), &name)
            .map_err(io_err("cannot open build directory", &dir))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
            .map_err(|e| io_err("cannot set the mode of", &dir)(e.into()))?;
        Ok(dir)
    }

    /// Points `env_path` at `build_dir` atomically (a symlink to a temporary name, then
    /// `rename` over the link), relative to the open pack directory. A real directory left at
    /// `env_path` by an older in-place installer is moved aside first (returned), since
    /// `rename` cannot replace a non-empty directory.
    pub fn switch_to(&self, build_dir: &Path) -> Result<Option<PathBuf>, LayoutError> {
        let target = build_dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| build_dir.parent() == Some(self.pack_dir.as_path()))
            .ok_or_else(|| LayoutError::BadEnvPath(build_dir.display().to_string()))?;
        let pack = self.open_created()?;
        let fail = |what: &'static str| io_err(what, &self.env_path);
        let mut moved_aside = None;
        if pack.type_of(self.name()).map_err(fail("cannot read"))? == Some(FileType::Directory) {
            let aside = format!(".{}-legacy-{}", self.name(), std::process::id());
            rustix::fs::renameat(pack.as_fd(), self.name(), pack.as_fd(), aside.as_str())
                .map_err(|e| fail("cannot move aside")(e.into()))?;
            moved_aside = Some(self.pack_dir.join(aside));
        }
        let tmp = format!(".{}.switch-{}", self.name(), std::process::id());
        let _ = rustix::fs::unlinkat(pack.as_fd(), tmp.as_str(), AtFlags::empty());
        // Relative target: the envs root can be moved or mounted elsewhere as a whole.
        rustix::fs::symlinkat(target, pack.as_fd(), tmp.as_str())
            .map_err(|e| fail("cannot create a symlink beside")(e.into()))?;
        rustix::fs::renameat(pack.as_fd(), tmp.as_str(), pack.as_fd(), self.name())
            .map_err(|e| fail("cannot switch")(e.into()))?;
        Ok(moved_aside)
    }

    /// Removes the link `env_path` (when a switch must be undone and nothing was served).
    pub fn remove_link(&self) -> Result<(), LayoutError> {
        if let Some(pack) = self.open(false)? {
            if pack
                .type_of(self.name())
                .map_err(io_err("cannot read", &self.env_path))?
                == Some(FileType::Symlink)
            {
                pack.remove(self.name())
                    .map_err(io_err("cannot remove", &self.env_path))?;
            }
        }
        Ok(())
    }

    /// The build directory `env_path` points at now, if it is one of this environment's.
    pub fn current_build(&self) -> Option<PathBuf> {
        let pack = self.open(false).ok()??;
        pack.link_target(self.name()).map(|t| self.pack_dir.join(t))
    }

    /// Removes one of this environment's build directories (or its private leftovers),
    /// relative to the open pack directory; a path that is not one of them is refused.
    pub fn remove_build(&self, build_dir: &Path) -> Result<(), LayoutError> {
        let name = self.own_entry(build_dir)?;
        match self.open(false)? {
            Some(pack) => pack
                .remove(name)
                .map_err(io_err("cannot remove", build_dir)),
            None => Ok(()),
        }
    }

    /// Gives one of this environment's build directories, and all in it, to `uid:gid`.
    pub fn chown_build(&self, build_dir: &Path, uid: u32, gid: u32) -> Result<(), LayoutError> {
        let name = self.own_entry(build_dir)?;
        match self.open(false)? {
            Some(pack) => pack
                .chown_all(name, uid, gid)
                .map_err(io_err("cannot change the owner of", build_dir)),
            None => Ok(()),
        }
    }

    /// The name of `build_dir` in the pack directory, if it is one of this environment's.
    fn own_entry<'a>(&self, build_dir: &'a Path) -> Result<&'a str, LayoutError> {
        build_dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| {
                build_dir.parent() == Some(self.pack_dir.as_path())
                    && n.strip_prefix('.')
                        .and_then(|r| r.strip_prefix(self.name()))
                        .is_some_and(|r| r.starts_with('-'))
            })
            .ok_or_else(|| LayoutError::BadEnvPath(build_dir.display().to_string()))
    }
}

#[cfg(test)]
mod tests;
