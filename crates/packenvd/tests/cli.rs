//! The operator's command line, as the real binary against a real database: following a build
//! (`request --wait`, `logs --follow`), what `status` tells and its exit status, unknown names
//! as usage errors, `remove`'s look before it deletes, `gc --dry-run`, completions and the man
//! page.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sqlx::PgPool;

/// A runtime whose second step fails the way pip does when a package does not exist. The
/// message is put together by printf so that the command line itself does not hold it: a
/// test finding it then found the step's output.
fn failing_runtime() -> serde_json::Value {
    json!({"installers": [
        {"name": "prepare", "order": 1, "command": "sh", "args": ["-c", "echo preparing"]},
        {"name": "install", "order": 2, "command": "sh", "args": ["-c",
            "echo 'Collecting nosuch'; printf 'ERROR: No matching %s found for nosuch\\n' distribution >&2; exit 1"]}
    ]})
}

/// A runtime of two steps that take a moment each.
fn good_runtime(seconds: u32) -> serde_json::Value {
    json!({"installers": [
        {"name": "prepare", "order": 1, "command": "sh", "args": ["-c", "echo preparing > {env_path}/a"]},
        {"name": "install", "order": 2, "command": "sh", "args": ["-c",
            format!("echo installing; sleep {seconds}; echo done > {{env_path}}/b")]}
    ]})
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn request_wait_on_a_failing_pack_prints_its_steps_and_cause_and_exits_1(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.bad", failing_runtime()).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let url = database_url(&pool);
    let d = Daemon::spawn(&env, &url, "a", &[], &[]);
    let out = cli(
        &env,
        &url,
        &["request", "p", "t.bad", "--wait", "--timeout", "60s"],
    );
    let text = text(&out);
    assert_eq!(code(&out), Some(1), "{text}\n{}", d.output());
    for expected in [
        "p t.bad: pending",
        "p t.bad: step 1/2 'prepare'",
        "p t.bad: step 2/2 'install'",
        "failed after",
        "No matching distribution found for nosuch",
        "--- p t.bad: error ---",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn request_wait_on_a_good_pack_follows_it_and_exits_0(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", good_runtime(3)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let url = database_url(&pool);
    let d = Daemon::spawn(&env, &url, "a", &[], &[]);
    let out = cli(
        &env,
        &url,
        &["request", "p", "t.ok", "--wait", "--timeout", "60s"],
    );
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}\n{}", d.output());
    for expected in [
        "p t.ok: step 1/2 'prepare'",
        "p t.ok: step 2/2 'install'",
        "p t.ok: ready after",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    assert_eq!(
        sqlx::query_scalar::<_, String>("SELECT status::text FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap(),
        "ready"
    );

    // Asked again with nothing changed: answered by the current build.
    let out = cli(
        &env,
        &url,
        &["request", "p", "t.ok", "--wait", "--timeout", "60s"],
    );
    let again = self::text(&out);
    assert_eq!(code(&out), Some(0), "{again}");
    assert!(again.contains("inputs unchanged"), "{again}");

    // And a rebuild follows the same way.
    let out = cli(&env, &url, &["rebuild", "p", "--wait", "--timeout", "60s"]);
    let rebuilt = self::text(&out);
    assert_eq!(code(&out), Some(0), "{rebuilt}");
    assert!(
        rebuilt.contains("p t.ok: reset to pending") && rebuilt.contains("step 2/2 'install'"),
        "{rebuilt}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_wait_without_a_daemon_warns_and_gives_up_after_its_timeout_with_4(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let url = database_url(&pool);
    let out = cli(
        &env,
        &url,
        &["request", "p", "core.shell", "--wait", "--timeout", "1s"],
    );
    let text = text(&out);
    assert_eq!(code(&out), Some(4), "{text}");
    assert!(
        text.contains("no packenvd daemon has ever run against this database"),
        "{text}"
    );
    assert!(text.contains("gave up after"), "{text}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn status_shows_the_cause_of_a_failure_not_its_command_and_exits_1(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.bad", failing_runtime()).await;
    add_runtime(&pool, "t.ok", good_runtime(0)).await;
    for p in ["bad", "good"] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
    }
    request(&pool, "bad", "t.bad").await;
    request(&pool, "good", "t.ok").await;
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);

    let out = cli(&env, &url, &["status"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(1), "a failed row: {text}");
    let bad = text.lines().find(|l| l.contains("t.bad")).unwrap();
    assert!(
        bad.contains("failed") && bad.contains("No matching distribution found for nosuch"),
        "{text}"
    );
    assert!(!bad.contains("sh -c"), "the cause, not the command: {text}");
    assert!(
        text.contains("2 environment(s): 1 ready, 1 failed"),
        "{text}"
    );
    assert!(text.contains("nodes: "), "the nodes' heartbeats: {text}");

    // Fitted to the width the reader has (COLUMNS, off a terminal), the names whole.
    let out = cli_with(&env, &url, &["status"], &[("COLUMNS", "80")]);
    let narrow = self::text(&out);
    assert_eq!(code(&out), Some(1), "{narrow}");
    for line in narrow.lines() {
        assert!(line.chars().count() <= 80, "{line:?} in:\n{narrow}");
    }
    let bad = narrow.lines().find(|l| l.contains("t.bad")).unwrap();
    assert!(bad.contains(" bad ") && bad.contains("failed"), "{narrow}");
    assert!(
        bad.replace('\u{a0}', " ").contains("failed   No matching"),
        "the cause, cut at the column's edge: {narrow}"
    );

    // --wide keeps the whole error sentence; --json has the cause as a field.
    let wide = self::text(&cli(&env, &url, &["status", "--wide"]));
    assert!(wide.contains("sh -c"), "{wide}");
    let out = cli(&env, &url, &["status", "--json"]);
    assert_eq!(code(&out), Some(1));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runtime_ref"] == "t.bad")
        .unwrap();
    assert_eq!(bad["cause"], "No matching distribution found for nosuch");

    let out = cli(&env, &url, &["status", "--pack", "good"]);
    assert_eq!(
        code(&out),
        Some(0),
        "only a ready row: {}",
        self::text(&out)
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn status_shows_the_step_a_build_is_at_and_how_long_it_runs(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.slow", good_runtime(30)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let url = database_url(&pool);
    let d = Daemon::spawn(&env, &url, "a", &[], &[]);
    request(&pool, "p", "t.slow").await;
    eventually(
        Duration::from_secs(20),
        "the second step in the log",
        || async {
            let log: Option<String> =
                sqlx::query_scalar("SELECT install_log FROM pack_environment_node")
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
                    .flatten();
            log.is_some_and(|l| l.contains("step 2/2"))
        },
    )
    .await;
    let out = cli(&env, &url, &["status"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}\n{}", d.output());
    let line = text.lines().find(|l| l.contains("t.slow")).unwrap();
    assert!(
        line.contains("installing") && line.contains("step 2/2 'install', "),
        "{text}"
    );
    let node = cli(&env, &url, &["status", "--node", &node_name()]);
    assert!(
        self::text(&node).contains("step 2/2 'install'"),
        "{}",
        self::text(&node)
    );

    // logs --follow prints the log as it grows, until the build ends.
    sqlx::query("UPDATE runtime SET installers = $1 WHERE ref = 't.slow'")
        .bind(good_runtime(2))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE pack_environment SET status = 'pending'")
        .execute(&pool)
        .await
        .unwrap();
    let out = cli(&env, &url, &["logs", "p", "--follow", "--timeout", "60s"]);
    let followed = self::text(&out);
    assert_eq!(code(&out), Some(0), "{followed}\n{}", d.output());
    for expected in [
        "==> step 1/2 'prepare'",
        "installing",
        "==> step 'install' succeeded",
        ": ready ---",
    ] {
        assert!(
            followed.contains(expected),
            "no {expected:?} in:\n{followed}"
        );
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn status_warns_when_rows_wait_and_no_daemon_is_alive(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    request(&pool, "p", "core.shell").await;
    let url = database_url(&pool);
    let out = cli(&env, &url, &["status"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    assert!(
        text.contains(
            "warning: no packenvd daemon has ever run against this database: 1 environment(s) wait"
        ),
        "{text}"
    );

    // A node that stopped an hour ago.
    sqlx::query(
        "INSERT INTO packenvd_node (name, envs_root, last_seen, ttl)
         VALUES ('web-1', '/srv/envs', now() - interval '1 hour', interval '10 minutes')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let text = self::text(&cli(&env, &url, &["status"]));
    assert!(text.contains("nodes: web-1 (seen 1h"), "{text}");
    assert!(text.contains(", gone)"), "{text}");
    assert!(
        text.contains("warning: no packenvd daemon has been seen for 1h")
            && text.contains("1 environment(s) will wait until one runs"),
        "{text}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn unknown_names_and_values_are_usage_errors_that_list_the_valid_ones(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", good_runtime(0)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    request(&pool, "p", "t.ok").await;
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);
    let node = node_name();
    for (args, expected) in [
        (
            vec!["status", "--status", "bogus"],
            vec![
                "bogus",
                "pending",
                "installing",
                "ready",
                "failed",
                "outdated",
            ],
        ),
        (
            vec!["status", "--pack", "nosuch"],
            vec!["\"nosuch\"", "packs with environments: p"],
        ),
        (
            vec!["status", "--node", "nosuch"],
            vec!["\"nosuch\"", &node],
        ),
        (
            vec!["verify", "nosuch"],
            vec!["\"nosuch\"", "packs with environments: p"],
        ),
        (
            vec!["verify", "p", "nosuch"],
            vec!["\"nosuch\"", "its runtimes: t.ok"],
        ),
        (vec!["logs", "nosuch", "x"], vec!["\"nosuch\"", "p"]),
        (vec!["logs", "p", "nosuch"], vec!["\"nosuch\"", "t.ok"]),
        (vec!["rebuild", "nosuch"], vec!["\"nosuch\"", "p"]),
        (
            vec!["rebuild", "p", "--node", "nosuch"],
            vec!["\"nosuch\"", &node],
        ),
        (vec!["remove", "nosuch", "--yes"], vec!["\"nosuch\"", "p"]),
        (
            vec!["request", "nosuch", "t.ok"],
            vec!["no pack with ref nosuch", "the packs: p"],
        ),
        (
            vec!["request", "p", "nosuch"],
            vec!["no runtime with ref nosuch", "core.python", "t.ok"],
        ),
        (vec!["node", "forget", "nosuch"], vec!["\"nosuch\"", &node]),
        (vec!["rebuild"], vec!["--failed"]),
        (vec!["verify", "--stale", "p"], vec!["cannot be used with"]),
        (
            vec!["status", "--json", "--wide"],
            vec!["cannot be used with"],
        ),
        (
            vec!["request", "p", "t.ok", "--timeout", "1m"],
            vec!["--wait"],
        ),
        (
            vec!["completions", "bash", "--config", "x.toml"],
            vec!["--config"],
        ),
        (vec!["--config", "x.toml", "man"], vec!["do not apply"]),
        (
            vec!["--config", "x.toml", "status", "--config", "y.toml"],
            vec!["given twice"],
        ),
    ] {
        let out = cli(&env, &url, &args);
        let text = text(&out);
        assert_eq!(code(&out), Some(2), "{args:?}: {text}");
        for e in expected {
            assert!(text.contains(e), "{args:?}: no {e:?} in:\n{text}");
        }
    }
    // A mistyped variable does not stop the command; the warning names the key meant.
    let out = cli_with(&env, &url, &["status"], &[("PACKENVD_CONCURENCY", "3")]);
    let warned = text(&out);
    assert_eq!(code(&out), Some(0), "{warned}");
    assert!(
        warned.contains("PACKENVD_CONCURENCY names no setting and is ignored; did you mean PACKENVD_CONCURRENCY?"),
        "{warned}"
    );
    assert_eq!(
        sqlx::query_scalar::<_, String>("SELECT status::text FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap(),
        "ready",
        "no command above changed a row"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn logs_of_a_pack_with_one_environment_need_no_runtime_and_show_the_tail_once(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.bad", failing_runtime()).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    request(&pool, "p", "t.bad").await;
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);
    let out = cli(&env, &url, &["logs", "p"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(1), "a failed environment: {text}");
    assert!(text.starts_with("p t.bad: failed (node "), "{text}");
    assert!(
        text.contains("--- install log ---\n==> step 1/2 'prepare'"),
        "{text}"
    );
    assert!(
        text.contains("--- error ---\nstep 'install' (`sh -c"),
        "{text}"
    );
    assert_eq!(
        text.matches("No matching distribution found for nosuch")
            .count(),
        1,
        "the output tail once: {text}"
    );

    // With a second environment the runtime must be named.
    request(&pool, "p", "core.shell").await;
    let out = cli(&env, &url, &["logs", "p"]);
    let text = self::text(&out);
    assert_eq!(code(&out), Some(2), "{text}");
    assert!(
        text.contains("pack p has 2 environments: name the runtime, one of core.shell, t.bad"),
        "{text}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn remove_lists_before_it_deletes_and_asks_for_yes_off_a_terminal(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", good_runtime(0)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    request(&pool, "p", "t.ok").await;
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);
    let pack_dir = env.envs_root().join("p");
    let before = tree(&pack_dir);
    assert!(before.iter().any(|e| e.starts_with(".t.ok-")), "{before:?}");
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    let out = cli(&env, &url, &["remove", "p", "--dry-run"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    assert!(
        text.contains("would delete 1 environment row(s) of pack p"),
        "{text}"
    );
    assert!(text.contains("p t.ok (ready, 1 node row(s))"), "{text}");
    assert!(
        text.contains(&format!("  {}", pack_dir.join("t.ok").display()))
            && text.contains(&format!("  {}/.t.ok-", pack_dir.display())),
        "the link and the build: {text}"
    );
    assert_eq!(rows().await, 1, "a dry run deletes no row");
    assert_eq!(tree(&pack_dir), before, "a dry run removes nothing");

    let out = cli(&env, &url, &["remove", "p"]);
    let text = self::text(&out);
    assert_eq!(code(&out), Some(2), "{text}");
    assert!(text.contains("pass --yes"), "{text}");
    assert_eq!(rows().await, 1, "refused: nothing deleted");
    assert_eq!(tree(&pack_dir), before);

    let out = cli(&env, &url, &["remove", "p", "--yes"]);
    let text = self::text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    assert!(text.contains("p t.ok: row deleted"), "{text}");
    assert_eq!(rows().await, 0);
    assert!(
        !pack_dir.exists(),
        "the emptied pack directory goes too: {:?}",
        tree(&pack_dir)
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn gc_dry_run_lists_builds_that_wait_out_the_grace_with_when_they_go(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", good_runtime(0)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.ok").await;
    env.worker(&pool).drain().await.unwrap();
    let first = row(&pool, id).await.metadata["build_dir"]
        .as_str()
        .unwrap()
        .to_owned();
    sqlx::query("UPDATE pack_environment SET status = 'pending'")
        .execute(&pool)
        .await
        .unwrap();
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);
    let out = cli(&env, &url, &["gc", "--dry-run"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("waiting ") && l.contains(&first))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("removable in 59m") || line.contains("removable in 1h"),
        "{line}"
    );
    assert!(text.contains("nothing to remove"), "{text}");
    assert!(std::path::Path::new(&first).exists());
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = run(&["completions", "bash"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        script.contains("_packenvd()") && script.contains("--dry-run"),
        "{script}"
    );
    for shell in ["zsh", "fish"] {
        assert!(run(&["completions", shell]).status.success(), "{shell}");
    }
    let out = run(&["man"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        page.starts_with(".ie") || page.contains(".TH packenvd"),
        "{page}"
    );
    assert!(
        page.contains("Exit status"),
        "the exit statuses are in the page: {page}"
    );
    // Every command's --help ends with the exit statuses.
    for args in [
        vec!["--help"],
        vec!["status", "--help"],
        vec!["request", "--help"],
        vec!["node", "forget", "--help"],
        vec!["check-config", "--help"],
    ] {
        let out = run(&args);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Exit status:") && help.contains("4  --wait or --follow gave up"),
            "{args:?}: {help}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["man", "--out-dir", &dir.path().display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.path().join("packenvd-status.1").exists());
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "an unknown shell");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn check_config_connect_checks_the_database_the_directories_and_the_commands(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.missing",
        json!({"installers": [
            {"name": "fetch", "order": 1, "command": "packenvd-no-such-tool", "args": []}
        ]}),
    )
    .await;
    let url = database_url(&pool);
    let out = cli(&env, &url, &["check-config", "--connect"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(1), "{text}");
    for expected in [
        "# ok   database: reachable at ",
        "# ok   database: migrated",
        "# ok   database: the role has every right the daemon uses",
        "# ok   runtime core.shell",
        "# FAIL runtime t.missing: not found on this host's PATH: packenvd-no-such-tool",
        "# note envs_root ",
        "does not exist; the daemon creates it at start",
        "/packs: exists, readable",
        "# 1 check(s) failed",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    // The checks are comments: the output still loads back as a config file.
    let file = env.dir.path().join("checked.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = cli(
        &env,
        &url,
        &["check-config", "--config", file.to_str().unwrap()],
    );
    assert_eq!(code(&out), Some(0), "{}", self::text(&out));

    // A role with one right of the many, an envs root that is a file, no packs dir.
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Roles are the cluster's: one per test database, in PostgreSQL's 63 bytes.
    let role = format!("chk_{}", &db[db.len() - 16..]).to_lowercase();
    for sql in [
        format!("DROP ROLE IF EXISTS {role}"),
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT ON pack TO {role}"),
    ] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
    let scheme_end = url.find("://").unwrap() + 3;
    let rest = &url[scheme_end..];
    let host = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    let limited = format!("{}{role}@{host}", &url[..scheme_end]);
    std::fs::write(env.dir.path().join("envs"), "not a directory").unwrap();
    std::fs::remove_dir(env.dir.path().join("packs")).unwrap();
    let out = cli(&env, &limited, &["check-config", "--connect"]);
    let text = self::text(&out);
    assert_eq!(code(&out), Some(1), "{text}");
    for expected in [
        "# FAIL database: cannot read _sqlx_migrations: ",
        "permission denied for table _sqlx_migrations",
        "# FAIL database: the role lacks SELECT on _sqlx_migrations, DELETE on pack_environment, \
         INSERT on pack_environment, SELECT on pack_environment",
        "SELECT on runtime",
        "; apply deploy/db-role.sql as the schema's owner",
        "# FAIL envs_root ",
        "/envs: not a directory",
        "# FAIL packs_dir ",
        "No such file or directory",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    assert!(!text.contains("SELECT on pack,"), "{text}");
    sqlx::query(&format!("DROP OWNED BY {role}"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&pool)
        .await
        .unwrap();

    // Without a database to check, a usage error.
    let out = cli_with(
        &env,
        "",
        &["check-config", "--connect"],
        &[("DATABASE_URL", "")],
    );
    let text = self::text(&out);
    assert_eq!(code(&out), Some(2), "{text}");
    assert!(text.contains("--connect needs a database"), "{text}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_unchanged_request_keeps_the_real_log_beside_its_note(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", good_runtime(0)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    request(&pool, "p", "t.ok").await;
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);
    for _ in 0..2 {
        request(&pool, "p", "t.ok").await;
        env.worker(&pool).drain().await.unwrap();
    }
    let out = cli(&env, &url, &["logs", "p"]);
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    let (note, kept) = text
        .split_once(packenvd::store::CURRENT_BUILD_LOG)
        .unwrap_or_else(|| panic!("no current build's log in:\n{text}"));
    assert!(note.contains("already up to date"), "{text}");
    assert!(!note.contains("==> step"), "{text}");
    assert!(
        kept.contains("==> step 1/2 'prepare'") && kept.contains("==> step 2/2 'install'"),
        "{text}"
    );
    assert_eq!(
        text.matches(packenvd::store::CURRENT_BUILD_LOG).count(),
        1,
        "asked twice, kept once: {text}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn request_wait_on_a_terminal_draws_a_progress_line_and_still_fails_with_1(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.bad", failing_runtime()).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let url = database_url(&pool);
    let d = Daemon::spawn(&env, &url, "a", &[], &[]);
    let out = cli_on_terminal(
        &env,
        &url,
        &["request", "p", "t.bad", "--wait", "--timeout", "60s"],
    );
    let text = text(&out);
    assert_eq!(code(&out), Some(1), "{text}\n{}", d.output());
    // indicatif redraws its line in place: erase-line sequences, not one line per poll.
    assert!(
        text.contains("\u{1b}[2K"),
        "no progress line drawn: {text:?}"
    );
    for expected in [
        "p t.bad",
        "failed after",
        "No matching distribution found for nosuch",
        "--- p t.bad: error ---",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }

    // status on the same terminal fits its 100 columns.
    let out = cli_on_terminal(&env, &url, &["status"]);
    let table = self::text(&out);
    assert_eq!(code(&out), Some(1), "{table}");
    let table = table.replace('\r', "");
    assert!(table.contains("t.bad"), "{table}");
    for line in table.lines() {
        assert!(line.chars().count() <= 100, "{line:?} in:\n{table}");
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn remove_on_a_terminal_asks_first(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", good_runtime(0)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    request(&pool, "p", "t.ok").await;
    env.worker(&pool).drain().await.unwrap();
    let url = database_url(&pool);
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    let out = cli_on_terminal_typing(&env, &url, &["remove", "p"], "n\n");
    let text = text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    assert!(
        text.contains("Delete? [y/N]") && text.contains("nothing deleted"),
        "{text}"
    );
    assert_eq!(rows().await, 1, "{text}");

    let out = cli_on_terminal_typing(&env, &url, &["remove", "p"], "y\n");
    let text = self::text(&out);
    assert_eq!(code(&out), Some(0), "{text}");
    assert!(text.contains("p t.ok: row deleted"), "{text}");
    assert_eq!(rows().await, 0, "{text}");
    assert!(
        !env.envs_root().join("p").exists(),
        "the emptied pack directory"
    );
}
