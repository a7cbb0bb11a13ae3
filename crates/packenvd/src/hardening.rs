//! What the daemon does to itself so that the code it runs cannot reach its secrets (DESIGN §6):
//! it is not dumpable (no other process of its user may read its memory or
//! `/proc/<pid>/environ`), it passes on no descriptor it inherited, and once the
//! configuration is read it keeps no secret in its environment.

/// Makes this process non-dumpable and every inherited descriptor above 2 close-on-exec.
/// Returns what could not be done, as warnings to log once logging is set up.
pub fn harden_process() -> Vec<String> {
    let mut warnings = Vec::new();
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        warnings.push(format!(
            "cannot make the process non-dumpable ({e}): processes of this user could read its memory"
        ));
    }
    packenv_core::supervise::close_inherited_descriptors();
    warnings
}

/// Variables that hold database credentials: removed from this process's environment once the
/// configuration is loaded, so nothing started later can inherit them by mistake.
pub const SECRET_VARS: &[&str] = &["DATABASE_URL", "PACKENVD_DATABASE_URL", "PGPASSWORD"];

/// Removes [`SECRET_VARS`] from the environment. Call it before any other thread starts.
pub fn forget_secrets() {
    for var in SECRET_VARS {
        std::env::remove_var(var);
    }
}

/// Whether this process is dumpable (false once [`harden_process`] ran).
pub fn is_dumpable() -> bool {
    nix::sys::prctl::get_dumpable().unwrap_or(true)
}
