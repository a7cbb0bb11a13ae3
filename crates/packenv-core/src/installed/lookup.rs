//! Looking up and opening what a RECORD lists, beneath the open build directory: never
//! following a link out of it, never blocking on a FIFO or a device.

use super::*;

/// Whether openat2 is known to be missing (kernel < 5.6, or a seccomp filter refusing it).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Whether `rel` exists under `root`: Some(false) when it does not, None when that cannot be
/// told without leaving the build (a link that points out of it) or reading what the daemon may
/// not. The last component is never followed, and nothing is opened for reading, so a FIFO or
/// a device listed costs nothing.
pub(super) fn exists(root: &OwnedFd, rel: &Path) -> Option<bool> {
    match find(root, rel, OFlags::PATH) {
        Lookup::Yes(_) => Some(true),
        Lookup::No => Some(false),
        Lookup::Unknown => None,
    }
}

/// What looking a listed path up found.
pub(super) enum Lookup {
    /// It is there, opened with the flags asked for.
    Yes(OwnedFd),
    No,
    /// It cannot be told without leaving the build or doing what the daemon may not.
    Unknown,
}

/// Opens `rel` under `root` with `flags` (and never following its last component); links
/// inside the build are followed where openat2 can keep them inside, never out of it.
pub(super) fn find(root: &OwnedFd, rel: &Path, flags: OFlags) -> Lookup {
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
pub(super) fn find_following_no_link(root: &OwnedFd, rel: &Path, flags: OFlags) -> Lookup {
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
pub(super) fn open_regular_at(
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
