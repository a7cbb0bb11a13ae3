//! This node (DESIGN §8): one envs filesystem, named in its envs root's marker; registered with
//! what it can build; brought up to date with what was asked while it was away; its disk
//! checked against the builds its rows record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use packenv_core::layout::EnvsRoot;
use packenv_core::probe;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::store;
use crate::Error;

/// Commands whose version a node reports, when it has them.
const VERSIONED: &[&str] = &["python3", "node", "npm", "uv", "pip3"];

/// What a node's start did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Started {
    /// Environments that no node had, now this node's (an upgrade from a single host).
    pub adopted: u64,
    /// Rows added or brought up to date (catch-up).
    pub caught_up: u64,
    /// Ready rows whose build was missing from the disk: rebuilt.
    pub missing: u64,
}

/// Claims the envs root for this node, registers it, adopts and catches up, and checks its
/// disk. Run at every daemon start (and by `drain`).
pub async fn start(
    pool: &PgPool,
    settings: &Settings,
    detected: &(serde_json::Value, serde_json::Value),
    protections: &[String],
) -> Result<Started, Error> {
    let (root, name) = (settings.envs_root.clone(), settings.node_name.clone());
    packenv_core::blocking(move || {
        EnvsRoot::open(&root, true)?
            .expect("created")
            .claim_node(&name)
    })
    .await
    .map_err(|e| Error::Io {
        what: "the envs root is not usable".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let info = store::NodeInfo {
        name: settings.node_name.clone(),
        envs_root: settings.envs_root.display().to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        runtimes: detected.0.clone(),
        tools: detected.1.clone(),
        protections: json!(protections),
        ttl: settings.node_ttl,
    };
    store::register_node(pool, &info)
        .await
        .map_err(|e| match e {
            store::RegisterError::Db(e) => Error::db("registering the node")(e),
            other => Error::Io {
                what: "this node cannot register".into(),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
    let node = &settings.node_name;
    let adopted = store::adopt(pool, node, &info.envs_root)
        .await
        .map_err(Error::db("adopting environments"))?;
    let caught_up = store::catch_up(pool, node)
        .await
        .map_err(Error::db("catching up"))?;
    let missing = check_disk(pool, node).await?;
    Ok(Started {
        adopted,
        caught_up,
        missing,
    })
}

/// Sends back to be rebuilt the ready rows of `node` whose build is not on its disk (a wiped
/// or replaced envs root).
async fn check_disk(pool: &PgPool, node: &str) -> Result<u64, Error> {
    let recorded = store::recorded_builds(pool, node)
        .await
        .map_err(Error::db("reading this node's builds"))?;
    let missing: Vec<i64> = packenv_core::blocking(move || {
        recorded
            .into_iter()
            .filter(|r| {
                let build = r
                    .build_dir
                    .as_deref()
                    .map_or_else(|| PathBuf::from(&r.env_path), PathBuf::from);
                !Path::new(&build).is_dir()
            })
            .map(|r| r.id)
            .collect()
    })
    .await;
    if missing.is_empty() {
        return Ok(0);
    }
    store::builds_missing(pool, &missing)
        .await
        .map_err(Error::db("marking missing builds"))
}

/// What this host can build (DESIGN §8, the runtime detection the platform reads in
/// `packenvd_node`): per runtime, the commands its steps and executables name, found on the
/// steps' PATH or not (`runtimes`); and the interpreters and installers found, with their
/// versions (`tools`).
pub async fn detect(
    pool: &PgPool,
    settings: &Settings,
) -> Result<(serde_json::Value, serde_json::Value), Error> {
    let runtimes = store::runtimes(pool)
        .await
        .map_err(Error::db("reading the runtimes"))?;
    let path = probe::step_environment(&settings.env_passthrough, Path::new("/"), Path::new("/"))
        .remove("PATH")
        .unwrap_or_default();
    let needs: Vec<(String, Vec<String>)> = runtimes
        .iter()
        .map(|(r, installers)| (r.clone(), bare_commands(installers)))
        .collect();
    let (p, n) = (path.clone(), needs.clone());
    let found: BTreeMap<String, Option<String>> = packenv_core::blocking(move || {
        let mut names: Vec<String> = VERSIONED.iter().map(|s| s.to_string()).collect();
        names.extend(n.into_iter().flat_map(|(_, c)| c));
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let at = probe::resolve_executable(&name, &p).map(|x| x.display().to_string());
                (name, at)
            })
            .collect()
    })
    .await;
    let env = BTreeMap::from([("PATH".to_string(), path)]);
    // At once: each is a process start (npm's takes ~0.3 s), and the node registers only after.
    let probes = VERSIONED.iter().filter_map(|name| {
        let at = found.get(*name)?.clone()?;
        let env = &env;
        Some(async move {
            let version = probe::executable_version(
                &at,
                Path::new("/"),
                env,
                Duration::from_secs(10),
                None,
                &CancellationToken::new(),
            )
            .await
            .ok();
            let version = version.as_deref().and_then(version_number);
            (name.to_string(), json!({"path": at, "version": version}))
        })
    });
    let tools: serde_json::Map<String, serde_json::Value> = futures::future::join_all(probes)
        .await
        .into_iter()
        .collect();
    let mut out = serde_json::Map::new();
    for (runtime_ref, commands) in needs {
        let missing: Vec<&String> = commands
            .iter()
            .filter(|c| found.get(*c).is_none_or(Option::is_none))
            .collect();
        let at: BTreeMap<&String, &Option<String>> =
            commands.iter().map(|c| (c, &found[c])).collect();
        out.insert(
            runtime_ref,
            json!({"buildable": missing.is_empty(), "missing": missing, "commands": at}),
        );
    }
    Ok((
        serde_json::Value::Object(out),
        serde_json::Value::Object(tools),
    ))
}

/// The bare command names a runtime's steps and executables run (not paths, not templates):
/// what a host must have on PATH to build it. An unreadable spec needs nothing here; its rows
/// fail with the spec's error.
/// The version in a tool's `--version` line: `Python 3.11.7` → `3.11.7`, `v20.1.0` →
/// `20.1.0`, `pip 23.2.1 from /usr/lib/...` → `23.2.1`.
fn version_number(line: &str) -> Option<String> {
    line.split_whitespace()
        .map(|w| w.strip_prefix('v').unwrap_or(w))
        .find(|w| {
            w.contains('.')
                && w.starts_with(|c: char| c.is_ascii_digit())
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        })
        .map(str::to_owned)
}

fn bare_commands(installers: &str) -> Vec<String> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(installers) else {
        return Vec::new();
    };
    let Ok(spec) = packenv_core::spec::RuntimeSpec::from_json(&value) else {
        return Vec::new();
    };
    if !spec.requires_environment {
        return Vec::new();
    }
    let bare = |c: &str| !c.contains('/') && !c.contains('{') && !c.is_empty();
    // A command a step runs only when it is there (`command_exists`) is a choice, not a need;
    // the interpreter a runtime builds on is one, whatever the steps call it (`{python}`).
    let optional: Vec<&String> = spec
        .steps
        .iter()
        .filter_map(|s| s.condition.as_ref())
        .flat_map(|c| &c.command_exists)
        .collect();
    let interpreter = spec.interpreter.map(|i| match i {
        packenv_core::spec::Interpreter::Python => "python3".to_string(),
        packenv_core::spec::Interpreter::Node => "node".to_string(),
    });
    let mut names: Vec<String> = spec
        .steps
        .iter()
        .map(|s| s.command.clone())
        .filter(|c| !optional.contains(&c))
        .chain(spec.executable_templates.values().cloned())
        .chain(interpreter)
        .filter(|c| bare(c))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_the_first_dotted_number_of_the_line() {
        for (line, want) in [
            ("Python 3.11.7", Some("3.11.7")),
            ("v20.20.2", Some("20.20.2")),
            (
                "pip 23.2.1 from /root/.pyenv/versions/3.11.7/lib (python 3.11)",
                Some("23.2.1"),
            ),
            ("uv 0.13.9 (x86_64-unknown-linux-gnu)", Some("0.13.9")),
            ("11.19.1", Some("11.19.1")),
            ("no version here", None),
        ] {
            assert_eq!(version_number(line).as_deref(), want, "{line}");
        }
    }

    #[test]
    fn a_runtime_needs_the_bare_commands_of_its_steps_and_executables() {
        let spec = json!({
            "installers": [
                {"name": "a", "command": "python3", "args": []},
                {"name": "b", "command": "{env_path}/bin/pip"},
                {"name": "c", "command": "/usr/bin/cp"}
            ],
            "executable_templates": {"node": "node", "py": "{env_path}/bin/python"}
        });
        assert_eq!(bare_commands(&spec.to_string()), ["node", "python3"]);
        assert!(bare_commands(r#"{"installers": [], "requires_environment": false}"#).is_empty());
        assert!(bare_commands("not json").is_empty());
    }
}
