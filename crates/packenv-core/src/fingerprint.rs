//! The fingerprint of an environment's inputs (DESIGN §4): the installer spec, the pack's
//! dependency manifests and the interpreter's version. Equal fingerprints mean a rebuild would
//! install the same thing, so a request can be answered by the current build.

use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::{Found, PackDir};

/// The largest manifest packenvd reads. A dependency list bigger than this is not a
/// dependency list; reading it would only cost memory.
pub const MANIFEST_MAX_BYTES: u64 = 4 << 20;

/// A manifest that cannot be read as one.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{} is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is larger than {max} bytes", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    /// A symlink (or a link on the way) that leads out of the pack: not read.
    #[error("{} resolves outside the pack directory (a symlink leading out of the pack); not read", path.display())]
    Outside { path: PathBuf },
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ManifestError {
    /// Only an I/O error may pass (a file being replaced); a FIFO stays a FIFO.
    pub fn retryable(&self) -> bool {
        matches!(self, ManifestError::Io { .. })
    }
}

pub(crate) fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Reads a pack file that packenvd only hashes or parses: `None` when it does not exist. It
/// must be a regular file (a symlink to one is followed) of at most `max` bytes. It is opened
/// non-blocking, so a FIFO or a device is refused at once instead of freezing the reader, and
/// never read past `max`, so `/dev/zero` or a 10 GB file costs nothing.
pub fn read_manifest(path: &Path, max: u64) -> Result<Option<Vec<u8>>, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            rustix::fs::OFlags::NONBLOCK.bits() as i32 | rustix::fs::OFlags::NOCTTY.bits() as i32,
        )
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    read_opened(file, path, max).map(Some)
}

/// Reads an open pack file as [`read_manifest`] does: it must be a regular file of at most
/// `max` bytes; `path` names it in errors.
pub(crate) fn read_opened(
    file: std::fs::File,
    path: &Path,
    max: u64,
) -> Result<Vec<u8>, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ManifestError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(meta.file_type()),
        });
    }
    let too_large = || ManifestError::TooLarge {
        path: path.to_owned(),
        max,
    };
    if meta.len() > max {
        return Err(too_large());
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut content).map_err(io)?;
    if content.len() as u64 > max {
        return Err(too_large());
    }
    Ok(content)
}

/// Files of a pack that decide what an installer installs. The requirements files' `-r` and
/// `-c` includes are followed (see [`includes`]).
pub const MANIFESTS: &[&str] = &[
    "requirements.txt",
    "constraints.txt",
    "pyproject.toml",
    "uv.lock",
    "poetry.lock",
    "Pipfile",
    "Pipfile.lock",
    "package.json",
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
];

/// How deep `-r` includes are followed, and how many files at most.
pub(crate) const INCLUDE_DEPTH: usize = 8;
pub(crate) const INCLUDE_FILES: usize = 64;

/// A hex SHA-256 over the spec but its `checks` (serde_json writes object keys sorted, so equal
/// specs hash equally), each manifest's name and content (or its absence), the files its `-r`/`-c`
/// includes name, and `toolchain` (the interpreter chosen for the pack, and why). Taken before
/// a build runs, so it describes the inputs the build started from. Blocking: call it off the
/// async threads.
pub fn inputs_digest(
    installers: &serde_json::Value,
    pack_path: &Path,
    toolchain: &str,
) -> Result<String, ManifestError> {
    let mut h = Sha256::new();
    h.update(b"packenvd-inputs-v1\0spec\0");
    // A Value always serialises. The runtime's `checks` install nothing: adding or changing one
    // must not rebuild every environment of the runtime (and a spec without them hashes as it
    // always did).
    let spec = match installers {
        serde_json::Value::Object(m) if m.contains_key("checks") => {
            let mut m = m.clone();
            m.remove("checks");
            serde_json::to_vec(&m)
        }
        other => serde_json::to_vec(other),
    };
    h.update(spec.unwrap_or_default());
    // Every file is read beneath the pack's open directory: a manifest or an include that
    // leads out of the pack (a path, or a symlink) is hashed as outside, never read, so a pack
    // cannot make the daemon read a file of the host.
    let pack = match PackDir::open(pack_path) {
        Ok(p) => Some(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ManifestError::Io {
                path: pack_path.to_owned(),
                source,
            })
        }
    };
    let read = |rel: &Path| match &pack {
        Some(p) => p.read(rel, MANIFEST_MAX_BYTES),
        None => Ok(Found::Missing),
    };
    let mut included = Vec::new();
    for name in MANIFESTS {
        h.update(b"\0file\0");
        h.update(name.as_bytes());
        match read(Path::new(name))? {
            // A manifest is the pack's own file; one that is not is that row's error, as a
            // FIFO or a device is.
            Found::Outside => {
                return Err(ManifestError::Outside {
                    path: pack_path.join(name),
                })
            }
            Found::Inside(content) => {
                h.update(b"\0present\0");
                h.update(Sha256::digest(&content));
                if name.ends_with(".txt") {
                    included.extend(includes(&content, Path::new("")));
                }
            }
            Found::Missing => h.update(b"\0absent\0"),
        }
    }
    // Included files, breadth first, each once. A path that leaves the pack is hashed as
    // written (a change of the reference still changes the fingerprint).
    let mut seen = std::collections::BTreeSet::new();
    let mut depth = 0;
    while !included.is_empty() && depth < INCLUDE_DEPTH && seen.len() < INCLUDE_FILES {
        let mut next = Vec::new();
        for rel in std::mem::take(&mut included) {
            if seen.len() >= INCLUDE_FILES || !seen.insert(rel.clone()) {
                continue;
            }
            h.update(b"\0include\0");
            h.update(rel.as_os_str().as_encoded_bytes());
            match read(&rel)? {
                Found::Outside => h.update(b"\0outside\0"),
                Found::Inside(content) => {
                    h.update(b"\0present\0");
                    h.update(Sha256::digest(&content));
                    next.extend(includes(&content, rel.parent().unwrap_or(Path::new(""))));
                }
                Found::Missing => h.update(b"\0absent\0"),
            }
        }
        included = next;
        depth += 1;
    }
    if !toolchain.is_empty() {
        h.update(b"\0toolchain\0");
        h.update(toolchain.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// The files a requirements file includes (`-r f`, `--requirement=f`, `-c f`,
/// `--constraint f`), relative to the pack, resolved from `dir` (the including file's
/// directory, relative to the pack). URLs are not files.
pub fn includes(content: &[u8], dir: &Path) -> Vec<PathBuf> {
    let text = String::from_utf8_lossy(content);
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut rest = None;
        for opt in ["--requirement", "--constraint", "-r", "-c"] {
            if let Some(r) = line.strip_prefix(opt) {
                let long = opt.starts_with("--");
                if let Some(r) = r.strip_prefix('=') {
                    rest = Some(r);
                } else if r.starts_with([' ', '\t']) || (!long && !r.is_empty()) {
                    rest = Some(r);
                }
                break;
            }
        }
        let Some(rest) = rest else { continue };
        // A comment starts at whitespace + '#'.
        let target = rest
            .trim()
            .split(" #")
            .next()
            .unwrap_or_default()
            .split("\t#")
            .next()
            .unwrap_or_default()
            .trim();
        if target.is_empty() || target.contains("://") {
            continue;
        }
        out.push(dir.join(target));
    }
    out
}

/// The fingerprint stored on the row: the inputs and the interpreter's version (known once the
/// environment's interpreter has run).
pub fn fingerprint(inputs_digest: &str, interpreter_version: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(b"packenvd-fingerprint-v1\0");
    h.update(inputs_digest.as_bytes());
    h.update(b"\0interpreter\0");
    h.update(interpreter_version.unwrap_or("none").as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_of_requirements_files_are_read_as_pip_reads_them() {
        let content = b"-r base.txt\n--requirement=dev/extra.txt\n-cconstraints/pins.txt # pinned\n--constraint https://x/c.txt\nrequests==2.31\n# -r ignored.txt\n";
        assert_eq!(
            includes(content, Path::new("sub")),
            [
                PathBuf::from("sub/base.txt"),
                PathBuf::from("sub/dev/extra.txt"),
                PathBuf::from("sub/constraints/pins.txt"),
            ]
        );
    }

    #[test]
    fn a_runtimes_checks_are_not_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({"installers": [{"name": "a", "command": "true"}]});
        let mut with_checks = spec.clone();
        with_checks["checks"] = serde_json::json!([{"name": "c", "command": "true"}]);
        assert_eq!(
            inputs_digest(&spec, dir.path(), "").unwrap(),
            inputs_digest(&with_checks, dir.path(), "").unwrap()
        );
        let mut other = spec.clone();
        other["env_vars"] = serde_json::json!({"A": "1"});
        assert_ne!(
            inputs_digest(&spec, dir.path(), "").unwrap(),
            inputs_digest(&other, dir.path(), "").unwrap()
        );
    }

    #[test]
    fn an_edited_include_changes_the_digest_and_an_outside_one_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let pack = dir.path().join("pack");
        std::fs::create_dir_all(pack.join("req")).unwrap();
        std::fs::write(pack.join("requirements.txt"), "-r req/base.txt\n").unwrap();
        std::fs::write(pack.join("req/base.txt"), "-c pins.txt\nrequests\n").unwrap();
        std::fs::write(pack.join("req/pins.txt"), "requests==2.31\n").unwrap();
        let spec = serde_json::json!([]);
        let d1 = inputs_digest(&spec, &pack, "").unwrap();
        std::fs::write(pack.join("req/pins.txt"), "requests==2.32\n").unwrap();
        let d2 = inputs_digest(&spec, &pack, "").unwrap();
        assert_ne!(d1, d2, "a nested include counts");
        assert_ne!(d2, inputs_digest(&spec, &pack, "python=/x@3.12").unwrap());
        // An include leaving the pack (lexically or by a symlink) is never read: a FIFO there
        // would block a reader.
        let outside = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &outside,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(&outside, pack.join("link.txt")).unwrap();
        std::fs::write(
            pack.join("requirements.txt"),
            "-r ../fifo\n-r /etc/passwd\n-r link.txt\n-r requirements.txt\n",
        )
        .unwrap();
        inputs_digest(&spec, &pack, "").unwrap();
        // A manifest that is itself a link out of the pack is an error, still unread.
        std::os::unix::fs::symlink(&outside, pack.join("constraints.txt")).unwrap();
        assert!(matches!(
            inputs_digest(&spec, &pack, ""),
            Err(ManifestError::Outside { .. })
        ));
    }
    use serde_json::json;

    fn fp(spec: &serde_json::Value, dir: &Path, version: Option<&str>) -> String {
        fingerprint(&inputs_digest(spec, dir, "").unwrap(), version)
    }

    #[test]
    fn every_input_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({"installers": [{"name": "a", "command": "x"}]});
        std::fs::write(dir.path().join("requirements.txt"), "six==1.16.0\n").unwrap();
        let base = fp(&spec, dir.path(), Some("Python 3.11.7"));
        assert_eq!(base, fp(&spec, dir.path(), Some("Python 3.11.7")), "stable");

        assert_ne!(
            base,
            fp(&spec, dir.path(), Some("Python 3.11.9")),
            "interpreter"
        );
        let other_spec = json!({"installers": [{"name": "a", "command": "y"}]});
        assert_ne!(
            base,
            fp(&other_spec, dir.path(), Some("Python 3.11.7")),
            "spec"
        );
        std::fs::write(dir.path().join("requirements.txt"), "six==1.17.0\n").unwrap();
        assert_ne!(
            base,
            fp(&spec, dir.path(), Some("Python 3.11.7")),
            "manifest content"
        );
        std::fs::write(dir.path().join("requirements.txt"), "six==1.16.0\n").unwrap();
        std::fs::write(dir.path().join("package-lock.json"), "{}").unwrap();
        assert_ne!(
            base,
            fp(&spec, dir.path(), Some("Python 3.11.7")),
            "a new lock file"
        );
        std::fs::remove_file(dir.path().join("package-lock.json")).unwrap();
        std::fs::write(dir.path().join("README.md"), "docs").unwrap();
        assert_eq!(
            base,
            fp(&spec, dir.path(), Some("Python 3.11.7")),
            "other files do not count"
        );
    }
}

#[cfg(test)]
mod manifest_tests {
    use super::*;

    #[test]
    fn a_fifo_a_device_and_a_huge_file_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("requirements.txt");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let started = std::time::Instant::now();
        let err = read_manifest(&fifo, MANIFEST_MAX_BYTES).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        assert!(!err.retryable());

        let zero = dir.path().join("package.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = read_manifest(&zero, MANIFEST_MAX_BYTES).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");

        let big = dir.path().join("big.txt");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MANIFEST_MAX_BYTES + 1)
            .unwrap();
        assert!(matches!(
            read_manifest(&big, MANIFEST_MAX_BYTES),
            Err(ManifestError::TooLarge { .. })
        ));
        assert_eq!(read_manifest(&dir.path().join("absent"), 10).unwrap(), None);
    }
}
