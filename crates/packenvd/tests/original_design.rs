//! A database of the original design (issue 15): built by hand as its platform has it
//! (tests/fixtures/original_schema.sql), with rows written the way its manager wrote them,
//! migrated, and served by packenvd: rows kept and built, the view answering both ways, the
//! original functions and readers still working.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sqlx::PgPool;

/// The original schema with its runtimes' base path under `root`.
async fn original_schema(pool: &PgPool, root: &Path) {
    let sql = std::fs::read_to_string(fixtures().join("original_schema.sql"))
        .expect("tests/fixtures/original_schema.sql")
        .replace(":base", &root.display().to_string());
    sqlx::raw_sql(&sql)
        .execute(pool)
        .await
        .expect("original schema");
}

/// A test's envs root at the original design's place, `<tmp>/opt/attune/packenvs`, and the
/// settings of a node that uses it.
fn env_at_original_root() -> (tempfile::TempDir, PathBuf, Env) {
    let base = tempfile::tempdir().expect("tempdir");
    let root = base.path().join("opt/attune/packenvs");
    let env = Env::new(&[("envs_root", &root.display().to_string())]);
    (base, root, env)
}

#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
struct Kept {
    pack_ref: String,
    runtime_ref: String,
    status: String,
    env_path: Option<String>,
    install_error: Option<String>,
}

async fn kept(pool: &PgPool) -> Vec<Kept> {
    sqlx::query_as(
        "SELECT pack_ref, runtime_ref, status::text AS status, env_path, install_error
         FROM pack_environment ORDER BY pack_ref",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn health(pool: &PgPool, pack: &str) -> (String, String, String) {
    sqlx::query_as(
        "SELECT status::text, health_status, health FROM v_pack_environment_status
         WHERE pack_ref = $1",
    )
    .bind(pack)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_database_of_the_original_design_migrates_keeps_every_row_and_builds_them(pool: PgPool) {
    let (_base, root, env) = env_at_original_root();
    original_schema(&pool, &root).await;
    // The original design as its documentation gives the table: a status without a default;
    // no defaults for metadata, created and updated either.
    sqlx::raw_sql(
        "ALTER TABLE pack_environment ALTER COLUMN status DROP DEFAULT,
             ALTER COLUMN metadata DROP DEFAULT,
             ALTER COLUMN created DROP DEFAULT, ALTER COLUMN created DROP NOT NULL,
             ALTER COLUMN updated DROP DEFAULT, ALTER COLUMN updated DROP NOT NULL",
    )
    .execute(&pool)
    .await
    .unwrap();

    let wheels = env.dir.path().join("wheels");
    env.pack_dir(
        "monitoring",
        &[("requirements.txt", &wheel_requirements(&wheels))],
    );
    env.pack_dir("tools", &[]);
    env.pack_dir("elsewhere", &[]);
    env.pack_dir("legacy", &[]);
    sqlx::raw_sql(
        "INSERT INTO pack (ref, label, version) VALUES
             ('monitoring', 'Monitoring', '1.2.0'), ('tools', 'Tools', '0.1.0'),
             ('elsewhere', 'Elsewhere', '1.0.0'), ('broken', 'Broken', '1.0.0'),
             ('legacy', 'Legacy', '1.0.0');
         -- Built by the original manager: a real directory at env_path, nothing recorded.
         INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status,
                                       installed_at, last_verified, install_log)
         SELECT p.id, p.ref, r.id, r.ref, get_pack_environment_path(p.ref, r.ref), 'ready',
                now(), now(), 'Created directory: ...'
         FROM pack p, runtime r WHERE p.ref = 'legacy' AND r.ref = 'core.python';
         -- As the original manager asked for an environment: its path from the runtime's
         -- template, status pending, metadata left NULL.
         INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status,
                                       metadata, created, updated)
         SELECT p.id, p.ref, r.id, r.ref, get_pack_environment_path(p.ref, r.ref), 'pending',
                NULL, now(), now()
         FROM pack p, runtime r WHERE p.ref = 'monitoring' AND r.ref = 'core.python';
         -- A runtime without an environment: '' for a path, ready at once.
         INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status,
                                       installed_at, metadata)
         SELECT p.id, p.ref, r.id, r.ref, '', 'ready', now(), NULL
         FROM pack p, runtime r WHERE p.ref = 'tools' AND r.ref = 'core.shell';
         -- Asked for when the platform's root was still the default one, outside this node's.
         INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status)
         SELECT p.id, p.ref, r.id, r.ref, '/opt/attune/packenvs/elsewhere/python', 'pending'
         FROM pack p, runtime r WHERE p.ref = 'elsewhere' AND r.ref = 'core.python';
         -- A failure the platform recorded.
         INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status,
                                       install_error, install_log)
         SELECT p.id, p.ref, r.id, r.ref, get_pack_environment_path(p.ref, r.ref), 'failed',
                'Installer ''install_requirements'' failed: Command failed with exit code Some(1)',
                'STDOUT: ...'
         FROM pack p, runtime r WHERE p.ref = 'broken' AND r.ref = 'core.python';",
    )
    .execute(&pool)
    .await
    .unwrap();
    let before = kept(&pool).await;
    let monitoring_path = format!("{}/monitoring/python", root.display());
    assert_eq!(
        before
            .iter()
            .find(|k| k.pack_ref == "monitoring")
            .unwrap()
            .env_path
            .as_deref(),
        Some(monitoring_path.as_str())
    );
    // The original's environment on disk, in the root the operator marked as packenvd's.
    let legacy_dir = root.join("legacy/python");
    std::fs::create_dir_all(legacy_dir.join("bin")).unwrap();
    std::os::unix::fs::symlink(host_python3(), legacy_dir.join("bin/python")).unwrap();
    std::fs::write(root.join(packenv_core::layout::ROOT_MARKER), "").unwrap();

    packenvd::store::MIGRATOR.run(&pool).await.unwrap();
    packenvd::store::MIGRATOR.run(&pool).await.unwrap();

    // Nothing lost: every row as it was; '' (no environment) is NULL now.
    let after = kept(&pool).await;
    assert_eq!(after.len(), before.len());
    for (a, b) in after.iter().zip(&before) {
        let path = b.env_path.clone().filter(|p| !p.is_empty());
        assert_eq!(
            (
                a.pack_ref.as_str(),
                &a.status,
                &a.env_path,
                &a.install_error
            ),
            (b.pack_ref.as_str(), &b.status, &path, &b.install_error)
        );
    }
    let nulls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pack_environment WHERE metadata IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(nulls, 0);
    // The platform's own migrations are still recorded beside packenvd's.
    let platform: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version < 20261127000000")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(platform, 4);
    // The original functions answer as they did.
    let (path, requires): (String, bool) = sqlx::query_as(
        "SELECT get_pack_environment_path('monitoring', 'core.python'),
                runtime_requires_environment('core.nope')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((path.as_str(), requires), (monitoring_path.as_str(), false));
    // The original's default runtimes became packenvd's, keeping their base path.
    let python: serde_json::Value =
        sqlx::query_scalar("SELECT installers FROM runtime WHERE ref = 'core.python'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(python["interpreter"], "python");
    assert_eq!(
        python["base_path_template"],
        format!("{}/{{pack_ref}}/{{runtime_name_lower}}", root.display())
    );
    // A reader of the original view keeps its columns, values and rights.
    assert_eq!(
        health(&pool, "monitoring").await,
        ("pending".into(), "provisioning".into(), "waiting".into())
    );
    let (name, runtime_name, may_read): (String, String, bool) = sqlx::query_as(
        "SELECT pack_name, runtime_name,
                has_table_privilege('platform_dashboard', 'v_pack_environment_status', 'SELECT')
         FROM v_pack_environment_status WHERE pack_ref = 'monitoring'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (name.as_str(), runtime_name.as_str(), may_read),
        ("Monitoring", "Python", true)
    );

    env.worker(&pool).drain().await.unwrap();

    // The row under this node's root (the original's) built where the platform said.
    let id: i64 =
        sqlx::query_scalar("SELECT id FROM pack_environment WHERE pack_ref = 'monitoring'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let r = row(&pool, id).await;
    assert_eq!(
        r.status, "ready",
        "{:?}\n{:?}",
        r.install_error, r.install_log
    );
    assert_eq!(r.env_path.as_deref(), Some(monitoring_path.as_str()));
    let build = r.metadata["build_dir"].as_str().unwrap();
    assert!(
        build.starts_with(&format!("{}/monitoring/.python-", root.display())),
        "{build}"
    );
    let python = r.metadata["executables"]["python"].as_str().unwrap();
    assert_eq!(
        common::python(
            python,
            "import packenvd_fixture; print(packenvd_fixture.VERSION)"
        ),
        "0.1.0"
    );
    // The one outside it failed, saying so, and nothing was written there.
    let rows = kept(&pool).await;
    let elsewhere = rows.iter().find(|k| k.pack_ref == "elsewhere").unwrap();
    assert_eq!(elsewhere.status, "failed");
    let error = elsewhere.install_error.as_deref().unwrap();
    assert!(
        error.contains("/opt/attune/packenvs/elsewhere/python")
            && error.contains("outside the envs root"),
        "{error}"
    );
    // The recorded failure and the shell environment are as they were.
    let broken = rows.iter().find(|k| k.pack_ref == "broken").unwrap();
    assert_eq!(broken.status, "failed");
    assert!(broken
        .install_error
        .as_deref()
        .unwrap()
        .starts_with("Installer 'install_requirements'"));
    assert_eq!(
        rows.iter().find(|k| k.pack_ref == "tools").unwrap().status,
        "ready"
    );
    // The view, both ways.
    assert_eq!(
        health(&pool, "monitoring").await,
        ("ready".into(), "healthy".into(), "healthy".into())
    );
    assert_eq!(
        health(&pool, "elsewhere").await,
        ("failed".into(), "unhealthy".into(), "unhealthy".into())
    );

    // The environment the original built is served as it is, through the client, until
    // packenvd has built its own: verification finds no build of packenvd's there, and the
    // rebuild moves the old directory aside.
    let client = packenv_client::Client::new(pool.clone());
    let served = client.lookup("legacy", "core.python").await.unwrap();
    assert_eq!(served.build_dir.as_deref(), Some(legacy_dir.as_path()));
    assert_eq!(
        served.executable("python").unwrap(),
        legacy_dir.join("bin/python")
    );
    assert_eq!(
        served.env_vars["VIRTUAL_ENV"],
        legacy_dir.display().to_string()
    );
    sqlx::query("UPDATE pack_environment_node SET last_verified = now() - interval '8 days'")
        .execute(&pool)
        .await
        .unwrap();
    let found = packenvd::verify::run_pass(&pool, &env.settings, &packenvd::verify::Scope::Stale)
        .await
        .unwrap();
    let legacy = found.iter().find(|f| f.pack_ref == "legacy").unwrap();
    assert!(legacy.failure.is_some(), "{found:?}");
    assert_eq!(
        client
            .lookup("legacy", "core.python")
            .await
            .unwrap()
            .build_dir
            .as_deref(),
        Some(legacy_dir.as_path()),
        "served while outdated"
    );
    env.worker(&pool).drain().await.unwrap();
    let rebuilt = client.lookup("legacy", "core.python").await.unwrap();
    let build = rebuilt.build_dir.clone().unwrap();
    // Path::starts_with compares whole components: the build's name is compared as text.
    assert!(
        build
            .display()
            .to_string()
            .starts_with(&format!("{}/legacy/.python-", root.display())),
        "{build:?}"
    );
    assert_eq!(
        rebuilt.executable("python").unwrap(),
        build.join("bin/python")
    );

    // The original manager's writes keep working: its upsert names an env_path and leaves
    // out metadata; a writer that sends metadata NULL explicitly is taken as '{}'.
    env.pack_dir("later", &[]);
    sqlx::raw_sql(
        "INSERT INTO pack (ref, label, version) VALUES ('later', 'Later', '1.0.0');
         INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status, metadata)
         SELECT p.id, p.ref, r.id, r.ref, get_pack_environment_path(p.ref, r.ref), 'pending', NULL
         FROM pack p, runtime r WHERE p.ref = 'later' AND r.ref = 'core.shell'
         ON CONFLICT (pack, runtime) DO UPDATE SET env_path = EXCLUDED.env_path,
             status = 'pending', install_log = NULL, install_error = NULL, updated = now();",
    )
    .execute(&pool)
    .await
    .unwrap();
    // And so do packenvd's: a request leaves env_path to the daemon.
    let id = request(&pool, "later", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(status_of(&pool, id).await, "ready");
    let shell: String = sqlx::query_scalar(
        "SELECT status::text FROM pack_environment WHERE pack_ref = 'later' AND runtime_ref = 'core.shell'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(shell, "ready");
}

/// The host's python3 itself (a pyenv shim resolved), as a venv's `bin/python` links it.
fn host_python3() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .current_dir("/")
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The migrations released before this one (on main), as a deployed database has them when
/// 20261127000000_platform_schemas and 20261127000006_original_design arrive.
async fn deployed_migrations(dir: &Path) -> sqlx::migrate::Migrator {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
    for f in std::fs::read_dir(&src).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if [
            "20261127000001_",
            "20261127000002_",
            "20261127000003_",
            "20261127000005_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
        {
            std::fs::copy(f.path(), dir.join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(dir).await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn the_documented_table_already_migrated_by_an_earlier_packenvd_converges(pool: PgPool) {
    let (_base, root, env) = env_at_original_root();
    // The table as the original design documents it, in a platform database that packenvd's
    // first three migrations were applied to: where `packenvd request` used to fail on the
    // env_path NOT NULL, and a NULL metadata failed every claim.
    sqlx::raw_sql(
        "CREATE TABLE pack (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, label TEXT NOT NULL);
         CREATE TABLE runtime (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                               installers JSONB);
         CREATE TYPE pack_environment_status_enum AS ENUM
             ('pending', 'installing', 'ready', 'failed', 'outdated');
         CREATE TABLE pack_environment (
             id BIGSERIAL PRIMARY KEY,
             pack BIGINT NOT NULL REFERENCES pack(id),
             pack_ref TEXT NOT NULL,
             runtime BIGINT NOT NULL REFERENCES runtime(id),
             runtime_ref TEXT NOT NULL,
             env_path TEXT NOT NULL,
             status pack_environment_status_enum NOT NULL,
             installed_at TIMESTAMPTZ,
             last_verified TIMESTAMPTZ,
             install_log TEXT,
             install_error TEXT,
             metadata JSONB,
             UNIQUE(pack, runtime));
         INSERT INTO pack (ref, label) VALUES ('old', 'Old'), ('new', 'New');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    deployed_migrations(dir.path())
        .await
        .run(&pool)
        .await
        .unwrap();
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    sqlx::query(
        "INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, env_path, status, metadata)
         SELECT p.id, p.ref, r.id, r.ref, $1, 'pending', NULL
         FROM pack p, runtime r WHERE p.ref = 'old' AND r.ref = 't.noop'",
    )
    .bind(format!("{}/old/t.noop", root.display()))
    .execute(&pool)
    .await
    .unwrap();

    let refused = sqlx::query("SELECT request_pack_environment('new', 't.noop')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("\"env_path\""), "{refused}");

    packenvd::store::MIGRATOR.run(&pool).await.unwrap();

    let new = request(&pool, "new", "t.noop").await;
    env.pack_dir("old", &[]);
    env.pack_dir("new", &[]);
    assert_eq!(env.worker(&pool).drain().await.unwrap(), 2);
    let statuses: Vec<(String, String)> =
        sqlx::query_as("SELECT pack_ref, status::text FROM pack_environment ORDER BY pack_ref")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        statuses,
        [
            ("new".to_string(), "ready".to_string()),
            ("old".into(), "ready".into())
        ]
    );
    assert_eq!(
        row(&pool, new).await.env_path,
        Some(format!("{}/new/t.noop", root.display()))
    );
    // The view gained both sets of columns on a table without the original's.
    let (h, hs): (String, String) = sqlx::query_as(
        "SELECT health, health_status FROM v_pack_environment_status WHERE pack_ref = 'old'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((h.as_str(), hs.as_str()), ("healthy", "healthy"));
}

#[sqlx::test(migrations = false)]
async fn a_database_at_the_deployed_migrations_takes_the_new_ones_out_of_order_and_rebuilds_nothing(
    pool: PgPool,
) {
    // packenvd's own schema as main's releases left it (the first three migrations), with a
    // ready environment: then this release's migrations, one of which sorts before them.
    let env = Env::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    deployed_migrations(dir.path())
        .await
        .run(&pool)
        .await
        .unwrap();
    add_runtime(&pool, "t.noop", shell_runtime("true")).await;
    add_pack(&pool, "p").await;
    env.pack_dir("p", &[]);
    let id = request(&pool, "p", "t.noop").await;
    assert_eq!(env.worker(&pool).drain().await.unwrap(), 1);
    let before = row(&pool, id).await;
    let defaults = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT column_name::text, column_default::text FROM information_schema.columns
             WHERE table_name = 'runtime' ORDER BY column_name",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let runtime_defaults = defaults().await;
    assert_eq!(
        packenvd::store::unapplied_migrations(&pool).await.unwrap(),
        [
            20261127000000,
            20261127000006,
            20261127000007,
            20261127000008,
            20261127000009,
            20261127000010
        ]
    );

    packenvd::store::MIGRATOR.run(&pool).await.unwrap();

    assert!(packenvd::store::unapplied_migrations(&pool)
        .await
        .unwrap()
        .is_empty());
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        applied,
        [
            20261127000000,
            20261127000001,
            20261127000002,
            20261127000003,
            20261127000005,
            20261127000006,
            20261127000007,
            20261127000008,
            20261127000009,
            20261127000010
        ]
    );
    // Nothing of packenvd's own schema or rows changed: the platform-schemas migration found
    // nothing to do, and the row is served by the same build without a rebuild.
    assert_eq!(defaults().await, runtime_defaults);
    let after = row(&pool, id).await;
    assert_eq!(
        (after.status.as_str(), &after.metadata["build_dir"]),
        ("ready", &before.metadata["build_dir"])
    );
    assert_eq!(env.worker(&pool).drain().await.unwrap(), 0);
    let (health, health_status): (String, String) =
        sqlx::query_as("SELECT health, health_status FROM v_pack_environment_status WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (health.as_str(), health_status.as_str()),
        ("healthy", "healthy")
    );
}
