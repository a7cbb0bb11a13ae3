//! What the binary says when it cannot reach the database, and how `run --until-done` ends:
//! real processes, real PostgreSQL.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;

fn packenvd(env: &Env, url: Option<&str>, args: &[&str]) -> Output {
    let s = &env.settings;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_packenvd"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("PACKENVD_ENVS_ROOT", &s.envs_root)
        .env("PACKENVD_PACKS_DIR", &s.packs_dir)
        .env("PACKENVD_CACHE_DIR", &s.cache_dir)
        .env("PACKENVD_STEP_WRITABLE", env.scratch());
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().expect("packenvd")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_refused_connection_is_reported_at_once_with_where_it_went() {
    let env = Env::new(&[]);
    let started = Instant::now();
    let out = packenvd(
        &env,
        Some("postgres://someone@127.0.0.1:1/platform"),
        &["status"],
    );
    let took = started.elapsed();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "cannot connect to the database at 127.0.0.1:1, database \"platform\" as \"someone\""
        ) && err.contains("Connection refused"),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}: {err}");
}

#[test]
fn without_a_database_url_the_error_says_where_one_may_come_from() {
    let env = Env::new(&[]);
    let out = packenvd(&env, None, &["status"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "set DATABASE_URL in the environment, or `database_url` or `database_url_file`"
        ),
        "{err}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_role_that_does_not_exist_is_named_once(pool: PgPool) {
    let env = Env::new(&[]);
    let url = database_url(&pool);
    let scheme_end = url.find("://").unwrap() + 3;
    let rest = &url[scheme_end..];
    let host = rest.rfind('@').map_or(rest, |at| &rest[at + 1..]);
    let url = format!("{}packenvd_no_such_role@{host}", &url[..scheme_end]);
    let out = packenvd(&env, Some(&url), &["status"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let cause = "role \"packenvd_no_such_role\" does not exist";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn run_until_done_ends_with_a_summary_and_fails_when_a_build_failed(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.ok", shell_runtime("echo ok > {env_path}/ok")).await;
    add_runtime(
        &pool,
        "t.fail",
        shell_runtime("echo 'No matching distribution found for nothing' >&2; exit 1"),
    )
    .await;
    for (p, rt) in [("good", "t.ok"), ("bad", "t.fail")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        request(&pool, p, rt).await;
    }
    let out = packenvd(&env, Some(&database_url(&pool)), &["run", "--until-done"]);
    let (stdout, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{err}");
    assert!(
        stdout.contains("done: 1 environment(s) built, 1 failed")
            && stdout.contains("failed: bad t.fail: step 'script'")
            && stdout.contains("(packenvd logs bad t.fail)"),
        "{stdout}"
    );

    // Nothing left to do, nothing failed in this run: exit 0.
    let out = packenvd(&env, Some(&database_url(&pool)), &["run", "--until-done"]);
    let (stdout, err) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{err}");
    assert!(
        stdout.contains("done: 0 environment(s) built, 0 failed"),
        "{stdout}"
    );
}
