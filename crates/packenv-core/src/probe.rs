//! What packenvd asks of the host and of an environment, in one place: the environment every
//! step starts with, where a pack's files and a runtime's cache are, what a command name
//! resolves to, and what version an executable reports. Builds, verification and the
//! benchmark all use these, so they cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::log::BuildLog;
use crate::runner::{self, Invocation, Outcome, Supervised};

/// Variables a step may inherit from the daemon besides PATH and LANG (DESIGN §6): proxies,
/// package indexes and CA bundles. Anything else, `DATABASE_URL` included, is dropped; HOME
/// and TMPDIR are always the build's own ([`step_environment`]).
pub const DEFAULT_PASSTHROUGH: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "npm_config_registry",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PYENV_ROOT",
    "PYENV_VERSION",
    "TMPDIR",
];

/// The scrubbed environment every step starts with (DESIGN §6): PATH and LANG, the
/// `passthrough` variables the daemon has, the cache variables pointing into `cache_dir`, a
/// private `tmp` as TMPDIR and `tmp/home` as HOME (nothing of the daemon's home: its caches,
/// its `.pgpass`), and settings that keep installers from prompting or phoning home. Nothing
/// else of the daemon's.
pub fn step_environment(
    passthrough: &[String],
    cache_dir: &Path,
    tmp: &Path,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in ["PATH", "LANG"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.entry("LANG".into()).or_insert_with(|| "C.UTF-8".into());
    for key in passthrough {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.clone(), v);
        }
    }
    env.insert("TMPDIR".into(), tmp.display().to_string());
    env.insert("HOME".into(), tmp.join("home").display().to_string());
    for (key, sub) in [
        ("PIP_CACHE_DIR", "pip"),
        ("npm_config_cache", "npm"),
        ("UV_CACHE_DIR", "uv"),
    ] {
        env.insert(key.into(), cache_dir.join(sub).display().to_string());
    }
    // Installers must never stop to ask, nor spend time on update checks.
    for (key, value) in [
        ("PIP_NO_INPUT", "1"),
        ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        ("npm_config_update_notifier", "false"),
        ("npm_config_fund", "false"),
        ("npm_config_audit", "false"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
    ] {
        env.entry(key.into()).or_insert_with(|| value.into());
    }
    env
}

/// Where a pack's files are: its `storage_path`, or `<packs_dir>/<pack_ref>` when that is NULL
/// (DESIGN §1).
pub fn pack_path(packs_dir: &Path, pack_ref: &str, storage_path: Option<&str>) -> PathBuf {
    storage_path.map_or_else(|| packs_dir.join(pack_ref), PathBuf::from)
}

/// The download cache of one pack's builds of one runtime:
/// `<cache_root>/<runtime directory name>/<pack_ref>`. Never shared between packs: steps write
/// their cache, and uv installs files as hard links into it, so a cache two packs shared would
/// let one pack's build rewrite what the other's environment runs, now (a linked file changed
/// in place) and in its later builds (an entry replaced, or built from a hostile sdist). A pack
/// can spoil only its own later builds (DESIGN §6).
pub fn cache_dir(cache_root: &Path, runtime_dir: &str, pack_ref: &str) -> PathBuf {
    cache_root.join(runtime_dir).join(pack_ref)
}

/// A bare command name is looked up on the steps' PATH; a path is taken as it is. `None` when
/// a bare name is found nowhere on that PATH.
pub fn resolve_executable(exe: &str, path_var: &str) -> Option<PathBuf> {
    if exe.contains('/') {
        return Some(PathBuf::from(exe));
    }
    std::env::split_paths(path_var)
        .map(|dir| dir.join(exe))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The executable whose version stands for "the interpreter" of an environment (in its
/// fingerprint and its metadata): `python`, else `node`, else the first one.
pub fn interpreter<V>(executables: &BTreeMap<String, V>) -> Option<(&String, &V)> {
    ["python", "node"]
        .iter()
        .find_map(|k| executables.get_key_value(*k))
        .or_else(|| executables.iter().next())
}

/// An executable that did not answer `--version`.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` {outcome}")]
pub struct ProbeFailure {
    /// The command line that was run.
    pub command: String,
    pub outcome: Outcome,
    /// What it printed (capped).
    pub output: String,
}

/// Runs `<exe> --version` in `cwd` with `env` (confined as `supervised` says: it runs code of
/// the environment); Ok holds the first line it printed.
pub async fn executable_version(
    exe: &str,
    cwd: &Path,
    env: &BTreeMap<String, String>,
    timeout: Duration,
    supervised: Option<&Supervised>,
    cancel: &CancellationToken,
) -> Result<String, ProbeFailure> {
    let inv = Invocation {
        program: exe.to_owned(),
        args: vec!["--version".into()],
        cwd: cwd.to_owned(),
        env: env.clone(),
        timeout,
        supervised: supervised.cloned(),
    };
    let out = BuildLog::new(4096);
    let outcome = runner::run(&inv, &out, cancel).await;
    let output = out.render();
    if outcome.success() {
        Ok(output.lines().next().unwrap_or_default().trim().to_owned())
    } else {
        Err(ProbeFailure {
            command: inv.display(),
            outcome,
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_environment_holds_caches_and_no_daemon_secret() {
        std::env::set_var("PACKENV_PROBE_SECRET", "x");
        let env = step_environment(
            &["NO_SUCH_VAR_XYZ".into(), "TMPDIR".into()],
            Path::new("/c/python"),
            Path::new("/c/.tmp/b1"),
        );
        assert_eq!(
            env["TMPDIR"], "/c/.tmp/b1",
            "the private tmp wins over a passthrough"
        );
        assert_eq!(env["HOME"], "/c/.tmp/b1/home");
        assert_eq!(env["PIP_CACHE_DIR"], "/c/python/pip");
        assert_eq!(env["UV_CACHE_DIR"], "/c/python/uv");
        assert!(env.contains_key("PATH") && env.contains_key("LANG"));
        assert!(!env.contains_key("PACKENV_PROBE_SECRET"));
        assert!(!env.contains_key("NO_SUCH_VAR_XYZ"));
    }

    #[test]
    fn a_bare_name_resolves_on_path_and_a_missing_one_does_not() {
        assert_eq!(
            resolve_executable("sh", "/nonexistent:/bin:/usr/bin")
                .unwrap()
                .file_name()
                .unwrap(),
            "sh"
        );
        assert_eq!(resolve_executable("no-such-cmd-xyz", "/bin:/usr/bin"), None);
        assert_eq!(
            resolve_executable("/x/y", ""),
            Some(PathBuf::from("/x/y")),
            "a path is taken as it is"
        );
    }

    #[test]
    fn python_stands_for_the_interpreter_before_anything_else() {
        let m: BTreeMap<String, u8> = [("a".into(), 1), ("node".into(), 2), ("python".into(), 3)]
            .into_iter()
            .collect();
        assert_eq!(interpreter(&m).map(|(k, _)| k.as_str()), Some("python"));
    }
}
