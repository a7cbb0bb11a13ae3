//! `{name}` templates in installer steps. Rendering is strict: an unknown variable or an
//! unclosed brace is an error, so a typo in a runtime's JSON fails the row before anything runs
//! instead of passing a literal `{env_pth}` to a command.

use std::collections::BTreeMap;

/// The variables a template may use (DESIGN §5).
pub const VARIABLES: &[&str] = &[
    "env_path",
    "pack_path",
    "pack_ref",
    "runtime_ref",
    "runtime_name",
    "runtime_name_lower",
    "cache_dir",
    // The interpreter chosen for the pack, for runtimes that name one ("interpreter").
    "python",
    "node",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unknown template variable {{{name}}} (known: {known})", known = VARIABLES.join(", "))]
    UnknownVariable { name: String },
    #[error(
        "template variable {{{name}}} is set only for runtimes with \"interpreter\": \"{name}\""
    )]
    NotSet { name: String },
    #[error("unclosed '{{' at byte {at}")]
    Unclosed { at: usize },
    #[error("unmatched '}}' at byte {at} (write '}}}}' for a literal brace)")]
    Unmatched { at: usize },
}

/// Values for the template variables of one build.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    values: BTreeMap<&'static str, String>,
}

impl Vars {
    /// Sets a variable; only names from [`VARIABLES`] are accepted.
    pub fn set(&mut self, name: &'static str, value: impl Into<String>) -> &mut Self {
        debug_assert!(
            VARIABLES.contains(&name),
            "{name} is not a template variable"
        );
        self.values.insert(name, value.into());
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Renders `template`; `{{` and `}}` stand for literal braces.
    pub fn render(&self, template: &str) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(template.len());
        let bytes = template.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' if bytes.get(i + 1) == Some(&b'{') => {
                    out.push('{');
                    i += 2;
                }
                b'{' => {
                    let close = template[i + 1..]
                        .find(['}', '{'])
                        .filter(|&off| bytes[i + 1 + off] == b'}')
                        .ok_or(TemplateError::Unclosed { at: i })?;
                    let name = &template[i + 1..i + 1 + close];
                    if !VARIABLES.contains(&name) {
                        return Err(TemplateError::UnknownVariable {
                            name: name.to_owned(),
                        });
                    }
                    // A known variable that this build did not set is a bug in the caller, but
                    // it must still not run a command with a hole in it.
                    let value = self.get(name).ok_or_else(|| match name {
                        "python" | "node" => TemplateError::NotSet {
                            name: name.to_owned(),
                        },
                        _ => TemplateError::UnknownVariable {
                            name: name.to_owned(),
                        },
                    })?;
                    out.push_str(value);
                    i += close + 2;
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    out.push('}');
                    i += 2;
                }
                b'}' => return Err(TemplateError::Unmatched { at: i }),
                _ => {
                    // Copy the run up to the next brace in one go; braces are ASCII, so the
                    // slice boundaries are always on UTF-8 character boundaries.
                    let next = template[i..]
                        .find(['{', '}'])
                        .map_or(bytes.len(), |off| i + off);
                    out.push_str(&template[i..next]);
                    i = next;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::default();
        v.set("env_path", "/envs/p/python").set("pack_ref", "p");
        v
    }

    #[test]
    fn known_variables_are_substituted() {
        assert_eq!(
            vars().render("{env_path}/bin/pip").unwrap(),
            "/envs/p/python/bin/pip"
        );
        assert_eq!(vars().render("a{pack_ref}b{pack_ref}").unwrap(), "apbp");
        assert_eq!(vars().render("plain ünïcode").unwrap(), "plain ünïcode");
    }

    #[test]
    fn doubled_braces_are_literal() {
        assert_eq!(vars().render("{{\"a\": 1}}").unwrap(), "{\"a\": 1}");
    }

    #[test]
    fn unknown_variable_is_an_error_naming_it() {
        let err = vars().render("{env_pth}/bin").unwrap_err();
        assert_eq!(
            err,
            TemplateError::UnknownVariable {
                name: "env_pth".into()
            }
        );
        assert!(err.to_string().contains("{env_pth}"));
    }

    #[test]
    fn unclosed_and_unmatched_braces_are_errors() {
        assert_eq!(
            vars().render("x {env_path").unwrap_err(),
            TemplateError::Unclosed { at: 2 }
        );
        assert_eq!(
            vars().render("{a{env_path}").unwrap_err(),
            TemplateError::Unclosed { at: 0 }
        );
        assert_eq!(
            vars().render("x }").unwrap_err(),
            TemplateError::Unmatched { at: 2 }
        );
    }
}
