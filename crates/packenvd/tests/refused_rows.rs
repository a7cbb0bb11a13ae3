//! Rows the database refuses (issue 21, attack 8): a trigger or constraint that refuses one
//! row's claim or write-back isolates that row; the rest of its batch goes on, and the row is
//! reported by id with the database's message and shown by `packenvd status`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use packenvd::services::ready_writer::{ReadyJob, ReadyWriter, Written};
use packenvd::store::{self, Transition};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The message every test's trigger raises, which the reports must carry.
const HOLD: &str = "on hold by the platform";

/// A trigger on the node rows of pack `bad`'s environment that raises when `when` holds
/// (`OLD` and `NEW` are the node row).
async fn refuse_bad_row(pool: &PgPool, when: &str) {
    // A trigger's WHEN may not read a table: the function checks the environment.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.env_id = (SELECT id FROM pack_environment WHERE pack_ref = 'bad') THEN
                 RAISE EXCEPTION 'row % is {HOLD}', NEW.id USING ERRCODE = 'P0001';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_bad BEFORE UPDATE ON pack_environment_node FOR EACH ROW
             WHEN ({when})
             EXECUTE FUNCTION refuse_bad();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Seven packs and `bad`, each asking for runtime `t.ok`; returns the environments' ids, bad's
/// third (the middle of the first claim's batch).
async fn eight_requests(env: &Env, pool: &PgPool) -> (Vec<i64>, i64) {
    add_runtime(pool, "t.ok", shell_runtime("true")).await;
    let mut good = Vec::new();
    let mut bad = 0;
    for p in ["a", "b", "bad", "c", "d", "e", "f", "g"] {
        env.pack_dir(p, &[]);
        add_pack(pool, p).await;
        let id = request(pool, p, "t.ok").await;
        if p == "bad" {
            bad = id;
        } else {
            good.push(id);
        }
    }
    (good, bad)
}

async fn node_row_of(pool: &PgPool, env_id: i64) -> i64 {
    sqlx::query_scalar("SELECT id FROM pack_environment_node WHERE env_id = $1")
        .bind(env_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn all_ready(pool: &PgPool, ids: &[i64]) -> bool {
    for id in ids {
        if status_of(pool, *id).await != "ready" {
            return false;
        }
    }
    true
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_row_the_database_refuses_to_claim_fails_alone_with_its_message_and_the_seven_others_become_ready(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let (good, bad) = eight_requests(&env, &pool).await;
    refuse_bad_row(
        &pool,
        "NEW.status = 'installing' AND OLD.status <> 'installing'",
    )
    .await;
    let url = database_url(&pool);
    let d = Daemon::spawn(&env, &url, "a", &[("PACKENVD_CONCURRENCY", "4")], &[]);
    eventually(Duration::from_secs(30), "the seven others ready", || {
        all_ready(&pool, &good)
    })
    .await;
    eventually(Duration::from_secs(10), "bad failed", || async {
        status_of(&pool, bad).await == "failed"
    })
    .await;
    let error = row(&pool, bad).await.install_error.unwrap_or_default();
    assert!(
        error.contains("the database refused to claim this row") && error.contains(HOLD),
        "{error}"
    );
    let node_row = node_row_of(&pool, bad).await;
    let out = d.output();
    let line = out
        .lines()
        .find(|l| l.contains("refused to claim this row"))
        .unwrap_or_else(|| panic!("no report of the refused row:\n{out}"));
    assert!(
        line.contains(&format!("node_row={node_row}"))
            && line.contains("pack_ref=\"bad\"")
            && line.contains(HOLD)
            && line.contains("WARN"),
        "{line}"
    );
    assert!(!out.contains("database unreachable"), "{out}");
    let status = cli(&env, &url, &["status", "--wide"]);
    let shown = text(&status);
    let bad_line = shown
        .lines()
        .find(|l| l.contains(" bad "))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        bad_line.contains("failed") && bad_line.contains(HOLD),
        "{shown}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_row_the_database_refuses_to_claim_and_to_fail_is_left_alone_and_shown_by_status_until_the_cause_goes(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let (good, bad) = eight_requests(&env, &pool).await;
    // Every change of the row is refused: the claim, and the daemon's attempt to fail it.
    refuse_bad_row(&pool, "NEW.status IS DISTINCT FROM OLD.status").await;
    let url = database_url(&pool);
    let mut d = Daemon::spawn(&env, &url, "a", &[("PACKENVD_CONCURRENCY", "4")], &[]);
    eventually(Duration::from_secs(30), "the seven others ready", || {
        all_ready(&pool, &good)
    })
    .await;
    let node_row = node_row_of(&pool, bad).await;
    let status = || {
        let out = cli(&env, &url, &["status"]);
        (out.status.code(), text(&out))
    };
    let wanted = format!(
        "leaves row {node_row} (environment {bad}, bad t.ok) alone: the database refused its claim"
    );
    let mut shown = status();
    for _ in 0..100 {
        if shown.1.contains(&wanted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        shown = status();
    }
    assert!(
        shown.1.contains(&wanted) && shown.1.contains(HOLD),
        "{}",
        shown.1
    );
    assert_ne!(
        shown.0,
        Some(0),
        "status is unwell while a row is left alone"
    );
    assert_eq!(status_of(&pool, bad).await, "pending");
    let out = d.output();
    let reports = out
        .lines()
        .filter(|l| l.contains("refused to claim this row and to fail it"))
        .collect::<Vec<_>>();
    assert_eq!(reports.len(), 1, "reported once:\n{out}");
    assert!(
        reports[0].contains(&format!("node_row={node_row}")) && reports[0].contains(HOLD),
        "{out}"
    );
    // The operator removes the cause; a restart takes the row at once (a running daemon takes
    // it when its backoff is over) and the list empties.
    sqlx::query("DROP TRIGGER refuse_bad ON pack_environment_node")
        .execute(&pool)
        .await
        .unwrap();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(20)).expect("exit");
    let _d = Daemon::spawn(&env, &url, "a", &[], &[]);
    eventually(Duration::from_secs(30), "bad ready", || async {
        status_of(&pool, bad).await == "ready"
    })
    .await;
    let shown = status();
    assert!(!shown.1.contains("leaves row"), "{}", shown.1);
}

/// Claims every claimable row of the tests' node for the writer test.
async fn claim_all(pool: &PgPool) -> Vec<store::Claim> {
    store::claim(
        pool,
        &node_name(),
        "me",
        Duration::from_secs(60),
        100,
        std::path::Path::new("/envs"),
    )
    .await
    .unwrap()
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_ready_write_back_the_database_refuses_for_one_row_of_a_batch_lands_the_seven_others(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    register_node(&pool, &env.envs_root().display().to_string()).await;
    let (good, bad) = eight_requests(&env, &pool).await;
    refuse_bad_row(&pool, "NEW.status = 'ready'").await;
    let claims = claim_all(&pool).await;
    assert_eq!(claims.len(), 8);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut answers = Vec::new();
    for c in &claims {
        let (done, answer) = tokio::sync::oneshot::channel();
        tx.send(ReadyJob {
            fence: c.fence,
            transition: Transition::Ready {
                env_path: None,
                metadata: serde_json::json!({}),
                fingerprint: None,
                log: "built".into(),
            },
            switch: None,
            done,
        })
        .unwrap();
        answers.push((c.row.env_id, answer));
    }
    drop(tx);
    // Every result is queued before the writer starts: they go in one batch.
    let writer = ReadyWriter {
        pool: pool.clone(),
        metrics: Arc::default(),
        root: CancellationToken::new(),
    };
    writer.run(rx).await;
    for (env_id, answer) in answers {
        match answer.await.unwrap() {
            Written::Done => assert_ne!(env_id, bad),
            Written::Rejected(e) => {
                assert_eq!(env_id, bad);
                assert!(e.to_string().contains(HOLD), "{e}");
            }
            other => panic!("environment {env_id}: {other:?}"),
        }
    }
    assert!(all_ready(&pool, &good).await);
    assert_eq!(status_of(&pool, bad).await, "installing");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_row_whose_write_back_and_failure_the_database_refuses_is_reported_and_shown_by_status(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let (good, bad) = eight_requests(&env, &pool).await;
    // The claim goes through; every end of the build (ready, then failed) is refused.
    refuse_bad_row(
        &pool,
        "OLD.status = 'installing' AND NEW.status <> 'installing'",
    )
    .await;
    let url = database_url(&pool);
    let d = Daemon::spawn(&env, &url, "a", &[("PACKENVD_CONCURRENCY", "8")], &[]);
    eventually(Duration::from_secs(30), "the seven others ready", || {
        all_ready(&pool, &good)
    })
    .await;
    let node_row = node_row_of(&pool, bad).await;
    let wanted = format!("leaves row {node_row} (environment {bad}, bad t.ok) alone: the database refused its write-back");
    let mut shown = String::new();
    for _ in 0..100 {
        shown = text(&cli(&env, &url, &["status"]));
        if shown.contains(&wanted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown.contains(&wanted) && shown.contains(HOLD), "{shown}");
    let out = d.output();
    assert!(
        out.lines()
            .any(|l| l.contains("refused to record the finished build")
                && l.contains(&format!("node_row={node_row}"))
                && l.contains(HOLD)),
        "{out}"
    );
}
