//! One build: turns a [`Target`] into a finished build directory, with no database access.
//! Everything that can be checked (the spec, path safety, every template) is checked before the
//! first command runs.
//!
//! A build never changes what `env_path` serves by itself: it returns a [`Switch`], and the
//! daemon applies it while it holds the row's claim (DESIGN §6, "fencing reaches the disk").

mod error;
pub mod interpreter;
mod plan;
mod reuse;
mod scratch;
pub(crate) use reuse::remember_version;
use reuse::{current_build_matches, Reuse};

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use error::{BuildError, Failure};
pub use plan::{parse_spec, Plan, PlannedCheck, PlannedCondition, PlannedStep, Toolchain};
use scratch::daemon_ids;
pub(crate) use scratch::Scratch;

use crate::fingerprint::{fingerprint, inputs_digest};
use crate::layout::{self, EnvLocation, LayoutError};
use crate::log::{tail_lines, BuildLog};
use crate::runner::{self, Outcome};
use crate::target::{BuildConfig, Target};
use crate::{blocking, manifest, probe, toolchain};

/// How long an executable may take to answer `--version` at the end of a build.
const EXECUTABLE_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a successful build produced.
#[derive(Debug)]
pub enum Built {
    /// The runtime needs no environment (shell, native): nothing on disk.
    NoEnvironment { metadata: serde_json::Value },
    /// A new build directory, complete and checked, not yet served.
    Ready(Ready),
    /// A request whose inputs match the current build, which still runs: nothing was built.
    Unchanged,
}

/// A finished build waiting to be switched in.
#[derive(Debug)]
pub struct Ready {
    /// `<envs_root>/<pack_ref>/<runtime>`: the link the switch points at the build.
    pub env_path: String,
    pub metadata: serde_json::Value,
    pub fingerprint: String,
    pub switch: Switch,
}

/// Points `env_path` at a finished build, or throws the build away.
#[derive(Debug, Clone)]
pub struct Switch {
    loc: EnvLocation,
    build_dir: PathBuf,
}

impl Switch {
    pub fn build_dir(&self) -> &Path {
        &self.build_dir
    }

    /// Makes the build the one `env_path` serves (blocking: call it off the async threads);
    /// returns the build served before. The build it replaces is marked superseded, which
    /// starts the collector's grace.
    pub fn apply(&self) -> Result<Option<PathBuf>, LayoutError> {
        let previous = self.loc.current_build();
        if let Some(aside) = self.loc.switch_to(&self.build_dir)? {
            tracing::warn!(moved_to = %aside.display(), "a real directory stood at env_path; moved it aside");
        }
        if let Some(old) = previous.as_ref().filter(|p| **p != self.build_dir) {
            mark_superseded(old);
        }
        Ok(previous)
    }

    /// Undoes [`Switch::apply`] when the write that should have recorded it failed: `env_path`
    /// serves `previous` again (blocking).
    pub fn revert(&self, previous: Option<&Path>) {
        let result = match previous {
            Some(p) if p != self.build_dir => self.loc.switch_to(p).map(|_| ()),
            Some(_) => Ok(()),
            None => self.loc.remove_link(),
        };
        if let Err(e) = result {
            tracing::warn!(env_path = %self.loc.env_path.display(), error = %e, "cannot undo a switch");
        }
    }

    /// Removes the build: its claim was lost, or it was never to be served (blocking).
    pub fn discard(&self) {
        if self.loc.current_build().as_deref() == Some(self.build_dir.as_path()) {
            return;
        }
        if let Err(e) = self.loc.remove_build(&self.build_dir) {
            tracing::warn!(build_dir = %self.build_dir.display(), error = %e, "cannot remove a discarded build");
        }
    }
}

/// What a build starts from once the row, the spec and the pack are checked: the environment's
/// place, the plan of steps and the interpreter chosen.
struct Prepared {
    spec: crate::spec::RuntimeSpec,
    loc: EnvLocation,
    plan: Plan,
    tools: Toolchain,
    build_dir: PathBuf,
}

/// Checks the row and the spec, finds the pack and the interpreter, and plans the steps of a
/// build named after `token`, or of the current build when there is no token (`PackMissing`
/// stands for "no current build" then: only [`answer`] asks, and it builds on any error);
/// `Ok(Err(built))` when the runtime needs no environment.
async fn prepare(
    cfg: &BuildConfig,
    target: &Target,
    token: Option<&str>,
    log: &BuildLog,
) -> Result<Result<Prepared, Built>, Failure> {
    let (installers, spec) = parse_spec(target)?;
    layout::validate_pack_ref(&target.pack_ref).map_err(BuildError::from)?;
    if let Some(problem) = &target.problem {
        return Err(BuildError::Row(problem.clone()).into());
    }
    if !spec.requires_environment {
        log.line(&format!(
            "runtime {} needs no environment",
            target.runtime_ref
        ));
        return Ok(Err(Built::NoEnvironment {
            metadata: json!({"requires_environment": false, "runtime": target.runtime_ref}),
        }));
    }
    let loc = EnvLocation::new(
        &cfg.envs_root,
        &target.pack_ref,
        &target.runtime_name,
        target.env_path.as_deref(),
    )
    .map_err(BuildError::from)?;
    if spec.steps.is_empty() && spec.executable_templates.is_empty() {
        return Err(BuildError::EmptySpec {
            runtime: target.runtime_ref.clone(),
        }
        .into());
    }
    let (build_dir, tmp) = match token {
        Some(token) => (
            loc.build_dir(token),
            cfg.tmp_root().join(format!(".{}-{token}", loc.name())),
        ),
        None => {
            let l = loc.clone();
            let Some(current) = blocking(move || l.current_build()).await else {
                return Err(BuildError::PackMissing {
                    path: loc.name().into(),
                }
                .into());
            };
            let tmp = cfg.tmp_root().join(format!(".{}-answer", loc.name()));
            (current, tmp)
        }
    };
    let pack_path = probe::pack_path(
        &cfg.packs_dir,
        &target.pack_ref,
        target.storage_path.as_deref(),
    );
    let p = pack_path.clone();
    if !blocking(move || p.is_dir()).await {
        // Retryable: a platform may insert the row before its copy of the pack's files is done.
        return Err(BuildError::PackMissing { path: pack_path }.into());
    }
    let path_var = steps_path(cfg);
    let tools = interpreter::resolve(cfg, target, &spec, &pack_path, &path_var).await?;
    if let Some(i) = tools.recorded.as_object() {
        log.line(&format!(
            "==> interpreter: {} {} ({}){}",
            i["name"].as_str().unwrap_or_default(),
            i["version"].as_str().unwrap_or("version unknown"),
            i["path"].as_str().unwrap_or_default(),
            match i["wanted"].as_object().filter(|w| !w.is_empty()) {
                Some(w) => format!(
                    ", for {}",
                    w.iter()
                        .map(|(k, v)| format!("{} ({k})", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
                None => String::new(),
            }
        ));
    }
    let plan = Plan::new(
        cfg, target, installers, &spec, &loc, &build_dir, &tmp, &tools,
    )?;
    // Before any step runs: an installer would follow what the pack's manifests name, and
    // print what it read into the row's log.
    let (pack, steps) = (plan.pack_path.clone(), plan.step_paths());
    blocking(move || manifest::check_steps(&pack, &steps))
        .await
        .map_err(BuildError::from)?;
    Ok(Ok(Prepared {
        spec,
        loc,
        plan,
        tools,
        build_dir,
    }))
}

const UNCHANGED: &str =
    "==> inputs unchanged since the current build (fingerprint matches): already up to date";

/// Answers a request without building and without running anything: `Some` when the current
/// build was made from the inputs a build would use now (or the runtime needs no environment),
/// `None` when only a build (or running the build's interpreter) can answer. Errors are `None`
/// too: the build reports them with its retry policy.
pub async fn answer(
    cfg: &BuildConfig,
    target: &Target,
    log: &BuildLog,
    cancel: &CancellationToken,
) -> Option<Built> {
    // Planned for the current build: the one plan the comparison needs.
    let p = match prepare(cfg, target, None, log).await {
        Ok(Ok(p)) => p,
        Ok(Err(built)) => return Some(built),
        Err(_) => return None,
    };
    let planned = (&p.plan, p.build_dir.as_path());
    match current_build_matches(
        cfg, target, &p.spec, &p.loc, planned, &p.tools, None, cancel,
    )
    .await
    {
        Reuse::Yes => {
            log.line(UNCHANGED);
            Some(Built::Unchanged)
        }
        Reuse::No | Reuse::Unknown => None,
    }
}

/// Builds `target` into a new build directory named after `token`. With `reuse_if_current`
/// (a request, not a reset), a current build whose inputs are unchanged answers instead.
/// Output goes to `log`; `cancel` kills the running step.
pub async fn run(
    cfg: &BuildConfig,
    target: &Target,
    token: &str,
    reuse_if_current: bool,
    log: &BuildLog,
    cancel: &CancellationToken,
) -> Result<Built, Failure> {
    let Prepared {
        spec,
        loc,
        plan,
        tools,
        build_dir,
    } = match prepare(cfg, target, Some(token), log).await? {
        Ok(p) => p,
        Err(built) => return Ok(built),
    };
    if reuse_if_current {
        // First without running anything: a request for an unchanged pack is answered from
        // what is known of the current build's interpreter.
        if current_build_matches(
            cfg,
            target,
            &spec,
            &loc,
            (&plan, &build_dir),
            &tools,
            None,
            cancel,
        )
        .await
            == Reuse::Yes
        {
            log.line(UNCHANGED);
            return Ok(Built::Unchanged);
        }
    }
    let user = cfg.sandbox.as_ref().and_then(|s| s.user);
    let scratch = Scratch::create(cfg, &plan.tmp_dir, Some(&plan.cache_dir), user).await?;

    let result = async {
        if reuse_if_current {
            if current_build_matches(
                cfg,
                target,
                &spec,
                &loc,
                (&plan, &build_dir),
                &tools,
                Some(()),
                cancel,
            )
            .await
                == Reuse::Yes
            {
                log.line(UNCHANGED);
                return Ok(None);
            }
            log.line(
                "==> inputs changed since the current build (or it no longer runs): rebuilding",
            );
        }
        // Read before the steps run: the fingerprint describes the inputs this build started
        // from.
        let inputs = digest(&plan, &tools).await?;
        let (l, t) = (loc.clone(), token.to_owned());
        blocking(move || {
            let dir = l.create_build_dir(&t)?;
            if let Some((uid, gid)) = user {
                l.chown_build(&dir, uid, gid)?;
            }
            Ok::<_, BuildError>(())
        })
        .await?;
        let executables = run_plan(&plan, &build_dir, log, cancel).await;
        if user.is_some() {
            // Steps ran as the build user; the build becomes the daemon's again, read-only to
            // every later step.
            let (l, b) = (loc.clone(), build_dir.clone());
            let (uid, gid) = daemon_ids();
            blocking(move || l.chown_build(&b, uid, gid)).await?;
        }
        let executables = executables?;
        let version = probe::interpreter(&executables).map(|(_, (_, v))| v.as_str());
        Ok(Some(Ready {
            env_path: loc.env_path.display().to_string(),
            metadata: metadata(&build_dir, token, &plan, &executables, &tools),
            fingerprint: fingerprint(&inputs, version),
            switch: Switch {
                loc: loc.clone(),
                build_dir: build_dir.clone(),
            },
        }))
    }
    .await;
    scratch.remove().await;
    match result {
        Ok(Some(ready)) => Ok(Built::Ready(ready)),
        Ok(None) => Ok(Built::Unchanged),
        Err(error) => {
            // A failed build is never served, so it goes at once (DESIGN §4).
            let switch = Switch {
                loc: loc.clone(),
                build_dir,
            };
            let served = blocking(move || {
                switch.discard();
                switch.loc.current_build()
            })
            .await;
            Err(Failure { error, served })
        }
    }
}

async fn digest(plan: &Plan, tools: &Toolchain) -> Result<String, BuildError> {
    let (installers, pack_path, identity) = (
        plan.installers.clone(),
        plan.pack_path.clone(),
        tools.identity.clone(),
    );
    blocking(move || inputs_digest(&installers, &pack_path, &identity).map_err(BuildError::from))
        .await
}

/// The PATH steps run with: the daemon's (or a default), as [`probe::step_environment`] gives.
pub fn steps_path(cfg: &BuildConfig) -> String {
    probe::step_environment(&cfg.env_passthrough, Path::new("/"), Path::new("/"))
        .remove("PATH")
        .unwrap_or_default()
}

/// What the row's `metadata` records of a build: where it is and what to start. Actions must
/// start from the build directory, never through the `env_path` link: a process started through
/// the link would load modules of the next build after a switch.
fn metadata(
    build_dir: &Path,
    token: &str,
    plan: &Plan,
    executables: &BTreeMap<String, (String, String)>,
    tools: &Toolchain,
) -> serde_json::Value {
    let interpreter = probe::interpreter(executables).map(|(_, (_, v))| v.clone());
    json!({
        "interpreter": tools.recorded,
        "build_dir": build_dir.display().to_string(),
        "build_id": token,
        "executables": executables.iter().map(|(k, (p, _))| (k.clone(), p.clone())).collect::<BTreeMap<_, _>>(),
        "versions": executables.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
        "interpreter_version": interpreter,
        "env_vars": plan.env_vars,
    })
}

/// Runs the steps, then checks the executables. Ok holds each executable's resolved path and
/// the first line of its `--version`.
async fn run_plan(
    plan: &Plan,
    build_dir: &Path,
    log: &BuildLog,
    cancel: &CancellationToken,
) -> Result<BTreeMap<String, (String, String)>, BuildError> {
    let total = plan.steps.len();
    for (i, step) in plan.steps.iter().enumerate() {
        if let Some(cond) = &step.condition {
            let (c, path) = (cond.clone(), plan.path_var().to_owned());
            if let Some(why) = blocking(move || c.unmet(&path)).await {
                log.line(&format!(
                    "==> step {}/{total} '{}' skipped: {why}",
                    i + 1,
                    step.name,
                ));
                continue;
            }
        }
        log.line(&format!(
            "==> step {}/{total} '{}': {}",
            i + 1,
            step.name,
            step.inv.display()
        ));
        if probe::resolve_executable(&step.inv.program, plan.path_var()).is_none() {
            return Err(BuildError::CommandNotFound {
                name: step.name.clone(),
                program: step.inv.program.clone(),
                path: plan.path_var().to_owned(),
            });
        }
        let started = Instant::now();
        let outcome = runner::run(&step.inv, log, cancel).await;
        let took =
            humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64));
        if outcome.success() {
            log.line(&format!("==> step '{}' succeeded in {took}", step.name));
            continue;
        }
        if matches!(outcome, Outcome::Cancelled) {
            log.line(&format!("==> step '{}' {outcome}", step.name));
            return Err(BuildError::Cancelled);
        }
        let sentence = format!("step '{}' (`{}`) {outcome}", step.name, step.inv.display());
        if step.optional {
            log.line(&format!("==> optional {sentence} after {took}; skipped"));
            continue;
        }
        log.line(&format!("==> {sentence} after {took}"));
        let tail = tail_lines(&log.render(), 20, 4000);
        return Err(BuildError::Step {
            name: step.name.clone(),
            command: step.inv.display(),
            hint: error::limit_hint(
                &outcome,
                &tail,
                step.inv.supervised.as_ref().map(|s| &s.confinement),
            ),
            outcome,
            tail,
        });
    }

    let mut found = BTreeMap::new();
    for (name, exe) in &plan.executables {
        let Some(path) = probe::resolve_executable(exe, plan.path_var()) else {
            return Err(BuildError::Executable {
                name: name.clone(),
                template: exe.clone(),
                failure: format!("`{exe}` not found on PATH (PATH={})", plan.path_var()),
                tail: String::new(),
            });
        };
        let path = path.display().to_string();
        match probe::executable_version(
            &path,
            build_dir,
            &plan.base_env,
            EXECUTABLE_CHECK_TIMEOUT,
            plan.check.as_ref(),
            cancel,
        )
        .await
        {
            Ok(version) => {
                log.line(&format!("==> executable '{name}': {path} ({version})"));
                let p = PathBuf::from(&path);
                if let Some(key) = blocking(move || toolchain::file_key(&p)).await {
                    remember_version(key, version.clone());
                }
                found.insert(name.clone(), (path, version));
            }
            Err(f) if matches!(f.outcome, Outcome::Cancelled) => return Err(BuildError::Cancelled),
            Err(f) => {
                return Err(BuildError::Executable {
                    name: name.clone(),
                    template: exe.clone(),
                    tail: tail_lines(&f.output, 10, 2000),
                    failure: f.to_string(),
                })
            }
        }
    }
    Ok(found)
}

/// Sets a build directory's modification time to now; the collector measures its grace from it.
pub fn mark_superseded(dir: &Path) {
    let now = std::time::SystemTime::now();
    if let Err(e) = std::fs::File::open(dir).and_then(|f| f.set_modified(now)) {
        tracing::warn!(build_dir = %dir.display(), error = %e, "cannot mark the old build as superseded");
    }
}

#[cfg(test)]
mod tests;
