//! Installer step semantics: order, optional, condition, environment, output cap, timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use sqlx::PgPool;

async fn build_one(pool: &PgPool, env: &Env, installers: serde_json::Value) -> Row {
    env.pack_dir("p", &[("present.txt", "x")]);
    add_pack(pool, "p").await;
    add_runtime(pool, "t.rt", installers).await;
    let id = request(pool, "p", "t.rt").await;
    env.worker(pool).drain().await.unwrap();
    row(pool, id).await
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn steps_run_in_order_and_optional_failures_and_false_conditions_are_skipped(pool: PgPool) {
    let env = Env::new(&[]);
    let r = build_one(&pool, &env, json!({"installers": [
        {"name": "third", "order": 3, "command": "sh", "args": ["-c", "echo 3 >> {env_path}/trace"]},
        {"name": "first", "order": 1, "command": "sh", "args": ["-c", "echo 1 >> {env_path}/trace"]},
        {"name": "flaky", "order": 2, "optional": true, "command": "sh", "args": ["-c", "exit 7"]},
        {"name": "absent", "order": 2, "condition": {"file_exists": "missing.txt"},
         "command": "sh", "args": ["-c", "echo absent >> {env_path}/trace"]},
        {"name": "present", "order": 2, "condition": {"file_exists": "{pack_path}/present.txt"},
         "command": "sh", "args": ["-c", "echo 2 >> {env_path}/trace"]}
    ]}))
    .await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let trace = std::fs::read_to_string(format!("{}/trace", r.env_path.unwrap())).unwrap();
    assert_eq!(trace, "1\n2\n3\n");
    let log = r.install_log.unwrap();
    assert!(
        log.contains("optional step 'flaky'")
            && log.contains("exited with status 7")
            && log.contains("skipped"),
        "{log}"
    );
    assert!(log.contains("'absent' skipped"), "{log}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_sees_only_the_allowed_environment(pool: PgPool) {
    std::env::set_var("PACKENVD_TEST_SECRET", "hunter2");
    std::env::set_var("DATABASE_URL_COPY", "postgres://secret");
    let env = Env::new(&[]);
    let r = build_one(&pool, &env, json!({"installers": [
        {"name": "dump", "command": "sh", "args": ["-c", "env > {env_path}/env.txt"], "env": {"STEP_OWN": "{pack_ref}"}}
    ]}))
    .await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let dump = std::fs::read_to_string(format!("{}/env.txt", r.env_path.unwrap())).unwrap();
    let names: Vec<&str> = dump.lines().filter_map(|l| l.split('=').next()).collect();
    for forbidden in [
        "DATABASE_URL",
        "PACKENVD_TEST_SECRET",
        "DATABASE_URL_COPY",
        "PIP_FIND_LINKS",
        "NOTIFY_SOCKET",
    ] {
        assert!(
            !names.contains(&forbidden),
            "{forbidden} leaked into the step:\n{dump}"
        );
    }
    assert!(!dump.contains("hunter2"));
    assert!(dump.contains("STEP_OWN=p\n"), "{dump}");
    assert!(dump.contains("PIP_CACHE_DIR="), "{dump}");
    let allowed = [
        "PATH",
        "HOME",
        "LANG",
        "PWD",
        "SHLVL",
        "_",
        "STEP_OWN",
        "PIP_CACHE_DIR",
        "npm_config_cache",
        "UV_CACHE_DIR",
        "PIP_NO_INPUT",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "npm_config_update_notifier",
        "npm_config_fund",
        "npm_config_audit",
        "PYTHONDONTWRITEBYTECODE",
    ];
    for name in names {
        assert!(
            allowed.contains(&name) || env.settings.env_passthrough.iter().any(|p| p == name),
            "unexpected variable {name}"
        );
    }
}

/// The peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs one build of `script` in a daemon process of its own and returns the row and that
/// process's peak memory: what the build cost, whatever other tests run in this process.
async fn daemon_build(pool: &PgPool, env: &Env, pack: &str, script: &str) -> (Row, u64) {
    env.pack_dir(pack, &[]);
    add_pack(pool, pack).await;
    add_runtime(pool, &format!("t.{pack}"), shell_runtime(script)).await;
    let id = request(pool, pack, &format!("t.{pack}")).await;
    let d = Daemon::spawn(
        env,
        &database_url(pool),
        pack,
        &[("PACKENVD_LOG_MAX_BYTES", "65536")],
        &[],
    );
    eventually(Duration::from_secs(60), "the build", || async {
        matches!(status_of(pool, id).await.as_str(), "ready" | "failed")
    })
    .await;
    let peak = peak_rss_kib(d.child.id());
    (row(pool, id).await, peak)
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_that_prints_50_mb_is_capped_and_memory_stays_small(pool: PgPool) {
    let env = Env::new(&[]);
    let (_, quiet) = daemon_build(&pool, &env, "quiet", "echo hello").await;
    let (r, loud) = daemon_build(
        &pool,
        &env,
        "flood",
        "echo FIRST-LINE; head -c 52428800 /dev/zero | tr '\\0' 'x'; echo; echo LAST-LINE",
    )
    .await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let log = r.install_log.unwrap();
    assert!(log.len() < 70_000, "log is {} bytes", log.len());
    assert!(
        log.contains("FIRST-LINE")
            && log.contains("LAST-LINE")
            && log.contains("bytes of output elided")
    );
    // 50 MB went through the flooding daemon; its peak grew by far less than that over a
    // daemon whose step printed one line.
    let grew = loud.saturating_sub(quiet);
    assert!(
        grew < 20 * 1024,
        "peak RSS {loud} KiB against {quiet} KiB for a quiet build"
    );
    println!("FIGURE 50 MB step: daemon peak RSS {loud} KiB, a quiet build's {quiet} KiB");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_hanging_step_is_killed_at_its_timeout_with_its_children(pool: PgPool) {
    let env = Env::new(&[("max_attempts", "1")]);
    let marker = env.scratch().join("child-survived");
    let started = Instant::now();
    let r = build_one(
        &pool,
        &env,
        json!({"installers": [
            {"name": "hang", "timeout": "1s", "command": "sh",
             "args": ["-c", format!("(sleep 3; touch {}) & sleep 600", marker.display())]}
        ]}),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(r.status, "failed");
    let error = r.install_error.unwrap();
    assert!(
        error.contains("step 'hang'") && error.contains("timed out after 1s"),
        "{error}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists(), "a child of the step outlived the timeout");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_failing_step_is_retried_with_backoff_then_failed(pool: PgPool) {
    let env = Env::new(&[("max_attempts", "2"), ("retry_backoff", "1h")]);
    let r = build_one(&pool, &env, json!({"installers": [{"name": "boom", "command": "sh", "args": ["-c", "echo network down >&2; exit 3"]}]})).await;
    assert_eq!(
        (r.status.as_str(), r.attempts),
        ("pending", 1),
        "a step failure is retried"
    );
    assert!(
        r.install_error
            .as_deref()
            .unwrap()
            .contains("exited with status 3"),
        "the error stays visible while waiting"
    );
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM run_after - now())::float8 FROM pack_environment",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!((2600.0..4600.0).contains(&wait), "next try in {wait} s");
    sqlx::query("UPDATE pack_environment_node SET run_after = now()")
        .execute(&pool)
        .await
        .unwrap();
    env.worker(&pool).drain().await.unwrap();
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status::text, attempts FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("failed", 2));
}
