//! One build: turns a claimed row into a result, with no database access. Everything that can
//! be checked (path safety, the spec, every template) is checked before the first command runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use packenv_core::fingerprint::{fingerprint, inputs_digest};
use packenv_core::layout::{self, EnvLocation};
use packenv_core::log::{tail_lines, CappedLog};
use packenv_core::runner::{self, Invocation, Outcome};
use packenv_core::spec::RuntimeSpec;
use packenv_core::template::Vars;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::store::Claimed;

/// How long an executable may take to answer `--version`.
const EXECUTABLE_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a build ended with.
#[derive(Debug)]
pub enum BuildResult {
    Ready {
        /// `None` for runtimes that need no environment.
        env_path: Option<String>,
        metadata: serde_json::Value,
        fingerprint: Option<String>,
    },
    /// A request whose inputs match the current build, which still runs: nothing was built.
    Unchanged,
    Failed {
        /// One sentence naming the step, the command and how it ended, then the output's tail.
        error: String,
        /// Network trouble and timeouts may pass; a bad spec or a missing package will not.
        retryable: bool,
    },
    /// Shutdown or a lost claim stopped the build; nothing is to be recorded as an attempt.
    Cancelled,
}

impl BuildResult {
    fn permanent(error: impl Into<String>) -> Self {
        BuildResult::Failed {
            error: error.into(),
            retryable: false,
        }
    }
}

/// Runs the build of `row`, writing output to `log`. `cancel` kills the running step.
pub async fn run(
    settings: &Settings,
    row: &Claimed,
    log: &Arc<Mutex<CappedLog>>,
    cancel: &CancellationToken,
) -> BuildResult {
    let say = |line: String| log.lock().unwrap_or_else(|p| p.into_inner()).line(&line);
    let spec = match RuntimeSpec::from_json(&row.installers) {
        Ok(spec) => spec,
        Err(e) => return BuildResult::permanent(format!("runtime {}: {e}", row.runtime_ref)),
    };
    if let Err(e) = layout::validate_pack_ref(&row.pack_ref) {
        return BuildResult::permanent(e.to_string());
    }
    if !spec.requires_environment {
        say(format!("runtime {} needs no environment", row.runtime_ref));
        return BuildResult::Ready {
            env_path: None,
            metadata: json!({"requires_environment": false, "runtime": row.runtime_ref}),
            fingerprint: None,
        };
    }
    let loc = match EnvLocation::new(
        &settings.envs_root,
        &row.pack_ref,
        &row.runtime_name,
        row.env_path.as_deref(),
    ) {
        Ok(loc) => loc,
        Err(e) => return BuildResult::permanent(e.to_string()),
    };
    let pack_path = row
        .storage_path
        .as_ref()
        .map_or_else(|| settings.packs_dir.join(&row.pack_ref), PathBuf::from);
    if !pack_path.is_dir() {
        // Retryable: a platform may insert the row before its copy of the pack's files is done.
        return BuildResult::Failed {
            error: format!(
                "pack directory {} does not exist or is not a directory",
                pack_path.display()
            ),
            retryable: true,
        };
    }
    let runtime_dir = loc
        .env_path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let cache_dir = settings.cache_dir.join(&runtime_dir);
    let token = row.claim_token.simple().to_string();
    let build_dir = loc.build_dir(&token);

    let mut vars = Vars::default();
    vars.set("env_path", build_dir.display().to_string())
        .set("pack_path", pack_path.display().to_string())
        .set("pack_ref", row.pack_ref.clone())
        .set("runtime_ref", row.runtime_ref.clone())
        .set("runtime_name", row.runtime_name.clone())
        .set("runtime_name_lower", row.runtime_name.to_lowercase())
        .set("cache_dir", cache_dir.display().to_string());
    let base_env = step_environment(settings, &cache_dir);
    let plan = match Plan::render(&spec, &vars, &pack_path, &base_env, settings.step_timeout) {
        Ok(plan) => plan,
        Err(e) => return BuildResult::permanent(format!("runtime {}: {e}", row.runtime_ref)),
    };

    if row.skip_if_current {
        if current_build_matches(row, &loc, &pack_path, &plan, cancel).await {
            say("==> inputs unchanged since the current build (fingerprint matches): already up to date".into());
            return BuildResult::Unchanged;
        }
        say("==> inputs changed since the current build (or it no longer runs): rebuilding".into());
    }
    // Read before the steps run: the fingerprint describes the inputs this build started from.
    let inputs = match inputs_digest(&row.installers, &pack_path) {
        Ok(d) => d,
        Err(e) => {
            return BuildResult::Failed {
                error: format!(
                    "cannot read the pack's manifests in {}: {e}",
                    pack_path.display()
                ),
                retryable: true,
            }
        }
    };

    for dir in [&cache_dir, &settings.envs_root] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return BuildResult::Failed {
                error: format!("cannot create {}: {e}", dir.display()),
                retryable: true,
            };
        }
    }
    if let Err(e) = loc.create_build_dir(&settings.envs_root, &token) {
        return BuildResult::Failed {
            error: e.to_string(),
            retryable: !matches!(e, layout::LayoutError::OutsideRoot { .. }),
        };
    }
    let result = run_plan(&plan, &build_dir, log, cancel).await;
    let result = match result {
        Ok(executables) => {
            let version = interpreter(&executables).map(|(_, (_, v))| v.as_str());
            switch(
                &loc,
                &build_dir,
                &plan,
                &executables,
                &token,
                fingerprint(&inputs, version),
            )
        }
        Err(failure) => failure,
    };
    if !matches!(result, BuildResult::Ready { .. }) {
        // A failed build is never served, so it goes at once (DESIGN §4).
        if let Err(e) = std::fs::remove_dir_all(&build_dir) {
            tracing::warn!(build_dir = %build_dir.display(), error = %e, "cannot remove failed build");
        }
        if let BuildResult::Failed { error, retryable } = result {
            let served = loc
                .current_build()
                .map(|b| format!(" The previous build {} is still served.", b.display()));
            return BuildResult::Failed {
                error: error + served.as_deref().unwrap_or(""),
                retryable,
            };
        }
    }
    result
}

/// A step with every template rendered.
#[derive(Debug)]
struct PlannedStep {
    name: String,
    optional: bool,
    /// Absolute path that must exist for the step to run.
    condition: Option<PathBuf>,
    inv: Invocation,
}

#[derive(Debug)]
struct Plan {
    steps: Vec<PlannedStep>,
    executables: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    base_env: BTreeMap<String, String>,
}

impl Plan {
    fn render(
        spec: &RuntimeSpec,
        vars: &Vars,
        pack_path: &Path,
        base_env: &BTreeMap<String, String>,
        default_timeout: Duration,
    ) -> Result<Plan, String> {
        let mut steps = Vec::with_capacity(spec.steps.len());
        for step in &spec.steps {
            let r = |field: &str, t: &str| {
                vars.render(t)
                    .map_err(|e| format!("step '{}', {field}: {e}", step.name))
            };
            let mut env = base_env.clone();
            for (k, v) in &step.env {
                env.insert(k.clone(), r(&format!("env.{k}"), v)?);
            }
            let cwd = match &step.cwd {
                Some(c) => pack_path.join(r("cwd", c)?),
                None => pack_path.to_owned(),
            };
            steps.push(PlannedStep {
                name: step.name.clone(),
                optional: step.optional,
                condition: step
                    .condition
                    .as_ref()
                    .map(|c| r("condition.file_exists", &c.file_exists).map(|p| pack_path.join(p)))
                    .transpose()?,
                inv: Invocation {
                    program: r("command", &step.command)?,
                    args: step
                        .args
                        .iter()
                        .enumerate()
                        .map(|(i, a)| r(&format!("args[{i}]"), a))
                        .collect::<Result<_, _>>()?,
                    cwd,
                    env,
                    timeout: step.timeout.unwrap_or(default_timeout),
                },
            });
        }
        let render_map = |what: &str, m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| {
                    vars.render(v)
                        .map(|v| (k.clone(), v))
                        .map_err(|e| format!("{what}.{k}: {e}"))
                })
                .collect::<Result<BTreeMap<_, _>, _>>()
        };
        Ok(Plan {
            steps,
            executables: render_map("executable_templates", &spec.executable_templates)?,
            env_vars: render_map("env_vars", &spec.env_vars)?,
            base_env: base_env.clone(),
        })
    }
}

/// The scrubbed environment of every step (DESIGN §6).
pub(crate) fn step_environment(settings: &Settings, cache_dir: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in ["PATH", "HOME", "LANG"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.entry("LANG".into()).or_insert_with(|| "C.UTF-8".into());
    for key in &settings.env_passthrough {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.clone(), v);
        }
    }
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

/// Runs the steps, then checks the executables. Ok holds each executable's resolved path and
/// the first line of its `--version`.
async fn run_plan(
    plan: &Plan,
    build_dir: &Path,
    log: &Arc<Mutex<CappedLog>>,
    cancel: &CancellationToken,
) -> Result<BTreeMap<String, (String, String)>, BuildResult> {
    let say = |line: String| log.lock().unwrap_or_else(|p| p.into_inner()).line(&line);
    let total = plan.steps.len();
    for (i, step) in plan.steps.iter().enumerate() {
        if let Some(cond) = &step.condition {
            if !cond.exists() {
                say(format!(
                    "==> step {}/{total} '{}' skipped: {} does not exist",
                    i + 1,
                    step.name,
                    cond.display()
                ));
                continue;
            }
        }
        say(format!(
            "==> step {}/{total} '{}': {}",
            i + 1,
            step.name,
            step.inv.display()
        ));
        let started = Instant::now();
        let outcome = runner::run(&step.inv, log, cancel).await;
        let took =
            humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64));
        if outcome.success() {
            say(format!("==> step '{}' succeeded in {took}", step.name));
            continue;
        }
        if matches!(outcome, Outcome::Cancelled) {
            say(format!("==> step '{}' {}", step.name, outcome.describe()));
            return Err(BuildResult::Cancelled);
        }
        let sentence = format!(
            "step '{}' (`{}`) {}",
            step.name,
            step.inv.display(),
            outcome.describe()
        );
        if step.optional {
            say(format!("==> optional {sentence} after {took}; skipped"));
            continue;
        }
        say(format!("==> {sentence} after {took}"));
        let text = log.lock().unwrap_or_else(|p| p.into_inner()).render();
        let tail = tail_lines(&text, 20, 4000);
        let retryable = classify(&outcome, &tail);
        return Err(BuildResult::Failed {
            error: format!("{sentence}.\n--- output tail ---\n{tail}"),
            retryable,
        });
    }

    let mut found = BTreeMap::new();
    for (name, exe) in &plan.executables {
        let path = resolve_executable(exe, plan.base_env.get("PATH").map_or("", String::as_str));
        match executable_version(
            &path,
            build_dir,
            &plan.base_env,
            EXECUTABLE_CHECK_TIMEOUT,
            cancel,
        )
        .await
        {
            Ok(version) => {
                say(format!("==> executable '{name}': {path} ({version})"));
                found.insert(name.clone(), (path, version));
            }
            Err((Outcome::Cancelled, _, _)) => return Err(BuildResult::Cancelled),
            Err((outcome, text, inv)) => {
                return Err(BuildResult::permanent(format!(
                    "executable '{name}' ({exe}) does not run: `{}` {}.\n--- output tail ---\n{}",
                    inv.display(),
                    outcome.describe(),
                    tail_lines(&text, 10, 2000)
                )))
            }
        }
    }
    Ok(found)
}

/// The executable whose version stands for "the interpreter" in the fingerprint.
pub(crate) fn interpreter<V>(executables: &BTreeMap<String, V>) -> Option<(&String, &V)> {
    ["python", "node"]
        .iter()
        .find_map(|k| executables.get_key_value(*k))
        .or_else(|| executables.iter().next())
}

/// The request fast path: the current build is the one the row records, its interpreter still
/// runs, and the fingerprint of today's inputs equals the row's.
async fn current_build_matches(
    row: &Claimed,
    loc: &EnvLocation,
    pack_path: &Path,
    plan: &Plan,
    cancel: &CancellationToken,
) -> bool {
    let (Some(recorded), Some(current)) = (row.fingerprint.as_deref(), loc.current_build()) else {
        return false;
    };
    if row.metadata["build_dir"].as_str() != Some(&*current.to_string_lossy()) {
        return false;
    }
    let executables: BTreeMap<String, String> =
        serde_json::from_value(row.metadata["executables"].clone()).unwrap_or_default();
    let version = match interpreter(&executables) {
        None => None,
        Some((_, path)) => match executable_version(
            path,
            &current,
            &plan.base_env,
            EXECUTABLE_CHECK_TIMEOUT,
            cancel,
        )
        .await
        {
            Ok(v) => Some(v),
            Err(_) => return false,
        },
    };
    inputs_digest(&row.installers, pack_path)
        .is_ok_and(|d| fingerprint(&d, version.as_deref()) == recorded)
}

/// Runs `<exe> --version`; Ok holds the first line of its output, Err the outcome and output.
pub(crate) async fn executable_version(
    exe: &str,
    cwd: &Path,
    env: &BTreeMap<String, String>,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<String, (Outcome, String, Invocation)> {
    let inv = Invocation {
        program: exe.to_owned(),
        args: vec!["--version".into()],
        cwd: cwd.to_owned(),
        env: env.clone(),
        timeout,
    };
    let out = Arc::new(Mutex::new(CappedLog::new(4096)));
    let outcome = runner::run(&inv, &out, cancel).await;
    let text = out.lock().unwrap_or_else(|p| p.into_inner()).render();
    if outcome.success() {
        Ok(text.lines().next().unwrap_or_default().trim().to_owned())
    } else {
        Err((outcome, text, inv))
    }
}

/// Flips `env_path` to the finished build and describes it for the row's `metadata`.
fn switch(
    loc: &EnvLocation,
    build_dir: &Path,
    plan: &Plan,
    executables: &BTreeMap<String, (String, String)>,
    token: &str,
    fingerprint: String,
) -> BuildResult {
    let previous = loc.current_build();
    match loc.switch_to(build_dir) {
        Ok(Some(aside)) => {
            tracing::warn!(moved_to = %aside.display(), "a real directory stood at env_path; moved it aside")
        }
        Ok(None) => {}
        Err(e) => {
            return BuildResult::Failed {
                error: e.to_string(),
                retryable: true,
            }
        }
    }
    // The collector's grace for the old build runs from now, not from when it was built.
    if let Some(old) = previous.filter(|p| p != build_dir) {
        mark_superseded(&old);
    }
    // Actions must start from the build directory, never through the env_path symlink: a
    // process started through the link would load modules of the next build after a switch.
    let interpreter = interpreter(executables).map(|(_, (_, v))| v.clone());
    let metadata = json!({
        "build_dir": build_dir.display().to_string(),
        "build_id": token,
        "executables": executables.iter().map(|(k, (p, _))| (k.clone(), p.clone())).collect::<BTreeMap<_, _>>(),
        "versions": executables.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
        "interpreter_version": interpreter,
        "env_vars": plan.env_vars,
    });
    BuildResult::Ready {
        env_path: Some(loc.env_path.display().to_string()),
        metadata,
        fingerprint: Some(fingerprint),
    }
}

/// Sets a build directory's modification time to now; the collector measures its grace from it.
pub fn mark_superseded(dir: &Path) {
    let now = std::time::SystemTime::now();
    if let Err(e) = std::fs::File::open(dir).and_then(|f| f.set_modified(now)) {
        tracing::warn!(build_dir = %dir.display(), error = %e, "cannot mark the old build as superseded");
    }
}

/// A bare command name is looked up on the steps' PATH; a path is taken as it is.
fn resolve_executable(exe: &str, path_var: &str) -> String {
    if exe.contains('/') {
        return exe.to_owned();
    }
    std::env::split_paths(path_var)
        .map(|dir| dir.join(exe))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map_or_else(|| exe.to_owned(), |p| p.display().to_string())
}

/// Output that says the package does not exist or cannot be resolved: another try will not help.
const PERMANENT_MARKERS: &[&str] = &[
    "No matching distribution found",
    "Could not find a version that satisfies",
    "ResolutionImpossible",
    "Invalid requirement",
    "npm error code E404",
    "npm ERR! code E404",
    "npm error code ETARGET",
    "npm ERR! code ETARGET",
    "No solution found when resolving",
];

fn classify(outcome: &Outcome, tail: &str) -> bool {
    match outcome {
        Outcome::SpawnFailed(e) => {
            e.kind() != std::io::ErrorKind::NotFound
                && e.kind() != std::io::ErrorKind::PermissionDenied
        }
        Outcome::TimedOut(_) => true,
        _ => !PERMANENT_MARKERS.iter().any(|m| tail.contains(m)),
    }
}
