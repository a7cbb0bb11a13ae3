//! The checks of a ready environment (DESIGN §7), cheapest first: the link, the executables, the
//! inputs, the installed packages (Python: every recorded file exists and has the sha256 it was
//! installed with, then `pip check`; Node.js: `npm ls` finds every dependency), then the
//! runtime's own `checks`. No database: the `packenvd` crate takes the rows and writes the
//! results.
//!
//! What runs is derived from the runtime's spec and the build directory the link names, never
//! from the row's `metadata` (DESIGN §6: no path is run because a row names it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::build::{parse_spec, BuildError, Plan, Scratch, Toolchain};
use crate::fingerprint::{fingerprint, inputs_digest};
use crate::layout::{EnvLocation, LayoutError};
use crate::log::{tail_lines, BuildLog};
use crate::runner::{self, Invocation};
use crate::spec::{Interpreter, RuntimeSpec};
use crate::target::{BuildConfig, Target};
use crate::{blocking, probe};

/// Which check failed and what it saw, in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("the row has no env_path")]
    NoEnvPath,
    #[error("the runtime's spec: {0}")]
    Spec(#[source] BuildError),
    /// The checks could not run on this host (their private tmp could not be made): nothing
    /// is known about the environment, which must not be blamed for it.
    #[error("the checks cannot run here: {0}")]
    Local(#[source] BuildError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("env_path {0} does not point to a build directory")]
    NotABuild(String),
    #[error("cannot resolve {}: {source}", path.display())]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("env_path {env_path} resolves to {}, outside the envs root", real.display())]
    OutsideRoot { env_path: String, real: PathBuf },
    #[error("env_path {env_path} points to {}, but the row records {recorded:?}", build.display())]
    NotRecorded {
        env_path: String,
        build: PathBuf,
        recorded: Option<String>,
    },
    #[error("executable '{name}' ({path}) is missing")]
    ExecutableMissing { name: String, path: String },
    #[error("executable '{name}' does not run: {failure}: {tail}")]
    ExecutableFails {
        name: String,
        failure: String,
        tail: String,
    },
    #[error("inputs changed: the interpreter is now {now:?}, the build was made with {was:?}")]
    InterpreterChanged { now: String, was: String },
    #[error(transparent)]
    Interpreter(BuildError),
    #[error("inputs changed: the runtime's installer spec or the pack's dependency manifests differ from the build's")]
    InputsChanged,
    #[error(transparent)]
    Manifest(#[from] crate::fingerprint::ManifestError),
    #[error("`{command}` {outcome}: {tail}")]
    PipCheck {
        command: String,
        outcome: String,
        tail: String,
    },
    #[error(transparent)]
    Installed(#[from] crate::installed::RecordProblem),
    #[error("node_modules lacks dependencies: `{command}` {outcome}: {problems}")]
    NpmLs {
        command: String,
        outcome: String,
        /// npm's own words: `missing: dep@^1, required by pack@1.0.0`, ...
        problems: String,
    },
    #[error("check '{name}': {missing}")]
    CheckCommandNotFound {
        name: String,
        /// "`x` not found on PATH (PATH=...)", or which file of a path is missing.
        missing: String,
    },
    #[error("check '{name}' (`{command}`) {outcome}: {tail}")]
    RuntimeCheck {
        name: String,
        command: String,
        outcome: String,
        tail: String,
    },
}

impl CheckError {
    /// Whether the fault is this host's, not the environment's: the row stays as it was.
    pub fn is_local(&self) -> bool {
        matches!(self, CheckError::Local(_))
    }
}

/// Settings of the checks.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub build: BuildConfig,
    /// Limit of each check command; past it the check fails.
    pub timeout: Duration,
    /// Whether Python environments with pip also run `pip check`.
    pub pip_check: bool,
}

/// Runs every check of `target`'s environment; Err names the first that failed.
pub async fn check(cfg: &CheckConfig, target: &Target) -> Result<(), CheckError> {
    let (installers, spec) = parse_spec(target).map_err(CheckError::Spec)?;
    if !spec.requires_environment {
        return Ok(());
    }
    // 1. env_path names a build directory inside the envs root, the one the row records.
    let env_path = target.env_path.clone().ok_or(CheckError::NoEnvPath)?;
    let loc = EnvLocation::new(
        &cfg.build.envs_root,
        &target.pack_ref,
        &target.runtime_name,
        Some(&env_path),
    )?;
    let recorded = target.metadata()["build_dir"].as_str().map(str::to_owned);
    let build = {
        let (loc, root, env_path, recorded) = (
            loc.clone(),
            cfg.build.envs_root.clone(),
            env_path.clone(),
            recorded.clone(),
        );
        blocking(move || check_link(&loc, &root, &env_path, recorded)).await?
    };

    // 2. Each executable the spec promises exists in that build and runs, confined, writing
    // only to a private tmp (it runs the environment's code: a `.pth` file, a shebang).
    let tmp = cfg.build.tmp_root().join(check_tmp_name());
    let pack_path = probe::pack_path(
        &cfg.build.packs_dir,
        &target.pack_ref,
        target.storage_path.as_deref(),
    );
    // The interpreter a build would choose now: another one (a newer Python that fits, the
    // chosen one gone) changes the fingerprint below.
    let tools = crate::build::interpreter::resolve(
        &cfg.build,
        target,
        &spec,
        &pack_path,
        &crate::build::steps_path(&cfg.build),
    )
    .await
    .map_err(CheckError::Interpreter)?;
    let plan = Plan::new(
        &cfg.build, target, installers, &spec, &loc, &build, &tmp, &tools,
    )
    .map_err(CheckError::Spec)?;
    let user = cfg.build.sandbox.as_ref().and_then(|s| s.user);
    let scratch = Scratch::create(&cfg.build, &tmp, None, user)
        .await
        .map_err(CheckError::Local)?;
    let result = run_checks(cfg, target, &spec, &plan, &build, &tools).await;
    scratch.remove().await;
    result
}

/// A private tmp name no other check or build uses.
fn check_tmp_name() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "check-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Checks 2 to 7, on the build the link names.
async fn run_checks(
    cfg: &CheckConfig,
    target: &Target,
    spec: &RuntimeSpec,
    plan: &Plan,
    build: &Path,
    tools: &Toolchain,
) -> Result<(), CheckError> {
    let cancel = CancellationToken::new();
    let mut versions = BTreeMap::new();
    let mut paths = BTreeMap::new();
    for (name, exe) in &plan.executables {
        let missing = || CheckError::ExecutableMissing {
            name: name.clone(),
            path: exe.clone(),
        };
        let path = probe::resolve_executable(exe, plan.path_var()).ok_or_else(missing)?;
        let p = path.clone();
        if !blocking(move || p.exists()).await {
            return Err(missing());
        }
        let path = path.display().to_string();
        match probe::executable_version(
            &path,
            build,
            &plan.base_env,
            cfg.timeout,
            plan.check.as_ref(),
            &cancel,
        )
        .await
        {
            Ok(v) => {
                versions.insert(name.clone(), v);
                paths.insert(name.clone(), path);
            }
            Err(f) => {
                return Err(CheckError::ExecutableFails {
                    name: name.clone(),
                    tail: tail_lines(&f.output, 3, 400),
                    failure: f.to_string(),
                })
            }
        }
    }

    // 3. The inputs are those the build was made from.
    if let Some(recorded) = &target.fingerprint {
        let (spec_json, pack_path, identity) = (
            plan.installers.clone(),
            plan.pack_path.clone(),
            tools.identity.clone(),
        );
        let digest = blocking(move || inputs_digest(&spec_json, &pack_path, &identity)).await?;
        let version = probe::interpreter(&versions).map(|(_, v)| v.as_str());
        if &fingerprint(&digest, version) != recorded {
            let metadata = target.metadata();
            let was = metadata["interpreter_version"].as_str();
            let chosen = |m: &serde_json::Value| {
                format!(
                    "{} {}",
                    m["path"].as_str().unwrap_or("?"),
                    m["version"].as_str().unwrap_or("?")
                )
            };
            return Err(match (was, version) {
                (Some(was), Some(now)) if was != now => CheckError::InterpreterChanged {
                    now: now.to_owned(),
                    was: was.to_owned(),
                },
                _ if metadata["interpreter"].is_object()
                    && metadata["interpreter"]["path"] != tools.recorded["path"] =>
                {
                    CheckError::InterpreterChanged {
                        now: chosen(&tools.recorded),
                        was: chosen(&metadata["interpreter"]),
                    }
                }
                _ => CheckError::InputsChanged,
            });
        }
    }

    // 4. For Python: every file each installed distribution recorded is still there and, where
    // RECORD gives its sha256, still what was installed, read by the daemon (a deleted or
    // rewritten module breaks the action while the interpreter runs and pip check, which reads
    // only metadata, passes). Hashing stops at the checks' timeout, and when this future is
    // dropped (the blocking thread cannot be aborted, only told).
    let b = build.to_owned();
    let budget = crate::installed::Budget {
        deadline: Some(std::time::Instant::now() + cfg.timeout),
        ..crate::installed::Budget::default()
    };
    let cancelled = CancelOnDrop::default();
    let flag = cancelled.0.clone();
    blocking(move || crate::installed::check_python(&b, budget, &flag)).await?;
    drop(cancelled);

    // 5. For Python: installed packages are consistent. A venv without pip is checked with
    // the host's uv, else with the chosen interpreter's pip pointed at it.
    if let (true, Some(python)) = (cfg.pip_check, paths.get("python")) {
        let mut env = plan.base_env.clone();
        let (program, args): (String, Vec<String>) = if paths.contains_key("pip") {
            (
                python.clone(),
                vec!["-m".into(), "pip".into(), "check".into()],
            )
        } else if probe::resolve_executable("uv", plan.path_var()).is_some() {
            env.insert("UV_NO_CACHE".into(), "1".into());
            let args = ["pip", "check", "--python", python.as_str()];
            ("uv".into(), args.iter().map(|a| a.to_string()).collect())
        } else if let Some(host) = tools.vars.get("python") {
            let args = ["-m", "pip", "--python", python.as_str(), "check"];
            (host.clone(), args.iter().map(|a| a.to_string()).collect())
        } else {
            (String::new(), Vec::new())
        };
        if !program.is_empty() {
            let inv = Invocation {
                program,
                args,
                cwd: build.to_owned(),
                env,
                timeout: cfg.timeout,
                supervised: plan.check.clone(),
            };
            let out = BuildLog::new(8192);
            let outcome = runner::run(&inv, &out, &cancel).await;
            if !outcome.success() {
                return Err(CheckError::PipCheck {
                    command: inv.display(),
                    outcome: outcome.to_string(),
                    tail: tail_lines(&out.render(), 5, 600),
                });
            }
        }
    }

    // 6. For Node.js: node_modules holds every dependency package.json asks for. A platform's
    // own runtime may not say `interpreter`; its `node` executable says as much.
    if spec.interpreter == Some(Interpreter::Node) || plan.executables.contains_key("node") {
        npm_ls(cfg, plan, build, &cancel).await?;
    }

    // 7. The runtime's own checks, in the order the spec lists them.
    for check in &plan.checks {
        let mut inv = check.inv.clone();
        inv.timeout = cfg.timeout;
        let (program, path_var) = (inv.program.clone(), plan.path_var().to_owned());
        if let Some(missing) = blocking(move || runner::missing(&program, Some(&path_var))).await {
            return Err(CheckError::CheckCommandNotFound {
                name: check.name.clone(),
                missing,
            });
        }
        let out = BuildLog::new(8192);
        let outcome = runner::run(&inv, &out, &cancel).await;
        if !outcome.success() {
            return Err(CheckError::RuntimeCheck {
                name: check.name.clone(),
                command: check.inv.display(),
                outcome: outcome.to_string(),
                tail: tail_lines(&out.render(), 5, 600),
            });
        }
    }
    Ok(())
}

/// A flag set when it is dropped: tells blocking work that its result is no longer wanted.
#[derive(Default)]
struct CancelOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `npm ls` over the production dependencies of a Node.js build with a `package.json`, confined
/// like the other checks. It needs neither the network nor the shared cache: npm is told to
/// stay offline and to keep its cache and logs in the check's private tmp.
async fn npm_ls(
    cfg: &CheckConfig,
    plan: &Plan,
    build: &Path,
    cancel: &CancellationToken,
) -> Result<(), CheckError> {
    // Without npm the build did not use it either.
    let Some(npm) = probe::resolve_executable("npm", plan.path_var()) else {
        return Ok(());
    };
    let b = build.to_owned();
    let project = blocking(move || {
        let file = |name: &str| b.join(name).symlink_metadata().is_ok_and(|m| m.is_file());
        // Yarn's Plug'n'Play keeps no node_modules for npm to read.
        file("package.json") && !file(".pnp.cjs") && !file(".pnp.js")
    })
    .await;
    if !project {
        return Ok(());
    }
    let mut env = plan.base_env.clone();
    for (key, value) in [
        (
            "npm_config_cache",
            plan.tmp_dir.join("npm").display().to_string(),
        ),
        ("npm_config_offline", "true".into()),
        ("npm_config_logs_max", "0".into()),
        ("npm_config_update_notifier", "false".into()),
    ] {
        env.insert(key.into(), value);
    }
    let inv = Invocation {
        program: npm.display().to_string(),
        args: ["ls", "--omit=dev", "--all", "--parseable"]
            .map(String::from)
            .to_vec(),
        cwd: build.to_owned(),
        env,
        timeout: cfg.timeout,
        supervised: plan.check.clone(),
    };
    let out = BuildLog::new(16384);
    let outcome = runner::run(&inv, &out, cancel).await;
    if outcome.success() {
        return Ok(());
    }
    let text = out.render();
    let problems: Vec<&str> = text
        .lines()
        .map(|l| {
            l.trim()
                .trim_start_matches("npm error ")
                .trim_start_matches("npm ERR! ")
        })
        .filter(|l| {
            ["missing:", "invalid:", "extraneous:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    Err(CheckError::NpmLs {
        command: inv.display(),
        outcome: outcome.to_string(),
        problems: if problems.is_empty() {
            tail_lines(&text, 5, 600)
        } else {
            let mut p = problems.join("; ");
            if p.len() > 600 {
                let cut = (0..=600)
                    .rev()
                    .find(|&i| p.is_char_boundary(i))
                    .unwrap_or(0);
                p.truncate(cut);
                p.push('…');
            }
            p
        },
    })
}

/// The build directory the link names, if it is inside the envs root and the one recorded.
fn check_link(
    loc: &EnvLocation,
    root: &Path,
    env_path: &str,
    recorded: Option<String>,
) -> Result<PathBuf, CheckError> {
    let build = loc
        .current_build()
        .ok_or_else(|| CheckError::NotABuild(env_path.to_owned()))?;
    let real = std::fs::canonicalize(&build).map_err(|source| CheckError::Resolve {
        path: build.clone(),
        source,
    })?;
    let root = std::fs::canonicalize(root).map_err(|source| CheckError::Resolve {
        path: root.to_owned(),
        source,
    })?;
    if !real.starts_with(&root) {
        return Err(CheckError::OutsideRoot {
            env_path: env_path.to_owned(),
            real,
        });
    }
    let recorded_path = recorded.as_deref().map(Path::new);
    if recorded_path != Some(real.as_path()) && recorded_path != Some(build.as_path()) {
        return Err(CheckError::NotRecorded {
            env_path: env_path.to_owned(),
            build,
            recorded,
        });
    }
    Ok(build)
}
