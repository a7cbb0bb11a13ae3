//! The least-privilege role of `deploy/db-role.sql` (DESIGN §6), proven with the real daemon
//! binary: it builds, verifies, rebuilds and removes environments with the role's rights and
//! no more, and the role cannot touch what is not packenvd's.
//!
//! Roles are cluster-wide while each test has a database of its own, so each test creates a
//! role named after its database and the process, and drops it again even when it fails.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use sqlx::PgPool;

const DB_ROLE_SQL: &str = include_str!("../../../deploy/db-role.sql");

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// deploy/db-role.sql as psql would run it with `-v role=<role>` (and `-v node=<node>` unless
/// `node` is empty): psql's meta-commands (the lines starting with a backslash) dropped, its
/// variables substituted.
fn db_role_sql(role: &str, node: &str) -> String {
    let sql: String = DB_ROLE_SQL
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        sql.contains(":\"role\"") && sql.contains(":'role'"),
        "deploy/db-role.sql no longer uses the psql variable role"
    );
    sql.replace(":\"role\"", &quote_ident(role))
        .replace(":'role'", &quote_literal(role))
        .replace(":'node'", &quote_literal(node))
}

async fn apply_db_role(owner: &PgPool, role: &str) {
    apply_node_role(owner, role, "").await
}

async fn apply_node_role(owner: &PgPool, role: &str, node: &str) {
    sqlx::raw_sql(&db_role_sql(role, node))
        .execute(owner)
        .await
        .expect("applying deploy/db-role.sql");
}

/// `url` with its user (and password) replaced.
fn url_as(url: &str, user: &str, password: &str) -> String {
    let scheme_end = url.find("://").expect("a URL with a scheme") + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{}{user}:{password}@{host}", &url[..scheme_end])
}

/// A cluster-wide role for one test, dropped (with its grants in the test's database) when the
/// test ends, pass or fail. Declared before anything that connects as the role, so it is
/// dropped after them.
struct TestRole {
    name: String,
    password: String,
    owner_url: String,
}

impl TestRole {
    async fn create(owner: &PgPool) -> TestRole {
        Self::create_for_node(owner, "").await
    }

    /// A role of deploy/db-role.sql's with `-v node=<node>` (every node's when empty).
    async fn create_for_node(owner: &PgPool, node: &str) -> TestRole {
        let db = owner
            .connect_options()
            .get_database()
            .expect("database name")
            .to_owned();
        // Test databases are `_sqlx_test_<hash of the test's path>`: a slice of the hash keeps
        // tests apart, the pid keeps concurrent runs against one server apart.
        let hash: String = db
            .trim_start_matches("_sqlx_test_")
            .chars()
            .take(12)
            .collect();
        let role = TestRole {
            name: format!("packenvd_{}_{}", hash.to_lowercase(), std::process::id()),
            password: uuid::Uuid::new_v4().simple().to_string(),
            owner_url: database_url(owner),
        };
        apply_node_role(owner, &role.name, node).await;
        // What the operator does by hand (`\password`); the file never holds one. The test
        // cluster trusts local connections, but a DATABASE_URL with password authentication
        // works too.
        sqlx::query(&format!(
            "ALTER ROLE {} PASSWORD {}",
            quote_ident(&role.name),
            quote_literal(&role.password)
        ))
        .execute(owner)
        .await
        .expect("setting the role's password");
        role
    }

    fn url(&self) -> String {
        url_as(&self.owner_url, &self.name, &self.password)
    }

    async fn pool(&self) -> PgPool {
        let pool = PgPool::connect(&self.url())
            .await
            .expect("connect as the role");
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(user, self.name);
        pool
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        // Drop cannot await: a thread of its own with its own runtime does the cleanup.
        let (url, role) = (self.owner_url.clone(), quote_ident(&self.name));
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let owner = PgPool::connect(&url).await?;
                // DROP OWNED removes the role's grants in this database, where it has all of
                // them; then nothing keeps DROP ROLE from succeeding.
                sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
                    .execute(&owner)
                    .await?;
                owner.close().await;
                Ok::<_, sqlx::Error>(())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop role {}: {e}", self.name),
            Err(_) => eprintln!("could not drop role {}: cleanup panicked", self.name),
        }
    }
}

/// A `packenvd` CLI command run against `url`, with the test's directories.
fn packenvd(env: &Env, url: &str, args: &[&str]) -> Output {
    let s = &env.settings;
    std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("PACKENVD_ENVS_ROOT", &s.envs_root)
        .env("PACKENVD_PACKS_DIR", &s.packs_dir)
        .env("PACKENVD_CACHE_DIR", &s.cache_dir)
        .output()
        .expect("running packenvd")
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} under the role: {}", text(out));
}

/// Waits until every row is `ready`, failing at once with the daemon's output if it exits.
async fn until_all_ready(pool: &PgPool, daemon: &mut Daemon, limit: Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            panic!(
                "the daemon exited ({status}) under the role:\n{}",
                daemon.output()
            );
        }
        let statuses: Vec<(String, String)> =
            sqlx::query_as("SELECT pack_ref, status::text FROM pack_environment ORDER BY pack_ref")
                .fetch_all(pool)
                .await
                .unwrap();
        if statuses.iter().all(|(_, s)| s == "ready") {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "not all ready after {limit:?}: {statuses:?}\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, as systemd stops the unit; the daemon must exit cleanly.
fn stop(mut daemon: Daemon) -> String {
    daemon.signal(Signal::SIGTERM);
    assert!(
        daemon.wait_exit(Duration::from_secs(20)).is_some(),
        "the daemon did not stop on SIGTERM:\n{}",
        daemon.output()
    );
    let status = daemon.child.wait().expect("wait");
    let output = daemon.output();
    assert!(status.success(), "exit {status}:\n{output}");
    output
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn the_daemon_and_the_cli_work_under_the_least_privilege_role(pool: PgPool) {
    // PostgreSQL 14 and older let PUBLIC create in schema public; db-role.sql warns about it
    // and docs/operations.md says to revoke it, as here (the default since PostgreSQL 15).
    sqlx::query("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        .execute(&pool)
        .await
        .unwrap();
    let role = TestRole::create(&pool).await;
    // Re-running after each migration is the documented upgrade step: it must be harmless.
    apply_db_role(&pool, &role.name).await;

    // The platform (the owner here) registers packs and runtimes; packenvd's role only reads
    // them.
    let env = Env::new(&[]);
    env.pack_dir("shell_pack", &[("run.sh", "echo hi\n")]);
    env.pack_dir("built_pack", &[]);
    add_pack(&pool, "shell_pack").await;
    add_pack(&pool, "built_pack").await;
    add_runtime(
        &pool,
        "test.sh",
        shell_runtime("echo built > {env_path}/marker"),
    )
    .await;

    // A pack install made with the role's rights: request_pack_environment() inserts with
    // pack_environment's sequence and fires both triggers.
    let as_role = role.pool().await;
    let shell_id = request(&as_role, "shell_pack", "core.shell").await;
    let built_id = request(&as_role, "built_pack", "test.sh").await;

    let url = role.url();
    let mut daemon = Daemon::spawn(
        &env,
        &url,
        "least-privilege",
        &[
            ("PACKENVD_POLL_INTERVAL", "200ms"),
            ("PACKENVD_LEASE", "3s"),
        ],
        &[],
    );
    until_all_ready(&pool, &mut daemon, Duration::from_secs(60)).await;
    // A few heartbeat and rescue rounds (every second with a 3 s lease) with the role's rights.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let output = stop(daemon);
    assert!(
        !output.contains("permission denied"),
        "the daemon hit a missing right:\n{output}"
    );

    let shell = row(&pool, shell_id).await;
    assert_eq!(shell.status, "ready", "{shell:?}");
    assert_eq!(shell.env_path, None);
    let built = row(&pool, built_id).await;
    assert_eq!(built.status, "ready", "{built:?}");
    let env_path = built.env_path.clone().expect("env_path");
    assert_eq!(
        std::fs::read_to_string(format!("{env_path}/marker")).unwrap(),
        "built\n"
    );

    // The operator commands, with the same rights.
    let out = packenvd(&env, &url, &["status", "--json"]);
    assert_ok(&out, "status");
    assert!(String::from_utf8_lossy(&out.stdout).contains("built_pack"));
    assert_ok(
        &packenvd(&env, &url, &["logs", "built_pack", "test.sh"]),
        "logs",
    );
    assert_ok(&packenvd(&env, &url, &["verify", "--all"]), "verify --all");
    let verified: Option<String> =
        sqlx::query_scalar("SELECT last_verify_result FROM pack_environment WHERE id = $1")
            .bind(built_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verified.as_deref(), Some("ok"));
    assert_ok(&packenvd(&env, &url, &["gc", "--dry-run"]), "gc --dry-run");
    assert_ok(
        &packenvd(&env, &url, &["rebuild", "built_pack", "test.sh"]),
        "rebuild",
    );
    assert_eq!(status_of(&pool, built_id).await, "pending");
    assert_ok(
        &packenvd(&env, &url, &["remove", "built_pack", "test.sh", "--yes"]),
        "remove",
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE id = $1")
        .bind(built_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "remove deletes the row");

    // And nothing beyond packenvd's rights. 42501 is insufficient_privilege.
    for sql in [
        "CREATE TABLE packenvd_may_not (x int)",
        "CREATE SCHEMA packenvd_may_not",
        "DROP TABLE pack",
        "ALTER TABLE pack_environment ADD COLUMN packenvd_may_not int",
        "UPDATE runtime SET installers = '[]'",
        "INSERT INTO pack (ref) VALUES ('packenvd_may_not')",
        "DELETE FROM pack",
        "TRUNCATE pack_environment",
        "DELETE FROM _sqlx_migrations",
        "CREATE OR REPLACE FUNCTION request_pack_environment(p_pack_ref TEXT, p_runtime_ref TEXT)
         RETURNS pack_environment LANGUAGE sql AS 'SELECT NULL::pack_environment'",
    ] {
        let err = sqlx::query(sql)
            .execute(&as_role)
            .await
            .expect_err(&format!("the role could run: {sql}"));
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    // Migrations are the owner's job: the role cannot apply them.
    let out = packenvd(&env, &url, &["migrate"]);
    assert!(
        !out.status.success(),
        "migrate under the role: {}",
        text(&out)
    );
    as_role.close().await;
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn under_the_role_a_pending_migration_stops_the_daemon_until_the_owner_migrates(
    pool: PgPool,
) {
    sqlx::query("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        .execute(&pool)
        .await
        .unwrap();
    let role = TestRole::create(&pool).await;
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.shell").await;

    // An upgrade whose migration has not been applied yet: the newest one is forgotten, as if
    // the binary were newer than the schema. (Every migration is written to run again safely.)
    let newest: i64 = sqlx::query_scalar(
        "DELETE FROM _sqlx_migrations
         WHERE version = (SELECT max(version) FROM _sqlx_migrations) RETURNING version",
    )
    .fetch_one(&pool)
    .await
    .unwrap();

    let url = role.url();
    let mut daemon = Daemon::spawn(&env, &url, "early", &[], &[]);
    assert!(
        daemon.wait_exit(Duration::from_secs(30)).is_some(),
        "the daemon kept running with a migration pending it cannot apply:\n{}",
        daemon.output()
    );
    let status = daemon.child.wait().expect("wait");
    let output = daemon.output();
    assert!(!status.success(), "exit {status}:\n{output}");
    // The error tells the operator what to do.
    assert!(
        output.contains("packenvd migrate"),
        "the error should name `packenvd migrate`:\n{output}"
    );
    assert_eq!(status_of(&pool, id).await, "pending", "nothing was claimed");

    // The documented upgrade: the owner migrates, re-applies db-role.sql, the daemon starts.
    let owner_url = database_url(&pool);
    let out = packenvd(&env, &owner_url, &["migrate"]);
    assert!(out.status.success(), "migrate as the owner: {}", text(&out));
    let applied: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM _sqlx_migrations WHERE version = $1)")
            .bind(newest)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(applied);
    apply_db_role(&pool, &role.name).await;
    let mut daemon = Daemon::spawn(
        &env,
        &url,
        "after-upgrade",
        &[("PACKENVD_POLL_INTERVAL", "200ms")],
        &[],
    );
    until_all_ready(&pool, &mut daemon, Duration::from_secs(30)).await;
    stop(daemon);
}

/// The platform's own role writes `pack_environment` and nothing of packenvd's: its requests,
/// resets and inserts still reach every node, because the fan-out runs with the owner's rights.
#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_platform_role_with_rights_on_pack_environment_only_reaches_every_node(owner: PgPool) {
    let role = TestRole::create(&owner).await;
    sqlx::raw_sql(&format!(
        "REVOKE ALL ON packenvd_node, pack_environment_node, v_pack_environment_node FROM {r};
         REVOKE ALL ON SEQUENCE pack_environment_node_id_seq FROM {r};",
        r = quote_ident(&role.name)
    ))
    .execute(&owner)
    .await
    .unwrap();
    register_node(&owner, "/envs").await;
    add_runtime(&owner, "t.noop", shell_runtime("true")).await;
    add_pack(&owner, "a").await;
    add_pack(&owner, "b").await;
    let platform = role.pool().await;
    request(&platform, "a", "t.noop").await;
    sqlx::query(
        "INSERT INTO pack_environment (pack, runtime, status)
         SELECT p.id, r.id, 'pending' FROM pack p, runtime r WHERE p.ref = 'b' AND r.ref = 't.noop'",
    )
    .execute(&platform)
    .await
    .expect("a plain insert under the platform's role");
    sqlx::query("UPDATE pack_environment SET status = 'outdated' WHERE pack_ref = 'a'")
        .execute(&platform)
        .await
        .expect("a pack update under the platform's role");
    let denied = sqlx::query("SELECT 1 FROM pack_environment_node")
        .execute(&platform)
        .await
        .expect_err("the role has no rights on the node rows");
    assert!(denied.to_string().contains("permission denied"), "{denied}");
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT pe.pack_ref, n.node, n.status::text FROM pack_environment_node n
         JOIN pack_environment pe ON pe.id = n.env_id ORDER BY 1",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("a".into(), node_name(), "outdated".into()),
            ("b".into(), node_name(), "pending".into())
        ]
    );
    platform.close().await;
}

/// Node `other` beside this host's node (the one the daemons of these tests run as), as its
/// own daemon would register it.
async fn register_other_node(owner: &PgPool, other: &str) {
    packenvd::store::register_node(
        owner,
        &packenvd::store::NodeInfo {
            name: other.into(),
            envs_root: format!("/srv/{other}/envs"),
            version: "test".into(),
            runtimes: serde_json::json!({}),
            tools: serde_json::json!({}),
            protections: serde_json::json!([]),
            ttl: Duration::from_secs(600),
        },
    )
    .await
    .unwrap();
}

/// The SQLSTATE of a refused statement.
fn code(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_node_role_builds_its_own_rows_and_postgres_refuses_its_writes_of_another_nodes(
    owner: PgPool,
) {
    // This host's daemon runs as "web-2"'s role (its node is named after the host); "web-1" is
    // another host whose rows the role must not touch.
    let me = node_name();
    let role = TestRole::create_for_node(&owner, &me).await;
    register_other_node(&owner, "web-1").await;
    let env = Env::new(&[]);
    env.pack_dir("built_pack", &[]);
    add_pack(&owner, "built_pack").await;
    add_runtime(
        &owner,
        "test.sh",
        shell_runtime("echo built > {env_path}/marker"),
    )
    .await;
    let id = request(&owner, "built_pack", "test.sh").await;

    // Claim, heartbeat, write-back, node heartbeat and rescue with the node role's rights.
    let url = role.url();
    let mut daemon = Daemon::spawn(
        &env,
        &url,
        "node-role",
        &[
            ("PACKENVD_POLL_INTERVAL", "200ms"),
            ("PACKENVD_LEASE", "3s"),
        ],
        &[],
    );
    let started = Instant::now();
    loop {
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            panic!("the daemon exited ({status}):\n{}", daemon.output());
        }
        let mine: Option<String> = sqlx::query_scalar(
            "SELECT status::text FROM pack_environment_node WHERE env_id = $1 AND node = $2",
        )
        .bind(id)
        .bind(&me)
        .fetch_optional(&owner)
        .await
        .unwrap();
        if mine.as_deref() == Some("ready") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready: {mine:?}\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let output = stop(daemon);
    assert!(
        !output.contains("permission denied") && !output.contains("row-level security"),
        "the daemon hit its role's limits on its own rows:\n{output}"
    );

    let as_role = role.pool().await;
    let web1_before: (String, serde_json::Value) = sqlx::query_as(
        "SELECT status::text, metadata FROM pack_environment_node WHERE node = 'web-1'",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    // An UPDATE of web-1's row: row-level security leaves it out, so nothing changes.
    let hijack = sqlx::query(
        "UPDATE pack_environment_node
         SET status = 'ready', metadata = jsonb_build_object(
             'build_dir', '/tmp', 'executables', jsonb_build_object('python', '/tmp/evil.sh'),
             'env_vars', jsonb_build_object('LD_PRELOAD', '/tmp/evil.so'))
         WHERE node = 'web-1'",
    )
    .execute(&as_role)
    .await
    .expect("the statement runs, and reaches no row of web-1");
    assert_eq!(hijack.rows_affected(), 0);
    let web1_after: (String, serde_json::Value) = sqlx::query_as(
        "SELECT status::text, metadata FROM pack_environment_node WHERE node = 'web-1'",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(
        web1_after, web1_before,
        "web-1's row changed under web-2's role"
    );
    let moved = sqlx::query("UPDATE packenvd_node SET envs_root = '/' WHERE name = 'web-1'")
        .execute(&as_role)
        .await
        .unwrap();
    assert_eq!(moved.rows_affected(), 0, "web-1's envs root moved");

    // Writes that would make a row web-1's are refused outright. 42501 is
    // insufficient_privilege, which is also what a row-level security violation raises.
    for sql in [
        "UPDATE pack_environment_node SET node = 'web-1' WHERE node = current_setting('x.me')",
        "INSERT INTO pack_environment_node (env_id, node, metadata)
         SELECT id, 'web-1', '{\"executables\": {\"python\": \"/tmp/evil.sh\"}}' FROM pack_environment",
        "INSERT INTO packenvd_node (name, envs_root) VALUES ('web-3', '/')",
        // The platform's writes fan out to every node's rows with the owner's rights.
        "SELECT request_pack_environment('built_pack', 'test.sh')",
        "UPDATE pack_environment SET env_path = '/tmp', status = 'outdated'",
        "DELETE FROM pack_environment",
    ] {
        let mut tx = as_role.begin().await.unwrap();
        sqlx::query("SELECT set_config('x.me', $1, true)")
            .bind(&me)
            .execute(&mut *tx)
            .await
            .unwrap();
        let err = sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .expect_err(&format!("web-2's role could run: {sql}"));
        assert_eq!(code(&err).as_deref(), Some("42501"), "{sql}: {err}");
    }

    // Its own rows stay its own to write.
    let own = sqlx::query("UPDATE pack_environment_node SET last_verified = NULL WHERE node = $1")
        .bind(&me)
        .execute(&as_role)
        .await
        .unwrap();
    assert_eq!(own.rows_affected(), 1);

    // A node past its ttl is declared gone by any node's rescuer, through the one function
    // that writes other nodes' rows; then the environment no longer waits for it.
    sqlx::query(
        "UPDATE packenvd_node SET last_seen = now() - interval '1 hour' WHERE name = 'web-1'",
    )
    .execute(&owner)
    .await
    .unwrap();
    let gone = packenvd::store::reap_gone_nodes(&as_role).await.unwrap();
    assert_eq!(gone, ["web-1"]);
    assert_eq!(status_of(&owner, id).await, "ready");
    as_role.close().await;
}
