//! The interpreter of one build (DESIGN §5): for a runtime that names one (`"interpreter":
//! "python"`), what the pack asks for and what the host has decide `{python}`; without a
//! constraint it is `python3` on the steps' PATH, as it always was. Node.js is checked, not
//! chosen: a host has one `node`.

use std::path::Path;

use serde_json::json;

use crate::build::{BuildError, Toolchain};
use crate::spec::{Interpreter, RuntimeSpec};
use crate::target::{BuildConfig, Target};
use crate::toolchain::{self, Candidate, Requirement, Version};
use crate::{blocking, probe};

/// Chooses the interpreter for `target`; `path_var` is the steps' PATH.
pub async fn resolve(
    cfg: &BuildConfig,
    target: &Target,
    spec: &RuntimeSpec,
    pack_path: &Path,
    path_var: &str,
) -> Result<Toolchain, BuildError> {
    let Some(interp) = spec.interpreter else {
        return Ok(Toolchain::default());
    };
    let fail = |source| BuildError::Toolchain {
        pack: target.pack_ref.clone(),
        source,
    };
    let pack_row = match target.pack_dependencies.as_deref() {
        None => None,
        Some(text) => Some(
            serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
                fail(toolchain::ToolchainError::Constraint {
                    source_: "the pack row's runtime_dependencies".into(),
                    problem: e.to_string(),
                })
            })?,
        ),
    };
    let requirements = {
        let (runtime_ref, wanted, pack_path) = (
            target.runtime_ref.clone(),
            spec.interpreter_version.clone(),
            pack_path.to_owned(),
        );
        blocking(move || {
            toolchain::requirements(
                interp,
                &runtime_ref,
                wanted.as_deref(),
                pack_row.as_ref(),
                &pack_path,
            )
        })
        .await
        .map_err(fail)?
    };
    let default_name = match interp {
        Interpreter::Python => "python3",
        Interpreter::Node => "node",
    };
    let chosen = match interp {
        Interpreter::Python if !requirements.is_empty() => {
            let found = toolchain::pythons(path_var, &cfg.python_search).await;
            toolchain::choose(interp, &requirements, &found)
                .map_err(fail)?
                .map(|c| (c.path, Some(c.version)))
        }
        _ => None,
    };
    let (path, version) = match chosen {
        Some((path, version)) => (Some(path), version),
        None => {
            // The default command, as the steps will find it.
            let path = probe::resolve_executable(default_name, path_var);
            let version = match &path {
                Some(p) => toolchain::host_version(p.clone())
                    .await
                    .as_deref()
                    .and_then(Version::find),
                None => None,
            };
            if !requirements.is_empty() {
                // Node.js: the host's must satisfy the pack; there is no other to choose.
                let fits = version
                    .as_ref()
                    .is_some_and(|v| requirements.iter().all(|r| r.constraint.matches(v)));
                if !fits {
                    let found: Vec<Candidate> = path
                        .iter()
                        .zip(version.iter())
                        .map(|(p, v)| Candidate {
                            path: p.clone(),
                            version: v.clone(),
                        })
                        .collect();
                    return Err(fail(toolchain::unsatisfied(interp, &requirements, &found)));
                }
            }
            (path, version)
        }
    };
    let shown = path
        .as_ref()
        .map_or_else(|| default_name.to_owned(), |p| p.display().to_string());
    let version_text = version.as_ref().map(Version::to_string);
    Ok(Toolchain {
        vars: [(interp.name(), shown.clone())].into_iter().collect(),
        identity: identity(interp, &shown, version_text.as_deref(), &requirements),
        recorded: json!({
            "name": interp.name(),
            "path": shown,
            "version": version_text,
            "wanted": toolchain::describe(&requirements),
        }),
    })
}

fn identity(
    interp: Interpreter,
    path: &str,
    version: Option<&str>,
    requirements: &[Requirement],
) -> String {
    let wanted: Vec<String> = requirements
        .iter()
        .map(|r| format!("{}={}", r.source, r.constraint))
        .collect();
    format!(
        "{}={path}@{};wanted={}",
        interp.name(),
        version.unwrap_or("?"),
        wanted.join(";")
    )
}
