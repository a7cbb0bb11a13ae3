//! What operators and systemd see: the notify protocol, SIGHUP reloads, metrics and health,
//! JSON logs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::json;
use sqlx::PgPool;

/// Reads notify datagrams until one contains `needle` (or panics after `limit`).
fn wait_for_datagram(sock: &UnixDatagram, needle: &str, limit: Duration, seen: &mut Vec<String>) {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            if msg.contains(needle) {
                return;
            }
        }
    }
    panic!("no {needle:?} within {limit:?}; got {seen:?}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_daemon_speaks_sd_notify_and_no_step_sees_the_socket(pool: PgPool) {
    let env = Env::new(&[]);
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dump = env.scratch().join("step-env.txt");
    add_runtime(&pool, "t.env", json!([{"name": "dump", "command": "sh", "args": ["-c", format!("env > {}", dump.display())]}])).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;

    let url = database_url(&pool);
    let sock_str = sock_path.display().to_string();
    let d = Daemon::spawn(
        &env,
        &url,
        "a",
        &[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "2000000")],
        &[],
    );
    let mut seen = Vec::new();
    wait_for_datagram(&sock, "READY=1", Duration::from_secs(15), &mut seen);
    assert!(seen.last().unwrap().contains("STATUS="), "{seen:?}");
    wait_for_datagram(&sock, "WATCHDOG=1", Duration::from_secs(10), &mut seen);
    wait_for_datagram(&sock, "building", Duration::from_secs(15), &mut seen);

    let id = request(&pool, "p", "t.env").await;
    eventually(Duration::from_secs(10), "the build", || async {
        status_of(&pool, id).await == "ready"
    })
    .await;
    let step_env = std::fs::read_to_string(&dump).unwrap();
    assert!(
        !step_env.contains("NOTIFY_SOCKET") && !step_env.contains("WATCHDOG_USEC"),
        "{step_env}"
    );

    d.signal(Signal::SIGTERM);
    wait_for_datagram(&sock, "STOPPING=1", Duration::from_secs(10), &mut seen);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn sighup_applies_reloadable_keys_and_survives_a_bad_file(pool: PgPool) {
    let env = Env::new(&[]);
    let config = env.dir.path().join("packenvd.toml");
    std::fs::write(&config, "concurrency = 1\npoll_interval = \"200ms\"\n").unwrap();
    add_runtime(
        &pool,
        "t.slow",
        json!([{"name": "slow", "command": "sleep", "args": ["3"]}]),
    )
    .await;
    let url = database_url(&pool);
    let mut d = Daemon::spawn(
        &env,
        &url,
        "a",
        &[],
        &["--config", &config.display().to_string()],
    );
    eventually(Duration::from_secs(15), "the daemon to start", || async {
        d.output().contains("packenvd started")
    })
    .await;

    std::fs::write(
        &config,
        "concurrency = 3\npoll_interval = \"200ms\"\nlease = \"30s\"\n",
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    // The reload logs one line per changed key, the restart-only ones after: wait for both
    // (reading between the two lines is not a failure).
    eventually(
        Duration::from_secs(5),
        "the reload: concurrency applied and a restart-only key named",
        || async {
            let out = d.output();
            (out.contains("key=\"concurrency\"") || out.contains("key=concurrency"))
                && out.contains("only a restart applies it")
        },
    )
    .await;

    for i in 0..3 {
        let pack = format!("p{i}");
        env.pack_dir(&pack, &[]);
        add_pack(&pool, &pack).await;
        request(&pool, &pack, "t.slow").await;
    }
    eventually(Duration::from_secs(5), "three builds at once", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'installing'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n == 3
    })
    .await;
    let claimed_by: String = sqlx::query_scalar("SELECT min(claimed_by) FROM pack_environment")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(claimed_by, "a", "instance_name stays");

    std::fs::write(&config, "concurrency = = oops\n").unwrap();
    d.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "the failed reload", || async {
        d.output()
            .contains("reload failed; keeping the running configuration")
    })
    .await;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "a bad file must not stop the daemon"
    );
    eventually(Duration::from_secs(15), "the builds to finish", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE status = 'ready'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n == 3
    })
    .await;
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn metrics_and_healthz_are_served_when_asked(pool: PgPool) {
    let env = Env::new(&[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    add_runtime(&pool, "t.ok", shell_runtime("true")).await;
    add_runtime(&pool, "t.bad", shell_runtime("exit 3")).await;
    for (p, rt) in [("p1", "t.ok"), ("p2", "t.bad")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        request(&pool, p, rt).await;
    }
    let url = database_url(&pool);
    let listen = format!("127.0.0.1:{port}");
    let _d = Daemon::spawn(
        &env,
        &url,
        "a",
        &[
            ("PACKENVD_METRICS_LISTEN", &listen),
            ("PACKENVD_MAX_ATTEMPTS", "1"),
        ],
        &[],
    );
    eventually(Duration::from_secs(15), "both builds", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pack_environment WHERE status IN ('ready', 'failed')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        n == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    let node = node_name();
    for line in [
        "packenvd_builds_total{outcome=\"ready\"} 1".to_string(),
        "packenvd_builds_total{outcome=\"failed\"} 1".to_string(),
        format!("packenvd_environments{{status=\"ready\",node=\"{node}\"}} 1"),
        format!("packenvd_environments{{status=\"failed\",node=\"{node}\"}} 1"),
        "packenvd_pickup_latency_seconds_count 2".to_string(),
        "packenvd_build_duration_seconds_count 2".to_string(),
    ] {
        assert!(body.contains(&line), "missing {line:?} in:\n{body}");
    }
    let (status, body) = http_get(port, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn json_logs_carry_the_row_on_every_state_change(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.shell").await;
    let url = database_url(&pool);
    let mut d = Daemon::spawn(
        &env,
        &url,
        "a",
        &[],
        &["--until-done", "--log-format", "json"],
    );
    assert!(d.wait_exit(Duration::from_secs(20)).is_some());
    let out = d.output();
    // Every line is JSON but the summary `--until-done` prints on stdout for the operator.
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.starts_with("done: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        out.contains("done: 1 environment(s) built, 0 failed"),
        "{out}"
    );
    let changes: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            matches!(
                l["fields"]["message"].as_str(),
                Some("installing" | "build finished")
            )
        })
        .collect();
    assert_eq!(changes.len(), 2, "{out}");
    for c in changes {
        let span = &c["span"];
        assert_eq!(span["pack_ref"], "p");
        assert_eq!(span["runtime_ref"], "core.shell");
        assert_eq!(span["env_id"], id);
        assert!(
            span["claim_token"].as_str().is_some_and(|t| t.len() == 36),
            "{c}"
        );
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_config_file_is_hidden_from_steps_before_and_after_a_reload(pool: PgPool) {
    let env = Env::new(&[]);
    let config = env.dir.path().join("packenvd.toml");
    let marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&config, format!("poll_interval = \"200ms\"\n# {marker}\n")).unwrap();
    let peek = format!("cat {} > {{env_path}}/peek 2>&1; true", config.display());
    add_runtime(&pool, "t.peek", shell_runtime(&peek)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.peek").await;
    let url = database_url(&pool);
    // A relative --config, as an operator may type it.
    let d = Daemon::spawn_in(
        &env,
        &url,
        "a",
        &[],
        &["--config", "packenvd.toml"],
        env.dir.path(),
    );
    let peeked = |build: Option<String>| {
        let pool = &pool;
        async move {
            eventually(Duration::from_secs(15), "a build", || async {
                let r = row(pool, id).await;
                r.status == "ready" && r.metadata["build_dir"].as_str() != build.as_deref()
            })
            .await;
            let build = row(pool, id).await.metadata["build_dir"]
                .as_str()
                .unwrap()
                .to_owned();
            let seen = std::fs::read_to_string(format!("{build}/peek")).unwrap();
            (build, seen)
        }
    };
    let (first, seen) = peeked(None).await;
    assert!(
        seen.contains("Permission denied") && !seen.contains(&marker),
        "{seen}"
    );

    std::fs::write(&config, format!("poll_interval = \"300ms\"\n# {marker}\n")).unwrap();
    d.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "the reload", || async {
        d.output().contains("reloaded")
    })
    .await;
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let (_, seen) = peeked(Some(first)).await;
    assert!(
        seen.contains("Permission denied") && !seen.contains(&marker),
        "after the reload: {seen}\n{}",
        d.output()
    );
}

#[test]
fn check_config_with_a_relative_config_file_prints_a_file_that_loads_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("packenvd.toml"),
        "step_hidden = [\"/srv/private\"]\n",
    )
    .unwrap();
    let check_config = |file: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
            .args(["--config", file, "check-config"])
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "check-config --config {file}: {stderr}"
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let step_hidden = |toml: &str| {
        toml.lines()
            .find(|l| l.starts_with("step_hidden ="))
            .unwrap()
            .split("    #")
            .next()
            .unwrap()
            .to_owned()
    };
    let first = check_config("packenvd.toml");
    assert_eq!(step_hidden(&first), "step_hidden = [\"/srv/private\"]");
    std::fs::write(dir.path().join("out.toml"), &first).unwrap();
    let second = check_config("out.toml");
    assert_eq!(step_hidden(&second), step_hidden(&first));
}
