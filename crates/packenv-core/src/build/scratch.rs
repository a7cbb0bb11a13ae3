//! A build's scratch space: the private temporary directory a build's steps get, made for the
//! build user when there is one, and taken back and removed when the build ends.

use super::*;

/// The daemon's own user and group, to take a build back from the build user.
pub(super) fn daemon_ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

/// The private directories of a build or a check outside its build directory: the private tmp
/// `tmp` (with the HOME inside) and the runtime's cache, given to the build user when there is
/// one. The tmp goes when the build ends.
pub(crate) struct Scratch {
    tmp_root: PathBuf,
    tmp_name: String,
}

impl Scratch {
    pub(crate) async fn create(
        cfg: &BuildConfig,
        tmp: &Path,
        cache: Option<&Path>,
        user: Option<(u32, u32)>,
    ) -> Result<Scratch, BuildError> {
        let tmp_root = cfg.tmp_root();
        let tmp_name = tmp
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (cache, tmp) = (cache.map(Path::to_owned), tmp.to_owned());
        let (root, name) = (tmp_root.clone(), tmp_name.clone());
        blocking(move || {
            let io = |what: &'static str, path: &Path| {
                let path = path.to_owned();
                move |source| BuildError::Io { what, path, source }
            };
            for dir in cache.iter().chain([&root]) {
                std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
            }
            // Nobody else may use or list another build's tmp.
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
                .map_err(io("cannot set the mode of", &root))?;
            let root_fd = open_dir(&root).map_err(io("cannot open", &root))?;
            // A leftover of the same name (a pid reused after a crash); if it cannot go, the
            // mkdir below says so.
            let _ = take_back_and_remove(&root_fd, &name);
            rustix::fs::mkdirat(
                &root_fd,
                name.as_str(),
                rustix::fs::Mode::from_raw_mode(0o700),
            )
            .map_err(|e| io("cannot create", &tmp)(e.into()))?;
            let made = (|| {
                let tmp_fd =
                    crate::fsat::open_dir_at(&root_fd, &name).map_err(io("cannot open", &tmp))?;
                let mode = rustix::fs::Mode::from_raw_mode(0o700);
                rustix::fs::fchmod(&tmp_fd, mode)
                    .map_err(|e| io("cannot set the mode of", &tmp)(e.into()))?;
                let home = tmp.join("home");
                rustix::fs::mkdirat(&tmp_fd, "home", mode)
                    .map_err(|e| io("cannot create", &home)(e.into()))?;
                let home_fd =
                    crate::fsat::open_dir_at(&tmp_fd, "home").map_err(io("cannot open", &home))?;
                if let Some((uid, gid)) = user {
                    // Through descriptors opened while both were the daemon's, and `home`
                    // first: once `<tmp>` (0700) is the build user's, a daemon without
                    // CAP_DAC_OVERRIDE can no longer look anything up inside it.
                    let (uid, gid) = (
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    );
                    for (fd, path) in [(&home_fd, &home), (&tmp_fd, &tmp)] {
                        rustix::fs::fchown(fd, uid, gid)
                            .map_err(|e| io("cannot give the build user", path)(e.into()))?;
                    }
                }
                Ok::<(), BuildError>(())
            })();
            if made.is_err() {
                // Half made: it would stay in the tmp root forever.
                let _ = take_back_and_remove(&root_fd, &name);
            }
            made?;
            if let Some((uid, gid)) = user {
                if let Some(dir) = &cache {
                    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
                        .map_err(io("cannot give the build user", dir))?;
                }
            }
            Ok::<(), BuildError>(())
        })
        .await?;
        Ok(Scratch { tmp_root, tmp_name })
    }

    /// Removes the private tmp, whatever was left in it (never following a symlink).
    pub(crate) async fn remove(self) {
        blocking(move || {
            let Ok(root) = open_dir(&self.tmp_root) else {
                return;
            };
            if let Err(e) = take_back_and_remove(&root, &self.tmp_name) {
                tracing::warn!(tmp = %self.tmp_root.join(&self.tmp_name).display(), error = %e, "cannot remove a build's tmp");
            }
        })
        .await;
    }
}

/// Opens a directory, never through a symlink.
fn open_dir(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    Ok(rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// Gives `name` in `dir`, and all in it, back to the daemon (the build user may own it, mode
/// 0700), then removes it.
fn take_back_and_remove(dir: &std::os::fd::OwnedFd, name: &str) -> std::io::Result<()> {
    let (uid, gid) = daemon_ids();
    let _ = crate::fsat::chown_all_at(dir, name, uid, gid);
    crate::fsat::remove_all_at(dir, name)
}
