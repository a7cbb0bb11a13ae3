//! The default runtimes (issue 13): core.python with and without uv on the host, the
//! interpreter a pack asks for, a Node.js constraint, a platform's empty runtimes, includes in
//! the fingerprint. Real venvs, real interpreters, real daemon processes where PATH matters.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use packenvd::verify::{run_pass, Scope};
use sqlx::PgPool;

fn ready(r: &Row) {
    assert_eq!(
        r.status,
        "ready",
        "error: {:?}\nlog:\n{}",
        r.install_error,
        r.install_log.as_deref().unwrap_or("")
    );
}

/// The package version the environment's interpreter imports, and its `sys.version_info`.
fn imports(r: &Row) -> (String, String) {
    let python = r.metadata["executables"]["python"].as_str().unwrap();
    let out = Command::new(python)
        .args([
            "-c",
            "import sys, packenvd_fixture; print(packenvd_fixture.VERSION); print('%d.%d.%d' % sys.version_info[:3])",
        ])
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    (
        lines.next().unwrap_or_default().to_owned(),
        lines.next().unwrap_or_default().to_owned(),
    )
}

fn uv_on_path() -> bool {
    Command::new("uv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The interpreter behind `python3` on this PATH (a pyenv shim resolves to a real one).
fn real_python3() -> PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .current_dir("/")
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A PATH with that python3 and the system's directories: no uv.
fn path_without_uv(env: &Env) -> String {
    let bin = env.dir.path().join("bin-no-uv");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(real_python3(), bin.join("python3")).unwrap();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display());
    assert!(
        std::env::split_paths(&path).all(|d| !d.join("uv").exists()),
        "uv must not be on {path}"
    );
    path
}

fn pack_with_wheel(env: &Env, name: &str, extra: &[(&str, &str)]) -> PathBuf {
    let wheels = env.dir.path().join("wheels");
    if !wheels.exists() {
        make_wheel(&wheels, "0.1.0");
    }
    let reqs = format!(
        "--no-index\n--find-links {}\npackenvd-fixture==0.1.0\n",
        wheels.display()
    );
    let mut files = vec![("requirements.txt", reqs.as_str())];
    files.extend_from_slice(extra);
    env.pack_dir(name, &files)
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_default_python_runtime_uses_uv_when_the_host_has_it_and_copies_no_pip(pool: PgPool) {
    assert!(
        uv_on_path(),
        "uv is not installed: `python3 -m pip install uv` (.ci/run does)"
    );
    let env = Env::new(&[]);
    pack_with_wheel(&env, "p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    ready(&r);
    let log = r.install_log.clone().unwrap();
    assert!(
        log.contains("'create venv (uv)': uv venv") && log.contains("'install requirements (uv)'"),
        "{log}"
    );
    assert_eq!(imports(&r).0, "0.1.0");
    let build = PathBuf::from(r.metadata["build_dir"].as_str().unwrap());
    assert!(
        !build.join("bin/pip").exists(),
        "no pip copied into the environment"
    );
    assert_eq!(r.metadata["interpreter"]["name"], "python");

    // Verification's package check runs with the host's uv.
    sqlx::query("UPDATE pack_environment_node SET last_verified = now() - interval '8 days'")
        .execute(&pool)
        .await
        .unwrap();
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].failure.is_none(), "{found:?}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn without_uv_the_default_python_runtime_makes_a_pip_less_venv_the_hosts_pip_fills(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    pack_with_wheel(&env, "p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    let path = path_without_uv(&env);
    let url = database_url(&pool);
    let mut d = Daemon::spawn(&env, &url, "a", &[("PATH", &path)], &["--until-done"]);
    d.wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("still running:\n{}", d.output()));
    let r = row(&pool, id).await;
    ready(&r);
    let log = r.install_log.clone().unwrap();
    assert!(
        log.contains("'create venv': ")
            && log.contains("-m venv --without-pip")
            && log.contains("-m pip --python")
            && log.contains("'create venv (uv)' skipped: `uv` is not on PATH"),
        "{log}"
    );
    assert_eq!(imports(&r).0, "0.1.0");
    let build = PathBuf::from(r.metadata["build_dir"].as_str().unwrap());
    assert!(!build.join("bin/pip").exists());

    // Verification without uv: the host's pip checks the environment's packages.
    sqlx::query("UPDATE pack_environment_node SET last_verified = now() - interval '8 days'")
        .execute(&pool)
        .await
        .unwrap();
    let s = &env.settings;
    let out = Command::new(env!("CARGO_BIN_EXE_packenvd"))
        .args(["verify", "--all"])
        .env("DATABASE_URL", &url)
        .env("PATH", &path)
        .env("PACKENVD_ENVS_ROOT", &s.envs_root)
        .env("PACKENVD_PACKS_DIR", &s.packs_dir)
        .env("PACKENVD_CACHE_DIR", &s.cache_dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(status_of(&pool, id).await, "ready");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_pack_gets_the_python_version_it_asks_for_or_an_error_naming_what_the_host_has(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let host = packenv_core::toolchain::pythons(
        &std::env::var("PATH").unwrap_or_default(),
        &env.settings
            .python_search
            .iter()
            .map(PathBuf::from)
            .collect::<Vec<_>>(),
    )
    .await;
    let default = imports_version_of_python3();
    // A version of the host's that is not its default python3 (3.8 or newer: uv and pip need it).
    let Some(other) = host
        .iter()
        .find(|c| c.version.0[..2] != default[..2] && c.version.0[..2] >= [3, 8][..])
    else {
        panic!(
            "this test needs a second Python (3.8+) besides python3 {default:?}; found {host:?} \
             (pyenv install 3.12, or set python_search)"
        );
    };
    let wanted = format!("{}.{}.x", other.version.0[0], other.version.0[1]);
    let yaml = format!("ref: p\nruntime_dependencies:\n  - python: \"{wanted}\"\n");
    pack_with_wheel(&env, "p", &[("pack.yaml", &yaml)]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    ready(&r);
    let (pkg, version) = imports(&r);
    assert_eq!(pkg, "0.1.0");
    assert!(
        version.starts_with(&format!("{}.{}.", other.version.0[0], other.version.0[1])),
        "asked for {wanted}, got {version}"
    );
    assert_eq!(
        r.metadata["interpreter"]["wanted"]["pack.yaml runtime_dependencies"],
        wanted
    );

    // Asking for what no Python here is: a permanent error naming the wish and the host's.
    let yaml = "runtime_dependencies:\n  - python: \">=3.99\"\n";
    env.pack_dir("q", &[("pack.yaml", yaml)]);
    add_pack(&pool, "q").await;
    let id = request(&pool, "q", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1));
    let error = r.install_error.unwrap();
    assert!(
        error.contains(
            "no Python on this host satisfies >=3.99 (from pack.yaml runtime_dependencies)"
        ) && error.contains(&other.version.to_string()),
        "{error}"
    );
}

/// python3's (major, minor, micro).
fn imports_version_of_python3() -> Vec<u64> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .current_dir("/")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect()
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_node_pack_whose_constraint_the_hosts_node_misses_fails_saying_both(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir(
        "n",
        &[
            (
                "package.json",
                r#"{"name": "n", "version": "1.0.0", "private": true}"#,
            ),
            ("pack.yaml", "runtime_dependencies:\n  - nodejs: \">=99\"\n"),
        ],
    );
    add_pack(&pool, "n").await;
    let id = request(&pool, "n", "core.nodejs").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1));
    let error = r.install_error.unwrap();
    assert!(
        error.contains(
            "no Node.js on this host satisfies >=99 (from pack.yaml runtime_dependencies); it has "
        ) && error.contains("/node)"),
        "{error}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_node_pack_with_a_lockfile_is_installed_with_npm_ci(pool: PgPool) {
    let env = Env::new(&[]);
    let package_json = r#"{"name": "n", "version": "1.0.0", "private": true}"#;
    let lock = r#"{"name": "n", "version": "1.0.0", "lockfileVersion": 3, "requires": true,
                   "packages": {"": {"name": "n", "version": "1.0.0"}}}"#;
    env.pack_dir(
        "locked",
        &[("package.json", package_json), ("package-lock.json", lock)],
    );
    env.pack_dir("loose", &[("package.json", package_json)]);
    for p in ["locked", "loose"] {
        add_pack(&pool, p).await;
    }
    let locked = request(&pool, "locked", "core.nodejs").await;
    let loose = request(&pool, "loose", "core.nodejs").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, locked).await;
    ready(&r);
    let log = r.install_log.unwrap();
    assert!(
        log.contains("'npm ci': npm ci") && log.contains("'npm install' skipped"),
        "{log}"
    );
    let r = row(&pool, loose).await;
    ready(&r);
    let log = r.install_log.unwrap();
    assert!(
        log.contains("'npm install': npm install") && log.contains("'npm ci' skipped"),
        "{log}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_platforms_core_python_without_installers_gets_packenvds_and_builds_a_working_venv(
    pool: PgPool,
) {
    sqlx::raw_sql(
        "CREATE TABLE pack (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, label TEXT NOT NULL);
         CREATE TABLE runtime (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, name TEXT NOT NULL);
         INSERT INTO runtime (ref, name) VALUES ('core.python', 'Python');",
    )
    .execute(&pool)
    .await
    .unwrap();
    packenvd::store::MIGRATOR.run(&pool).await.unwrap();
    let env = Env::new(&[]);
    pack_with_wheel(&env, "p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    ready(&r);
    assert_eq!(imports(&r).0, "0.1.0");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_runtime_that_needs_an_environment_but_says_nothing_fails_instead_of_serving_an_empty_one(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.empty", serde_json::json!({"installers": []})).await;
    env.pack_dir("p", &[("requirements.txt", "requests\n")]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.empty").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1));
    let error = r.install_error.unwrap();
    assert!(
        error.contains(
            "runtime t.empty requires an environment but has no installer step and no executable"
        ),
        "{error}"
    );
    assert!(!env.envs_root().join("p/t.empty").exists());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_edited_requirements_include_makes_the_environment_outdated(pool: PgPool) {
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    make_wheel(&wheels, "0.1.0");
    let base = format!(
        "--no-index\n--find-links {}\npackenvd-fixture==0.1.0\n",
        wheels.display()
    );
    let pack = env.pack_dir("p", &[("requirements.txt", "-r reqs/base.txt\n")]);
    std::fs::create_dir_all(pack.join("reqs")).unwrap();
    std::fs::write(pack.join("reqs/base.txt"), &base).unwrap();
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    ready(&row(&pool, id).await);

    let stale = || async {
        sqlx::query("UPDATE pack_environment_node SET last_verified = now() - interval '8 days'")
            .execute(&pool)
            .await
            .unwrap();
    };
    stale().await;
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert!(found[0].failure.is_none(), "unchanged: {found:?}");

    std::fs::write(
        pack.join("reqs/base.txt"),
        format!("{base}# pinned by ops\n"),
    )
    .unwrap();
    stale().await;
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    let reason = found[0].failure.clone().expect("the include changed");
    assert!(reason.contains("inputs changed"), "{reason}");
    assert_eq!(status_of(&pool, id).await, "outdated");
}
