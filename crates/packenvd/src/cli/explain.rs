//! Reading a row back for people: where a running build is (from packenvd's own `==>` lines,
//! which `packenv_core::build` writes into the log), what a failure's cause is (the line an
//! operator acts on, not the command that ran), and an error without the output tail that the
//! log already shows.
//!
//! The inputs are stored text, possibly written by an older packenvd: every function here
//! degrades to showing the text as it is rather than failing.

/// The marker [`packenv_core::build::BuildError`] puts between a failure's sentence and the end
/// of the step's output.
const TAIL_MARKER: &str = "\n--- output tail ---\n";

/// A step of a build as its log tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub n: usize,
    pub total: usize,
    pub name: String,
    /// `==> step 'name' succeeded in ...` followed it.
    pub done: bool,
    pub skipped: bool,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}/{} '{}'", self.n, self.total, self.name)?;
        if self.skipped {
            f.write_str(" skipped")?;
        } else if self.done {
            f.write_str(" done")?;
        }
        Ok(())
    }
}

/// Parses `==> step 2/3 'name': command` and `==> step 2/3 'name' skipped: why`.
fn parse_step(line: &str) -> Option<Step> {
    let rest = line.strip_prefix("==> step ")?;
    let (count, rest) = rest.split_once(' ')?;
    let (n, total) = count.split_once('/')?;
    let rest = rest.strip_prefix('\'')?;
    // A name may hold a quote; what follows the closing one is fixed text.
    let (name, skipped) = match (rest.find("': "), rest.find("' skipped: ")) {
        (Some(a), Some(b)) if b < a => (&rest[..b], true),
        (Some(a), _) => (&rest[..a], false),
        (None, Some(b)) => (&rest[..b], true),
        (None, None) => (rest.strip_suffix('\'')?, false),
    };
    Some(Step {
        n: n.parse().ok()?,
        total: total.parse().ok()?,
        name: name.to_owned(),
        done: false,
        skipped,
    })
}

/// The last step started among packenvd's `==>` lines of a log, in their order.
pub fn current_step<'a>(marks: impl IntoIterator<Item = &'a str>) -> Option<Step> {
    let mut step: Option<Step> = None;
    for line in marks {
        if let Some(s) = parse_step(line) {
            step = Some(s);
        } else if let Some(s) = step.as_mut() {
            if line.starts_with(&format!("==> step '{}' succeeded", s.name)) {
                s.done = true;
            }
        }
    }
    step
}

/// What a running build is doing, in a few words: its step, or the phase before or after the
/// steps.
pub fn phase(marks: &[&str]) -> String {
    if marks.iter().any(|l| l.starts_with("==> inputs unchanged")) {
        return "up to date (inputs unchanged)".into();
    }
    let step = current_step(marks.iter().copied());
    let checking = marks
        .iter()
        .rev()
        .take_while(|l| parse_step(l).is_none())
        .any(|l| l.starts_with("==> executable "));
    match step {
        Some(s) if checking || (s.done && s.n == s.total) => {
            format!("checking executables (after {s})")
        }
        Some(s) => s.to_string(),
        None if checking => "checking executables".into(),
        None => "preparing".into(),
    }
}

/// The `==>` lines of a log.
pub fn marks(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("==> ")).collect()
}

/// The last line a step printed: what a build is doing right now. A carriage return starts a
/// line over (progress bars), and escape sequences are dropped.
pub fn last_output_line(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .map(|l| clean(l.rsplit('\r').find(|p| !p.trim().is_empty()).unwrap_or("")))
        .find(|l| !l.is_empty() && !l.starts_with("==> ") && !l.starts_with("[... "))
}

/// A line without control characters and ANSI escape sequences, trimmed.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte; anything else: ESC and one character.
            if chars.next_if_eq(&'[').is_some() {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

/// An error without the sentence that says which build is still served (it comes last, after
/// the tail), and that sentence.
fn split_served(error: &str) -> (&str, Option<&str>) {
    let error = error.trim_end();
    match error.rfind(" The previous build ") {
        Some(i) if error.ends_with(" is still served.") => (&error[..i], Some(&error[i + 1..])),
        _ => (error, None),
    }
}

/// An error in two parts: what happened (with what is still served), and the step's output
/// tail when the log does not already hold it (`logs` prints the log; the tail would be shown
/// twice).
pub fn without_tail(error: &str, log: Option<&str>) -> (String, Option<String>) {
    let (body, served) = split_served(error);
    let (head, tail) = match body.split_once(TAIL_MARKER) {
        Some((head, tail)) => (head, Some(tail.trim_end())),
        None => (body, None),
    };
    let mut head = head.trim_end().to_owned();
    if let Some(s) = served {
        head.push(' ');
        head.push_str(s);
    }
    let tail = tail
        .filter(|t| !t.is_empty())
        .filter(|t| !log.is_some_and(|l| l.contains(t)))
        .map(str::to_owned);
    (head, tail)
}

/// The cause of a failure in one line: the line of the output that says what went wrong (`No
/// matching distribution found for x`), or the error's own sentence without the command line.
/// A summary's error names its node (`node web-3: ...`): the cause keeps the node (`web-3:
/// ...`).
pub fn cause(error: &str) -> String {
    let (node, error) = match error.strip_prefix("node ").and_then(|r| r.split_once(": ")) {
        Some((node, rest)) if !node.is_empty() && !node.contains(char::is_whitespace) => {
            (Some(node), rest)
        }
        _ => (None, error),
    };
    let (body, _) = split_served(error);
    let (head, tail) = match body.split_once(TAIL_MARKER) {
        Some((head, tail)) => (head, Some(tail)),
        None => (body, None),
    };
    let found = tail
        .and_then(cause_in_output)
        .unwrap_or_else(|| headline(head));
    match node {
        Some(node) => format!("{node}: {found}"),
        None => found,
    }
}

/// The first line of an error, without what an operator does not need to read first: the
/// command line of a step, the PATH searched, the interpreters the host has.
fn headline(head: &str) -> String {
    let first = clean(head.lines().next().unwrap_or(""));
    let first = first.trim_end_matches('.');
    // step 'x': `uv` not found on PATH (PATH=...)
    if let Some(i) = first.find("` not found on PATH") {
        if let Some(start) = first[..i].rfind('`') {
            return format!("{} not found on PATH", &first[start..=i]);
        }
    }
    // pack p: no Python on this host satisfies ...; it has ...
    if let Some((_, rest)) = first.strip_prefix("pack ").and_then(|r| r.split_once(": ")) {
        return rest.split("; it has").next().unwrap_or(rest).to_owned();
    }
    // step 'x' (`command`) exited with status 1
    if first.starts_with("step '") {
        if let (Some(a), Some(b)) = (first.find(" (`"), first.rfind("`) ")) {
            if a < b {
                return format!("{}{}", &first[..a], &first[b + 2..]);
            }
        }
    }
    // executable 'x' (template) does not run: ...
    if first.starts_with("executable '") {
        if let (Some(a), Some(b)) = (first.find(" ("), first.find(") does not run")) {
            if a < b {
                return format!("{}{}", &first[..a], &first[b + 1..]);
            }
        }
    }
    first.to_owned()
}

/// The line of a step's output that says what went wrong, if one does.
fn cause_in_output(tail: &str) -> Option<String> {
    let lines: Vec<String> = tail
        .lines()
        .map(clean)
        .filter(|l| !l.is_empty() && !is_noise(l))
        .collect();
    // npm: `npm error code E404`, then the sentence.
    if let Some(i) = lines
        .iter()
        .rposition(|l| l.starts_with("npm error code ") || l.starts_with("npm ERR! code "))
    {
        let code = lines[i].rsplit(' ').next().unwrap_or("");
        let message = lines
            .get(i + 1)
            .map(|l| npm_message(l))
            .filter(|m| !m.is_empty());
        return Some(match message {
            Some(m) => format!("{code}: {m}"),
            None => format!("npm failed with {code}"),
        });
    }
    let at = lines.iter().rposition(|l| error_message(l).is_some());
    if let Some(i) = at {
        let message = error_message(&lines[i]).unwrap_or_default();
        // uv prints the reason on the next lines (`cause: Because ...`, `╰─▶ Because ...`).
        if let Some(reason) = lines.get(i + 1).and_then(|l| {
            l.strip_prefix("cause: ")
                .or_else(|| l.strip_prefix("╰─▶ "))
                .map(str::to_owned)
        }) {
            return Some(reason);
        }
        return Some(message);
    }
    lines
        .iter()
        .rev()
        .find(|l| !l.starts_with("WARNING") && !l.starts_with("warning"))
        .cloned()
}

/// `npm error 404 Not Found - GET ...` → `404 Not Found - GET ...`.
fn npm_message(line: &str) -> String {
    line.strip_prefix("npm error ")
        .or_else(|| line.strip_prefix("npm ERR! "))
        .unwrap_or(line)
        .trim()
        .to_owned()
}

/// The message of a line that reports an error, without its prefix: `ERROR: x`, `error: x`,
/// `× x` (uv), `fatal: x`; a Python exception's last line (`ModuleNotFoundError: x`) whole.
fn error_message(line: &str) -> Option<String> {
    for prefix in ["ERROR: ", "error: ", "Error: ", "fatal: ", "× "] {
        if let Some(m) = line.strip_prefix(prefix) {
            return Some(m.trim().to_owned());
        }
    }
    let (name, _) = line.split_once(": ")?;
    let exception = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        && (name.ends_with("Error") || name.ends_with("Exception"));
    exception.then(|| line.to_owned())
}

/// Output lines that never say why something failed.
fn is_noise(line: &str) -> bool {
    line.starts_with("==> ")
        || line.starts_with("[notice]")
        || line.starts_with("[... ")
        || line.contains("A complete log of this run can be found")
        || line == "npm error"
        || line == "npm ERR!"
        || line.starts_with("npm error 404 Note that")
        || line == "npm error 404"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_step_is_the_last_one_started() {
        let log = "==> interpreter: python3 Python 3.11.2 (/usr/bin/python3)\n\
                   ==> step 1/3 'create venv': /usr/bin/python3 -m venv /e\n\
                   some output\n\
                   ==> step 'create venv' succeeded in 2s\n\
                   ==> step 2/3 'upgrade pip' skipped: no file /p/x\n\
                   ==> step 3/3 'install requirements': /e/bin/pip install -r r.txt\n\
                   Collecting requests\n";
        let step = current_step(marks(log)).unwrap();
        assert_eq!(step.to_string(), "step 3/3 'install requirements'");
        assert_eq!(phase(&marks(log)), "step 3/3 'install requirements'");
        assert_eq!(
            last_output_line(log).as_deref(),
            Some("Collecting requests")
        );
        let done = format!("{log}==> step 'install requirements' succeeded in 5s\n==> executable 'python': /e/bin/python (Python 3.11.2)\n");
        assert_eq!(
            phase(&marks(&done)),
            "checking executables (after step 3/3 'install requirements' done)"
        );
        assert_eq!(phase(&[]), "preparing");
        assert_eq!(
            phase(&marks("==> inputs unchanged since the current build (fingerprint matches): already up to date\n")),
            "up to date (inputs unchanged)"
        );
    }

    #[test]
    fn a_progress_bar_line_shows_its_last_state() {
        assert_eq!(
            last_output_line(
                "Downloading 10%\rDownloading 50%\r\x1b[32mDownloading 90%\x1b[0m\n\n"
            )
            .as_deref(),
            Some("Downloading 90%")
        );
    }

    #[test]
    fn the_cause_of_a_pip_failure_is_the_last_error_line() {
        let e = "step 'install requirements' (`/e/bin/python -m pip install -r /p/requirements.txt`) exited with status 1.\n\
                 --- output tail ---\n\
                 ERROR: Could not find a version that satisfies the requirement requests==99.9 (from versions: 0.2.0)\n\
                 ERROR: No matching distribution found for requests==99.9\n\
                 \n[notice] A new release of pip is available: 23.0 -> 25.0\n\
                 ==> step 'install requirements' (`/e/bin/python -m pip install`) exited with status 1 after 3s \
                 The previous build /envs/p/.python-1 is still served.";
        assert_eq!(
            cause(e),
            "No matching distribution found for requests==99.9"
        );
        assert_eq!(
            cause(&format!("node web-3: {e}")),
            "web-3: No matching distribution found for requests==99.9"
        );
    }

    #[test]
    fn the_cause_of_uv_and_npm_failures_names_the_package() {
        let uv = "step 'install' (`uv pip install`) exited with status 1.\n--- output tail ---\n\
                  error: No solution found when resolving dependencies\n  \
                  cause: Because there is no version of requests==99.9 and you require requests==99.9, we can conclude that your requirements are unsatisfiable.";
        assert!(cause(uv).starts_with("Because there is no version of requests==99.9"));
        let npm = "step 'npm install' (`npm install --omit=dev`) exited with status 1.\n--- output tail ---\n\
                   npm error code E404\n\
                   npm error 404 Not Found - GET https://registry.npmjs.org/nosuch\n\
                   npm error 404\n\
                   npm error 404 Note that you can also install from a\n\
                   npm error A complete log of this run can be found in: /root/.npm/_logs/x.log";
        assert_eq!(
            cause(npm),
            "E404: 404 Not Found - GET https://registry.npmjs.org/nosuch"
        );
        let traceback = "step 's' (`python x.py`) exited with status 1.\n--- output tail ---\n\
                         Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n\
                         ModuleNotFoundError: No module named 'setuptools'";
        assert_eq!(
            cause(traceback),
            "ModuleNotFoundError: No module named 'setuptools'"
        );
    }

    #[test]
    fn without_a_telling_line_the_cause_is_the_sentence_without_the_command() {
        assert_eq!(
            cause("step 'script' (`sh -c exit 3`) exited with status 3.\n--- output tail ---\n"),
            "step 'script' exited with status 3"
        );
        assert_eq!(
            cause("step 'venv': `uv` not found on PATH (PATH=/usr/bin:/bin)"),
            "`uv` not found on PATH"
        );
        assert_eq!(
            cause("pack p: no Python on this host satisfies >=3.99 (from pack.yaml runtime_dependencies); it has 3.13.0 (/usr/bin/python3.13)"),
            "no Python on this host satisfies >=3.99 (from pack.yaml runtime_dependencies)"
        );
        assert_eq!(
            cause("executable 'python' ({env_path}/bin/python) does not run: exited with status 1.\n--- output tail ---\n"),
            "executable 'python' does not run: exited with status 1"
        );
        assert_eq!(
            cause("the build by host:1234 stopped renewing its lease (daemon killed or cut off) on attempt 2; it will be retried"),
            "the build by host:1234 stopped renewing its lease (daemon killed or cut off) on attempt 2; it will be retried"
        );
    }

    #[test]
    fn an_error_loses_its_tail_only_when_the_log_holds_it() {
        let e = "step 's' (`sh`) exited with status 1.\n--- output tail ---\nboom\nbang The previous build /b is still served.";
        let (head, tail) = without_tail(e, Some("==> step 1/1 's': sh\nboom\nbang\n"));
        assert_eq!(
            head,
            "step 's' (`sh`) exited with status 1. The previous build /b is still served."
        );
        assert_eq!(tail, None);
        let (_, tail) = without_tail(e, Some("another build's log"));
        assert_eq!(tail.as_deref(), Some("boom\nbang"));
    }
}
