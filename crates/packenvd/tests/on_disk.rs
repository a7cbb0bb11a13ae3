//! Environments on disk (DESIGN §4): atomic switches under running actions, old builds kept
//! while used, garbage collection, fingerprints and the request fast path, shared caches, uv.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use packenvd::gc::{self, GcConfig};
use sqlx::PgPool;

/// A pack `p` whose requirements install the fixture wheel at `version` from `wheels`, offline.
fn offline_requirements(wheels: &Path, version: &str) -> String {
    format!(
        "--no-index\n--find-links {}\npackenvd-fixture=={version}\n",
        wheels.display()
    )
}

async fn reset(pool: &PgPool, id: i64) {
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

fn python_of(r: &Row) -> String {
    r.metadata["executables"]["python"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn build_dirs(pack_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pack_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != packenv_core::layout::PACK_RECORD)
        .collect();
    v.sort();
    v
}

/// A process started from `python` that imports the fixture only once `go` exists.
fn late_importer(python: &str, go: &Path) -> std::process::Child {
    let code = format!(
        "import os, time\nwhile not os.path.exists({go:?}): time.sleep(0.02)\nimport packenvd_fixture\nprint(packenvd_fixture.VERSION)",
        go = go.display().to_string()
    );
    std::process::Command::new(python)
        .args(["-c", &code])
        .current_dir("/")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A ready core.python environment for pack `p` with the fixture at 0.1.0; wheels of 0.1.0 and
/// 0.2.0 wait in the returned wheelhouse for a rebuild.
async fn ready_python_pack(pool: &PgPool, env: &Env) -> (PathBuf, PathBuf, i64, Row) {
    let wheels = env.dir.path().join("wheels");
    make_wheel(&wheels, "0.1.0");
    make_wheel(&wheels, "0.2.0");
    let pack = env.pack_dir(
        "p",
        &[("requirements.txt", &offline_requirements(&wheels, "0.1.0"))],
    );
    add_pack(pool, "p").await;
    let id = request(pool, "p", "core.python").await;
    env.worker(pool).drain().await.unwrap();
    let r = row(pool, id).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    (pack, wheels, id, r)
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_rebuild_switches_atomically_under_running_actions(pool: PgPool) {
    let env = Env::new(&[]);
    let (pack, wheels, id, first) = ready_python_pack(&pool, &env).await;
    let old_python = python_of(&first);
    let go = env.dir.path().join("go");
    let old_process = late_importer(&old_python, &go);

    // Actions keep starting through env_path for the whole rebuild.
    let env_python = format!("{}/bin/python", first.env_path.as_deref().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (runs, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looper = {
        let (stop, runs, failures, env_python) = (
            stop.clone(),
            runs.clone(),
            failures.clone(),
            env_python.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let ok = std::process::Command::new(&env_python)
                    .args(["-c", "import packenvd_fixture"])
                    .current_dir("/")
                    .status()
                    .is_ok_and(|s| s.success());
                runs.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    std::fs::write(
        pack.join("requirements.txt"),
        offline_requirements(&wheels, "0.2.0"),
    )
    .unwrap();
    reset(&pool, id).await;
    env.worker(&pool).drain().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    let second = row(&pool, id).await;
    assert_eq!(second.status, "ready", "{:?}", second.install_error);
    assert_ne!(second.metadata["build_dir"], first.metadata["build_dir"]);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "imports failed during the switch ({} runs)",
        runs.load(Ordering::Relaxed)
    );
    assert!(runs.load(Ordering::Relaxed) > 20, "the loop hardly ran");
    assert_eq!(
        python(
            &env_python,
            "import packenvd_fixture; print(packenvd_fixture.VERSION)"
        ),
        "0.2.0"
    );

    // The process started on the old build still imports from it after the switch.
    std::fs::write(&go, "").unwrap();
    let out = old_process.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0.1.0");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_failed_rebuild_leaves_the_previous_build_served_and_working(pool: PgPool) {
    let env = Env::new(&[]);
    let (pack, wheels, id, good) = ready_python_pack(&pool, &env).await;

    std::fs::write(
        pack.join("requirements.txt"),
        offline_requirements(&wheels, "9.9.9"),
    )
    .unwrap();
    reset(&pool, id).await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "failed");
    let error = r.install_error.unwrap();
    assert!(error.contains("is still served"), "{error}");
    let env_path = r.env_path.unwrap();
    assert_eq!(
        std::fs::canonicalize(&env_path).unwrap(),
        PathBuf::from(good.metadata["build_dir"].as_str().unwrap()),
        "env_path still names the good build"
    );
    assert_eq!(
        python(
            &format!("{env_path}/bin/python"),
            "import packenvd_fixture; print(packenvd_fixture.VERSION)"
        ),
        "0.1.0"
    );
    assert_eq!(
        build_dirs(&env.envs_root().join("p")).len(),
        1,
        "the failed build was removed"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_old_build_in_use_is_kept_past_the_grace_and_removed_once_unused(pool: PgPool) {
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    make_wheel(&wheels, "0.1.0");
    make_wheel(&wheels, "0.2.0");
    let pack = env.pack_dir(
        "p",
        &[("requirements.txt", &offline_requirements(&wheels, "0.1.0"))],
    );
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let old = row(&pool, id).await;
    let old_dir = PathBuf::from(old.metadata["build_dir"].as_str().unwrap());
    let go = env.dir.path().join("go");
    let process = late_importer(&python_of(&old), &go);

    std::fs::write(
        pack.join("requirements.txt"),
        offline_requirements(&wheels, "0.2.0"),
    )
    .unwrap();
    reset(&pool, id).await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(row(&pool, id).await.status, "ready");
    // Things packenvd did not make are never touched.
    std::fs::write(env.envs_root().join("README.txt"), "mine").unwrap();
    std::fs::write(env.envs_root().join("p/notes.txt"), "mine").unwrap();
    std::fs::create_dir_all(env.envs_root().join("p/.cache")).unwrap();

    let within = GcConfig {
        envs_root: env.envs_root().to_owned(),
        grace: Duration::from_secs(3600),
        node: node_name(),
    };
    let report = gc::run_once(&pool, &within, false).await.unwrap();
    assert!(
        report.removed.is_empty() && report.kept_in_use.is_empty(),
        "within the grace nothing goes: {report:?}"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let past = GcConfig {
        grace: Duration::from_secs(1),
        ..within
    };
    let report = gc::run_once(&pool, &past, false).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.kept_in_use.len(), 1, "{report:?}");
    assert!(
        report.kept_in_use[0]
            .reason
            .contains(&format!("pid {}", process.id())),
        "{report:?}"
    );
    assert!(old_dir.is_dir());

    std::fs::write(&go, "").unwrap();
    let out = process.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0.1.0",
        "it kept importing from the old build"
    );

    let report = gc::run_once(&pool, &past, false).await.unwrap();
    assert_eq!(
        report
            .removed
            .iter()
            .map(|r| r.path.as_path())
            .collect::<Vec<_>>(),
        [old_dir.as_path()]
    );
    assert!(!old_dir.exists());
    let current = row(&pool, id).await;
    assert!(
        Path::new(current.metadata["build_dir"].as_str().unwrap()).is_dir(),
        "the current build stays"
    );
    assert!(
        env.envs_root().join("README.txt").exists()
            && env.envs_root().join("p/notes.txt").exists()
            && env.envs_root().join("p/.cache").is_dir()
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_deleted_pack_loses_its_environments_after_the_grace_and_dry_run_only_lists(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    env.pack_dir("gone", &[]);
    env.pack_dir("kept", &[]);
    add_runtime(
        &pool,
        "t.env",
        shell_runtime("echo built > {env_path}/marker"),
    )
    .await;
    for p in ["gone", "kept"] {
        add_pack(&pool, p).await;
        request(&pool, p, "t.env").await;
    }
    env.worker(&pool).drain().await.unwrap();
    sqlx::query("DELETE FROM pack WHERE ref = 'gone'")
        .execute(&pool)
        .await
        .unwrap();
    let before = tree(env.envs_root());

    let cfg = GcConfig {
        envs_root: env.envs_root().to_owned(),
        grace: Duration::from_secs(3600),
        node: node_name(),
    };
    assert!(
        gc::run_once(&pool, &cfg, true)
            .await
            .unwrap()
            .removed
            .is_empty(),
        "not before the grace"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cfg = GcConfig {
        grace: Duration::from_secs(1),
        ..cfg
    };
    let dry = gc::run_once(&pool, &cfg, true).await.unwrap();
    let listed: Vec<String> = dry.removed.iter().map(|r| r.to_string()).collect();
    assert_eq!(dry.removed.len(), 2, "the link and its build: {listed:?}");
    assert!(
        listed[0].contains("gone/t.env: no pack_environment row"),
        "{listed:?}"
    );
    assert!(listed[1].contains("gone/.t.env-"), "{listed:?}");
    assert_eq!(tree(env.envs_root()), before, "a dry run removes nothing");

    let report = gc::run_once(&pool, &cfg, false).await.unwrap();
    assert_eq!(
        report.removed, dry.removed,
        "the pass removes what the dry run listed"
    );
    assert!(
        !env.envs_root().join("gone").exists(),
        "{:?}",
        tree(env.envs_root())
    );
    assert!(env.envs_root().join("kept/t.env/marker").exists());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_request_with_unchanged_inputs_finishes_without_running_a_step(pool: PgPool) {
    let env = Env::new(&[]);
    let (pack, wheels, id, built) = ready_python_pack(&pool, &env).await;

    let before: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let worker = env.worker(&pool);
    let shutdown = worker.shutdown();
    let daemon = tokio::spawn({
        let s = shutdown.clone();
        async move { worker.run(&s, false).await }
    });
    // Started: its node checked what it can build, and registered. (A request before would
    // wait for the start-up, which is not what this measures.)
    eventually(Duration::from_secs(60), "the node registered", || async {
        sqlx::query_scalar::<_, bool>("SELECT last_seen > $1 FROM packenvd_node")
            .bind(before)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .unwrap_or(false)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    request(&pool, "p", "core.python").await;
    eventually(Duration::from_secs(5), "ready again", || async {
        status_of(&pool, id).await == "ready"
    })
    .await;
    let took = asked.elapsed();
    let again = row(&pool, id).await;
    assert_eq!(
        again.metadata["build_id"], built.metadata["build_id"],
        "nothing was rebuilt"
    );
    let log = again.install_log.unwrap();
    let (note, kept) = log
        .split_once(packenvd::store::CURRENT_BUILD_LOG)
        .expect("the current build's log kept below the note");
    assert!(
        note.contains("already up to date") && !note.contains("==> step"),
        "{log}"
    );
    assert_eq!(
        kept.trim_start(),
        built.install_log.as_deref().unwrap().trim_start(),
        "the build's own log, as it was"
    );
    assert!(took < Duration::from_millis(100), "took {took:?}");
    println!(
        "FIGURE unchanged request answered in {} ms",
        took.as_millis()
    );

    // Changed inputs: the same request rebuilds, with a new fingerprint.
    std::fs::write(
        pack.join("requirements.txt"),
        offline_requirements(&wheels, "0.1.0") + "# pinned\n",
    )
    .unwrap();
    request(&pool, "p", "core.python").await;
    eventually(Duration::from_secs(60), "the rebuild", || async {
        let r = row(&pool, id).await;
        r.status == "ready" && r.metadata["build_id"] != built.metadata["build_id"]
    })
    .await;
    let rebuilt = row(&pool, id).await;
    assert!(built.fingerprint.is_some() && rebuilt.fingerprint.is_some());
    assert_ne!(
        built.fingerprint, rebuilt.fingerprint,
        "changing requirements.txt changes the fingerprint"
    );

    // An operator's reset rebuilds even though nothing changed.
    let before_reset = row(&pool, id).await.metadata["build_id"].clone();
    reset(&pool, id).await;
    eventually(Duration::from_secs(60), "the forced rebuild", || async {
        let r = row(&pool, id).await;
        r.status == "ready" && r.metadata["build_id"] != before_reset
    })
    .await;
    shutdown.stop.cancel();
    daemon.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_second_build_reads_its_packages_from_its_packs_cache(pool: PgPool) {
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    make_wheel(&wheels, "0.1.0");
    let index = IndexServer::start(&wheels, env.dir.path().join("index.log"));
    // Steps may connect to the registry ports only; this index is on a port of its own.
    let mut env = env;
    env.settings.step_tcp_ports = packenvd::config::Ports(Some(vec![index.port]));
    let reqs = format!(
        "--index-url http://127.0.0.1:{}/simple/\n--trusted-host 127.0.0.1\npackenvd-fixture==0.1.0\n",
        index.port
    );
    env.pack_dir("p", &[("requirements.txt", &reqs)]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let cold = row(&pool, id).await;
    assert_eq!(cold.status, "ready", "{:?}", cold.install_error);
    let wheel_fetches = || {
        index
            .requests()
            .iter()
            .filter(|p| p.ends_with(".whl"))
            .count()
    };
    // pip fetches a wheel once; uv may look at it more than once (its metadata, then all).
    let cold_fetches = wheel_fetches();
    assert!(cold_fetches >= 1, "{:?}", index.requests());
    reset(&pool, id).await;
    env.worker(&pool).drain().await.unwrap();
    let warm = row(&pool, id).await;
    assert_eq!(warm.status, "ready");
    assert_ne!(
        warm.metadata["build_id"], cold.metadata["build_id"],
        "a real rebuild"
    );
    // The rebuild fetched no wheel: it took it from the cache (uv's or pip's, as the host has
    // uv or not).
    assert_eq!(wheel_fetches(), cold_fetches, "{:?}", index.requests());
    // The pack's own cache: caches are never shared between packs.
    let cache = env.settings.cache_dir.join("python").join("p");
    assert!(cache.join("uv").is_dir() || cache.join("pip").is_dir());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_uv_runtime_builds_the_same_pack_and_its_venv_imports_the_package(pool: PgPool) {
    assert!(
        std::process::Command::new("uv")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "uv is not installed: `python3 -m pip install uv` (.ci/run does)"
    );
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    make_wheel(&wheels, "0.1.0");
    env.pack_dir(
        "p",
        &[("requirements.txt", &offline_requirements(&wheels, "0.1.0"))],
    );
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python-uv").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(
        r.status,
        "ready",
        "{:?}\n{}",
        r.install_error,
        r.install_log.unwrap_or_default()
    );
    assert_eq!(
        Path::new(r.env_path.as_deref().unwrap()),
        env.envs_root().join("p/python-uv")
    );
    assert_eq!(
        python(
            &python_of(&r),
            "import packenvd_fixture; print(packenvd_fixture.VERSION)"
        ),
        "0.1.0"
    );
    assert!(
        env.settings.cache_dir.join("python-uv/p/uv").is_dir(),
        "uv used the pack's cache"
    );
}
