//! packenv-client (issue 15) against a real database and a real daemon: every operation, the
//! waits and their errors, several nodes, and the example action runner
//! (`examples/run_action.rs`) end to end. The daemon is the worker in-process: drained where
//! the test only needs builds done, running with its listener and services where a wait
//! needs it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use packenv_client::{Client, Error, Status};
use packenvd::verify::{run_pass, Scope};
use packenvd::worker::Shutdown;
use sqlx::postgres::PgListener;
use sqlx::PgPool;

/// A runtime whose build holds an executable `tool` and names a variable pointing into it.
fn tool_runtime() -> serde_json::Value {
    serde_json::json!({
        "installers": [{"name": "make tool", "command": "sh", "args": ["-c",
            "mkdir -p {env_path}/bin && printf '#!/bin/sh\\necho tool\\n' > {env_path}/bin/tool && chmod +x {env_path}/bin/tool"]}],
        "executable_templates": {"tool": "{env_path}/bin/tool"},
        "env_vars": {"TOOL_HOME": "{env_path}"}
    })
}

/// The daemon's loop with its services, in the background.
struct Running {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), packenvd::Error>>,
}

impl Running {
    fn start(env: &Env, pool: &PgPool) -> Running {
        let worker = env.worker(pool);
        let shutdown = worker.shutdown();
        let task = tokio::spawn({
            let s = shutdown.clone();
            async move { worker.run(&s, false).await }
        });
        Running { shutdown, task }
    }

    /// Stops it at once: running builds are killed and handed back.
    async fn stop(self) {
        self.shutdown.stop();
        self.shutdown.kill();
        self.task.await.unwrap().unwrap();
    }
}

async fn ready_pack(pool: &PgPool, env: &Env, pack: &str, runtime: &str) {
    env.pack_dir(pack, &[]);
    add_pack(pool, pack).await;
    request(pool, pack, runtime).await;
    env.worker(pool).drain().await.unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn request_get_list_and_remove_answer_from_the_database_and_name_what_is_missing(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    add_pack(&pool, "p").await;
    env.pack_dir("p", &[]);
    let client = Client::new(pool.clone());

    assert!(
        matches!(client.request("nope", "t.tool").await, Err(Error::NoSuchPack(p)) if p == "nope")
    );
    assert!(
        matches!(client.request("p", "t.nope").await, Err(Error::NoSuchRuntime(r)) if r == "t.nope")
    );
    assert!(matches!(
        client.get("p", "t.tool").await,
        Err(Error::NoSuchEnvironment { .. })
    ));
    assert!(matches!(
        client.get("nope", "t.tool").await,
        Err(Error::NoSuchPack(_))
    ));
    assert!(matches!(
        client.lookup("p", "t.tool").await,
        Err(Error::NoSuchEnvironment { .. })
    ));
    assert!(matches!(
        client.lookup("p", "t.nope").await,
        Err(Error::NoSuchRuntime(_))
    ));

    let asked = client.request("p", "t.tool").await.unwrap();
    assert_eq!((asked.status, asked.nodes.len()), (Status::Pending, 0));
    // No packenvd has registered this host yet.
    let e = client.lookup("p", "t.tool").await.unwrap_err();
    assert!(
        matches!(&e, Error::NotOnNode { node } if node == client.node()),
        "{e}"
    );

    env.worker(&pool).drain().await.unwrap();
    let got = client.get("p", "t.tool").await.unwrap();
    assert_eq!(
        (got.id, got.status, got.install_error.as_deref()),
        (asked.id, Status::Ready, None)
    );
    let mine = got.node(client.node()).expect("this host's copy");
    assert_eq!(mine.status, Status::Ready);
    let build = mine.build_dir.clone().expect("a build");
    assert!(build.starts_with(env.envs_root().join("p")), "{build:?}");
    assert_eq!(mine.executables["tool"], build.join("bin/tool"));
    assert_eq!(mine.env_vars["TOOL_HOME"], build.display().to_string());
    assert!(mine.installed_at.is_some() && mine.last_verified.is_some() && !mine.node_gone);

    add_pack(&pool, "q").await;
    client.request("q", "t.tool").await.unwrap();
    let refs = |envs: Vec<packenv_client::Environment>| {
        envs.into_iter().map(|e| e.pack_ref).collect::<Vec<_>>()
    };
    assert_eq!(refs(client.list(Some("p")).await.unwrap()), ["p"]);
    assert_eq!(refs(client.list(None).await.unwrap()), ["p", "q"]);

    assert!(client.remove("p", "t.tool").await.unwrap());
    assert!(matches!(
        client.get("p", "t.tool").await,
        Err(Error::NoSuchEnvironment { .. })
    ));
    assert!(!client.remove("p", "t.tool").await.unwrap());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn lookup_gives_the_resolved_build_never_the_link_and_keeps_it_while_a_rebuild_waits(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    ready_pack(&pool, &env, "p", "t.tool").await;
    let client = Client::new(pool.clone());

    let resolved = client.lookup("p", "t.tool").await.unwrap();
    let link = env.envs_root().join("p/t.tool");
    let build = resolved.build_dir.clone().unwrap();
    assert_ne!(build, link);
    assert_eq!(std::fs::canonicalize(&link).unwrap(), build);
    let tool = client.executable("p", "t.tool", "tool").await.unwrap();
    assert_eq!(tool, build.join("bin/tool"));
    let out = std::process::Command::new(&tool).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tool");
    assert_eq!(
        client.env_vars("p", "t.tool").await.unwrap(),
        resolved.env_vars
    );
    match client.executable("p", "t.tool", "python").await {
        Err(Error::NoSuchExecutable { name, available }) => {
            assert_eq!(
                (name.as_str(), available),
                ("python", vec!["tool".to_string()])
            )
        }
        other => panic!("{other:?}"),
    }

    // An operator's reset, no daemon running: the current build serves until the new one is
    // switched in.
    sqlx::query("UPDATE pack_environment SET status = 'pending'")
        .execute(&pool)
        .await
        .unwrap();
    let waiting = client.lookup("p", "t.tool").await.unwrap();
    assert_eq!(
        (waiting.status, waiting.build_dir),
        (Status::Pending, Some(build.clone()))
    );
    env.worker(&pool).drain().await.unwrap();
    let rebuilt = client.lookup("p", "t.tool").await.unwrap();
    assert_eq!(rebuilt.status, Status::Ready);
    assert_ne!(rebuilt.build_dir, Some(build));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn ensure_requests_and_returns_once_the_daemon_built_it_woken_by_the_status_channel(
    pool: PgPool,
) {
    let env = Env::new(&[("poll_interval", "1m")]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    add_pack(&pool, "p").await;
    env.pack_dir("p", &[]);
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener
        .listen(packenv_client::STATUS_CHANNEL)
        .await
        .unwrap();
    let daemon = Running::start(&env, &pool);
    let client = Client::new(pool.clone());

    let got = client
        .ensure("p", "t.tool", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got.status, Status::Ready);
    assert!(got.node(client.node()).unwrap().build_dir.is_some());
    let note = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(note.payload(), format!("{} ready", got.id));

    // A ready environment is returned as it is: no request, no new generation.
    let generation = || async {
        sqlx::query_scalar::<_, i64>("SELECT generation FROM pack_environment")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = generation().await;
    client
        .ensure("p", "t.tool", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(generation().await, before);
    daemon.stop().await;
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn ensure_on_a_failing_pack_returns_the_cause(pool: PgPool) {
    let env = Env::new(&[("max_attempts", "1")]);
    add_runtime(
        &pool,
        "t.fail",
        shell_runtime("echo 'no package named nothing-here' >&2; exit 3"),
    )
    .await;
    add_pack(&pool, "p").await;
    env.pack_dir("p", &[]);
    let daemon = Running::start(&env, &pool);
    let client = Client::new(pool.clone());

    let e = client
        .ensure("p", "t.fail", Duration::from_secs(60))
        .await
        .unwrap_err();
    let Error::Failed { cause } = &e else {
        panic!("{e:?}")
    };
    assert!(
        cause.contains("exited with status 3") && cause.contains("no package named nothing-here"),
        "{cause}"
    );
    assert!(e.to_string().starts_with("failed: "), "{e}");
    // The runner's lookup says the same.
    assert!(matches!(
        client.lookup("p", "t.fail").await,
        Err(Error::Failed { .. })
    ));
    daemon.stop().await;
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn ensure_gives_up_after_its_timeout_saying_which_step_runs(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(
        &pool,
        "t.slow",
        serde_json::json!({"installers": [
            {"name": "quick", "order": 1, "command": "true"},
            {"name": "slow", "order": 2, "command": "sleep", "args": ["60"]}
        ]}),
    )
    .await;
    add_pack(&pool, "p").await;
    env.pack_dir("p", &[]);
    let daemon = Running::start(&env, &pool);
    let client = Client::new(pool.clone());

    let started = Instant::now();
    let e = client
        .ensure("p", "t.slow", Duration::from_secs(5))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(e.to_string(), "not ready: installing step 2/2");
    let e = client.lookup("p", "t.slow").await.unwrap_err();
    assert!(
        matches!(&e, Error::NotReady { status: Status::Installing, step: Some(s) } if s == "2/2"),
        "{e:?}"
    );
    daemon.stop().await;
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn executable_on_several_nodes_is_this_nodes_own_build(pool: PgPool) {
    let here = Env::new(&[]);
    let packs = here.settings.packs_dir.display().to_string();
    let other = Env::new(&[("packs_dir", &packs), ("node_name", "other-host")]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    ready_pack(&pool, &here, "p", "t.tool").await;
    other.worker(&pool).drain().await.unwrap();
    let client = Client::new(pool.clone());
    assert_eq!(client.get("p", "t.tool").await.unwrap().nodes.len(), 2);

    let mine = client.executable("p", "t.tool", "tool").await.unwrap();
    assert!(mine.starts_with(here.envs_root()), "{mine:?}");
    let theirs = client
        .clone()
        .with_node("other-host")
        .executable("p", "t.tool", "tool")
        .await
        .unwrap();
    assert!(theirs.starts_with(other.envs_root()), "{theirs:?}");
    let e = client
        .with_node("nobody")
        .lookup("p", "t.tool")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotOnNode { .. }), "{e}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn request_verification_puts_every_copy_first_in_the_next_pass(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    ready_pack(&pool, &env, "p", "t.tool").await;
    let client = Client::new(pool.clone());

    assert_eq!(client.request_verification("p", "t.tool").await.unwrap(), 1);
    let unverified = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pack_environment_node WHERE last_verified IS NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(unverified().await, 1);
    // The default pass takes only what is older than verify_max_age (7 days): this row.
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].failure.is_none(), "{found:?}");
    assert_eq!(unverified().await, 0);
    assert!(matches!(
        client.request_verification("p", "core.shell").await,
        Err(Error::NoSuchEnvironment { .. })
    ));
}

/// The example runner's binary, built by cargo when it is missing or older than its source
/// (`cargo nextest run -p packenvd` alone does not build the client's examples).
fn run_action_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let target_dir = profile_dir.parent().unwrap();
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--quiet",
            "-p",
            "packenv-client",
            "--example",
            "run_action",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("cargo");
    assert!(status.success(), "building the run_action example");
    profile_dir.join("examples/run_action")
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_example_runner_registers_a_pack_and_runs_its_action_with_the_packs_interpreter(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    let pack = env.pack_dir(
        "runner_demo",
        &[("requirements.txt", &wheel_requirements(&wheels))],
    );
    std::fs::create_dir_all(pack.join("actions")).unwrap();
    std::fs::write(
        pack.join("actions/show.py"),
        "import os, sys, packenvd_fixture\n\
         print('fixture', packenvd_fixture.VERSION)\n\
         print('prefix', sys.prefix)\n\
         print('virtual_env', os.environ.get('VIRTUAL_ENV'))\n\
         print('path0', os.environ['PATH'].split(':')[0])\n",
    )
    .unwrap();
    let runner = run_action_binary();
    let daemon = Running::start(&env, &pool);

    let out = tokio::process::Command::new(&runner)
        .arg("--timeout")
        .arg("120")
        .arg(&pack)
        .args(["core.python", "actions/show.py"])
        .env("DATABASE_URL", database_url(&pool))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // Registered as the platform would, with its storage path, and built from it.
    let storage: Option<String> =
        sqlx::query_scalar("SELECT storage_path FROM pack WHERE ref = 'runner_demo'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(storage, Some(pack.display().to_string()));
    let build: String = sqlx::query_scalar(
        "SELECT n.metadata ->> 'build_dir' FROM pack_environment_node n
         JOIN pack_environment pe ON pe.id = n.env_id WHERE pe.pack_ref = 'runner_demo'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // The action ran on the build's interpreter, not through the env_path link, with the
    // build's variables.
    assert!(stdout.contains("fixture 0.1.0"), "{stdout}");
    assert!(stdout.contains(&format!("prefix {build}\n")), "{stdout}");
    assert!(
        stdout.contains(&format!("virtual_env {build}\n")),
        "{stdout}"
    );
    // The venv's bin first on PATH, as activating it would.
    assert!(stdout.contains(&format!("path0 {build}/bin\n")), "{stdout}");
    assert!(
        stderr.contains("==> running actions/show.py on node"),
        "{stderr}"
    );
    daemon.stop().await;
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_runners_lookup_reads_indexes_only_on_the_tables_that_grow(pool: PgPool) {
    // 3,000 ready environments on three nodes: enough rows that a scan would cost more than
    // the index probes, as on a platform's database.
    sqlx::raw_sql(
        "INSERT INTO pack (ref, label) SELECT 'lk' || i, '' FROM generate_series(1, 3000) i;
         INSERT INTO pack_environment (pack, runtime, status, env_path)
         SELECT p.id, r.id, 'ready', '/envs/' || p.ref || '/python'
         FROM pack p, runtime r WHERE r.ref = 'core.python';
         INSERT INTO packenvd_node (name, envs_root)
         SELECT 'n' || i, '/envs' FROM generate_series(1, 3) i;
         INSERT INTO pack_environment_node (env_id, node, status, env_path, metadata)
         SELECT pe.id, nd.name, 'ready', pe.env_path,
                jsonb_build_object('build_dir', pe.env_path || '-' || nd.name)
         FROM pack_environment pe, packenvd_node nd;
         ANALYZE;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", packenv_client::LOOKUP_SQL))
        .bind("lk1234")
        .bind("core.python")
        .bind("n2")
        .fetch_all(&pool)
        .await
        .unwrap();
    let plan = plan.join("\n");
    for table in ["pack", "pack_environment", "pack_environment_node"] {
        assert!(
            !plan.contains(&format!("Seq Scan on {table} ")),
            "{table} is scanned:\n{plan}"
        );
    }
    let found = Client::new(pool.clone())
        .with_node("n2")
        .lookup("lk1234", "core.python")
        .await
        .unwrap();
    assert_eq!(
        found.build_dir,
        Some(PathBuf::from("/envs/lk1234/python-n2"))
    );
}

/// deploy/client-role.sql as psql runs it with `-v role=<role>`: its meta-commands dropped,
/// its variables substituted.
fn client_role_sql(role: &str) -> String {
    let sql: String = include_str!("../../../deploy/client-role.sql")
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(sql.contains(":\"role\"") && sql.contains(":'role'"));
    sql.replace(":\"role\"", &format!("\"{role}\""))
        .replace(":'role'", &format!("'{role}'"))
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_client_role_of_deploy_does_every_operation_and_nothing_more(pool: PgPool) {
    let env = Env::new(&[("max_attempts", "1")]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    add_runtime(&pool, "t.fail", shell_runtime("exit 3")).await;
    add_pack(&pool, "p").await;
    env.pack_dir("p", &[]);
    // Roles are cluster-wide and each test has its own database: a role named after it.
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let role = format!("client_{}", db.trim_start_matches("_sqlx_test_")).to_lowercase();
    let password = format!("pw{}", std::process::id());
    sqlx::raw_sql(&client_role_sql(&role))
        .execute(&pool)
        .await
        .expect("applying deploy/client-role.sql");
    sqlx::query(&format!("ALTER ROLE \"{role}\" PASSWORD '{password}'"))
        .execute(&pool)
        .await
        .unwrap();
    let mut url: sqlx::postgres::PgConnectOptions = database_url(&pool).parse().unwrap();
    url = url.username(&role).password(&password);
    let as_role = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(url)
        .await
        .expect("connect as the client role");

    let outcome = async {
        let client = Client::new(as_role.clone());
        let daemon = Running::start(&env, &pool);
        let ready = client
            .ensure("p", "t.tool", Duration::from_secs(60))
            .await
            .expect("ensure");
        let failed = client.ensure("p", "t.fail", Duration::from_secs(60)).await;
        daemon.stop().await;
        assert!(matches!(failed, Err(Error::Failed { .. })), "{failed:?}");
        assert_eq!(client.get("p", "t.tool").await.unwrap().id, ready.id);
        assert_eq!(client.list(Some("p")).await.unwrap().len(), 2);
        let tool = client.executable("p", "t.tool", "tool").await.unwrap();
        assert!(tool.starts_with(env.envs_root()), "{tool:?}");
        assert!(client
            .env_vars("p", "t.tool")
            .await
            .unwrap()
            .contains_key("TOOL_HOME"));
        assert_eq!(client.request("p", "t.tool").await.unwrap().id, ready.id);
        assert_eq!(client.request_verification("p", "t.fail").await.unwrap(), 0);
        assert!(client.remove("p", "t.fail").await.unwrap());
        let status: String = sqlx::query_scalar(
            "SELECT health_status FROM v_pack_environment_status WHERE runtime_ref = 't.tool'",
        )
        .fetch_one(&as_role)
        .await
        .unwrap();
        assert_eq!(status, "provisioning");
        // Grants only what the client needs: the node rows are the daemon's to write.
        let refused = sqlx::query("UPDATE pack_environment_node SET status = 'ready'")
            .execute(&as_role)
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("permission denied"),
            "{refused}"
        );
    };
    // The role is dropped whatever the outcome, so a failure does not leave it in the cluster.
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    as_role.close().await;
    sqlx::raw_sql(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\";"))
        .execute(&pool)
        .await
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Rewrites this node's row of `p` as another host's role could before migration 9, or a
/// hostile step's daemon could on its own host: `metadata #- path` set to `value`.
async fn tamper(pool: &PgPool, path: &[&str], value: serde_json::Value) {
    sqlx::query("UPDATE pack_environment_node SET metadata = jsonb_set(metadata, $1, $2, true)")
        .bind(path)
        .bind(value)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_client_refuses_a_row_whose_executables_or_variables_point_outside_its_build(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    ready_pack(&pool, &env, "p", "t.tool").await;
    let client = Client::new(pool.clone());
    let good = client.lookup("p", "t.tool").await.unwrap();
    let build = good.build_dir.clone().unwrap();
    let metadata: serde_json::Value =
        sqlx::query_scalar("SELECT metadata FROM pack_environment_node")
            .fetch_one(&pool)
            .await
            .unwrap();

    // A script that would run if the client believed the row.
    let evil = std::env::temp_dir().join(format!("evil-{}.sh", std::process::id()));
    std::fs::write(&evil, "#!/bin/sh\necho evil\n").unwrap();
    let evil = evil.display().to_string();
    // A directory of the build that links out of it.
    let escape_dir = build.join("out");
    std::os::unix::fs::symlink(std::env::temp_dir(), &escape_dir).unwrap();
    let escape = escape_dir.join(std::path::Path::new(&evil).file_name().unwrap());
    let build_text = build.display().to_string();
    let cases: [(&[&str], String, &str); 5] = [
        (&["executables", "tool"], evil.clone(), "executables.tool"),
        (
            &["executables", "tool"],
            format!("{build_text}/../../evil.sh"),
            "executables.tool",
        ),
        // Inside the build by its name, out of it through the link.
        (
            &["executables", "tool"],
            escape.display().to_string(),
            "executables.tool",
        ),
        (
            &["env_vars", "LD_PRELOAD"],
            format!("{}/evil.so", std::env::temp_dir().display()),
            "env_vars.LD_PRELOAD",
        ),
        (
            &["env_vars", "PYTHONSTARTUP"],
            "evil.py".to_string(),
            "env_vars.PYTHONSTARTUP",
        ),
    ];
    for (path, value, want_key) in cases {
        tamper(&pool, path, serde_json::json!(value)).await;
        match client.lookup("p", "t.tool").await {
            Err(e @ Error::OutsideBuild { .. }) => {
                let Error::OutsideBuild {
                    key, path: p, node, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((key.as_str(), p.as_str()), (want_key, value.as_str()));
                assert_eq!(node, &node_name());
                let text = e.to_string();
                assert!(
                    text.contains(&format!("outside the build {build_text} of node {node}")),
                    "{text}"
                );
            }
            other => panic!("{want_key} = {value} was not refused: {other:?}"),
        }
        sqlx::query("UPDATE pack_environment_node SET metadata = $1")
            .bind(&metadata)
            .execute(&pool)
            .await
            .unwrap();
    }

    // A build directory outside the node's envs root is refused as a whole.
    tamper(
        &pool,
        &["build_dir"],
        serde_json::json!(std::env::temp_dir()),
    )
    .await;
    match client.lookup("p", "t.tool").await {
        Err(Error::OutsideBuild { key, reason, .. }) => {
            assert_eq!(key, "build_dir");
            assert!(reason.contains("outside the envs_root"), "{reason}");
        }
        other => panic!("a build outside the envs root was not refused: {other:?}"),
    }
    sqlx::query("UPDATE pack_environment_node SET metadata = $1")
        .bind(&metadata)
        .execute(&pool)
        .await
        .unwrap();

    // The row as the daemon wrote it still resolves, and runs.
    let again = client.lookup("p", "t.tool").await.unwrap();
    assert_eq!(again.executables, good.executables);
    let out = std::process::Command::new(again.executable("tool").unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tool");
    std::fs::remove_file(&evil).unwrap();
}
