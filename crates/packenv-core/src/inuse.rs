//! Which directories running processes still use, read from `/proc` (Linux). A build is only
//! deleted when no process has its executable, working directory, root, an argument, a mapped
//! file or an open file inside it: deleting a build under a running Python breaks its next
//! import.
//!
//! Processes of other users are only visible to a daemon with the right to read their `/proc`
//! entries (root, or the same user); the collector's grace period covers the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// For each of `dirs` that some process uses, the pids (and what they use) that hold it.
pub fn dirs_in_use(dirs: &[PathBuf]) -> BTreeMap<PathBuf, Vec<String>> {
    let mut found: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    if dirs.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let base = entry.path();
        let mut check = |what: &str, path: &str| {
            for dir in dirs {
                if is_inside(path, dir) {
                    found
                        .entry(dir.clone())
                        .or_default()
                        .push(format!("pid {pid} ({what} {path})"));
                }
            }
        };
        for link in ["exe", "cwd", "root"] {
            if let Ok(target) = std::fs::read_link(base.join(link)) {
                check(link, &target.to_string_lossy());
            }
        }
        if let Ok(cmdline) = std::fs::read(base.join("cmdline")) {
            for arg in cmdline
                .split(|b| *b == 0)
                .filter(|a| a.first() == Some(&b'/'))
            {
                check("argument", &String::from_utf8_lossy(arg));
            }
        }
        if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            for path in maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .filter(|p| p.starts_with('/'))
            {
                check("mapped file", path);
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    check("open file", &target.to_string_lossy());
                }
            }
        }
    }
    for users in found.values_mut() {
        users.sort();
        users.dedup();
    }
    found
}

fn is_inside(path: &str, dir: &Path) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    Path::new(path).starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_its_working_directory_inside_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .unwrap();
        let found = dirs_in_use(&[dir.path().to_owned(), other.path().to_owned()]);
        child.kill().unwrap();
        child.wait().unwrap();
        let users = &found[dir.path()];
        assert!(
            users
                .iter()
                .any(|u| u.contains(&format!("pid {}", child.id())) && u.contains("cwd")),
            "{users:?}"
        );
        assert!(!found.contains_key(other.path()));
    }

    #[test]
    fn an_argument_inside_counts_and_a_sibling_prefix_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("bin/python");
        let sibling = PathBuf::from(format!("{}-other/x", dir.path().display()));
        // `sh -c CMD NAME ARG`: ARG is an argument of a long-running process.
        let mut holder = std::process::Command::new("sh")
            .args(["-c", "sleep 30", "sh", &inside.display().to_string()])
            // The orphaned `sleep` must not hold the test's output open after `sh` is killed.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let found = dirs_in_use(&[dir.path().to_owned()]);
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(
            found[dir.path()].iter().any(|u| u.contains("argument")),
            "{found:?}"
        );
        assert!(!is_inside(&sibling.display().to_string(), dir.path()));
    }
}
