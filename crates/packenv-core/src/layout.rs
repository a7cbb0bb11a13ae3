//! Where environments live on disk (DESIGN §4, §6).
//!
//! ```text
//! <envs_root>/<pack_ref>/<runtime>            symlink → .<runtime>-<token>  (env_path)
//! <envs_root>/<pack_ref>/.<runtime>-<token>/  one build, created at its final place
//! ```
//!
//! A venv holds absolute paths, so a build is never moved: it is made where it will be used and
//! `env_path` is switched to it atomically (symlink to a temporary name, then `rename`).

use std::io;
use std::path::{Component, Path, PathBuf};

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

/// The place of one (pack, runtime) environment under the envs root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvLocation {
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
        Ok(EnvLocation { pack_dir, env_path })
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

    /// Creates the pack directory and a fresh, empty build directory, refusing to follow a
    /// symlink out of the envs root.
    pub fn create_build_dir(&self, envs_root: &Path, token: &str) -> Result<PathBuf, LayoutError> {
        std::fs::create_dir_all(&self.pack_dir).map_err(io_err("cannot create", &self.pack_dir))?;
        let real_root = std::fs::canonicalize(envs_root)
            .map_err(io_err("cannot resolve envs root", envs_root))?;
        let real_pack_dir = std::fs::canonicalize(&self.pack_dir)
            .map_err(io_err("cannot resolve", &self.pack_dir))?;
        if real_pack_dir.parent() != Some(real_root.as_path()) {
            return Err(LayoutError::OutsideRoot {
                path: real_pack_dir.display().to_string(),
                root: real_root,
            });
        }
        let dir = self.build_dir(token);
        std::fs::create_dir(&dir).map_err(io_err("cannot create build directory", &dir))?;
        Ok(dir)
    }

    /// Points `env_path` at `build_dir` atomically. A real directory left at `env_path` by an
    /// older in-place installer is moved aside first (returned), since `rename` cannot replace
    /// a non-empty directory.
    pub fn switch_to(&self, build_dir: &Path) -> Result<Option<PathBuf>, LayoutError> {
        let target = build_dir
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| LayoutError::BadEnvPath(build_dir.display().to_string()))?;
        let mut moved_aside = None;
        if let Ok(meta) = std::fs::symlink_metadata(&self.env_path) {
            if meta.is_dir() {
                let aside =
                    self.pack_dir
                        .join(format!(".{}-legacy-{}", self.name(), std::process::id()));
                std::fs::rename(&self.env_path, &aside)
                    .map_err(io_err("cannot move aside", &self.env_path))?;
                moved_aside = Some(aside);
            }
        }
        let tmp = self
            .pack_dir
            .join(format!(".{}.switch-{}", self.name(), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        // Relative target: the envs root can be moved or mounted elsewhere as a whole.
        std::os::unix::fs::symlink(&target, &tmp).map_err(io_err("cannot create symlink", &tmp))?;
        std::fs::rename(&tmp, &self.env_path).map_err(io_err("cannot switch", &self.env_path))?;
        Ok(moved_aside)
    }

    /// The build directory `env_path` points at now, if any.
    pub fn current_build(&self) -> Option<PathBuf> {
        let target = std::fs::read_link(&self.env_path).ok()?;
        let dir = self.pack_dir.join(target);
        dir.is_dir().then_some(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_refs_are_strict() {
        for ok in ["core", "my_pack", "pack-2", "a.b", "_x"] {
            validate_pack_ref(ok).unwrap();
        }
        for bad in [
            "",
            "..",
            "a/b",
            "../x",
            ".hidden",
            "a..b",
            "-x",
            "a b",
            "ü",
            &"x".repeat(129),
        ] {
            assert!(validate_pack_ref(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn env_path_is_derived_or_checked_against_the_root() {
        let root = Path::new("/srv/envs");
        let loc = EnvLocation::new(root, "web", "Python", None).unwrap();
        assert_eq!(loc.env_path, Path::new("/srv/envs/web/python"));
        assert_eq!(loc.build_dir("t1"), Path::new("/srv/envs/web/.python-t1"));

        let given = EnvLocation::new(root, "web", "Python", Some("/srv/envs/web/py")).unwrap();
        assert_eq!(given.env_path, Path::new("/srv/envs/web/py"));

        for bad in [
            "/etc/passwd",
            "/srv/envs/../etc",
            "relative/path",
            "/srv/envs/other/python",
            "/srv/envs/web/.hidden",
        ] {
            assert!(
                EnvLocation::new(root, "web", "Python", Some(bad)).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn switching_is_a_rename_over_the_old_link() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = EnvLocation::new(tmp.path(), "p", "python", None).unwrap();
        let a = loc.create_build_dir(tmp.path(), "a").unwrap();
        std::fs::write(a.join("f"), "a").unwrap();
        loc.switch_to(&a).unwrap();
        assert_eq!(
            std::fs::read_to_string(loc.env_path.join("f")).unwrap(),
            "a"
        );
        let b = loc.create_build_dir(tmp.path(), "b").unwrap();
        std::fs::write(b.join("f"), "b").unwrap();
        loc.switch_to(&b).unwrap();
        assert_eq!(
            std::fs::read_to_string(loc.env_path.join("f")).unwrap(),
            "b"
        );
        assert_eq!(loc.current_build().unwrap(), b);
        assert!(a.exists(), "the old build stays for running processes");
    }

    #[test]
    fn a_legacy_directory_at_env_path_is_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = EnvLocation::new(tmp.path(), "p", "python", None).unwrap();
        std::fs::create_dir_all(loc.env_path.join("bin")).unwrap();
        let b = loc.create_build_dir(tmp.path(), "b").unwrap();
        let aside = loc.switch_to(&b).unwrap().unwrap();
        assert!(aside.join("bin").is_dir());
        assert_eq!(loc.current_build().unwrap(), b);
    }

    #[test]
    fn a_pack_dir_that_is_a_symlink_out_of_the_root_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("p")).unwrap();
        let loc = EnvLocation::new(tmp.path(), "p", "python", None).unwrap();
        assert!(matches!(
            loc.create_build_dir(tmp.path(), "a"),
            Err(LayoutError::OutsideRoot { .. })
        ));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
