//! Hostile pack files and rows (DESIGN §6): each fails its own row with a clear error, never
//! freezes the daemon, and never takes another row down with it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use sqlx::PgPool;

fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn fifo_device_and_huge_manifests_fail_their_rows_at_once_and_the_daemon_keeps_answering(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.py",
        json!({"installers": [{"name": "noop", "command": "true"}]}),
    )
    .await;
    let fifo = |name: &str| {
        let dir = env.pack_dir(name, &[]);
        nix::unistd::mkfifo(
            &dir.join("requirements.txt"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
    };
    fifo("fifo1");
    fifo("fifo2");
    let zero = env.pack_dir("zero", &[]);
    std::os::unix::fs::symlink("/dev/zero", zero.join("requirements.txt")).unwrap();
    let huge = env.pack_dir("huge", &[]);
    std::fs::File::create(huge.join("package.json"))
        .unwrap()
        .set_len(10 << 30)
        .unwrap();
    env.pack_dir("good", &[("requirements.txt", "six\n")]);
    let mut ids = Vec::new();
    for p in ["fifo1", "fifo2", "zero", "huge", "good"] {
        add_pack(&pool, p).await;
        ids.push((p, request(&pool, p, "t.py").await));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let _d = Daemon::spawn(
        &env,
        &database_url(&pool),
        "a",
        &[("PACKENVD_METRICS_LISTEN", &listen)],
        &[],
    );
    // /healthz answers all along; the slowest answer is the figure.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    loop {
        let asked = Instant::now();
        let status = http_status(port, "/healthz");
        if status.is_some() {
            slowest = slowest.max(asked.elapsed());
        }
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pack_environment WHERE status IN ('ready', 'failed')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if done == 5 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not done in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_status(port, "/healthz"), Some(200));
    for (pack, id) in ids {
        let r = row(&pool, id).await;
        let error = r.install_error.clone().unwrap_or_default();
        match pack {
            "good" => assert_eq!(r.status, "ready", "{error}"),
            "fifo1" | "fifo2" => {
                assert_eq!(r.status, "failed");
                assert!(
                    error.contains("requirements.txt is a FIFO, not a regular file"),
                    "{error}"
                );
                assert_eq!(r.attempts, 1, "permanent");
            }
            // A link out of the pack is not even opened.
            "zero" => assert!(
                error.contains("requirements.txt resolves outside the pack directory"),
                "{error}"
            ),
            "huge" => assert!(error.contains("package.json is larger than"), "{error}"),
            _ => unreachable!(),
        }
    }
    println!(
        "FIGURE hostile manifests: 2 FIFOs, /dev/zero and a 10 GB file failed at once; /healthz's slowest answer {:.1} ms",
        slowest.as_secs_f64() * 1000.0
    );
}

/// `{"a": {"a": ... }}` nested `depth` deep.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }))
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_runtime_nested_130_deep_fails_its_row_and_the_rest_of_the_claim_builds(pool: PgPool) {
    let env = Env::new(&[]);
    let mut deep = json!({"installers": []});
    deep["x"] = nested(130);
    add_runtime(&pool, "t.deep", deep).await;
    add_runtime(&pool, "t.ok", shell_runtime("true")).await;
    let mut ok = Vec::new();
    for p in ["a", "b", "c", "d"] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
    }
    let bad = request(&pool, "a", "t.deep").await;
    for p in ["b", "c", "d"] {
        ok.push(request(&pool, p, "t.ok").await);
    }
    // One claim takes all four rows.
    assert_eq!(env.worker(&pool).drain().await.unwrap(), 4);
    let r = row(&pool, bad).await;
    assert_eq!((r.status.as_str(), r.attempts), ("failed", 1));
    let error = r.install_error.unwrap();
    assert!(
        error.contains("runtime t.deep: invalid installers JSON")
            && error.contains("recursion limit"),
        "{error}"
    );
    for id in ok {
        assert_eq!(status_of(&pool, id).await, "ready");
    }

    // Verification: the deep row fails its check alone; the others are verified, and none
    // stays marked "being checked".
    sqlx::query(
        "UPDATE pack_environment_node SET status = 'ready', install_error = NULL WHERE env_id = $1",
    )
    .bind(bad)
    .execute(&pool)
    .await
    .unwrap();
    let found = packenvd::verify::run_pass(&pool, &env.settings, &packenvd::verify::Scope::All)
        .await
        .unwrap();
    assert_eq!(found.len(), 4);
    let broken: Vec<&str> = found
        .iter()
        .filter(|f| f.failure.is_some())
        .map(|f| f.pack_ref.as_str())
        .collect();
    assert_eq!(broken, ["a"]);
    let checking: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pack_environment WHERE last_verify_result LIKE 'being checked%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(checking, 0);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_row_claiming_another_packs_ref_fails_and_leaves_that_pack_alone(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.mark",
        shell_runtime("echo mine > {env_path}/owner"),
    )
    .await;
    env.pack_dir("victim", &[]);
    env.pack_dir("attacker", &[]);
    add_pack(&pool, "victim").await;
    let attacker = add_pack(&pool, "attacker").await;
    let victim_row = request(&pool, "victim", "t.mark").await;
    env.worker(&pool).drain().await.unwrap();
    let before = tree(&env.envs_root().join("victim"));
    // A row of the attacker's pack that says it is the victim's (the runtime differs, so the
    // unique constraint lets it in).
    add_runtime(
        &pool,
        "t.mark2",
        shell_runtime("echo stolen > {env_path}/owner"),
    )
    .await;
    let lie: i64 = sqlx::query_scalar(
        "INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref)
         SELECT $1, 'victim', r.id, r.ref FROM runtime r WHERE r.ref = 't.mark2' RETURNING id",
    )
    .bind(attacker)
    .fetch_one(&pool)
    .await
    .unwrap();
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, lie).await;
    assert_eq!(r.status, "failed");
    assert!(r
        .install_error
        .unwrap()
        .contains("the row's pack_ref 'victim' is not the ref 'attacker' of its pack"),);
    assert_eq!(tree(&env.envs_root().join("victim")), before);
    assert_eq!(status_of(&pool, victim_row).await, "ready");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn runtimes_whose_names_differ_in_case_do_not_share_a_directory(pool: PgPool) {
    let env = Env::new(&[]);
    sqlx::query(
        "INSERT INTO runtime (ref, name, installers) VALUES
         ('t.upper', 'Same', $1), ('t.lower', 'same', $2)",
    )
    .bind(shell_runtime("echo upper > {env_path}/who"))
    .bind(shell_runtime("echo lower > {env_path}/who"))
    .execute(&pool)
    .await
    .unwrap();
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let first = request(&pool, "p", "t.upper").await;
    let second = request(&pool, "p", "t.lower").await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(status_of(&pool, first).await, "ready");
    let r = row(&pool, second).await;
    assert_eq!(
        (r.status.as_str(), r.attempts),
        ("failed", 1),
        "no rebuild loop"
    );
    assert!(r.install_error.unwrap().contains(
        "runtime t.lower and runtime t.upper of pack p would share the directory 'same'"
    ),);
    let who = std::fs::read_to_string(env.envs_root().join("p/same/who")).unwrap();
    assert_eq!(who, "upper\n");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn verification_never_runs_a_path_the_rows_metadata_names(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.tool",
        json!({
            "installers": [{"name": "tool", "command": "sh", "args": ["-c",
                "mkdir -p {env_path}/bin && printf '#!/bin/sh\\necho tool\\n' > {env_path}/bin/tool && chmod +x {env_path}/bin/tool"]}],
            "executable_templates": {"tool": "{env_path}/bin/tool"}
        }),
    )
    .await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.tool").await;
    env.worker(&pool).drain().await.unwrap();
    let trap = env.scratch().join("trap.sh");
    let marker = env.scratch().join("trap-ran");
    std::fs::write(&trap, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&trap, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    sqlx::query(
        "UPDATE pack_environment_node SET metadata = jsonb_set(metadata, '{executables,tool}', to_jsonb($2::text)) WHERE env_id = $1",
    )
    .bind(id)
    .bind(trap.display().to_string())
    .execute(&pool)
    .await
    .unwrap();
    let found = packenvd::verify::run_pass(&pool, &env.settings, &packenvd::verify::Scope::All)
        .await
        .unwrap();
    assert!(found[0].failure.is_none(), "{found:?}");
    assert!(!marker.exists(), "verification ran the path metadata named");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_result_the_database_refuses_fails_its_row_with_the_reason_and_the_batch_lands(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    // A constraint the platform added: no ready row whose log says POISON.
    sqlx::query(
        "ALTER TABLE pack_environment ADD CONSTRAINT no_poison
         CHECK (status <> 'ready' OR install_log IS NULL OR install_log NOT LIKE '%POISON%')",
    )
    .execute(&pool)
    .await
    .unwrap();
    add_runtime(&pool, "t.poison", shell_runtime("echo POISON")).await;
    add_runtime(&pool, "t.ok", shell_runtime("true")).await;
    let mut ids = Vec::new();
    for (p, rt) in [("bad", "t.poison"), ("a", "t.ok"), ("b", "t.ok")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        ids.push(request(&pool, p, rt).await);
    }
    env.worker(&pool).drain().await.unwrap();
    let bad = row(&pool, ids[0]).await;
    assert_eq!(bad.status, "failed");
    let error = bad.install_error.unwrap();
    assert!(
        error.contains("the database refused to record the finished build")
            && error.contains("no_poison"),
        "{error}"
    );
    for id in &ids[1..] {
        assert_eq!(status_of(&pool, *id).await, "ready");
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn sigterm_finishes_in_bounded_time_while_the_database_refuses_every_write_of_a_row(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.pack_ref = 'stuck' AND OLD.status = 'installing' AND NEW.status <> 'installing' THEN
                 RAISE EXCEPTION 'permission denied for this row' USING ERRCODE = '42501';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON pack_environment FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&pool)
    .await
    .unwrap();
    add_runtime(&pool, "t.ok", shell_runtime("true")).await;
    add_runtime(&pool, "t.slow", shell_runtime("sleep 600")).await;
    let mut ids = Vec::new();
    for (p, rt) in [("stuck", "t.ok"), ("ok", "t.ok"), ("slow", "t.slow")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        ids.push(request(&pool, p, rt).await);
    }
    let mut d = Daemon::spawn(
        &env,
        &database_url(&pool),
        "a",
        &[("PACKENVD_SHUTDOWN_GRACE", "1s")],
        &[],
    );
    eventually(Duration::from_secs(20), "the refusal", || async {
        d.output()
            .contains("the database refused to record the outcome")
    })
    .await;
    // The other rows are not held back by the refused one (their writes may come just after).
    eventually(Duration::from_secs(20), "ok ready", || async {
        status_of(&pool, ids[1]).await == "ready"
    })
    .await;
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let took = d
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no exit within grace + 19 s:\n{}", d.output()));
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    assert_eq!(status_of(&pool, ids[2]).await, "pending", "handed back");
    println!(
        "FIGURE refused write-back: SIGTERM to exit in {:.1} s (grace 1 s)",
        took.as_secs_f64()
    );
}

/// The lines of a file outside every pack that no row's log or error may ever show.
fn outside_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| l.len() > 3)
        .map(String::from)
        .collect()
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn includes_and_paths_leaving_the_pack_fail_their_rows_and_leak_no_byte_of_the_outside_file(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    // A file outside every pack, with a line found nowhere else.
    let marker = format!("packenvd-marker-{}", uuid::Uuid::new_v4().simple());
    let outside = env.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), format!("{marker}\n")).unwrap();
    std::fs::write(
        outside.join("pyproject.toml"),
        format!("[project]\nname = \"{marker}\"\nversion = \"1\"\n"),
    )
    .unwrap();
    std::fs::write(
        outside.join("package.json"),
        format!("{{\"name\": \"{marker}\", \"version\": \"1.0.0\"}}\n"),
    )
    .unwrap();
    let python = |name: &str, requirements: &str| {
        env.pack_dir(
            name,
            &[("requirements.txt", &format!("--no-index\n{requirements}\n"))],
        )
    };
    python("shadow-r", "-r /etc/shadow");
    python("shadow-c", "-c /etc/shadow");
    python("escape-r", "-r ../../outside/secret.txt");
    python("editable", "-e ../../outside");
    python("file-url", &format!("x @ file://{}", outside.display()));
    let link = env.pack_dir("link", &[]);
    std::os::unix::fs::symlink("/etc/shadow", link.join("requirements.txt")).unwrap();
    let etc = python("etc-link", "-r etc/shadow");
    std::os::unix::fs::symlink("/etc", etc.join("etc")).unwrap();
    let npm = env.pack_dir(
        "npm-file",
        &[(
            "package.json",
            "{\"name\": \"p\", \"version\": \"1.0.0\",\n \"dependencies\": {\"evil\": \"file:../../outside\"}}\n",
        )],
    );
    // A pack whose includes stay inside (a nested -r, a -c, a symlink within the pack) builds.
    let good = env.pack_dir("good", &[]);
    make_wheel(&good.join("wheels"), "0.1.0");
    std::fs::create_dir_all(good.join("req")).unwrap();
    std::fs::write(
        good.join("req/base.txt"),
        format!(
            "--no-index\n--find-links {}\n-c pins.txt\npackenvd-fixture\n",
            good.join("wheels").display()
        ),
    )
    .unwrap();
    std::fs::write(good.join("req/pins.txt"), "packenvd-fixture==0.1.0\n").unwrap();
    // Installers read a symlinked file's includes relative to the link's directory.
    std::os::unix::fs::symlink("base.txt", good.join("req/link.txt")).unwrap();
    std::fs::write(good.join("requirements.txt"), "-r req/link.txt\n").unwrap();

    let rows = [
        (
            "shadow-r",
            "core.python",
            "requirements.txt, line 2: -r '/etc/shadow' resolves outside the pack directory",
        ),
        (
            "shadow-c",
            "core.python",
            "requirements.txt, line 2: -c '/etc/shadow' resolves outside the pack directory",
        ),
        (
            "escape-r",
            "core.python",
            "requirements.txt, line 2: -r '../../outside/secret.txt' resolves outside",
        ),
        (
            "editable",
            "core.python",
            "requirements.txt, line 2: -e '../../outside' resolves outside",
        ),
        (
            "file-url",
            "core.python",
            &format!(
                "requirements.txt, line 2: a direct reference 'file://{}' resolves outside",
                outside.display()
            ),
        ),
        (
            "link",
            "core.python",
            "requirements.txt (read by step 'install requirements",
        ),
        (
            "etc-link",
            "core.python",
            "requirements.txt, line 2: -r 'etc/shadow' resolves outside",
        ),
        (
            "npm-file",
            "core.nodejs",
            "package.json, line 2: dependencies.evil 'file:../../outside' resolves outside",
        ),
        ("good", "core.python", ""),
    ];
    let mut ids = Vec::new();
    for (pack, runtime, _) in &rows {
        add_pack(&pool, pack).await;
        ids.push(request(&pool, pack, runtime).await);
    }
    let worker = env.worker(&pool);
    let started = Instant::now();
    while worker.drain().await.unwrap() > 0 {}
    let took = started.elapsed();

    let mut secrets = outside_lines(std::path::Path::new("/etc/shadow"));
    secrets.push(marker.clone());
    for ((pack, _, expected), id) in rows.iter().zip(ids) {
        let r = row(&pool, id).await;
        let error = r.install_error.clone().unwrap_or_default();
        let log = r.install_log.clone().unwrap_or_default();
        for s in &secrets {
            assert!(
                !error.contains(s.as_str()) && !log.contains(s.as_str()),
                "{pack}: a line of a file outside the pack reached the row:\n{error}\n{log}"
            );
        }
        if *pack == "good" {
            assert_eq!(r.status, "ready", "{error}\n{log}");
            continue;
        }
        assert_eq!(
            (r.status.as_str(), r.attempts),
            ("failed", 1),
            "{pack}: {error}"
        );
        assert!(error.contains(expected), "{pack}: {error}");
        assert!(!log.contains("==> step"), "{pack}: a step ran:\n{log}");
    }
    let _ = npm;
    println!(
        "FIGURE 8 hostile includes refused and a good pack built in {:.1} s",
        took.as_secs_f64()
    );
}
