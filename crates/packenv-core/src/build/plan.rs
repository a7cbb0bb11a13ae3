//! A build's plan: the spec parsed and every template rendered for one build directory, before
//! anything runs. A typo in a runtime's JSON fails here, not halfway through the steps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::build::BuildError;
use crate::layout::EnvLocation;
use crate::probe;
use crate::runner::{Invocation, Supervised};
use crate::spec::RuntimeSpec;
use crate::target::{BuildConfig, Target};
use crate::template::Vars;

/// A step with every template rendered.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub name: String,
    pub optional: bool,
    pub condition: Option<PlannedCondition>,
    pub inv: Invocation,
}

/// A runtime's own check (spec `checks`), rendered: runs in the build directory, confined like
/// the other checks; the checker sets its timeout.
#[derive(Debug, Clone)]
pub struct PlannedCheck {
    pub name: String,
    pub inv: Invocation,
}

/// A step's condition, rendered: absolute paths and bare command names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannedCondition {
    pub file_exists: Vec<PathBuf>,
    pub file_missing: Vec<PathBuf>,
    pub command_exists: Vec<String>,
    pub command_missing: Vec<String>,
}

impl PlannedCondition {
    /// None when the step runs; else why it is skipped. Blocking (it stats files).
    pub fn unmet(&self, path_var: &str) -> Option<String> {
        let found = |c: &str| probe::resolve_executable(c, path_var).is_some_and(|p| p.exists());
        if let Some(p) = self.file_exists.iter().find(|p| !p.exists()) {
            return Some(format!("{} does not exist", p.display()));
        }
        if let Some(p) = self.file_missing.iter().find(|p| p.exists()) {
            return Some(format!("{} exists", p.display()));
        }
        if let Some(c) = self.command_exists.iter().find(|c| !found(c)) {
            return Some(format!("`{c}` is not on PATH"));
        }
        if let Some(c) = self.command_missing.iter().find(|c| found(c)) {
            return Some(format!("`{c}` is on PATH"));
        }
        None
    }
}

/// The interpreter chosen for one build (DESIGN §5): the template variable that names it
/// (`{python}`, `{node}`), what the fingerprint takes of it, and what the metadata records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Toolchain {
    pub vars: BTreeMap<&'static str, String>,
    /// Path, version and the constraints it was chosen for, as one line; empty when the
    /// runtime names no interpreter.
    pub identity: String,
    pub recorded: serde_json::Value,
}

/// Everything a build of one target into one build directory will do and promise.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The installers JSON as parsed, for the fingerprint.
    pub installers: serde_json::Value,
    pub requires_environment: bool,
    pub steps: Vec<PlannedStep>,
    /// Executable name → rendered template (a path, or a bare command looked up on PATH).
    pub executables: BTreeMap<String, String>,
    /// Variables an action runner sets, rendered.
    pub env_vars: BTreeMap<String, String>,
    /// The environment every step starts with.
    pub base_env: BTreeMap<String, String>,
    pub pack_path: PathBuf,
    pub cache_dir: PathBuf,
    /// The build's private temporary directory (TMPDIR; HOME is `home` inside).
    pub tmp_dir: PathBuf,
    /// How the executable checks run: confined like the steps, but writing only to the tmp.
    pub check: Option<Supervised>,
    /// The runtime's own checks, for verification; rendered with the plan so that a typo in
    /// one fails a build before anything runs, not the first verification a week later.
    pub checks: Vec<PlannedCheck>,
}

/// Parses a target's installers JSON text (serde_json refuses nesting deeper than 128, which
/// is a spec error of this row like any other).
pub fn parse_spec(target: &Target) -> Result<(serde_json::Value, RuntimeSpec), BuildError> {
    let spec_error = |path: &str, message: String| BuildError::Spec {
        runtime: target.runtime_ref.clone(),
        source: crate::spec::SpecError {
            path: path.into(),
            message,
        },
    };
    let value: serde_json::Value = serde_json::from_str(&target.installers)
        .map_err(|e| spec_error("(top level)", e.to_string()))?;
    let spec = RuntimeSpec::from_json(&value).map_err(|source| BuildError::Spec {
        runtime: target.runtime_ref.clone(),
        source,
    })?;
    Ok((value, spec))
}

impl Plan {
    /// Parses `target`'s spec and renders it for a build in `build_dir`.
    pub fn render(
        cfg: &BuildConfig,
        target: &Target,
        loc: &EnvLocation,
        build_dir: &Path,
        tmp_dir: &Path,
        tools: &Toolchain,
    ) -> Result<Plan, BuildError> {
        let (installers, spec) = parse_spec(target)?;
        Plan::new(
            cfg, target, installers, &spec, loc, build_dir, tmp_dir, tools,
        )
    }

    /// Renders an already parsed spec for a build of `target` in `build_dir`, with `tmp_dir`
    /// as its private temporary directory and `tools` the interpreter chosen for it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &BuildConfig,
        target: &Target,
        installers: serde_json::Value,
        spec: &RuntimeSpec,
        loc: &EnvLocation,
        build_dir: &Path,
        tmp_dir: &Path,
        tools: &Toolchain,
    ) -> Result<Plan, BuildError> {
        let pack_path = probe::pack_path(
            &cfg.packs_dir,
            &target.pack_ref,
            target.storage_path.as_deref(),
        );
        let cache_dir = probe::cache_dir(&cfg.cache_dir, loc.name(), &target.pack_ref);
        let mut vars = Vars::default();
        vars.set("env_path", build_dir.display().to_string())
            .set("pack_path", pack_path.display().to_string())
            .set("pack_ref", target.pack_ref.clone())
            .set("runtime_ref", target.runtime_ref.clone())
            .set("runtime_name", target.runtime_name.clone())
            .set("runtime_name_lower", target.runtime_name.to_lowercase())
            .set("cache_dir", cache_dir.display().to_string());
        for (k, v) in &tools.vars {
            vars.set(k, v.clone());
        }
        let base_env = probe::step_environment(&cfg.env_passthrough, &cache_dir, tmp_dir);
        let supervised = cfg
            .sandbox
            .as_ref()
            .map(|s| s.supervised(&[build_dir, &cache_dir, tmp_dir]));
        let template = |field: String, t: &str| {
            vars.render(t).map_err(|source| BuildError::Template {
                runtime: target.runtime_ref.clone(),
                field,
                source,
            })
        };
        let mut steps = Vec::with_capacity(spec.steps.len());
        for step in &spec.steps {
            let r = |field: &str, t: &str| template(format!("step '{}', {field}", step.name), t);
            let mut env = base_env.clone();
            for (k, v) in &step.env {
                env.insert(k.clone(), r(&format!("env.{k}"), v)?);
            }
            let cwd = match &step.cwd {
                Some(c) => pack_path.join(r("cwd", c)?),
                None => pack_path.clone(),
            };
            steps.push(PlannedStep {
                name: step.name.clone(),
                optional: step.optional,
                condition: step
                    .condition
                    .as_ref()
                    .map(|c| {
                        let paths = |field: &str, list: &[String]| {
                            list.iter()
                                .map(|p| {
                                    r(&format!("condition.{field}"), p).map(|p| pack_path.join(p))
                                })
                                .collect::<Result<Vec<_>, _>>()
                        };
                        let names = |field: &str, list: &[String]| {
                            list.iter()
                                .map(|c| r(&format!("condition.{field}"), c))
                                .collect::<Result<Vec<_>, _>>()
                        };
                        Ok::<_, BuildError>(PlannedCondition {
                            file_exists: paths("file_exists", &c.file_exists)?,
                            file_missing: paths("file_missing", &c.file_missing)?,
                            command_exists: names("command_exists", &c.command_exists)?,
                            command_missing: names("command_missing", &c.command_missing)?,
                        })
                    })
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
                    timeout: step.timeout.unwrap_or(cfg.step_timeout),
                    supervised: supervised.clone(),
                },
            });
        }
        let check_confinement = cfg.sandbox.as_ref().map(|s| s.supervised(&[tmp_dir]));
        let mut checks = Vec::with_capacity(spec.checks.len());
        for check in &spec.checks {
            let r = |field: &str, t: &str| template(format!("check '{}', {field}", check.name), t);
            let mut env = base_env.clone();
            for (k, v) in &check.env {
                env.insert(k.clone(), r(&format!("env.{k}"), v)?);
            }
            checks.push(PlannedCheck {
                name: check.name.clone(),
                inv: Invocation {
                    program: r("command", &check.command)?,
                    args: check
                        .args
                        .iter()
                        .enumerate()
                        .map(|(i, a)| r(&format!("args[{i}]"), a))
                        .collect::<Result<_, _>>()?,
                    cwd: build_dir.to_owned(),
                    env,
                    timeout: cfg.step_timeout,
                    supervised: check_confinement.clone(),
                },
            });
        }
        let render_map = |what: &str, m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| Ok((k.clone(), template(format!("{what}.{k}"), v)?)))
                .collect::<Result<BTreeMap<_, _>, BuildError>>()
        };
        Ok(Plan {
            requires_environment: spec.requires_environment,
            executables: render_map("executable_templates", &spec.executable_templates)?,
            env_vars: render_map("env_vars", &spec.env_vars)?,
            steps,
            base_env,
            pack_path,
            cache_dir,
            installers,
            tmp_dir: tmp_dir.to_owned(),
            check: check_confinement,
            checks,
        })
    }

    /// Each step's name, working directory and arguments: what [`crate::manifest::check_steps`]
    /// looks for pack files in.
    pub fn step_paths(&self) -> Vec<(String, PathBuf, Vec<String>)> {
        self.steps
            .iter()
            .map(|s| (s.name.clone(), s.inv.cwd.clone(), s.inv.args.clone()))
            .collect()
    }

    /// The PATH steps and executables are looked up on.
    pub fn path_var(&self) -> &str {
        self.base_env.get("PATH").map_or("", String::as_str)
    }
}
