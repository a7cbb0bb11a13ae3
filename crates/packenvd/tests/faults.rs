//! Crash safety (DESIGN §2, §3), proven with real daemon processes and a real PostgreSQL:
//! kill -9, many instances, operator resets mid-build, a database outage, SIGTERM, retries.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_build_whose_daemon_was_killed_is_rebuilt_by_another_after_the_lease(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.slow",
        json!([{"name": "slow", "command": "sleep", "args": ["2"]}]),
    )
    .await;
    let id = request(&pool, "p", "t.slow").await;
    let url = database_url(&pool);
    let fast = [
        ("PACKENVD_LEASE", "3s"),
        ("PACKENVD_POLL_INTERVAL", "200ms"),
    ];

    let a = Daemon::spawn(&env, &url, "a", &fast, &[]);
    eventually(Duration::from_secs(10), "a to claim the row", || async {
        status_of(&pool, id).await == "installing"
    })
    .await;
    a.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    drop(a);

    let _b = Daemon::spawn(&env, &url, "b", &fast, &[]);
    eventually(Duration::from_secs(20), "b to rebuild the row", || async {
        status_of(&pool, id).await == "ready"
    })
    .await;
    let recovery = killed_at.elapsed();
    let r = row(&pool, id).await;
    assert_eq!(r.attempts, 2, "the killed attempt counts");
    let installing: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'installing'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(installing, 0);
    // Lease 3 s, heartbeat/rescue every 1 s, then a 2 s build.
    assert!(
        recovery < Duration::from_secs(12),
        "recovered after {recovery:?}"
    );
    println!(
        "FIGURE kill -9 recovery: {:.1} s from kill to ready (lease 3 s, build 2 s)",
        recovery.as_secs_f64()
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn four_daemons_build_two_thousand_rows_each_exactly_once(pool: PgPool) {
    let env = Env::new(&[]);
    let out = env.scratch().join("built.txt");
    add_runtime(&pool, "t.append", json!({
        "installers": [{"name": "append", "command": "sh", "args": ["-c", format!("echo {{pack_ref}} >> {}", out.display())]}],
        "requires_environment": true
    }))
    .await;
    sqlx::query("INSERT INTO pack (ref, label, storage_path) SELECT 'p' || i, 'p', $1 FROM generate_series(1, 2000) i")
        .bind(env.settings.packs_dir.display().to_string())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO pack_environment (pack, runtime) SELECT p.id, r.id FROM pack p, runtime r WHERE r.ref = 't.append'")
        .execute(&pool)
        .await
        .unwrap();
    let url = database_url(&pool);
    let started = Instant::now();
    let mut daemons: Vec<Daemon> = (0..4)
        .map(|i| {
            Daemon::spawn(
                &env,
                &url,
                &format!("d{i}"),
                &[("PACKENVD_CONCURRENCY", "4")],
                &["--until-done"],
            )
        })
        .collect();
    for d in &mut daemons {
        assert!(
            d.wait_exit(Duration::from_secs(240)).is_some(),
            "daemon did not finish:\n{}",
            d.output()
        );
    }
    let took = started.elapsed();
    let text = std::fs::read_to_string(&out).unwrap();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        *seen.entry(line).or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "built more than once: {duplicates:?}"
    );
    assert_eq!(seen.len(), 2000, "every row built");
    let ready: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'ready'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(ready, 2000);
    let by: Vec<(String, i64)> = sqlx::query_as(
        "SELECT metadata->>'build_id' IS NOT NULL, count(*) FROM pack_environment GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .map(|v: Vec<(bool, i64)>| v.into_iter().map(|(b, n)| (b.to_string(), n)).collect())
    .unwrap();
    println!(
        "FIGURE 4 daemons x 2000 rows: {:.1} s, duplicates 0, lost 0 ({by:?})",
        took.as_secs_f64()
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_operator_reset_mid_build_cancels_it_and_the_final_ready_comes_from_a_later_build(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(&pool, "t.slow", json!([{"name": "slow", "command": "sh", "args": ["-c", "date +%s%N > {env_path}/started; sleep 4"]}])).await;
    let id = request(&pool, "p", "t.slow").await;
    let url = database_url(&pool);
    let d = Daemon::spawn(
        &env,
        &url,
        "a",
        &[("PACKENVD_LEASE", "3s"), ("PACKENVD_CONCURRENCY", "1")],
        &[],
    );
    eventually(Duration::from_secs(10), "the first claim", || async {
        status_of(&pool, id).await == "installing"
    })
    .await;
    let first = row(&pool, id).await.claim_token.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reset_at_ns: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1e9)::int8")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "ready after the reset", || async {
        status_of(&pool, id).await == "ready"
    })
    .await;
    let r = row(&pool, id).await;
    let build_id = r.metadata["build_id"].as_str().unwrap().to_owned();
    assert_ne!(
        build_id,
        first.simple().to_string(),
        "the stale build's result was written"
    );
    let started: i64 = std::fs::read_to_string(format!(
        "{}/started",
        r.metadata["build_dir"].as_str().unwrap()
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    assert!(
        started > reset_at_ns,
        "the final build started before the reset"
    );
    assert!(
        d.output().contains("claim lost"),
        "the stale build was not cancelled:\n{}",
        d.output()
    );
    // The stale build was cancelled well before its 4 s step could finish, and its directory is gone.
    let stale_dir = env
        .envs_root()
        .join(format!("p/.t.slow-{}", first.simple()));
    assert!(!stale_dir.exists());
}

#[sqlx::test(migrations = false)]
async fn the_daemon_survives_a_database_outage_and_every_result_reaches_the_table(_pool: PgPool) {
    // Its own cluster: stopping the shared one would break every other test.
    let cluster = PrivateCluster::start();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url())
        .await
        .unwrap();
    packenvd::store::MIGRATOR.run(&pool).await.unwrap();
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.work",
        json!([{"name": "work", "command": "sleep", "args": ["3"]}]),
    )
    .await;
    for i in 0..6 {
        let pack = format!("p{i}");
        env.pack_dir(&pack, &[]);
        add_pack(&pool, &pack).await;
        request(&pool, &pack, "t.work").await;
    }
    let mut d = Daemon::spawn(
        &env,
        &cluster.url(),
        "a",
        &[
            ("PACKENVD_CONCURRENCY", "6"),
            ("PACKENVD_POLL_INTERVAL", "500ms"),
        ],
        &[],
    );
    // Down while the builds run (each sleeps 3 s), so their results wait for it.
    eventually(Duration::from_secs(30), "builds running", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pack_environment_node WHERE status = 'installing'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == 6
    })
    .await;
    pool.close().await;
    cluster.ctl("stop");
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon exited during the outage:\n{}",
        d.output()
    );
    cluster.ctl("start");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "all six ready", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'ready'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n == 6
    })
    .await;
    let back = stopped_at.elapsed();
    assert!(
        d.output().contains("cannot write results back"),
        "{}",
        d.output()
    );
    println!(
        "FIGURE outage: database down 10 s, all 6 results written {:.1} s after it stopped; lost 0",
        back.as_secs_f64()
    );
    pool.close().await;
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn sigterm_hands_running_builds_back_and_leaves_no_child_process(pool: PgPool) {
    let env = Env::new(&[]);
    let needle = format!("packenvd-sigterm-{}", std::process::id());
    add_runtime(
        &pool,
        "t.long",
        json!([{"name": "long", "command": "sh", "args": ["-c", format!("sleep 300 # {needle}")]}]),
    )
    .await;
    add_runtime(
        &pool,
        "t.quick",
        json!([{"name": "quick", "command": "sleep", "args": ["1"]}]),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let pack = format!("p{i}");
        env.pack_dir(&pack, &[]);
        add_pack(&pool, &pack).await;
        ids.push(request(&pool, &pack, if i == 0 { "t.quick" } else { "t.long" }).await);
    }
    let url = database_url(&pool);
    let mut d = Daemon::spawn(
        &env,
        &url,
        "a",
        &[
            ("PACKENVD_CONCURRENCY", "3"),
            ("PACKENVD_SHUTDOWN_GRACE", "2s"),
        ],
        &[],
    );
    eventually(Duration::from_secs(10), "three builds running", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'installing'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.signal(Signal::SIGTERM);
    let took = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon did not exit within grace + 8 s");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(
        processes_with(&needle).is_empty(),
        "step processes survived: {:?}",
        processes_with(&needle)
    );
    let statuses: Vec<(String, i32)> =
        sqlx::query_as("SELECT status::text, attempts FROM pack_environment ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    // The quick build finished within the grace; the long ones were handed back unspent.
    assert_eq!(
        statuses,
        [
            ("ready".into(), 1),
            ("pending".into(), 0),
            ("pending".into(), 0)
        ],
        "{}",
        d.output()
    );
}

/// Makes every waiting retry due now, as if its backoff had passed.
async fn due_now(pool: &PgPool) {
    sqlx::query("UPDATE pack_environment_node SET run_after = now() WHERE status = 'pending'")
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_that_fails_twice_then_succeeds_ends_ready_after_growing_waits(pool: PgPool) {
    let env = Env::new(&[("retry_backoff", "300ms"), ("max_attempts", "3")]);
    let counter = env.scratch().join("count");
    let script = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 3 ]",
        c = counter.display()
    );
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.flaky",
        json!([{"name": "flaky", "command": "sh", "args": ["-c", script]}]),
    )
    .await;
    let id = request(&pool, "p", "t.flaky").await;
    let worker = env.worker(&pool);
    let mut waits = Vec::new();
    loop {
        worker.drain().await.unwrap();
        let (status, wait): (String, f64) =
            sqlx::query_as("SELECT status::text, extract(epoch FROM run_after - updated)::float8 FROM pack_environment WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        if status != "pending" {
            assert_eq!(status, "ready");
            break;
        }
        waits.push(wait);
        // The wait is recorded; bring the retry forward instead of sleeping through it.
        due_now(&pool).await;
    }
    assert_eq!(row(&pool, id).await.attempts, 3);
    assert_eq!(waits.len(), 2);
    assert!(waits[1] > waits[0], "waits did not grow: {waits:?}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_that_always_fails_ends_failed_after_max_attempts(pool: PgPool) {
    let env = Env::new(&[("retry_backoff", "50ms"), ("max_attempts", "3")]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.broken",
        json!([{"name": "broken", "command": "sh", "args": ["-c", "echo boom; exit 4"]}]),
    )
    .await;
    let id = request(&pool, "p", "t.broken").await;
    let worker = env.worker(&pool);
    for _ in 0..20 {
        worker.drain().await.unwrap();
        if status_of(&pool, id).await == "failed" {
            break;
        }
        due_now(&pool).await;
    }
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 3));
    assert!(r.install_error.unwrap().contains("exited with status 4"));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_late_write_back_is_fenced_out_after_a_rescue(pool: PgPool) {
    register_node(&pool, "/envs").await;
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.noop").await;
    let claimed = packenvd::store::claim(
        &pool,
        &node_name(),
        "a",
        Duration::from_secs(60),
        1,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap();
    let token = claimed[0].fence.token;
    // The lease runs out (as if the holder paused), another instance rescues and reclaims.
    sqlx::query("UPDATE pack_environment_node SET lease_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        packenvd::store::rescue_expired(&pool, &node_name(), 3)
            .await
            .unwrap(),
        1
    );
    let again = packenvd::store::claim(
        &pool,
        &node_name(),
        "b",
        Duration::from_secs(60),
        1,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap();
    assert_eq!(again.len(), 1);
    // The first holder's result and heartbeat now match nothing.
    let late = packenvd::store::Transition::Ready {
        env_path: None,
        metadata: json!({}),
        fingerprint: None,
        log: "late".into(),
    };
    let fence = packenvd::store::Fence { id, token };
    assert!(!packenvd::store::finish(&pool, fence, late).await.unwrap());
    assert!(
        packenvd::store::heartbeat(&pool, &[fence], Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    let r = row(&pool, id).await;
    assert_eq!(
        (r.status.as_str(), r.claim_token),
        ("installing", Some(again[0].fence.token))
    );
    // A rescue never touches a row whose lease is still running.
    assert_eq!(
        packenvd::store::rescue_expired(&pool, &node_name(), 3)
            .await
            .unwrap(),
        0
    );
}
