//! The request fast path: whether the current build still answers a request, and what
//! builds' interpreters answered to `--version` (asked once per file).

use super::*;

/// The request fast path: the current build is the one the row records, its interpreter still
/// runs, and the fingerprint of today's inputs equals the row's.
/// Whether a request can be answered by the current build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reuse {
    Yes,
    No,
    /// Only running the current build's interpreter would tell.
    Unknown,
}

/// Whether the current build was made from the inputs a new build would use: its recorded
/// fingerprint equals the one of the spec, the manifests, the chosen interpreter and the
/// version the build's interpreter reports. The version comes from what is known of the file
/// the build's interpreter resolves to ([`toolchain::file_key`]: a venv's `bin/python` is the
/// host's interpreter); only with `run` is an unknown one run, confined like a check.
#[allow(clippy::too_many_arguments)]
pub(super) async fn current_build_matches(
    cfg: &BuildConfig,
    target: &Target,
    spec: &crate::spec::RuntimeSpec,
    loc: &EnvLocation,
    (plan, planned_for): (&Plan, &Path),
    tools: &Toolchain,
    run: Option<()>,
    cancel: &CancellationToken,
) -> Reuse {
    let Some(recorded) = target.fingerprint.as_deref() else {
        return Reuse::No;
    };
    let l = loc.clone();
    let Some(current) = blocking(move || l.current_build()).await else {
        return Reuse::No;
    };
    if target.metadata()["build_dir"].as_str() != Some(&*current.to_string_lossy()) {
        return Reuse::No;
    }
    // The executables as the spec names them in the current build, never as metadata says.
    let made;
    let current_plan = if planned_for == current {
        plan
    } else {
        let Ok(p) = Plan::new(
            cfg,
            target,
            plan.installers.clone(),
            spec,
            loc,
            &current,
            &plan.tmp_dir,
            tools,
        ) else {
            return Reuse::No;
        };
        made = p;
        &made
    };
    let version = match probe::interpreter(&current_plan.executables) {
        None => None,
        Some((_, exe)) => {
            let Some(path) = probe::resolve_executable(exe, plan.path_var()) else {
                return Reuse::No;
            };
            let key = {
                let p = path.clone();
                blocking(move || toolchain::file_key(&p)).await
            };
            let Some(key) = key else {
                return Reuse::No;
            };
            match (known_version(&key), run) {
                (Some(v), _) => Some(v),
                (None, None) => return Reuse::Unknown,
                (None, Some(())) => match probe::executable_version(
                    &path.display().to_string(),
                    &current,
                    &plan.base_env,
                    EXECUTABLE_CHECK_TIMEOUT,
                    plan.check.as_ref(),
                    cancel,
                )
                .await
                {
                    Ok(v) => {
                        remember_version(key, v.clone());
                        Some(v)
                    }
                    Err(_) => return Reuse::No,
                },
            }
        }
    };
    match digest(plan, tools).await {
        Ok(d) if fingerprint(&d, version.as_deref()) == recorded => Reuse::Yes,
        _ => Reuse::No,
    }
}

/// What builds' interpreters answered to `--version`, by the identity of the file they resolve
/// to: asked once per file while it is unchanged, so an unchanged request costs no process.
static BUILD_VERSIONS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<toolchain::FileKey, String>>,
> = std::sync::LazyLock::new(Default::default);

fn known_version(key: &toolchain::FileKey) -> Option<String> {
    BUILD_VERSIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned()
}

/// Records what a build's interpreter answered, for later requests.
pub(crate) fn remember_version(key: toolchain::FileKey, version: String) {
    BUILD_VERSIONS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, version);
}
