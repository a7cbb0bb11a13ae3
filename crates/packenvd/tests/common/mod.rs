//! Helpers shared by the integration tests: settings pointing into a temp dir, packs and
//! runtimes inserted the way the platform would, and reading a row back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use packenvd::config::{Layers, Settings};
use packenvd::worker::Worker;
use sqlx::PgPool;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A scratch directory with `envs/`, `packs/` and `cache/`, and settings that use it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub settings: Settings,
}

impl Env {
    pub fn new(extra: &[(&'static str, &str)]) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |s: &str| dir.path().join(s).display().to_string();
        let mut flags: BTreeMap<&'static str, String> = BTreeMap::from([
            ("envs_root", p("envs")),
            ("packs_dir", p("packs")),
            ("cache_dir", p("cache")),
            ("concurrency", "4".to_string()),
            ("step_timeout", "2m".to_string()),
            // Builds run by the test process itself are supervised like the daemon's.
            (
                "step_supervisor",
                env!("CARGO_BIN_EXE_packenvd").to_string(),
            ),
            ("step_writable", p("scratch")),
        ]);
        for (k, v) in extra {
            flags.insert(k, v.to_string());
        }
        let env = BTreeMap::from([("DATABASE_URL".to_string(), "postgres://unused".to_string())]);
        let settings = Settings::load(
            Layers {
                file: None,
                flags,
                env,
            },
            true,
        )
        .expect("settings")
        .settings;
        std::fs::create_dir_all(dir.path().join("packs")).expect("packs dir");
        std::fs::create_dir_all(dir.path().join("scratch")).expect("scratch dir");
        Env { dir, settings }
    }

    /// A directory outside the envs root that steps may write to (`step_writable`): where a
    /// test's step leaves a trace for the test to read.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    pub fn worker(&self, pool: &PgPool) -> Worker {
        Worker::new(pool.clone(), Arc::new(self.settings.clone()))
    }

    /// Creates `<packs_dir>/<name>` with the given files.
    pub fn pack_dir(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.settings.packs_dir.join(name);
        std::fs::create_dir_all(&dir).expect("pack dir");
        for (f, content) in files {
            std::fs::write(dir.join(f), content).expect("pack file");
        }
        dir
    }

    pub fn envs_root(&self) -> &Path {
        &self.settings.envs_root
    }
}

pub async fn add_pack(pool: &PgPool, pack_ref: &str) -> i64 {
    sqlx::query_scalar("INSERT INTO pack (ref, label) VALUES ($1, $1) RETURNING id")
        .bind(pack_ref)
        .fetch_one(pool)
        .await
        .expect("insert pack")
}

pub async fn add_runtime(pool: &PgPool, runtime_ref: &str, installers: serde_json::Value) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO runtime (ref, name, installers) VALUES ($1, $1, $2) RETURNING id",
    )
    .bind(runtime_ref)
    .bind(installers)
    .fetch_one(pool)
    .await
    .expect("insert runtime")
}

pub async fn request(pool: &PgPool, pack_ref: &str, runtime_ref: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM request_pack_environment($1, $2)")
        .bind(pack_ref)
        .bind(runtime_ref)
        .fetch_one(pool)
        .await
        .expect("request_pack_environment")
}

#[derive(Debug, sqlx::FromRow)]
pub struct Row {
    pub status: String,
    pub env_path: Option<String>,
    pub install_error: Option<String>,
    pub install_log: Option<String>,
    pub metadata: serde_json::Value,
    pub attempts: i32,
    pub claim_token: Option<uuid::Uuid>,
    pub fingerprint: Option<String>,
}

pub async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as(
        "SELECT status::text AS status, env_path, install_error, install_log, metadata, attempts, claim_token,
                fingerprint
         FROM pack_environment WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .expect("row")
}

/// A runtime of one shell step.
pub fn shell_runtime(script: &str) -> serde_json::Value {
    serde_json::json!({"installers": [{"name": "script", "command": "sh", "args": ["-c", script]}]})
}

/// Builds the fixture wheel into `dir` and returns a requirements.txt that installs it with no
/// index (so no network).
pub fn wheel_requirements(dir: &Path) -> String {
    make_wheel(dir, "0.1.0");
    format!(
        "--no-index\n--find-links {}\npackenvd-fixture==0.1.0\n",
        dir.display()
    )
}

/// Every file and directory under `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).expect("prefix").display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The URL of the database behind `pool` (a `#[sqlx::test]` database), for a daemon process.
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool
        .connect_options()
        .get_database()
        .expect("database name")
        .to_owned();
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let path_end = base[path_start..]
        .find('?')
        .map_or(base.len(), |i| path_start + i);
    format!("{}/{}{}", &base[..path_start], db, &base[path_end..])
}

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

/// Polls `cond` every 20 ms for up to `limit`.
pub async fn eventually<F, Fut>(limit: std::time::Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !cond().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn status_of(pool: &PgPool, id: i64) -> String {
    sqlx::query_scalar("SELECT status::text FROM pack_environment WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("status")
}

/// Processes whose command line contains `needle` (to prove no step outlived its daemon).
pub fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// A PostgreSQL cluster of one test's own, for tests that stop and start the server (the
/// shared test server must stay up for every other test). Runs as `postgres` when we are root.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    as_postgres: bool,
    bindir: PathBuf,
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let bindir = [
            "/usr/lib/postgresql/17/bin",
            "/usr/lib/postgresql/16/bin",
            "/usr/lib/postgresql/15/bin",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").exists())
        .or_else(|| {
            let out = std::process::Command::new("sh")
                .args(["-c", "dirname \"$(command -v initdb)\""])
                .output()
                .ok()?;
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .expect("initdb not found");
        let dir = tempfile::Builder::new()
            .prefix("packenvd-pg-")
            .tempdir()
            .expect("tempdir");
        let as_postgres = nix::unistd::Uid::effective().is_root();
        if as_postgres {
            let status = std::process::Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let cluster = PrivateCluster {
            dir,
            as_postgres,
            bindir,
        };
        let data = cluster.data();
        cluster.pg(
            "initdb",
            &[
                "-D",
                &data,
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nfsync = off\n",
            cluster.dir.path().display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{data}/postgresql.conf"))
            .expect("conf");
        std::io::Write::write_all(&mut f, conf.as_bytes()).expect("conf");
        cluster.ctl("start");
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let exe = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect(tool);
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start` (waits until ready) or `pg_ctl stop` (fast).
    pub fn ctl(&self, action: &str) {
        let data = self.data();
        let log = self.dir.path().join("postgres.log").display().to_string();
        match action {
            "start" => self.pg("pg_ctl", &["-D", &data, "-l", &log, "-w", "start"]),
            _ => self.pg("pg_ctl", &["-D", &data, "-w", "-m", "fast", "stop"]),
        }
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}",
            self.dir.path().display()
        )
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = std::panic::catch_unwind(|| {
            self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
        });
    }
}

/// Builds the fixture wheel at `version` into `dir`.
pub fn make_wheel(dir: &Path, version: &str) {
    let out = std::process::Command::new("python3")
        .arg(fixtures().join("make_wheel.py"))
        .arg(dir)
        .args(["packenvd-fixture", version])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "make_wheel.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// tests/fixtures/index_server.py on a loopback port: a package index whose every request is
/// logged, to tell a download from a cache hit.
pub struct IndexServer {
    child: std::process::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl IndexServer {
    pub fn start(wheels: &Path, log: PathBuf) -> IndexServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(fixtures().join("index_server.py"))
            .arg(wheels)
            .arg(&log)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("index server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port");
        IndexServer {
            child,
            port: line.trim().parse().expect("port number"),
            log,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for IndexServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `python -c code` and returns its trimmed stdout, panicking with stderr on failure.
pub fn python(exe: &str, code: &str) -> String {
    let out = std::process::Command::new(exe)
        .args(["-c", code])
        .current_dir("/")
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{exe} -c {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
