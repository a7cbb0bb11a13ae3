//! Helpers shared by the integration tests: settings pointing into a temp dir, packs and
//! runtimes inserted the way the platform would, and reading a row back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use packenvd::config::{Layers, Settings};

mod cluster;
mod daemon;
#[allow(unused_imports)]
pub use cluster::*;
#[allow(unused_imports)]
pub use daemon::*;
use packenvd::worker::Worker;
use sqlx::PgPool;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A scratch directory with `envs/`, `packs/` and `cache/`, and settings that use it.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// Where the supervisor is linked, apart from `dir`, whose tree tests compare.
    pub bin: tempfile::TempDir,
    pub settings: Settings,
}

impl Env {
    pub fn new(extra: &[(&'static str, &str)]) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        // As root, steps run as packenvd's own unprivileged build id (64900): the test's tree
        // must be searchable, its scratch directory writable, and the supervisor reachable
        // wherever the checkout is.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let bin = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let supervisor = bin.path().join("packenvd");
        std::fs::hard_link(env!("CARGO_BIN_EXE_packenvd"), &supervisor)
            .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_packenvd"), &supervisor).map(|_| ()))
            .expect("supervisor");
        let p = |s: &str| dir.path().join(s).display().to_string();
        let mut flags: BTreeMap<&'static str, String> = BTreeMap::from([
            ("envs_root", p("envs")),
            ("packs_dir", p("packs")),
            ("cache_dir", p("cache")),
            ("concurrency", "4".to_string()),
            ("step_timeout", "2m".to_string()),
            // Builds run by the test process itself are supervised like the daemon's.
            ("step_supervisor", supervisor.display().to_string()),
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
        std::fs::set_permissions(
            dir.path().join("scratch"),
            std::fs::Permissions::from_mode(0o777),
        )
        .expect("chmod scratch");
        Env { dir, bin, settings }
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

/// Every file and directory under `dir`, relative, sorted; the envs root's own marker
/// (written when a node starts) is left out.
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
    out.retain(|p| p != packenv_core::layout::ROOT_MARKER);
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

/// The node the tests' workers and daemons are (the default node_name: the host name).
pub fn node_name() -> String {
    nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("a UTF-8 host name")
}

/// Registers the tests' node with envs root `root`, as a daemon's start would (adopting and
/// catching up), for tests that call the store directly, without a worker.
pub async fn register_node(pool: &PgPool, root: &str) {
    let info = packenvd::store::NodeInfo {
        name: node_name(),
        envs_root: root.into(),
        version: "test".into(),
        runtimes: serde_json::json!({}),
        tools: serde_json::json!({}),
        protections: serde_json::json!([]),
        ttl: std::time::Duration::from_secs(600),
    };
    packenvd::store::register_node(pool, &info)
        .await
        .expect("register");
    packenvd::store::adopt(pool, &info.name, root)
        .await
        .expect("adopt");
    packenvd::store::catch_up(pool, &info.name)
        .await
        .expect("catch up");
}

/// Whether the tests run as root: tests that run the daemon as another user need it.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Gives `path` (a file, or a directory and all in it) to `uid`, and makes the directory
/// chain above it traversable, so a daemon running as `uid` can work in it.
pub fn give_to(path: &Path, uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success());
    let mut p = path.parent();
    while let Some(dir) = p {
        if dir == Path::new("/") || dir == std::env::temp_dir() {
            break;
        }
        let mode = std::fs::metadata(dir).expect("stat").permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
            .expect("chmod");
        p = dir.parent();
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

/// The uid the daemon runs as in tests of the shipped setup (nobody).
pub const DAEMON_UID: u32 = 65534;
/// A build user distinct from the daemon's: a bare uid:gid, as `build_user` accepts.
pub const BUILD_UID: u32 = 64123;

/// A database of the test's own that any local user can reach (with a password), migrated:
/// for a daemon that runs as another user.
pub async fn reachable_database() -> (PrivateCluster, PgPool) {
    let cluster = PrivateCluster::start_with_password(&uuid::Uuid::new_v4().simple().to_string());
    let pool = PgPool::connect(&cluster.url()).await.expect("connect");
    packenvd::store::MIGRATOR
        .run(&pool)
        .await
        .expect("migrations");
    (cluster, pool)
}

/// Makes `env` a place a daemon running as `uid` can work in, as an operator sets it up: its
/// envs root, cache and scratch directory become that user's; the packs stay root's, readable.
pub fn hand_to_daemon_user(env: &Env, uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    for p in [&env.settings.envs_root, &env.settings.cache_dir] {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    for p in [
        &env.settings.envs_root,
        &env.settings.cache_dir,
        &env.scratch(),
    ] {
        give_to(p, uid);
    }
    for p in [env.dir.path(), env.settings.packs_dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// The entries of `<cache_dir>/.tmp`, where builds and checks get their private tmp.
pub fn private_tmps(env: &Env) -> Vec<String> {
    tree(&env.settings.cache_dir.join(".tmp"))
}

/// Whether process `pid` (a child not yet waited for) has exited.
pub fn has_exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}
