//! The shipped setup (deploy/packenvd.service): the daemon runs as an unprivileged user with
//! CAP_SETUID, CAP_SETGID and CAP_CHOWN, and steps run as a separate build user. Builds,
//! checks and the operator's `packenvd verify` work there, and clean up after themselves.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sqlx::PgPool;

/// A runtime whose step leaves traces in its build, HOME and TMPDIR, and whose environment
/// holds one executable, `tool`, that verification runs.
fn tool_runtime() -> serde_json::Value {
    json!({
        "installers": [{"name": "tool", "command": "sh", "args": ["-c",
            "id -u > {env_path}/uid && echo h > \"$HOME/h\" && mkdir -p \"$TMPDIR/a/b\" && \
             mkdir -p {env_path}/bin && printf '#!/bin/sh\\necho tool 1.0\\n' > {env_path}/bin/tool && \
             chmod +x {env_path}/bin/tool"]}],
        "executable_templates": {"tool": "{env_path}/bin/tool"}
    })
}

#[sqlx::test(migrations = false)]
async fn an_unprivileged_daemon_with_the_units_capabilities_builds_and_verifies_as_the_build_user(
    _pool: PgPool,
) {
    if !is_root() {
        eprintln!("skipped: running the daemon as another user with capabilities needs root");
        return;
    }
    let (cluster, pool) = reachable_database().await;
    let url = cluster.url();
    let env = Env::new(&[]);
    hand_to_daemon_user(&env, DAEMON_UID);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.tool").await;
    let build_user = format!("{BUILD_UID}:{BUILD_UID}");
    let vars = [("PACKENVD_BUILD_USER", build_user.as_str())];

    let mut d = Daemon::spawn_with_caps(&env, &url, "a", DAEMON_UID, UNIT_CAPS, &vars);
    let pid = d.child.id();
    eventually(Duration::from_secs(30), "the build", || async {
        let r = row(&pool, id).await;
        r.status == "ready" || r.install_error.is_some() || has_exited(pid)
    })
    .await;
    let r = row(&pool, id).await;
    assert_eq!(r.status, "ready", "{:?}\n{}", r.install_error, d.output());
    let build = std::path::PathBuf::from(r.metadata["build_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(build.join("uid")).unwrap().trim(),
        BUILD_UID.to_string(),
        "the step ran as the build user"
    );
    use std::os::unix::fs::MetadataExt;
    for p in [build.clone(), build.join("bin/tool")] {
        assert_eq!(
            std::fs::metadata(&p).unwrap().uid(),
            DAEMON_UID,
            "{} was not given back to the daemon",
            p.display()
        );
    }
    assert_eq!(
        private_tmps(&env),
        Vec::<String>::new(),
        "a build's tmp was left"
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(15))
        .expect("the daemon stops");

    // The operator's `packenvd verify`, as operations.md runs it: the daemon's user and
    // capabilities.
    let out = run_as(
        &env,
        &url,
        DAEMON_UID,
        UNIT_CAPS,
        &["verify", "--all"],
        &vars,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok      p t.tool"), "{text}");
    let verified: Option<String> =
        sqlx::query_scalar("SELECT last_verify_result FROM pack_environment WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verified.as_deref(), Some("ok"));
    assert_eq!(status_of(&pool, id).await, "ready");
    assert_eq!(
        private_tmps(&env),
        Vec::<String>::new(),
        "a check's tmp was left"
    );
    pool.close().await;
}

/// Builds pack `p` with runtime `t.tool` by a daemon of the shipped setup, then stops it.
async fn ready_by_the_shipped_setup(env: &Env, pool: &PgPool, url: &str, vars: &[(&str, &str)]) {
    hand_to_daemon_user(env, DAEMON_UID);
    add_runtime(pool, "t.tool", tool_runtime()).await;
    env.pack_dir("p", &[]);
    add_pack(pool, "p").await;
    let id = request(pool, "p", "t.tool").await;
    let mut d = Daemon::spawn_with_caps(env, url, "a", DAEMON_UID, UNIT_CAPS, vars);
    let pid = d.child.id();
    eventually(Duration::from_secs(30), "the build", || async {
        let r = row(pool, id).await;
        r.status == "ready" || r.install_error.is_some() || has_exited(pid)
    })
    .await;
    assert_eq!(status_of(pool, id).await, "ready", "{}", d.output());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(15))
        .expect("the daemon stops");
}

#[sqlx::test(migrations = false)]
async fn packenvd_verify_refuses_without_the_capabilities_or_as_another_user_and_leaves_every_row_as_it_was(
    _pool: PgPool,
) {
    if !is_root() {
        eprintln!("skipped: running packenvd as another user needs root");
        return;
    }
    let (cluster, pool) = reachable_database().await;
    let url = cluster.url();
    let env = Env::new(&[]);
    let build_user = format!("{BUILD_UID}:{BUILD_UID}");
    let vars = [("PACKENVD_BUILD_USER", build_user.as_str())];
    ready_by_the_shipped_setup(&env, &pool, &url, &vars).await;

    // As the daemon's user, but without its capabilities (runuser, a plain shell).
    let out = run_as(&env, &url, DAEMON_UID, "", &["verify", "--all"], &vars);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("refusing to verify")
            && stderr.contains("CAP_SETUID, CAP_SETGID and CAP_CHOWN"),
        "{stderr}"
    );
    let (status, result): (String, Option<String>) = sqlx::query_as(
        "SELECT status::text, last_verify_result FROM pack_environment WHERE pack_ref = 'p'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), result.as_deref()), ("ready", None));

    // As root, which may switch users but whose checks would find the daemon's envs root not
    // their own.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
        .args(["verify", "--all"])
        .env("DATABASE_URL", &url)
        .env("PACKENVD_ENVS_ROOT", env.envs_root())
        .env("PACKENVD_PACKS_DIR", &env.settings.packs_dir)
        .env("PACKENVD_CACHE_DIR", &env.settings.cache_dir)
        .env("PACKENVD_BUILD_USER", &build_user)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is owned by uid 65534") && stderr.contains("as the daemon's user"),
        "{stderr}"
    );
    let (status, result): (String, Option<String>) = sqlx::query_as(
        "SELECT status::text, last_verify_result FROM pack_environment WHERE pack_ref = 'p'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), result.as_deref()), ("ready", None));
    pool.close().await;
}

#[sqlx::test(migrations = false)]
async fn a_daemon_that_may_not_switch_to_or_chown_for_the_build_user_refuses_to_start(
    _pool: PgPool,
) {
    if !is_root() {
        eprintln!("skipped: running the daemon as another user with capabilities needs root");
        return;
    }
    let (cluster, pool) = reachable_database().await;
    let url = cluster.url();
    let env = Env::new(&[]);
    hand_to_daemon_user(&env, DAEMON_UID);
    let build_user = format!("{BUILD_UID}:{BUILD_UID}");
    let vars = [("PACKENVD_BUILD_USER", build_user.as_str())];
    for (caps, missing) in [
        ("", "may not switch to that user"),
        ("+setuid,+setgid", "may not give files to it"),
    ] {
        let mut d = Daemon::spawn_with_caps(&env, &url, "a", DAEMON_UID, caps, &vars);
        d.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| {
            panic!(
                "with caps {caps:?} the daemon kept running:\n{}",
                d.output()
            )
        });
        let out = d.output();
        assert_eq!(d.child.wait().unwrap().code(), Some(1), "{out}");
        assert!(
            out.contains(missing) && out.contains("CAP_SETUID, CAP_SETGID and CAP_CHOWN"),
            "with caps {caps:?}:\n{out}"
        );
    }
    assert_eq!(
        private_tmps(&env),
        Vec::<String>::new(),
        "the check left its file"
    );
    pool.close().await;
}
