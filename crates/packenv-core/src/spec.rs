//! The installer spec stored in `runtime.installers` (DESIGN §1, §5): either a bare array of
//! steps or an object with the steps and the runtime's templates.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A parsed and ordered installer spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSpec {
    /// Kept for the SQL function `get_pack_environment_path()`; packenvd places environments
    /// from its own config and never reads it.
    pub base_path_template: Option<String>,
    /// Steps, sorted by `order` (ties keep their position in the array).
    pub steps: Vec<Step>,
    /// Executables an action runner starts, e.g. `python` → `{env_path}/bin/python`. Each must
    /// run (`--version`) before a build counts as ready.
    pub executable_templates: BTreeMap<String, String>,
    /// Variables an action runner sets, e.g. `NODE_PATH`; recorded rendered in `metadata`.
    pub env_vars: BTreeMap<String, String>,
    /// `false` for shell and native packs: the row becomes ready with no directory.
    pub requires_environment: bool,
    /// The interpreter the runtime builds on, chosen per pack from the host's.
    pub interpreter: Option<Interpreter>,
    /// A version constraint on it that every pack of the runtime needs (`">=3.9"`).
    pub interpreter_version: Option<String>,
    /// The runtime's own verification commands, run after packenvd's checks.
    pub checks: Vec<Check>,
}

/// One installer step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory; the pack's directory when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub order: i64,
    /// A failing optional step is logged and skipped.
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub condition: Option<Condition>,
    /// Overrides the daemon's step timeout.
    #[serde(default, deserialize_with = "humantime_opt")]
    pub timeout: Option<Duration>,
}

/// A command verification runs in a ready environment (DESIGN §7), with the same template
/// variables as a step, in the build directory, confined like the other checks and cut at
/// `verify_timeout`. A non-zero exit makes the environment `outdated`, naming the check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Names the check in the reason of a failure; unique within the runtime.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Runs the step only when every part of the condition holds. Paths are templated; relative
/// ones are taken from the pack's directory. Commands are looked up on the steps' PATH.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Paths that must all exist.
    #[serde(default, deserialize_with = "one_or_many")]
    pub file_exists: Vec<String>,
    /// Paths none of which may exist.
    #[serde(default, deserialize_with = "one_or_many")]
    pub file_missing: Vec<String>,
    /// Commands that must all be found.
    #[serde(default, deserialize_with = "one_or_many")]
    pub command_exists: Vec<String>,
    /// Commands none of which may be found.
    #[serde(default, deserialize_with = "one_or_many")]
    pub command_missing: Vec<String>,
}

impl Condition {
    fn is_empty(&self) -> bool {
        self.file_exists.is_empty()
            && self.file_missing.is_empty()
            && self.command_exists.is_empty()
            && self.command_missing.is_empty()
    }
}

/// The interpreter a runtime builds on (DESIGN §5): which of a pack's `runtime_dependencies`
/// apply to it, and which template variable (`{python}`, `{node}`) names the chosen one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpreter {
    Python,
    Node,
}

impl Interpreter {
    /// The template variable and the key in metadata.
    pub fn name(self) -> &'static str {
        match self {
            Interpreter::Python => "python",
            Interpreter::Node => "node",
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecObject {
    #[serde(default)]
    base_path_template: Option<String>,
    #[serde(default)]
    installers: Vec<Step>,
    #[serde(default)]
    executable_templates: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    #[serde(default = "yes")]
    requires_environment: bool,
    #[serde(default)]
    interpreter: Option<Interpreter>,
    #[serde(default)]
    interpreter_version: Option<String>,
    #[serde(default)]
    checks: Vec<Check>,
}

fn yes() -> bool {
    true
}

fn humantime_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    raw.map(|s| {
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    })
    .transpose()
}

/// The installers JSON did not parse; `path` says where (e.g. `installers[1].timeout`).
#[derive(Debug, thiserror::Error)]
#[error("invalid installers JSON at {path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl RuntimeSpec {
    /// Parses `runtime.installers`.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, SpecError> {
        let spec = match value {
            serde_json::Value::Array(_) => SpecObject {
                base_path_template: None,
                installers: parse_at(value)?,
                executable_templates: BTreeMap::new(),
                env_vars: BTreeMap::new(),
                requires_environment: true,
                interpreter: None,
                interpreter_version: None,
                checks: Vec::new(),
            },
            serde_json::Value::Object(_) => parse_at(value)?,
            other => {
                return Err(SpecError {
                    path: "(top level)".into(),
                    message: format!(
                        "expected an array of steps or an object, found {}",
                        json_kind(other)
                    ),
                })
            }
        };
        let mut steps = spec.installers;
        let prefix = if value.is_array() { "" } else { "installers" };
        for (i, step) in steps.iter().enumerate() {
            if step.name.trim().is_empty() || step.command.trim().is_empty() {
                return Err(SpecError {
                    path: format!("{prefix}[{i}]"),
                    message: "a step needs a non-empty name and command".into(),
                });
            }
            if step.condition.as_ref().is_some_and(Condition::is_empty) {
                return Err(SpecError {
                    path: format!("{prefix}[{i}].condition"),
                    message: "a condition needs at least one of file_exists, file_missing, command_exists, command_missing".into(),
                });
            }
        }
        for (i, check) in spec.checks.iter().enumerate() {
            if check.name.trim().is_empty() || check.command.trim().is_empty() {
                return Err(SpecError {
                    path: format!("checks[{i}]"),
                    message: "a check needs a non-empty name and command".into(),
                });
            }
            // The name is all a failure's reason says of which check failed.
            if spec.checks[..i].iter().any(|c| c.name == check.name) {
                return Err(SpecError {
                    path: format!("checks[{i}].name"),
                    message: format!("another check is already named {:?}", check.name),
                });
            }
        }
        // Stable sort: steps with equal `order` run in the order they are written.
        steps.sort_by_key(|s| s.order);
        Ok(RuntimeSpec {
            base_path_template: spec.base_path_template,
            steps,
            executable_templates: spec.executable_templates,
            env_vars: spec.env_vars,
            requires_environment: spec.requires_environment,
            interpreter: spec.interpreter,
            interpreter_version: spec.interpreter_version,
            checks: spec.checks,
        })
    }
}

fn parse_at<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        SpecError {
            path: if path == "." {
                "(top level)".into()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bare_array_is_a_list_of_steps_sorted_by_order() {
        let spec = RuntimeSpec::from_json(&json!([
            {"name": "b", "command": "true", "order": 2},
            {"name": "a", "command": "true", "order": 1, "timeout": "15m"},
            {"name": "c", "command": "true", "order": 2},
        ]))
        .unwrap();
        let names: Vec<_> = spec.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(spec.steps[0].timeout, Some(Duration::from_secs(900)));
        assert!(spec.requires_environment);
    }

    #[test]
    fn object_form_carries_templates_and_requires_environment() {
        let spec = RuntimeSpec::from_json(&json!({
            "installers": [],
            "executable_templates": {"python": "{env_path}/bin/python"},
            "requires_environment": false
        }))
        .unwrap();
        assert!(!spec.requires_environment);
        assert_eq!(spec.executable_templates["python"], "{env_path}/bin/python");
    }

    #[test]
    fn a_condition_takes_one_path_or_command_or_a_list_and_must_say_something() {
        let spec = RuntimeSpec::from_json(&json!({"interpreter": "python", "installers": [
            {"name": "a", "command": "uv", "condition": {"command_exists": "uv", "file_exists": "x"}},
            {"name": "b", "command": "npm", "condition": {"file_missing": ["a.lock", "b.lock"]}}
        ]}))
        .unwrap();
        assert_eq!(spec.interpreter, Some(Interpreter::Python));
        let a = spec.steps[0].condition.clone().unwrap();
        assert_eq!(
            (a.command_exists, a.file_exists),
            (vec!["uv".into()], vec!["x".into()])
        );
        assert_eq!(
            spec.steps[1].condition.clone().unwrap().file_missing,
            ["a.lock", "b.lock"]
        );
        let err = RuntimeSpec::from_json(&json!([{"name": "a", "command": "x", "condition": {}}]))
            .unwrap_err();
        assert_eq!(err.path, "[0].condition");
        let err = RuntimeSpec::from_json(&json!({"interpreter": "ruby"})).unwrap_err();
        assert_eq!(err.path, "interpreter");
    }

    #[test]
    fn checks_are_parsed_strictly_and_named_uniquely() {
        let spec = RuntimeSpec::from_json(&json!({"checks": [
            {"name": "imports", "command": "{env_path}/bin/python", "args": ["-c", "import x"],
             "env": {"A": "1"}, "description": "the pack's modules import"}
        ]}))
        .unwrap();
        assert_eq!(spec.checks[0].name, "imports");
        assert_eq!(spec.checks[0].args, ["-c", "import x"]);
        assert!(RuntimeSpec::from_json(&json!([]))
            .unwrap()
            .checks
            .is_empty());

        let err = RuntimeSpec::from_json(
            &json!({"checks": [{"name": "a", "command": "x", "timeout": "1s"}]}),
        )
        .unwrap_err();
        assert_eq!(err.path, "checks[0].timeout");
        let err = RuntimeSpec::from_json(&json!({"checks": [{"name": "a"}]})).unwrap_err();
        assert_eq!(err.path, "checks[0]");
        assert!(err.message.contains("command"), "{err}");
        let err = RuntimeSpec::from_json(&json!({"checks": [{"name": " ", "command": "x"}]}))
            .unwrap_err();
        assert_eq!(err.path, "checks[0]");
        let err = RuntimeSpec::from_json(&json!({"checks": [
            {"name": "a", "command": "x"}, {"name": "a", "command": "y"}
        ]}))
        .unwrap_err();
        assert_eq!(err.path, "checks[1].name");
        let err = RuntimeSpec::from_json(&json!({"checks": {"name": "a"}})).unwrap_err();
        assert_eq!(err.path, "checks");
    }

    #[test]
    fn errors_name_where_the_json_is_wrong() {
        let err = RuntimeSpec::from_json(&json!({
            "installers": [{"name": "a", "command": "x"}, {"name": "b", "command": "y", "timeout": "soon"}]
        }))
        .unwrap_err();
        assert_eq!(err.path, "installers[1].timeout");
        assert!(err.message.contains("soon"), "{err}");

        let err = RuntimeSpec::from_json(&json!([{"name": "a", "comand": "x"}])).unwrap_err();
        assert_eq!(err.path, "[0].comand");

        let err = RuntimeSpec::from_json(&json!("python")).unwrap_err();
        assert!(err.to_string().contains("found a string"), "{err}");

        let err = RuntimeSpec::from_json(&json!([{"name": "", "command": "x"}])).unwrap_err();
        assert_eq!(err.path, "[0]");
    }
}
