//! `packenvd run` as a real process.

use std::path::PathBuf;

use super::Env;

/// The capabilities of deploy/packenvd.service, in setpriv's syntax.
pub const UNIT_CAPS: &str = "+setuid,+setgid,+chown";

/// The binary where an unprivileged user can reach it, whatever the checkout's modes.
fn reachable_binary(env: &Env) -> PathBuf {
    let bin = env.bin.path().join("packenvd");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_packenvd"), &bin).expect("copy packenvd");
    }
    bin
}

/// The test's directories, database and instance name, as a daemon or a command reads them.
fn with_settings<'a>(
    cmd: &'a mut std::process::Command,
    env: &Env,
    url: &str,
    name: &str,
) -> &'a mut std::process::Command {
    let s = &env.settings;
    cmd.env("DATABASE_URL", url)
        .env("PACKENVD_ENVS_ROOT", &s.envs_root)
        .env("PACKENVD_PACKS_DIR", &s.packs_dir)
        .env("PACKENVD_CACHE_DIR", &s.cache_dir)
        .env("PACKENVD_INSTANCE_NAME", name)
        .env("PACKENVD_STEP_WRITABLE", env.scratch())
        // The supervisor where the build user can reach it, wherever the checkout is.
        .env("PACKENVD_STEP_SUPERVISOR", reachable_binary(env))
}

/// `packenvd` (no command yet) as the unprivileged user `uid`, without supplementary groups,
/// holding `caps` (setpriv's syntax; "" for none) as ambient capabilities.
pub fn as_user(env: &Env, uid: u32, caps: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
    ]);
    if !caps.is_empty() {
        cmd.args([
            format!("--inh-caps={caps}"),
            format!("--ambient-caps={caps}"),
        ]);
    }
    cmd.arg("--").arg(reachable_binary(env));
    cmd
}

/// A `packenvd` command as the unprivileged user `uid` with `caps`, with the test's settings.
pub fn run_as(
    env: &Env,
    url: &str,
    uid: u32,
    caps: &str,
    args: &[&str],
    vars: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = as_user(env, uid, caps);
    cmd.args(args);
    with_settings(&mut cmd, env, url, "cli");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("running packenvd")
}

/// A `packenvd run` process with its output in a file.
pub struct Daemon {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(env: &Env, url: &str, name: &str, vars: &[(&str, &str)], args: &[&str]) -> Daemon {
        Self::spawn_in(env, url, name, vars, args, std::path::Path::new("."))
    }

    /// [`Daemon::spawn`] in the working directory `cwd` (where a relative `--config` is).
    pub fn spawn_in(
        env: &Env,
        url: &str,
        name: &str,
        vars: &[(&str, &str)],
        args: &[&str],
        cwd: &std::path::Path,
    ) -> Daemon {
        let log = env.dir.path().join(format!("daemon-{name}.log"));
        let out = std::fs::File::create(&log).expect("daemon log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"));
        cmd.arg("run").args(args).current_dir(cwd);
        with_settings(&mut cmd, env, url, name)
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("spawn packenvd"),
            log,
        }
    }

    /// A `packenvd run` process as the unprivileged user `uid` (65534 is nobody), started the
    /// way a careless parent would: with `inherited` open as descriptor 7.
    pub fn spawn_as(
        env: &Env,
        url: &str,
        name: &str,
        uid: u32,
        inherited: &std::path::Path,
        vars: &[(&str, &str)],
    ) -> Daemon {
        let log = env.dir.path().join(format!("daemon-{name}.log"));
        let out = std::fs::File::create(&log).expect("daemon log");
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "exec 7<\"$1\"; exec setpriv --reuid={uid} --regid={uid} --clear-groups -- \"$2\" run"
            ))
            .arg("sh")
            .arg(inherited)
            .arg(reachable_binary(env));
        with_settings(&mut cmd, env, url, name)
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("spawn packenvd"),
            log,
        }
    }

    /// A `packenvd run` process as the unprivileged user `uid` holding the capabilities `caps`
    /// (setpriv's syntax, e.g. [`UNIT_CAPS`]) as ambient ones, as the systemd unit starts it.
    pub fn spawn_with_caps(
        env: &Env,
        url: &str,
        name: &str,
        uid: u32,
        caps: &str,
        vars: &[(&str, &str)],
    ) -> Daemon {
        let log = env.dir.path().join(format!("daemon-{name}.log"));
        let out = std::fs::File::create(&log).expect("daemon log");
        let mut cmd = as_user(env, uid, caps);
        cmd.arg("run");
        with_settings(&mut cmd, env, url, name)
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("spawn packenvd"),
            log,
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    /// Waits up to `limit` for the process to exit; returns how long it took.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::time::Duration> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if self.child.try_wait().expect("try_wait").is_some() {
                return Some(started.elapsed());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `packenvd` command (`status`, `request ... --wait`, ...) run by the test's own user with
/// the test's settings, stdin not a terminal.
pub fn cli(env: &Env, url: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"));
    cmd.args(args).stdin(std::process::Stdio::null());
    with_settings(&mut cmd, env, url, "cli")
        .output()
        .expect("running packenvd")
}

/// [`cli`] with more environment variables.
#[allow(dead_code)]
pub fn cli_with(
    env: &Env,
    url: &str,
    args: &[&str],
    vars: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .envs(vars.iter().copied());
    with_settings(&mut cmd, env, url, "cli")
        .output()
        .expect("running packenvd")
}

/// [`cli`] on a pseudo-terminal (util-linux `script`), as an operator at a shell runs it; the
/// exit status is the command's. `args` must need no shell quoting.
#[allow(dead_code)]
pub fn cli_on_terminal(env: &Env, url: &str, args: &[&str]) -> std::process::Output {
    cli_on_terminal_typing(env, url, args, "")
}

/// [`cli_on_terminal`], with `typed` as what the operator types at it.
#[allow(dead_code)]
pub fn cli_on_terminal_typing(
    env: &Env,
    url: &str,
    args: &[&str],
    typed: &str,
) -> std::process::Output {
    use std::io::Write;
    let line = format!(
        "stty cols 100; {} {}",
        env!("CARGO_BIN_EXE_packenvd"),
        args.join(" ")
    );
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = with_settings(&mut cmd, env, url, "cli")
        .spawn()
        .expect("running packenvd under script");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(typed.as_bytes()).expect("typing");
    // Kept open until the command ends: script ends the session when its input ends.
    let out = child.wait_with_output().expect("packenvd under script");
    drop(stdin);
    out
}

/// The output of a command, for assertions and their messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
