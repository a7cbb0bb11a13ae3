//! The fingerprint of an environment's inputs (DESIGN §4): the installer spec, the pack's
//! dependency manifests and the interpreter's version. Equal fingerprints mean a rebuild would
//! install the same thing, so a request can be answered by the current build.

use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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

fn kind_of(t: std::fs::FileType) -> &'static str {
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
    Ok(Some(content))
}

/// Files of a pack that decide what an installer installs. `-r other.txt` includes inside a
/// requirements file are not followed.
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

/// A hex SHA-256 over the spec (serde_json writes object keys sorted, so equal specs hash
/// equally) and each manifest's name and content (or its absence). Taken before a build runs,
/// so it describes the inputs the build started from. Blocking: call it off the async threads.
pub fn inputs_digest(
    installers: &serde_json::Value,
    pack_path: &Path,
) -> Result<String, ManifestError> {
    let mut h = Sha256::new();
    h.update(b"packenvd-inputs-v1\0spec\0");
    // A Value always serialises.
    h.update(serde_json::to_vec(installers).unwrap_or_default());
    for name in MANIFESTS {
        h.update(b"\0file\0");
        h.update(name.as_bytes());
        match read_manifest(&pack_path.join(name), MANIFEST_MAX_BYTES)? {
            Some(content) => {
                h.update(b"\0present\0");
                h.update(Sha256::digest(&content));
            }
            None => h.update(b"\0absent\0"),
        }
    }
    Ok(hex::encode(h.finalize()))
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
    use serde_json::json;

    fn fp(spec: &serde_json::Value, dir: &Path, version: Option<&str>) -> String {
        fingerprint(&inputs_digest(spec, dir).unwrap(), version)
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
