//! File-system operations relative to an open directory that never follow a symlink (DESIGN
//! §6: nothing is created, changed or deleted outside the envs root, through a symlink, or by
//! a race). A hostile step may swap any entry it can write for a symlink at any moment; these
//! functions act on what is there, never on what a link points to.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// Opens the directory `name` inside `dir`; a symlink (or anything but a directory) fails.
pub fn open_dir_at(dir: impl AsFd, name: &str) -> io::Result<OwnedFd> {
    open_dir_at_c(dir, name)
}

fn open_dir_at_c<P: rustix::path::Arg>(dir: impl AsFd, name: P) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The type of `name` inside `dir`, not following a symlink; `None` when absent.
pub fn type_at(dir: impl AsFd, name: &str) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` inside `dir` and, if it is a directory, everything beneath it. A symlink is
/// removed itself, never followed. Absent is fine. A directory of ours that its owner may not
/// list, enter or change (a step can `chmod 000` what it made) is given those rights first.
pub fn remove_all_at(dir: impl AsFd, name: &str) -> io::Result<()> {
    remove_all_at_c(dir.as_fd(), name)
}

fn remove_all_at_c<P: rustix::path::Arg + Copy>(
    dir: std::os::fd::BorrowedFd<'_>,
    name: P,
) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return ignore_absent(rustix::fs::unlinkat(dir, name, AtFlags::empty()));
    }
    if st.st_uid == rustix::process::geteuid().as_raw() && st.st_mode & 0o700 != 0o700 {
        add_owner_rights(dir, name, 0o700)?;
    }
    let sub = open_dir_at_c(dir, name)?;
    for entry in entries(&sub)? {
        remove_all_at_c(sub.as_fd(), entry.as_c_str())?;
    }
    ignore_absent(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR))
}

/// Adds `bits` (of 0o700) to the mode of the directory `name` inside `dir`, if it is ours.
/// Through an `O_PATH` descriptor, which needs no right on the directory itself and never
/// follows a symlink, and its `/proc/self/fd` link, since `fchmod` refuses `O_PATH`
/// descriptors and `fchmodat` cannot refuse to follow a link.
fn add_owner_rights<P: rustix::path::Arg>(
    dir: std::os::fd::BorrowedFd<'_>,
    name: P,
    bits: u32,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & bits == bits {
        return Ok(());
    }
    let mode = Mode::from_raw_mode((st.st_mode & 0o7777) | bits);
    Ok(rustix::fs::chmod(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        mode,
    )?)
}

/// Gives `name` inside `dir`, and everything beneath it, to `uid:gid`, without following a
/// symlink anywhere (a link's own owner changes, not its target's). Taking a tree back, a
/// directory that its new owner (us) may not list or enter is given those rights.
pub fn chown_all_at(dir: impl AsFd, name: &str, uid: u32, gid: u32) -> io::Result<()> {
    chown_all_at_c(dir.as_fd(), name, uid, gid)
}

fn chown_all_at_c<P: rustix::path::Arg + Copy>(
    dir: std::os::fd::BorrowedFd<'_>,
    name: P,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    let owner = Some(rustix::fs::Uid::from_raw(uid));
    let group = Some(rustix::fs::Gid::from_raw(gid));
    rustix::fs::chownat(dir, name, owner, group, AtFlags::SYMLINK_NOFOLLOW)?;
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = match open_dir_at_c(dir, name) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                add_owner_rights(dir, name, 0o500)?;
                open_dir_at_c(dir, name)?
            }
            r => r?,
        };
        for entry in entries(&sub)? {
            chown_all_at_c(sub.as_fd(), entry.as_c_str(), uid, gid)?;
        }
    }
    Ok(())
}

/// The names in a directory, without `.` and `..`.
pub fn entries(dir: &OwnedFd) -> io::Result<Vec<std::ffi::CString>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

fn ignore_absent(r: rustix::io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_deletes_a_symlink_and_never_what_it_points_to() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "x").unwrap();
        let victim = root.path().join("build");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("sub/file"), "y").unwrap();
        std::os::unix::fs::symlink(outside.path(), victim.join("link")).unwrap();
        let dir = std::fs::File::open(root.path()).unwrap();
        remove_all_at(&dir, "build").unwrap();
        assert!(!victim.exists());
        assert!(outside.path().join("precious").exists());

        // A build directory swapped for a symlink: the link goes, its target stays.
        std::os::unix::fs::symlink(outside.path(), &victim).unwrap();
        remove_all_at(&dir, "build").unwrap();
        assert!(!victim.exists() && !victim.is_symlink());
        assert!(outside.path().join("precious").exists());
        remove_all_at(&dir, "absent").unwrap();
    }

    #[test]
    fn opening_a_symlinked_directory_fails() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/tmp", root.path().join("p")).unwrap();
        let dir = std::fs::File::open(root.path()).unwrap();
        assert!(open_dir_at(&dir, "p").is_err());
        assert_eq!(
            type_at(&dir, "p").unwrap(),
            Some(FileType::Symlink),
            "the link itself, not its target"
        );
    }
}
