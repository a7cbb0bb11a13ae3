//! `packenvd run` as a real process.

use std::path::PathBuf;

use super::Env;

/// A `packenvd run` process with its output in a file.
pub struct Daemon {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(env: &Env, url: &str, name: &str, vars: &[(&str, &str)], args: &[&str]) -> Daemon {
        let log = env.dir.path().join(format!("daemon-{name}.log"));
        let out = std::fs::File::create(&log).expect("daemon log");
        let s = &env.settings;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"));
        cmd.arg("run")
            .args(args)
            .env("DATABASE_URL", url)
            .env("PACKENVD_ENVS_ROOT", &s.envs_root)
            .env("PACKENVD_PACKS_DIR", &s.packs_dir)
            .env("PACKENVD_CACHE_DIR", &s.cache_dir)
            .env("PACKENVD_INSTANCE_NAME", name)
            .env("PACKENVD_STEP_WRITABLE", env.scratch())
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
        let s = &env.settings;
        // The binary where the unprivileged user can reach it, whatever the checkout's modes.
        let bin = env.dir.path().join("packenvd");
        if !bin.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_packenvd"), &bin).expect("copy packenvd");
        }
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "exec 7<\"$1\"; exec setpriv --reuid={uid} --regid={uid} --clear-groups -- \"$2\" run"
            ))
            .arg("sh")
            .arg(inherited)
            .arg(&bin)
            .env("DATABASE_URL", url)
            .env("PACKENVD_ENVS_ROOT", &s.envs_root)
            .env("PACKENVD_PACKS_DIR", &s.packs_dir)
            .env("PACKENVD_CACHE_DIR", &s.cache_dir)
            .env("PACKENVD_INSTANCE_NAME", name)
            .env("PACKENVD_STEP_WRITABLE", env.scratch())
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
