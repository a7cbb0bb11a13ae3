//! Which paths of a node's row a runner may use (DESIGN §6): no client runs a path a row names
//! unless it lies inside that row's build under that node's `envs_root`. The row is written by
//! the node's daemon; should another host's role, or a hostile step's, have rewritten it, its
//! `metadata.executables` or `env_vars` pointing at `/tmp/evil.sh` or `LD_PRELOAD=/tmp/evil.so`
//! are refused here rather than run.
//!
//! Paths are compared after lexical normalisation (`..` taken away), then, where they exist,
//! with their symlinks resolved: a link in the build that leads out of it is out of it. What the
//! platform itself decides (the `runtime` row's templates, which no node writes) is allowed as
//! it is: an executable the runtime names by a bare command (`node`) is the host's, when it is
//! where the node found that command (its own `packenvd_node` row).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::Error;

/// Variables whose value decides what code a process loads or runs: any path in them must be
/// the build's, and relative or empty entries (the working directory) are refused.
const CODE_VARS: &[&str] = &[
    "PATH",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONEXECUTABLE",
    "PYTHONPYCACHEPREFIX",
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_REPL_EXTERNAL_MODULE",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "BASH_ENV",
    "ENV",
    "GCONV_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "GIT_EXEC_PATH",
];

/// `LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_AUDIT`, ..., and macOS's `DYLD_*`.
fn loads_code(key: &str) -> bool {
    CODE_VARS.contains(&key) || key.starts_with("LD_") || key.starts_with("DYLD_")
}

/// What the check knows of the row: its build, its node, and what the platform decided.
pub(crate) struct Confine<'a> {
    pub node: &'a str,
    /// The node's `envs_root`, from its `packenvd_node` row (None: the node is not registered).
    pub envs_root: Option<&'a str>,
    /// The runtime's `executable_templates` and `env_vars` as the platform wrote them.
    pub executable_templates: &'a BTreeMap<String, String>,
    pub env_templates: &'a BTreeMap<String, String>,
    /// Where the node found each bare command its runtimes name (`packenvd_node.runtimes`).
    pub host_commands: &'a BTreeMap<String, Option<String>>,
}

impl Confine<'_> {
    fn refuse(&self, key: &str, path: &str, reason: String) -> Error {
        Error::OutsideBuild {
            node: self.node.to_owned(),
            key: key.to_owned(),
            path: path.to_owned(),
            reason,
        }
    }

    /// The build directory, checked to lie inside the node's envs root; returns it normalised
    /// and with its links resolved (when it exists).
    pub fn build(&self, build_dir: &str) -> Result<(PathBuf, Option<PathBuf>), Error> {
        let Some(root) = self.envs_root else {
            return Err(self.refuse(
                "build_dir",
                build_dir,
                format!(
                    "node {} is not registered: no envs_root to check it against",
                    self.node
                ),
            ));
        };
        let outside = || format!("outside the envs_root {root} of node {}", self.node);
        let (Some(root_n), Some(build_n)) = (normalize(root), normalize(build_dir)) else {
            return Err(self.refuse("build_dir", build_dir, "not an absolute path".into()));
        };
        if build_n == root_n || !build_n.starts_with(&root_n) {
            return Err(self.refuse("build_dir", build_dir, outside()));
        }
        let real = match std::fs::canonicalize(&build_n) {
            Ok(real) => {
                let root_real = std::fs::canonicalize(&root_n).unwrap_or(root_n);
                if real == root_real || !real.starts_with(&root_real) {
                    return Err(self.refuse(
                        "build_dir",
                        build_dir,
                        format!("{} (through a link, to {})", outside(), real.display()),
                    ));
                }
                Some(real)
            }
            Err(_) => None,
        };
        Ok((build_n, real))
    }

    /// `path` (named by `key`) lies inside the build, lexically and with the links of its
    /// directories resolved.
    fn inside(
        &self,
        key: &str,
        path: &str,
        build: &(PathBuf, Option<PathBuf>),
    ) -> Result<(), Error> {
        let outside = || {
            format!(
                "outside the build {} of node {}",
                build.0.display(),
                self.node
            )
        };
        let Some(p) = normalize(path) else {
            return Err(self.refuse(key, path, format!("not an absolute path, so {}", outside())));
        };
        if !p.starts_with(&build.0) {
            return Err(self.refuse(key, path, outside()));
        }
        // The directories on the way are resolved, the file itself is not: a venv's
        // `bin/python` is a link to the interpreter it was made from, outside every build. What
        // the row names must be a file of the build; where the build's own file points is the
        // build's content, made by its own pack's steps.
        let real = match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) => std::fs::canonicalize(dir).map(|d| d.join(name)),
            _ => std::fs::canonicalize(&p),
        };
        if let (Ok(real), Some(build_real)) = (real, &build.1) {
            if !real.starts_with(build_real) {
                return Err(self.refuse(
                    key,
                    path,
                    format!("{} (a link to {})", outside(), real.display()),
                ));
            }
        }
        Ok(())
    }

    /// Each executable lies inside the build, or is the host command the runtime names by a
    /// bare name, where this node found it.
    pub fn executables(
        &self,
        executables: &BTreeMap<String, PathBuf>,
        build: Option<&(PathBuf, Option<PathBuf>)>,
    ) -> Result<(), Error> {
        for (name, path) in executables {
            let key = format!("executables.{name}");
            let text = path.to_string_lossy();
            let template = self.executable_templates.get(name).map(String::as_str);
            if let Some(bare) = template.filter(|t| !t.contains(['/', '{'])) {
                let found = self.host_commands.get(bare).and_then(Option::as_deref);
                if text == bare || found == Some(&*text) {
                    continue;
                }
                if build.is_none() || !text.starts_with('/') {
                    return Err(self.refuse(
                        &key,
                        &text,
                        format!(
                            "the runtime names the host command {bare:?}, which node {} found at {}",
                            self.node,
                            found.unwrap_or("no path")
                        ),
                    ));
                }
            }
            match build {
                Some(b) => self.inside(&key, &text, b)?,
                None => {
                    return Err(self.refuse(
                        &key,
                        &text,
                        format!("the row has no build on node {} to hold it", self.node),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Each path in a variable's value (an absolute path, or an entry of a `:` list) lies
    /// inside the build; in a variable that decides what code runs, every entry must. A value
    /// the runtime's template sets as it is, with no placeholder, is the platform's.
    pub fn env_vars(
        &self,
        vars: &BTreeMap<String, String>,
        build: Option<&(PathBuf, Option<PathBuf>)>,
    ) -> Result<(), Error> {
        for (key, value) in vars {
            if self.env_templates.get(key) == Some(value) && !value.contains('{') {
                continue;
            }
            let code = loads_code(key);
            // Option strings (NODE_OPTIONS="--require /x.js") hold paths among words.
            let entries: Vec<&str> = if key.ends_with("OPTIONS") || key.ends_with("OPT") {
                value
                    .split(|c: char| c.is_whitespace() || c == '=')
                    .filter(|w| w.contains('/'))
                    .collect()
            } else {
                value.split(':').collect()
            };
            for entry in entries {
                let key = format!("env_vars.{key}");
                if entry.starts_with('/') {
                    match build {
                        Some(b) => self.inside(&key, entry, b)?,
                        None => {
                            return Err(self.refuse(
                                &key,
                                value,
                                format!("the row has no build on node {} to hold it", self.node),
                            ))
                        }
                    }
                } else if code && !value.is_empty() {
                    // A relative or empty entry is the working directory's, not the build's.
                    return Err(self.refuse(
                        &key,
                        value,
                        format!(
                            "the entry {entry:?} is relative (the working directory's), so outside the build {} of node {}",
                            build.map_or_else(|| "(none)".into(), |b| b.0.display().to_string()),
                            self.node
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `path` without `.` and `..` (a `..` at the root stays there); None when it is relative.
fn normalize(path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_takes_dot_dot_away_and_keeps_the_root() {
        assert_eq!(
            normalize("/a/b/../../../c/./d"),
            Some(PathBuf::from("/c/d"))
        );
        assert_eq!(normalize("a/b"), None);
    }

    #[test]
    fn code_loading_variables_include_the_loader_and_interpreter_hooks() {
        for k in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "DYLD_INSERT_LIBRARIES",
            "PYTHONSTARTUP",
            "NODE_OPTIONS",
        ] {
            assert!(loads_code(k), "{k}");
        }
        assert!(!loads_code("VIRTUAL_ENV"));
    }
}
