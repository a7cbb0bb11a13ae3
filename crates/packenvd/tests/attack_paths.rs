//! Attacks on paths (DESIGN §6): nothing outside the envs root, or another pack's, is ever
//! created, switched or deleted, whether a row lies, a directory is swapped for a symlink, or
//! a step writes where it likes; and a build whose claim was lost never changes what
//! `env_path` serves.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use packenv_core::log::BuildLog;
use packenvd::gc::{self, GcConfig};
use packenvd::services::ready_writer::{ReadyJob, ReadyWriter, Written};
use packenvd::store::{self, Transition};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn gc_config(env: &Env, grace: Duration) -> GcConfig {
    GcConfig {
        envs_root: env.envs_root().to_owned(),
        grace,
        node: node_name(),
    }
}

/// A directory outside the envs root holding things that look like packenvd's.
fn bait(dir: &Path) {
    std::fs::create_dir_all(dir.join(".python-0123456789abcdef0123456789abcdef")).unwrap();
    std::fs::write(dir.join("precious.txt"), "keep me").unwrap();
    std::os::unix::fs::symlink(
        ".python-0123456789abcdef0123456789abcdef",
        dir.join("python"),
    )
    .unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn remove_never_follows_a_pack_directory_that_is_a_symlink(pool: PgPool) {
    let env = Env::new(&[]);
    let outside = env.dir.path().join("outside");
    bait(&outside);
    packenv_core::layout::EnvsRoot::open(env.envs_root(), true).unwrap();
    std::os::unix::fs::symlink(&outside, env.envs_root().join("p")).unwrap();
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    sqlx::query("UPDATE pack_environment SET env_path = $2, status = 'ready' WHERE id = $1")
        .bind(id)
        .bind(env.envs_root().join("p/python").display().to_string())
        .execute(&pool)
        .await
        .unwrap();
    let before = tree(&outside);
    let (removed, report) = gc::remove(&pool, &gc_config(&env, Duration::from_secs(1)), "p", None)
        .await
        .unwrap();
    assert_eq!(removed, ["core.python"], "the row is gone");
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(
        tree(&outside),
        before,
        "nothing outside the envs root changed"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn remove_ignores_a_row_that_names_another_packs_environment(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.env", shell_runtime("echo ok > {env_path}/ok")).await;
    for p in ["victim", "attacker"] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
    }
    request(&pool, "victim", "t.env").await;
    env.worker(&pool).drain().await.unwrap();
    let before = tree(&env.envs_root().join("victim"));
    let lie = request(&pool, "attacker", "t.env").await;
    sqlx::query("UPDATE pack_environment SET env_path = $2, status = 'ready' WHERE id = $1")
        .bind(lie)
        .bind(env.envs_root().join("victim/t.env").display().to_string())
        .execute(&pool)
        .await
        .unwrap();
    gc::remove(
        &pool,
        &gc_config(&env, Duration::from_secs(1)),
        "attacker",
        None,
    )
    .await
    .unwrap();
    assert_eq!(tree(&env.envs_root().join("victim")), before);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_collector_removes_only_what_packenvd_made_and_recorded(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.env", shell_runtime("echo ok > {env_path}/ok")).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.env").await;
    env.worker(&pool).drain().await.unwrap();
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    env.worker(&pool).drain().await.unwrap();
    let pack = env.envs_root().join("p");
    // Look-alikes packenvd never recorded, and a recorded name linked out of the root.
    bait(&pack.join("other"));
    std::fs::create_dir_all(pack.join(".foo-0123456789abcdef0123456789abcdef")).unwrap();
    std::os::unix::fs::symlink(".foo-0123456789abcdef0123456789abcdef", pack.join("foo")).unwrap();
    let outside = env.dir.path().join("outside");
    bait(&outside);
    std::os::unix::fs::symlink(&outside, env.envs_root().join("q")).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = gc::run_once(&pool, &gc_config(&env, Duration::from_secs(1)), false)
        .await
        .unwrap();
    let removed: Vec<String> = report
        .removed
        .iter()
        .map(|r| r.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(removed.len(), 1, "only the superseded build: {report:?}");
    assert!(removed[0].starts_with(".t.env-"), "{removed:?}");
    assert!(pack.join(".foo-0123456789abcdef0123456789abcdef").is_dir());
    assert!(pack.join("foo").is_symlink());
    assert!(pack.join("other/precious.txt").exists());
    assert!(outside.join("precious.txt").exists());
    assert_eq!(status_of(&pool, id).await, "ready");
    assert!(pack.join("t.env/ok").exists(), "the current build stays");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_envs_root_packenvd_does_not_own_is_refused_by_builds_and_the_collector(pool: PgPool) {
    let env = Env::new(&[]);
    // A worker started on a root it owns, whose root is then swapped for somebody else's.
    let worker = env.worker(&pool);
    worker.drain().await.unwrap();
    std::fs::remove_file(env.envs_root().join(".packenvd-root")).unwrap();
    std::fs::create_dir_all(env.envs_root().join("somebody")).unwrap();
    std::fs::write(env.envs_root().join("somebody/data"), "theirs").unwrap();
    add_runtime(&pool, "t.env", shell_runtime("true")).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.env").await;
    // A daemon refuses to start on it...
    let mut d = Daemon::spawn(&env, &database_url(&pool), "a", &[], &[]);
    assert!(d.wait_exit(Duration::from_secs(20)).is_some(), "it started");
    assert!(!d.child.wait().unwrap().success());
    assert!(
        d.output().contains("has no .packenvd-root marker"),
        "{}",
        d.output()
    );
    // ...and the running one's build touches nothing and says why.
    let mut builds = tokio::task::JoinSet::new();
    worker.step(&mut builds).await.unwrap();
    while builds.join_next().await.is_some() {}
    let r = row(&pool, id).await;
    assert_ne!(r.status, "ready");
    assert!(
        r.install_error
            .unwrap()
            .contains("has no .packenvd-root marker"),
        "the row says why"
    );
    let err = gc::run_once(&pool, &gc_config(&env, Duration::from_secs(1)), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("envs root"), "{err}");
    assert!(env.envs_root().join("somebody/data").exists());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_can_write_only_to_its_build_its_cache_and_its_tmp(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.env", shell_runtime("echo ok > {env_path}/ok")).await;
    env.pack_dir("victim", &[]);
    add_pack(&pool, "victim").await;
    request(&pool, "victim", "t.env").await;
    env.worker(&pool).drain().await.unwrap();
    let victim = env.envs_root().join("victim");
    let before = tree(&victim);
    let targets = [
        victim.join("t.env/evil"),
        victim.join("evil"),
        env.envs_root().join("evil"),
        env.settings.packs_dir.join("evil"),
        std::path::PathBuf::from("/tmp/packenvd-evil-from-a-step"),
    ];
    let script: String = targets
        .iter()
        .map(|t| format!("echo x > {} 2>/dev/null; ", t.display()))
        .chain([
            "echo x > {env_path}/mine && echo x > $TMPDIR/t && echo x > $PIP_CACHE_DIR.probe && echo allowed-ok > {env_path}/allowed".to_string(),
        ])
        .collect();
    add_runtime(&pool, "t.hostile", shell_runtime(&script)).await;
    env.pack_dir("attacker", &[]);
    add_pack(&pool, "attacker").await;
    let id = request(&pool, "attacker", "t.hostile").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    for t in &targets {
        assert!(!t.exists(), "a step wrote {}", t.display());
    }
    assert_eq!(tree(&victim), before);
    assert!(Path::new(r.env_path.as_deref().unwrap())
        .join("allowed")
        .exists());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_cannot_connect_to_a_port_it_was_not_given(pool: PgPool) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let probe = format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)\" && echo connected > {{env_path}}/result || echo refused > {{env_path}}/result"
    );
    let mut env = Env::new(&[]);
    for (allowed, expect) in [(false, "refused"), (true, "connected")] {
        if allowed {
            env.settings.step_tcp_ports = packenvd::config::Ports(Some(vec![443, port]));
        }
        let rt = format!("t.net{}", u8::from(allowed));
        add_runtime(&pool, &rt, shell_runtime(&probe)).await;
        let pack = format!("p{}", u8::from(allowed));
        env.pack_dir(&pack, &[]);
        add_pack(&pool, &pack).await;
        let id = request(&pool, &pack, &rt).await;
        env.worker(&pool).drain().await.unwrap();
        let r = row(&pool, id).await;
        assert_eq!(r.status, "ready", "{:?}", r.install_error);
        let result = std::fs::read_to_string(format!("{}/result", r.env_path.unwrap())).unwrap();
        assert_eq!(result.trim(), expect, "allowed: {allowed}");
        let accepted = listener.accept().is_ok();
        assert_eq!(
            accepted, allowed,
            "the listener saw a connection: {accepted}"
        );
    }
}

/// Builds `t.env` for pack `p` up to the switch, as the daemon would, and returns the job
/// the ready writer gets.
async fn built_but_not_switched(
    pool: &PgPool,
    env: &Env,
) -> (ReadyJob, tokio::sync::oneshot::Receiver<Written>) {
    env.worker(pool).start_node().await.unwrap();
    let claim = store::claim(
        pool,
        &node_name(),
        "me",
        Duration::from_secs(60),
        1,
        env.envs_root(),
    )
    .await
    .unwrap()
    .pop()
    .expect("a claim");
    let built = packenv_core::build::run(
        &env.settings.build_config(),
        &claim.row.target(),
        &claim.fence.token.simple().to_string(),
        false,
        &BuildLog::new(4096),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let packenv_core::build::Built::Ready(ready) = built else {
        panic!("not a build with a directory");
    };
    let (done, answer) = tokio::sync::oneshot::channel();
    let job = ReadyJob {
        fence: claim.fence,
        transition: Transition::Ready {
            env_path: Some(ready.env_path),
            metadata: ready.metadata,
            fingerprint: Some(ready.fingerprint),
            log: String::new(),
        },
        switch: Some(ready.switch),
        done,
    };
    (job, answer)
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_build_whose_claim_was_lost_never_changes_what_env_path_serves(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.env",
        shell_runtime("echo {env_path} > {env_path}/who"),
    )
    .await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.env").await;
    let writer = ReadyWriter {
        pool: pool.clone(),
        metrics: Arc::default(),
        root: CancellationToken::new(),
    };
    // The first build is served.
    let (job, _) = built_but_not_switched(&pool, &env).await;
    let first_dir = job.switch.as_ref().unwrap().build_dir().to_owned();
    assert!(matches!(
        writer.run_once(&[job]).await.unwrap()[..],
        [Written::Done]
    ));
    let link = env.envs_root().join("p/t.env");
    assert_eq!(std::fs::canonicalize(&link).unwrap(), first_dir);

    // A second build finishes after an operator's reset took its claim: it is thrown away.
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let (stale, _) = built_but_not_switched(&pool, &env).await;
    let stale_dir = stale.switch.as_ref().unwrap().build_dir().to_owned();
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        writer.run_once(&[stale]).await.unwrap()[..],
        [Written::Lost]
    ));
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        first_dir,
        "the stale build was switched in"
    );
    assert!(!stale_dir.exists(), "a discarded build is removed at once");
    let r = row(&pool, id).await;
    assert_eq!(r.status, "pending");
    assert_eq!(
        r.metadata["build_dir"],
        json!(first_dir.display().to_string())
    );
}

#[sqlx::test(migrations = false)]
async fn directories_a_step_made_unreadable_are_still_taken_back_and_removed(_pool: PgPool) {
    if !is_root() {
        eprintln!("skipped: running the daemon as another user with capabilities needs root");
        return;
    }
    // The shipped setup: without CAP_DAC_OVERRIDE, the daemon can neither enter nor empty a
    // directory of mode 000 until it owns it and gives itself the rights.
    let (cluster, pool) = reachable_database().await;
    let url = cluster.url();
    let env = Env::new(&[]);
    hand_to_daemon_user(&env, DAEMON_UID);
    let lock = "for d in {env_path} \"$HOME\" \"$TMPDIR\"; do \
                  mkdir -p \"$d/x/y\" && touch \"$d/x/y/f\" && chmod 000 \"$d/x/y\" \"$d/x\"; \
                done";
    add_runtime(&pool, "t.fail", shell_runtime(&format!("{lock}; exit 1"))).await;
    add_runtime(&pool, "t.ok", shell_runtime(lock)).await;
    let mut ids = Vec::new();
    for (p, rt) in [("f", "t.fail"), ("k", "t.ok")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        ids.push(request(&pool, p, rt).await);
    }
    let build_user = format!("{BUILD_UID}:{BUILD_UID}");
    let vars = [
        ("PACKENVD_BUILD_USER", build_user.as_str()),
        ("PACKENVD_MAX_ATTEMPTS", "1"),
    ];
    let d = Daemon::spawn_with_caps(&env, &url, "a", DAEMON_UID, UNIT_CAPS, &vars);
    let pid = d.child.id();
    eventually(Duration::from_secs(30), "both builds", || async {
        let mut done = true;
        for id in &ids {
            done &= matches!(status_of(&pool, *id).await.as_str(), "ready" | "failed");
        }
        done || has_exited(pid)
    })
    .await;
    let failed = row(&pool, ids[0]).await;
    assert_eq!(failed.status, "failed", "{}", d.output());
    let error = failed.install_error.unwrap();
    assert!(error.contains("step 'script'"), "{error}\n{}", d.output());
    let ready = row(&pool, ids[1]).await;
    assert_eq!(
        ready.status,
        "ready",
        "{:?}\n{}",
        ready.install_error,
        d.output()
    );
    let builds = |p: &str| {
        std::fs::read_dir(env.envs_root().join(p))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".t."))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(builds("f"), Vec::<String>::new(), "the failed build stayed");
    assert_eq!(
        private_tmps(&env),
        Vec::<String>::new(),
        "a build's tmp stayed"
    );

    // The ready one: removed on request, by the daemon's user.
    let out = run_as(&env, &url, DAEMON_UID, "", &["remove", "k", "--yes"], &vars);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        builds("k"),
        Vec::<String>::new(),
        "the removed build stayed"
    );
    drop(d);
    pool.close().await;
}
