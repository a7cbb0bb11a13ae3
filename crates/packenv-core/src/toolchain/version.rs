//! Versions as interpreters print them, and the constraints packs put on them, in both the
//! Python and the npm style.

use std::cmp::Ordering;
use std::fmt;

/// A version as interpreters print it: its numeric parts (`Python 3.11.7` → 3.11.7). Missing
/// parts are zeros: 3.11 equals 3.11.0.
#[derive(Debug, Clone)]
pub struct Version(pub Vec<u64>);

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Version {}

impl Version {
    /// The first dotted number in a `--version` line: `Python 3.11.7`, `v20.1.0`,
    /// `Python 3.13.0rc1` (3.13.0).
    pub fn find(line: &str) -> Option<Version> {
        line.split_whitespace()
            .map(|w| w.strip_prefix('v').unwrap_or(w))
            .filter(|w| w.starts_with(|c: char| c.is_ascii_digit()))
            .find_map(|w| Version::parse(w).filter(|v| v.0.len() >= 2))
    }

    /// `3.11.7`, `3.11`, `3`; each part's leading digits (`0rc1` → 0).
    pub fn parse(s: &str) -> Option<Version> {
        let parts: Option<Vec<u64>> = s
            .split('.')
            .map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .collect();
        parts.filter(|p| !p.is_empty()).map(Version)
    }

    fn part(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }

    fn cmp_parts(&self, other: &[u64]) -> Ordering {
        (0..self.0.len().max(other.len()))
            .map(|i| self.part(i).cmp(&other.get(i).copied().unwrap_or(0)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_parts(&other.0)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

/// One comparison: `op` against `parts`; with `prefix`, `==`/`!=` compare only `parts`' length
/// (`==3.11.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    op: Op,
    parts: Vec<u64>,
    prefix: bool,
}

impl Clause {
    fn matches(&self, v: &Version) -> bool {
        let ord = if self.prefix {
            let n = self.parts.len();
            Version(v.0.iter().copied().take(n).collect()).cmp_parts(&self.parts)
        } else {
            v.cmp_parts(&self.parts)
        };
        match self.op {
            Op::Eq => ord.is_eq(),
            Op::Ne => ord.is_ne(),
            Op::Ge => ord.is_ge(),
            Op::Gt => ord.is_gt(),
            Op::Le => ord.is_le(),
            Op::Lt => ord.is_lt(),
        }
    }
}

/// A version constraint: alternatives (`||`), each a list of clauses that must all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    text: String,
    any_of: Vec<Vec<Clause>>,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Constraint {
    pub fn parse(text: &str) -> Result<Constraint, String> {
        let text = text.trim();
        if text.is_empty() || text.len() > 200 {
            return Err(format!("{text:?} is not a version constraint"));
        }
        let any_of = text
            .split("||")
            .map(|alt| {
                // `>= 3.8` is one clause: an operator alone joins the next word.
                let mut words: Vec<String> = Vec::new();
                for w in alt.split([',', ' ', '\t']).filter(|w| !w.is_empty()) {
                    match words.last_mut() {
                        Some(last) if last.chars().all(|c| "<>=!~^".contains(c)) => {
                            last.push_str(w)
                        }
                        _ => words.push(w.to_owned()),
                    }
                }
                if words.is_empty() {
                    return Err(format!("{text:?}: an empty alternative"));
                }
                let mut clauses = Vec::new();
                for w in &words {
                    clauses.extend(parse_clause(w).ok_or_else(|| {
                        format!("{text:?}: cannot read {w:?} as a version constraint")
                    })?);
                }
                Ok(clauses)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Constraint {
            text: text.to_owned(),
            any_of,
        })
    }

    pub fn matches(&self, v: &Version) -> bool {
        self.any_of
            .iter()
            .any(|all| all.iter().all(|c| c.matches(v)))
    }
}

/// One word of a constraint as the clauses it stands for.
fn parse_clause(word: &str) -> Option<Vec<Clause>> {
    let (op, rest) = ["~=", "==", "!=", ">=", "<=", "===", ">", "<", "^", "~", "="]
        .iter()
        .filter(|op| word.starts_with(**op))
        .max_by_key(|op| op.len())
        .map_or(("", word), |op| (*op, &word[op.len()..]));
    let rest = rest.strip_prefix('v').unwrap_or(rest);
    if rest.is_empty() || rest == "*" || rest == "x" {
        return (op.is_empty()).then(Vec::new);
    }
    let mut parts = Vec::new();
    let mut wildcard = false;
    for p in rest.split('.') {
        if wildcard {
            return None;
        }
        if matches!(p, "*" | "x" | "X") {
            wildcard = true;
        } else {
            parts.push(p.parse::<u64>().ok()?);
        }
    }
    if parts.is_empty() {
        return None;
    }
    let c = |op, parts: Vec<u64>, prefix| Clause { op, parts, prefix };
    // The next version at the level of part `i`: 3.11 -> 3.12 at i = 1.
    let bump = |i: usize| {
        let mut up: Vec<u64> = parts[..=i].to_vec();
        up[i] += 1;
        up
    };
    Some(match op {
        "" | "=" | "==" | "===" => {
            if wildcard || op.is_empty() {
                vec![c(Op::Eq, parts, true)]
            } else {
                vec![c(Op::Eq, parts, false)]
            }
        }
        "!=" => vec![c(Op::Ne, parts, wildcard)],
        ">=" => vec![c(Op::Ge, parts, false)],
        ">" if wildcard => vec![c(Op::Ge, bump(parts.len() - 1), false)],
        ">" => vec![c(Op::Gt, parts, false)],
        "<=" if wildcard => vec![c(Op::Lt, bump(parts.len() - 1), false)],
        "<=" => vec![c(Op::Le, parts, false)],
        "<" => vec![c(Op::Lt, parts, false)],
        // PEP 440: ~=3.10 is >=3.10, ==3.*; ~=3.10.2 is >=3.10.2, ==3.10.*.
        "~=" if parts.len() >= 2 => {
            let keep = parts.len() - 1;
            vec![
                c(Op::Ge, parts.clone(), false),
                c(Op::Eq, parts[..keep].to_vec(), true),
            ]
        }
        // npm: ~1.2.3 is >=1.2.3 <1.3; ~1 is 1.x.
        "~" => {
            let level = if parts.len() >= 2 { 1 } else { 0 };
            vec![
                c(Op::Ge, parts.clone(), false),
                c(Op::Lt, bump(level), false),
            ]
        }
        // npm: ^18.2 is >=18.2 <19; ^0.2.3 is >=0.2.3 <0.3.0.
        "^" => {
            let level = parts
                .iter()
                .position(|&p| p != 0)
                .unwrap_or(parts.len() - 1);
            vec![
                c(Op::Ge, parts.clone(), false),
                c(Op::Lt, bump(level), false),
            ]
        }
        _ => return None,
    })
}
