//! A `package.json` or npm lock file: every local dependency and package location must stay
//! inside the pack.

use super::*;

/// Checks a `package.json` (its dependencies' `file:`/`link:`/path specs and its workspaces)
/// or an npm lock file (its packages' locations and `file:`/linked `resolved` paths): each
/// must stay inside the pack, read from the manifest's directory.
pub(super) fn check_npm(
    pack: &PackDir,
    pack_path: &Path,
    rel: &Path,
    content: &[u8],
    lock: bool,
) -> Result<(), IncludeError> {
    // Not JSON: npm fails on it by itself, with nothing outside the pack to show.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(content) else {
        return Ok(());
    };
    let mut found: Vec<(String, String)> = Vec::new();
    if lock {
        npm_lock_paths(&value, "", &mut found);
    } else {
        for section in [
            "dependencies",
            "devDependencies",
            "optionalDependencies",
            "peerDependencies",
            "overrides",
            "resolutions",
        ] {
            npm_spec_paths(&value[section], section, &mut found);
        }
        let workspaces = match &value["workspaces"] {
            serde_json::Value::Array(a) => a.clone(),
            other => other["packages"].as_array().cloned().unwrap_or_default(),
        };
        for w in workspaces.iter().filter_map(|w| w.as_str()) {
            // A glob's fixed prefix is where npm starts looking.
            let prefix = w.split(['*', '?', '[', '{']).next().unwrap_or_default();
            found.push(("workspaces".into(), prefix.to_owned()));
        }
    }
    let text = String::from_utf8_lossy(content);
    let dir = rel.parent().unwrap_or(Path::new(""));
    for (what, written) in found {
        let path = match file_url(&written) {
            Some(Target::Path(p)) => p,
            Some(Target::RemoteFile) => String::from("/"),
            None => written.strip_prefix("link:").unwrap_or(&written).to_owned(),
        };
        let at = dir.join(&path);
        let inside = !path.starts_with('~')
            && pack.stays_inside(&at).map_err(|source| ManifestError::Io {
                path: pack_path.join(&at),
                source,
            })?;
        if !inside {
            let quoted = serde_json::to_string(&written).unwrap_or_default();
            let line = text
                .find(&quoted)
                .map_or(0, |i| text[..i].matches('\n').count() + 1);
            return Err(IncludeError::Outside {
                pack: pack_path.to_owned(),
                manifest: rel.display().to_string(),
                line,
                what,
                include: written,
            });
        }
    }
    Ok(())
}

/// An npm dependency spec that names a local path.
fn npm_local(spec: &str) -> bool {
    let lower = spec.to_ascii_lowercase();
    lower.starts_with("file:")
        || lower.starts_with("link:")
        || lower.contains("+file:")
        || spec.starts_with(['.', '/', '~'])
}

fn npm_spec_paths(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::String(s) if npm_local(s) => out.push((at.to_owned(), s.clone())),
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                npm_spec_paths(v, &format!("{at}.{k}"), out);
            }
        }
        _ => {}
    }
}

fn npm_lock_paths(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    let serde_json::Value::Object(m) = v else {
        return;
    };
    for (k, v) in m {
        let here = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        if at == "packages" && !k.is_empty() && !k.starts_with("node_modules/") {
            // A package's location relative to the lock file: a workspace or a linked dir.
            out.push((format!("packages[{k:?}]"), k.clone()));
        }
        let linked = v["link"].as_bool() == Some(true);
        if let Some(resolved) = v["resolved"].as_str() {
            if linked || npm_local(resolved) {
                out.push((format!("{here}.resolved"), resolved.to_owned()));
            }
        }
        if let Some(version) = v["version"].as_str().filter(|s| npm_local(s)) {
            out.push((format!("{here}.version"), version.to_owned()));
        }
        npm_lock_paths(v, &here, out);
    }
}
