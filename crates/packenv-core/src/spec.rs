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

/// Runs the step only when the condition holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// A path (templated) that must exist; relative paths are taken from the pack's directory.
    pub file_exists: String,
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
        for (i, step) in steps.iter().enumerate() {
            if step.name.trim().is_empty() || step.command.trim().is_empty() {
                let prefix = if value.is_array() { "" } else { "installers" };
                return Err(SpecError {
                    path: format!("{prefix}[{i}]"),
                    message: "a step needs a non-empty name and command".into(),
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
