//! The fingerprint of an environment's inputs (DESIGN §4): the installer spec, the pack's
//! dependency manifests and the interpreter's version. Equal fingerprints mean a rebuild would
//! install the same thing, so a request can be answered by the current build.

use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

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
/// so it describes the inputs the build started from.
pub fn inputs_digest(installers: &serde_json::Value, pack_path: &Path) -> io::Result<String> {
    let mut h = Sha256::new();
    h.update(b"packenvd-inputs-v1\0spec\0");
    h.update(serde_json::to_vec(installers).map_err(io::Error::other)?);
    for name in MANIFESTS {
        h.update(b"\0file\0");
        h.update(name.as_bytes());
        match std::fs::read(pack_path.join(name)) {
            Ok(content) => {
                h.update(b"\0present\0");
                h.update(Sha256::digest(&content));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => h.update(b"\0absent\0"),
            Err(e) => return Err(e),
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
