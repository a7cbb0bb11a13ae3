//! The queue contract: claiming, NOTIFY pickup, operator resets, the schema.

mod common;

use std::time::{Duration, Instant};

use common::*;
use packenvd::store;
use sqlx::PgPool;

/// Claims `batch` rows at a time as `instance` until nothing is left; returns the ids.
async fn claim_until_empty(pool: &PgPool, instance: &str, batch: i64) -> Vec<i64> {
    let mut got = Vec::new();
    loop {
        let rows = store::claim(
            pool,
            &node_name(),
            instance,
            Duration::from_secs(60),
            batch,
            std::path::Path::new("/envs"),
        )
        .await
        .unwrap();
        if rows.is_empty() {
            return got;
        }
        got.extend(rows.into_iter().map(|c| c.row.id));
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn two_concurrent_claimers_get_disjoint_rows(pool: PgPool) {
    register_node(&pool, "/envs").await;
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    for i in 0..200 {
        add_pack(&pool, &format!("p{i}")).await;
        request(&pool, &format!("p{i}"), "t.noop").await;
    }
    let (a, b) = tokio::join!(
        claim_until_empty(&pool, "a", 7),
        claim_until_empty(&pool, "b", 5)
    );
    let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a row was claimed twice");
    assert_eq!(all.len(), 200, "every row claimed once");
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both claimers got rows: {} / {}",
        a.len(),
        b.len()
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_claim_takes_no_more_rows_than_asked_sets_the_lease_and_places_the_environment(
    pool: PgPool,
) {
    register_node(&pool, "/envs").await;
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    for i in 0..5 {
        add_pack(&pool, &format!("p{i}")).await;
        request(&pool, &format!("p{i}"), "t.noop").await;
    }
    add_pack(&pool, "sh").await;
    request(&pool, "sh", "core.shell").await;
    let rows = store::claim(
        &pool,
        &node_name(),
        "me",
        Duration::from_secs(60),
        2,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let (installing, leased): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'installing'),
                count(*) FILTER (WHERE lease_expires_at > now() + interval '50 seconds' AND claimed_by = 'me' AND attempts = 1)
         FROM pack_environment",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((installing, leased), (2, 2));
    // env_path is assigned at claim from the daemon's envs root...
    let paths: Vec<Option<String>> = rows.iter().map(|c| c.row.env_path.clone()).collect();
    assert_eq!(
        paths,
        [
            Some("/envs/p0/t.noop".to_string()),
            Some("/envs/p1/t.noop".to_string())
        ]
    );
    // ...but not for a runtime that needs no environment.
    sqlx::query(
        "UPDATE pack_environment_node n SET run_after = now() + interval '1 hour'
         FROM pack_environment pe WHERE pe.id = n.env_id AND pe.pack_ref <> 'sh'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let shell = store::claim(
        &pool,
        &node_name(),
        "me",
        Duration::from_secs(60),
        5,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap();
    assert_eq!(shell.len(), 1);
    assert_eq!(shell[0].row.env_path, None);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn outdated_rows_are_claimed_like_pending_ones(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.noop").await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(row(&pool, id).await.status, "ready");
    sqlx::query("UPDATE pack_environment SET status = 'outdated' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let claimed = store::claim(
        &pool,
        &node_name(),
        "me",
        Duration::from_secs(60),
        10,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap();
    assert_eq!(claimed.iter().map(|c| c.row.id).collect::<Vec<_>>(), [id]);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_claim_reads_the_partial_index_even_on_an_all_pending_table(pool: PgPool) {
    register_node(&pool, "/envs").await;
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    sqlx::query(
        "INSERT INTO pack (ref, label) SELECT 'p' || i, 'p' FROM generate_series(1, 5000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO pack_environment (pack, runtime) SELECT p.id, r.id FROM pack p, runtime r WHERE r.ref = 't.noop'")
        .execute(&pool)
        .await
        .unwrap();
    for finished in [false, true] {
        if finished {
            // Most rows done: the claim must not walk them.
            sqlx::query("UPDATE pack_environment_node SET status = 'ready' WHERE id % 100 <> 0")
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::query("ANALYZE pack_environment_node")
            .execute(&pool)
            .await
            .unwrap();
        // The claim statement itself, as the daemon sends it, with both lanes open.
        let plan: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {}", *store::CLAIM_SQL))
            .bind("explain")
            .bind(60.0f64)
            .bind(8i64)
            .bind("/envs")
            .bind(node_name())
            .bind(64i64)
            .bind(vec![1i64, 2])
            .bind(vec![3i64])
            .bind(None::<Vec<i64>>)
            .fetch_all(&pool)
            .await
            .unwrap();
        let lines: Vec<String> = plan.into_iter().map(|(l,)| l).collect();
        let text = lines.join("\n");
        // Each lane's CTE subtree: the lines below "CTE b" (builds) and "CTE a" (answers),
        // indented deeper than it.
        for (lane, index) in [
            ("CTE b", "pack_environment_node_claimable_idx"),
            ("CTE a", "pack_environment_node_answerable_idx"),
        ] {
            let start = lines
                .iter()
                .position(|l| l.trim_start().starts_with(lane))
                .unwrap_or_else(|| panic!("no {lane} in the plan:\n{text}"));
            let depth = |l: &str| l.len() - l.trim_start().len();
            let cte: Vec<&String> = lines[start + 1..]
                .iter()
                .take_while(|l| depth(l) > depth(&lines[start]))
                .collect();
            let cte_text: String = cte.iter().map(|l| format!("{l}\n")).collect();
            assert!(
                cte_text.contains(index),
                "{lane}, finished={finished}:\n{text}"
            );
            assert!(
                !cte_text.contains("Sort"),
                "{lane}: the index gives the order:\n{text}"
            );
        }
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_operator_reset_is_picked_up_within_a_second_by_notify(pool: PgPool) {
    let env = Env::new(&[("poll_interval", "1m")]);
    env.pack_dir("p", &[]);
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.noop").await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(row(&pool, id).await.status, "ready");

    let worker = env.worker(&pool);
    let shutdown = worker.shutdown();
    let daemon = tokio::spawn({
        let s = shutdown.clone();
        async move { worker.run(&s, false).await }
    });
    // Let the daemon reach its idle wait (its first claim finds nothing).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reset_at = Instant::now();
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let picked_up = loop {
        let r = row(&pool, id).await;
        if r.status != "pending" || r.claim_token.is_some() {
            break reset_at.elapsed();
        }
        assert!(
            reset_at.elapsed() < Duration::from_secs(5),
            "not picked up after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        picked_up < Duration::from_secs(1),
        "picked up after {picked_up:?}"
    );
    shutdown.stop.cancel();
    daemon.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_operator_reset_of_a_failed_row_starts_its_attempts_over(pool: PgPool) {
    let env = Env::new(&[("max_attempts", "1")]);
    env.pack_dir("p", &[]);
    add_runtime(&pool, "t.fail", shell_runtime("exit 1")).await;
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.fail").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1));
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(row(&pool, id).await.attempts, 0);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_row_with_null_metadata_or_installers_never_breaks_the_claim_of_the_others(pool: PgPool) {
    let env = Env::new(&[]);
    register_node(&pool, &env.envs_root().display().to_string()).await;
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    add_runtime(&pool, "t.null", shell_runtime("true")).await;
    for p in ["a", "b", "c"] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
    }
    let a = request(&pool, "a", "t.noop").await;
    let b = request(&pool, "b", "t.noop").await;
    let c = request(&pool, "c", "t.null").await;
    // A platform's columns may allow NULL where packenvd's do not: one such row used to fail
    // every claim's decoding ("database unreachable?"), leaving the batch installing.
    sqlx::raw_sql(
        "ALTER TABLE pack_environment_node ALTER COLUMN metadata DROP NOT NULL;
         UPDATE pack_environment_node n SET metadata = NULL
         FROM pack_environment pe WHERE pe.id = n.env_id AND pe.pack_ref = 'b';
         ALTER TABLE runtime ALTER COLUMN installers DROP NOT NULL;
         UPDATE runtime SET installers = NULL WHERE ref = 't.null';",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(env.worker(&pool).drain().await.unwrap(), 3);
    assert_eq!(row(&pool, a).await.status, "ready");
    assert_eq!(row(&pool, b).await.status, "ready");
    let r = row(&pool, c).await;
    assert_eq!(r.status, "failed");
    let error = r.install_error.unwrap();
    assert!(error.contains("has no installer step"), "{error}");
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_a_database_that_already_has_pack_and_runtime_tables(pool: PgPool) {
    // Tables as a platform that predates packenvd might have them: no storage_path, no installers.
    sqlx::raw_sql(
        "CREATE TABLE pack (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, label TEXT NOT NULL,
                            version TEXT NOT NULL DEFAULT '1.0.0', description TEXT);
         CREATE TABLE runtime (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                               description TEXT);
         INSERT INTO pack (ref, label) VALUES ('legacy', 'Legacy pack');
         INSERT INTO runtime (ref, name) VALUES ('core.python', 'Python');
         ALTER TABLE runtime ADD COLUMN installers JSONB;
         INSERT INTO runtime (ref, name, installers)
             VALUES ('core.nodejs', 'Node.js', '[{\"name\": \"ours\", \"command\": \"true\"}]');",
    )
    .execute(&pool)
    .await
    .unwrap();
    store::MIGRATOR.run(&pool).await.unwrap();
    // Running them again is a no-op.
    store::MIGRATOR.run(&pool).await.unwrap();
    let id = request(&pool, "legacy", "core.shell").await;
    assert_eq!(row(&pool, id).await.status, "pending");
    let seeded: Vec<String> = sqlx::query_scalar("SELECT ref FROM runtime ORDER BY ref")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        seeded,
        [
            "core.native",
            "core.nodejs",
            "core.python",
            "core.python-uv",
            "core.shell"
        ]
    );
    // The platform's core.python had no installers: it gets packenvd's, rather than building
    // empty environments; its own core.nodejs definition is kept as it is.
    let installers = |r: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(
                "SELECT installers FROM runtime WHERE ref = $1",
            )
            .bind(r)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let python = installers("core.python").await;
    assert_eq!(python["interpreter"], "python");
    assert!(python["installers"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    assert_eq!(
        installers("core.nodejs").await,
        serde_json::json!([{"name": "ours", "command": "true"}])
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn sql_helpers_answer_as_documented(pool: PgPool) {
    add_pack(&pool, "web").await;
    let path: String = sqlx::query_scalar("SELECT get_pack_environment_path('web', 'core.python')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(path, "/opt/attune/packenvs/web/python");
    let (py, sh): (bool, bool) = sqlx::query_as("SELECT runtime_requires_environment('core.python'), runtime_requires_environment('core.shell')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(py && !sh);
    let err = sqlx::query("SELECT request_pack_environment('nope', 'core.python')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no pack with ref nope"), "{err}");
    // A plain insert with ids only gets its refs filled in.
    sqlx::query("INSERT INTO pack_environment (pack, runtime) SELECT p.id, r.id FROM pack p, runtime r WHERE p.ref = 'web' AND r.ref = 'core.shell'")
        .execute(&pool)
        .await
        .unwrap();
    let refs: (String, String) =
        sqlx::query_as("SELECT pack_ref, runtime_ref FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(refs, ("web".into(), "core.shell".into()));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_daemons_sessions_plan_once_by_index_and_the_commands_keep_the_defaults(pool: PgPool) {
    let url = database_url(&pool);
    let settings = |pool: PgPool| async move {
        let row: (String, String, String) = sqlx::query_as(
            "SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan'),
                    current_setting('jit')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        row
    };
    let daemon = store::connect(&url, 2, store::Workload::Daemon)
        .await
        .unwrap();
    assert_eq!(
        settings(daemon.clone()).await,
        ("force_generic_plan".into(), "off".into(), "off".into())
    );
    daemon.close().await;
    let command = store::connect(&url, 2, store::Workload::Command)
        .await
        .unwrap();
    let defaults = settings(pool.clone()).await;
    assert_eq!(settings(command.clone()).await, defaults);
    assert_eq!(defaults.0, "auto");
    command.close().await;
}

/// A generic plan knows neither the claim's LIMIT nor the write-back's arrays: PostgreSQL then
/// guesses a tenth of the queue, and on an analyzed queue of thousands it joined the claimed
/// rows to the node table by merging whole indexes, a scan of every node row per claim. The
/// daemon's plans must be lookups by key whatever the queue's size.
#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_daemons_plans_stay_lookups_by_key_on_a_large_analyzed_queue(pool: PgPool) {
    register_node(&pool, "/envs").await;
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    sqlx::query(
        "INSERT INTO pack (ref, label) SELECT 'p' || g, '' FROM generate_series(1, 20000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO pack_environment (pack, runtime)
         SELECT p.id, r.id FROM pack p, runtime r WHERE r.ref = 't.noop'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();

    let daemon = store::connect(&database_url(&pool), 1, store::Workload::Daemon)
        .await
        .unwrap();
    let mut conn = daemon.acquire().await.unwrap();
    let statements = [
        (
            "claim",
            "text, float8, int8, text, text, int8, int8[], int8[], int8[]",
            store::CLAIM_SQL.as_str(),
            "('i', 60, 4, '/envs', 'n', 64, '{}', '{}', NULL)",
        ),
        (
            "write_ready",
            "int8[], uuid[], text[], text[], text[], text[]",
            store::WRITE_READY_SQL[0].as_str(),
            "('{1}', ARRAY[gen_random_uuid()], '{/e}', '{}', '{\"{}\"}', '{f}')",
        ),
        (
            "write_ready_locking",
            "int8[], uuid[], text[], text[], text[], text[]",
            store::WRITE_READY_SQL[1].as_str(),
            "('{1}', ARRAY[gen_random_uuid()], '{/e}', '{}', '{\"{}\"}', '{f}')",
        ),
    ];
    for (name, types, sql, args) in statements {
        sqlx::raw_sql(&format!("PREPARE {name}({types}) AS {sql}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name}{args}"))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        for shape in ["Merge Join", "Hash Join", "Seq Scan"] {
            assert!(
                !plan.contains(shape),
                "{name}'s plan has a {shape}:\n{plan}"
            );
        }
    }
}

/// The parent's counts after a write-back must be what a recount from the node rows gives,
/// whether the parent still counted the build (the common case, written without reading the
/// row first) or stopped counting it while it ran (its node was declared gone meanwhile).
#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_batch_write_back_keeps_the_counts_whether_the_parent_counted_the_build_or_not(
    pool: PgPool,
) {
    let [counted, uncounted, lost] =
        <[store::Claim; 3]>::try_from(claimed(&pool, &["counted", "uncounted", "lost"]).await)
            .unwrap();
    // What a gone node's withdrawal does to one row it was building.
    sqlx::query("UPDATE pack_environment_node SET required = false WHERE id = $1")
        .bind(uncounted.fence.id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pack_environment_recount($1)")
        .bind(uncounted.row.env_id)
        .execute(&pool)
        .await
        .unwrap();
    let stale = store::Fence {
        id: lost.fence.id,
        token: uuid::Uuid::new_v4(),
    };
    let mut conn = pool.acquire().await.unwrap();
    let written = store::finish_all(
        &mut conn,
        &[
            (counted.fence, built()),
            (uncounted.fence, built()),
            (stale, built()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(written, [true, true, false]);

    let counts = "SELECT pe.pack_ref, pe.status::text, pe.nodes_pending, pe.nodes_installing,
                         pe.nodes_ready, pe.nodes_failed, pe.nodes_outdated
                  FROM pack_environment pe ORDER BY pe.pack_ref";
    type Counts = (String, String, i32, i32, i32, i32, i32);
    let kept: Vec<Counts> = sqlx::query_as(counts).fetch_all(&pool).await.unwrap();
    sqlx::query("SELECT pack_environment_recount(id) FROM pack_environment")
        .execute(&pool)
        .await
        .unwrap();
    let recounted: Vec<Counts> = sqlx::query_as(counts).fetch_all(&pool).await.unwrap();
    assert_eq!(kept, recounted);
    assert_eq!(
        kept,
        [
            ("counted".into(), "ready".into(), 0, 0, 1, 0, 0),
            ("lost".into(), "installing".into(), 0, 1, 0, 0, 0),
            ("uncounted".into(), "ready".into(), 0, 0, 1, 0, 0),
        ]
    );
}

/// Requests a t.noop environment for each of `packs` on the tests' node and claims them all;
/// returns the claims in the order of `packs`.
async fn claimed(pool: &PgPool, packs: &[&str]) -> Vec<store::Claim> {
    register_node(pool, "/envs").await;
    add_runtime(pool, "t.noop", shell_runtime("true")).await;
    for p in packs {
        add_pack(pool, p).await;
        request(pool, p, "t.noop").await;
    }
    let claims = store::claim(
        pool,
        &node_name(),
        "i",
        Duration::from_secs(60),
        10,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap();
    assert_eq!(claims.len(), packs.len());
    packs
        .iter()
        .map(|p| {
            claims
                .iter()
                .find(|c| c.row.pack_ref == *p)
                .expect("claimed")
                .clone()
        })
        .collect()
}

/// A build's result with nothing in it, for the write-back.
fn built() -> store::Transition {
    store::Transition::Ready {
        env_path: None,
        metadata: serde_json::json!({}),
        fingerprint: None,
        log: "built".into(),
    }
}

/// Whoever waits for an environment hears once when it becomes ready or failed: from the
/// write-back's own statement, and from the parent's trigger when someone else sets the status.
#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_parent_that_becomes_ready_or_failed_notifies_once(pool: PgPool) {
    let claims = claimed(&pool, &["good", "bad"]).await;
    let ids: Vec<i64> = claims.iter().map(|c| c.row.env_id).collect();
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("pack_environment_status").await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let failed = store::Transition::Failed {
        error: "broken".into(),
        log: String::new(),
    };
    let written = store::finish_all(
        &mut conn,
        &[(claims[0].fence, built()), (claims[1].fence, failed)],
    )
    .await
    .unwrap();
    assert_eq!(written, [true, true]);
    // Someone else's write: the platform marks the good one failed itself.
    sqlx::query("UPDATE pack_environment SET status = 'failed' WHERE id = $1")
        .bind(ids[0])
        .execute(&pool)
        .await
        .unwrap();

    let mut heard = Vec::new();
    while let Ok(note) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        heard.push(note.unwrap().payload().to_string());
    }
    heard.sort();
    let mut expected = vec![
        format!("{} ready", ids[0]),
        format!("{} failed", ids[1]),
        format!("{} failed", ids[0]),
    ];
    expected.sort();
    assert_eq!(heard, expected);
}

/// The daemons' wake-up names only `run_after`: every write that makes a node row claimable
/// sets it, including the two a daemon makes itself, a retry and a failed verification.
#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_retry_and_a_failed_verification_wake_the_node(pool: PgPool) {
    let claims = claimed(&pool, &["retried", "verified"]).await;
    let ids: Vec<i64> = claims.iter().map(|c| c.row.env_id).collect();
    let mut conn = pool.acquire().await.unwrap();
    let written = store::finish_all(&mut conn, &[(claims[1].fence, built())])
        .await
        .unwrap();
    assert_eq!(written, [true]);
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("packenvd_wakeup").await.unwrap();
    async fn heard(listener: &mut sqlx::postgres::PgListener) -> String {
        tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("a wake-up")
            .unwrap()
            .payload()
            .to_string()
    }

    let retry = store::Transition::Retry {
        after: Duration::ZERO,
        error: "flaky".into(),
        log: String::new(),
    };
    assert!(store::finish(&pool, claims[0].fence, retry).await.unwrap());
    assert_eq!(heard(&mut listener).await, node_name());

    let (node_row, checked_at): (i64, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT id, last_verified FROM pack_environment_node WHERE env_id = $1")
            .bind(ids[1])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        store::finish_verification(&pool, node_row, checked_at, Some("python is gone"))
            .await
            .unwrap()
    );
    assert_eq!(heard(&mut listener).await, node_name());
    assert_eq!(status_of(&pool, ids[1]).await, "outdated");
}
