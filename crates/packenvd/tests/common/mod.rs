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
        ]);
        for (k, v) in extra {
            flags.insert(k, v.to_string());
        }
        let env = BTreeMap::from([("DATABASE_URL".to_string(), "postgres://unused".to_string())]);
        let (settings, _) = Settings::load(
            Layers {
                file: None,
                flags,
                env,
            },
            true,
        )
        .expect("settings");
        std::fs::create_dir_all(dir.path().join("packs")).expect("packs dir");
        Env { dir, settings }
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
}

pub async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as(
        "SELECT status::text AS status, env_path, install_error, install_log, metadata, attempts, claim_token
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
    let out = std::process::Command::new("python3")
        .arg(fixtures().join("make_wheel.py"))
        .arg(dir)
        .args(["packenvd-fixture", "0.1.0"])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "make_wheel.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
