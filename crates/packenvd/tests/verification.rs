//! Verification passes (DESIGN §7): stale environments are checked, broken ones go back to be
//! rebuilt, fresh ones are left alone, and several instances share the work without overlap.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use packenvd::verify::{run_pass, Scope};
use serde_json::json;
use sqlx::PgPool;

/// A runtime whose environment holds one executable, `tool`, which hangs on `--version` while
/// `<build>/hang` exists.
fn tool_runtime() -> serde_json::Value {
    json!({
        "installers": [{"name": "tool", "command": "sh", "args": ["-c",
            "mkdir -p {env_path}/bin && printf '#!/bin/sh\\nif [ -e {env_path}/hang ]; then sleep 600; fi\\necho tool 1.0\\n' > {env_path}/bin/tool && chmod +x {env_path}/bin/tool"]}],
        "executable_templates": {"tool": "{env_path}/bin/tool"}
    })
}

async fn make_stale(pool: &PgPool) {
    sqlx::query("UPDATE pack_environment_node SET last_verified = now() - interval '8 days' WHERE status = 'ready'")
        .execute(pool)
        .await
        .unwrap();
}

async fn ready_tool_env(pool: &PgPool, env: &Env, pack: &str, files: &[(&str, &str)]) -> i64 {
    env.pack_dir(pack, files);
    add_pack(pool, pack).await;
    let id = request(pool, pack, "t.tool").await;
    env.worker(pool).drain().await.unwrap();
    assert_eq!(status_of(pool, id).await, "ready");
    id
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_stale_environment_whose_interpreter_was_deleted_is_rebuilt_and_ends_ready(pool: PgPool) {
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    let reqs = wheel_requirements(&wheels);
    env.pack_dir("p", &[("requirements.txt", &reqs)]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let built = row(&pool, id).await;
    assert_eq!(built.status, "ready");
    make_stale(&pool).await;
    let python = built.metadata["executables"]["python"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(&python).unwrap();

    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1);
    let reason = found[0].failure.clone().expect("a failure");
    assert!(
        reason.contains("executable 'python'") && reason.contains("is missing"),
        "{reason}"
    );
    let r = row(&pool, id).await;
    assert_eq!(r.status, "outdated");
    assert!(r
        .install_error
        .unwrap()
        .contains("verification failed: executable 'python'"));
    // The old build stays served while the rebuild runs.
    assert!(Path::new(r.env_path.as_deref().unwrap())
        .join("pyvenv.cfg")
        .exists());

    env.worker(&pool).drain().await.unwrap();
    let rebuilt = row(&pool, id).await;
    assert_eq!(rebuilt.status, "ready", "{:?}", rebuilt.install_error);
    assert_ne!(rebuilt.metadata["build_id"], built.metadata["build_id"]);
    assert_eq!(python_import(&rebuilt), "0.1.0");
}

fn python_import(r: &Row) -> String {
    python(
        r.metadata["executables"]["python"].as_str().unwrap(),
        "import packenvd_fixture; print(packenvd_fixture.VERSION)",
    )
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_fresh_environment_is_not_touched_by_a_pass(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    let before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_verified FROM pack_environment WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert!(found.is_empty(), "{found:?}");
    let after: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_verified FROM pack_environment WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(before, after);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_healthy_stale_environment_is_marked_verified(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    make_stale(&pool).await;
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].failure.is_none(), "{found:?}");
    let (status, result, fresh): (String, String, bool) = sqlx::query_as(
        "SELECT status::text, last_verify_result, last_verified > now() - interval '1 minute' FROM pack_environment WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), result.as_str(), fresh),
        ("ready", "ok", true)
    );
    let view: (bool, Option<String>) = sqlx::query_as("SELECT needs_verification, last_verify_result FROM v_pack_environment_status WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(view, (false, Some("ok".into())));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn checks_that_cannot_run_on_this_host_leave_a_healthy_environment_ready_and_unchecked(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    make_stale(&pool).await;
    // Where checks make their private tmp, something that is not a directory: a fault of the
    // host, not of the environment.
    let tmp_root = env.settings.cache_dir.join(".tmp");
    std::fs::remove_dir_all(&tmp_root).unwrap();
    std::fs::write(&tmp_root, "not a directory").unwrap();

    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].failure.is_none(), "{found:?}");
    let reason = found[0].unchecked.clone().expect("unchecked");
    assert!(
        reason.contains("cannot run here") && !reason.contains("spec"),
        "{reason}"
    );
    let (status, error, still_stale): (String, Option<String>, bool) = sqlx::query_as(
        "SELECT status::text, install_error, last_verified < now() - interval '7 days'
         FROM pack_environment_node WHERE env_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status, "ready");
    assert_eq!(error, None);
    assert!(still_stale, "an unchecked row must not count as verified");

    // Once the host is fixed, the next pass checks it.
    std::fs::remove_file(&tmp_root).unwrap();
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(
        found[0].failure.is_none() && found[0].unchecked.is_none(),
        "{found:?}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_edited_requirements_txt_makes_the_row_outdated_because_inputs_changed(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[("requirements.txt", "six==1.16.0\n")]).await;
    std::fs::write(
        env.settings.packs_dir.join("p/requirements.txt"),
        "six==1.17.0\n",
    )
    .unwrap();
    make_stale(&pool).await;
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    let reason = found[0].failure.clone().expect("a failure");
    assert!(reason.starts_with("inputs changed"), "{reason}");
    let r = row(&pool, id).await;
    assert_eq!(r.status, "outdated");

    // The rebuild succeeds: nothing of the old verdict is left on the row or in `status`.
    env.worker(&pool).drain().await.unwrap();
    let (status, result, error): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status::text, last_verify_result, install_error FROM pack_environment WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), result, error), ("ready", None, None));
    let out = packenvd(&env, &pool, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ready") && !stdout.contains("inputs changed"),
        "{stdout}"
    );
}

/// The real binary, against the test's database and directories.
fn packenvd(env: &Env, pool: &PgPool, args: &[&str]) -> std::process::Output {
    let s = &env.settings;
    std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
        .args(args)
        .env("DATABASE_URL", database_url(pool))
        .env("PACKENVD_ENVS_ROOT", &s.envs_root)
        .env("PACKENVD_PACKS_DIR", &s.packs_dir)
        .env("PACKENVD_CACHE_DIR", &s.cache_dir)
        .output()
        .unwrap()
}

fn stdout_of(out: &std::process::Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn packenvd_verify_finds_a_deleted_module_file_and_a_pass_after_the_rebuild_clears_it(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let reqs = wheel_requirements(&env.dir.path().join("wheels"));
    env.pack_dir("p", &[("requirements.txt", &reqs)]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let built = row(&pool, id).await;
    assert_eq!(built.status, "ready", "{:?}", built.install_error);
    let out = packenvd(&env, &pool, &["verify", "p", "core.python"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));

    // The interpreter still runs and pip check reads only metadata: the deleted module is
    // found from the distribution's RECORD.
    let build = Path::new(built.metadata["build_dir"].as_str().unwrap());
    let module = std::fs::read_dir(build.join("lib"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .join("site-packages/packenvd_fixture/__init__.py")
        })
        .find(|p| p.exists())
        .expect("the installed module");
    std::fs::remove_file(&module).unwrap();
    let out = packenvd(&env, &pool, &["verify", "p", "core.python"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    assert!(
        stdout_of(&out).contains(
            "BROKEN  p core.python: package packenvd-fixture 0.1.0 is missing packenvd_fixture/__init__.py"
        ),
        "{}",
        stdout_of(&out)
    );
    let r = row(&pool, id).await;
    assert_eq!(r.status, "outdated");

    env.worker(&pool).drain().await.unwrap();
    assert_eq!(python_import(&row(&pool, id).await), "0.1.0");
    let out = packenvd(&env, &pool, &["verify", "p", "core.python"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
    let result: Option<String> =
        sqlx::query_scalar("SELECT last_verify_result FROM pack_environment WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(result.as_deref(), Some("ok"));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn packenvd_verify_fails_a_node_environment_whose_node_modules_was_deleted(pool: PgPool) {
    let env = Env::new(&[]);
    // The dependency lies inside the pack: a path out of it is refused.
    let pack = env.pack_dir("nodep", &[]);
    let dep = pack.join("node-dep");
    std::fs::create_dir_all(&dep).unwrap();
    for f in ["index.js", "package.json"] {
        std::fs::copy(fixtures().join("node-dep").join(f), dep.join(f)).unwrap();
    }
    let package_json = json!({
        "name": "nodep", "version": "1.0.0", "private": true,
        "dependencies": {"packenvd-fixture-dep": format!("file:{}", dep.display())}
    });
    std::fs::write(pack.join("package.json"), package_json.to_string()).unwrap();
    add_pack(&pool, "nodep").await;
    let id = request(&pool, "nodep", "core.nodejs").await;
    env.worker(&pool).drain().await.unwrap();
    let built = row(&pool, id).await;
    assert_eq!(built.status, "ready", "{:?}", built.install_error);
    let out = packenvd(&env, &pool, &["verify", "nodep", "core.nodejs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));

    let build = Path::new(built.metadata["build_dir"].as_str().unwrap());
    std::fs::remove_dir_all(build.join("node_modules")).unwrap();
    let out = packenvd(&env, &pool, &["verify", "nodep", "core.nodejs"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains("BROKEN  nodep core.nodejs: node_modules lacks dependencies")
            && text.contains("missing: packenvd-fixture-dep@"),
        "{text}"
    );
    assert_eq!(status_of(&pool, id).await, "outdated");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_failing_check_of_the_runtimes_spec_marks_the_environment_broken(pool: PgPool) {
    let env = Env::new(&[]);
    let mut spec = tool_runtime();
    spec["checks"] = json!([
        {"name": "tool answers", "command": "{env_path}/bin/tool"},
        {"name": "config present", "command": "test", "args": ["-e", "{pack_path}/tool.conf"]}
    ]);
    add_runtime(&pool, "t.tool", spec).await;
    let id = ready_tool_env(&pool, &env, "p", &[("tool.conf", "")]).await;
    let out = packenvd(&env, &pool, &["verify", "p", "t.tool"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));

    std::fs::remove_file(env.settings.packs_dir.join("p/tool.conf")).unwrap();
    let out = packenvd(&env, &pool, &["verify", "p", "t.tool"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains("BROKEN  p t.tool: check 'config present' (`test -e ")
            && text.contains("exited with status 1"),
        "{text}"
    );
    let r = row(&pool, id).await;
    assert_eq!(r.status, "outdated");
    assert!(r
        .install_error
        .unwrap()
        .starts_with("verification failed: check 'config present'"),);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_check_whose_command_is_missing_says_so_with_the_path(pool: PgPool) {
    let env = Env::new(&[]);
    let mut spec = tool_runtime();
    spec["checks"] = json!([{"name": "lint", "command": "no-such-checker-xyz"}]);
    add_runtime(&pool, "t.tool", spec).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    let found = run_pass(&pool, &env.settings, &Scope::All).await.unwrap();
    let reason = found[0].failure.clone().expect("a failure");
    assert!(
        reason.starts_with("check 'lint': `no-such-checker-xyz` not found on PATH (PATH=/"),
        "{reason}"
    );
    assert_eq!(status_of(&pool, id).await, "outdated");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_hanging_check_is_cut_at_its_timeout_and_counts_as_failed(pool: PgPool) {
    let env = Env::new(&[("verify_timeout", "1s")]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    let build_dir = row(&pool, id).await.metadata["build_dir"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(Path::new(&build_dir).join("hang"), "").unwrap();
    let started = Instant::now();
    let found = run_pass(&pool, &env.settings, &Scope::All).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let reason = found[0].failure.clone().expect("a failure");
    assert!(
        reason.contains("executable 'tool'") && reason.contains("timed out after 1s"),
        "{reason}"
    );
    assert_eq!(status_of(&pool, id).await, "outdated");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn two_instances_verify_a_thousand_stale_rows_each_exactly_once(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let first = ready_tool_env(&pool, &env, "p0", &[]).await;
    let model = row(&pool, first).await;
    // 999 more ready rows, each with a copy of that build in its own pack directory: real
    // links, real checks.
    let build_dir = model.metadata["build_dir"].as_str().unwrap().to_owned();
    let build_name = Path::new(&build_dir)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let shared = env.settings.packs_dir.join("p0").display().to_string();
    sqlx::query("INSERT INTO pack (ref, label, storage_path) SELECT 'p' || i, 'p', $1 FROM generate_series(1, 999) i")
        .bind(&shared)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO pack_environment (pack, runtime, status, env_path, metadata, fingerprint, installed_at, last_verified)
         SELECT p.id, r.id, 'ready', $1 || '/' || p.ref || '/t.tool',
                jsonb_set($2, '{build_dir}', to_jsonb($1 || '/' || p.ref || '/' || $4)),
                $3, now(), now() - interval '30 days'
         FROM pack p, runtime r WHERE r.ref = 't.tool' AND p.ref <> 'p0'",
    )
    .bind(env.envs_root().display().to_string())
    .bind(&model.metadata)
    .bind(&model.fingerprint)
    .bind(&build_name)
    .execute(&pool)
    .await
    .unwrap();
    // Rows the platform wrote as they were before nodes existed: this node adopts them.
    register_node(&pool, &env.envs_root().display().to_string()).await;
    let tool = std::fs::read(Path::new(&build_dir).join("bin/tool")).unwrap();
    for i in 1..=999 {
        let dir = env.envs_root().join(format!("p{i}"));
        std::fs::create_dir_all(dir.join(&build_name).join("bin")).unwrap();
        let copy = dir.join(&build_name).join("bin/tool");
        std::fs::write(&copy, &tool).unwrap();
        std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink(&build_name, dir.join("t.tool")).unwrap();
    }
    make_stale(&pool).await;

    let (mut a, mut b) = (env.settings.clone(), env.settings.clone());
    a.instance_name = "a".into();
    b.instance_name = "b".into();
    let started = Instant::now();
    let (fa, fb) = tokio::join!(
        run_pass(&pool, &a, &Scope::Stale),
        run_pass(&pool, &b, &Scope::Stale)
    );
    let took = started.elapsed();
    let (fa, fb) = (fa.unwrap(), fb.unwrap());
    let all: Vec<&str> = fa.iter().chain(&fb).map(|f| f.pack_ref.as_str()).collect();
    let unique: HashSet<&str> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        1000,
        "each row once: {} + {}",
        fa.len(),
        fb.len()
    );
    assert_eq!(unique.len(), 1000);
    assert!(
        fa.iter().chain(&fb).all(|f| f.failure.is_none()),
        "{:?}",
        fa.iter().chain(&fb).find(|f| f.failure.is_some())
    );
    assert!(
        !fa.is_empty() && !fb.is_empty(),
        "both instances took part: {} / {}",
        fa.len(),
        fb.len()
    );
    println!(
        "FIGURE verification: 1000 environments by 2 instances in {:.2} s = {:.0} environments/s",
        took.as_secs_f64(),
        1000.0 / took.as_secs_f64()
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn packenvd_verify_exits_0_when_all_is_well_and_1_when_something_is_broken(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    let url = database_url(&pool);
    let verify = |args: &[&str]| {
        let s = &env.settings;
        std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
            .arg("verify")
            .args(args)
            .env("DATABASE_URL", &url)
            .env("PACKENVD_ENVS_ROOT", &s.envs_root)
            .env("PACKENVD_PACKS_DIR", &s.packs_dir)
            .env("PACKENVD_CACHE_DIR", &s.cache_dir)
            .output()
            .unwrap()
    };
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 environment(s) verified"),
        "stale only by default"
    );
    let out = verify(&["--all"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok      p t.tool"));

    let tool = row(&pool, id).await.metadata["executables"]["tool"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(tool).unwrap();
    let out = verify(&["p", "t.tool"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("BROKEN  p t.tool: executable 'tool'"),
        "{stdout}"
    );
    assert_eq!(status_of(&pool, id).await, "outdated");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_bad_template_in_a_check_fails_the_build_not_a_later_verification(pool: PgPool) {
    let env = Env::new(&[]);
    let mut spec = tool_runtime();
    spec["checks"] = json!([{"name": "imports", "command": "{env_path}/bin/tool",
                             "args": ["{no_such_var}"]}]);
    add_runtime(&pool, "t.tool", spec).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.tool").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "failed");
    let error = r.install_error.unwrap();
    assert!(
        error.contains("runtime t.tool: check 'imports', args[0]: ")
            && error.contains("no_such_var"),
        "{error}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_passing_verification_clears_an_error_left_on_a_ready_row(pool: PgPool) {
    let env = Env::new(&[]);
    add_runtime(&pool, "t.tool", tool_runtime()).await;
    let id = ready_tool_env(&pool, &env, "p", &[]).await;
    // What an older packenvd or an operator's hand may have left on a row that is ready.
    for table in ["pack_environment_node", "pack_environment"] {
        let key = if table == "pack_environment" {
            "id"
        } else {
            "env_id"
        };
        sqlx::query(&format!(
            "UPDATE {table} SET install_error = 'verification failed: inputs changed: ...',
                    last_verify_result = 'inputs changed: ...' WHERE {key} = $1"
        ))
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    }
    let found = run_pass(&pool, &env.settings, &Scope::All).await.unwrap();
    assert!(found[0].failure.is_none(), "{found:?}");
    let row: (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status::text, install_error, last_verify_result FROM pack_environment WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, ("ready".into(), None, Some("ok".into())));
    let out = packenvd(&env, &pool, &["status"]);
    assert!(
        !stdout_of(&out).contains("inputs changed"),
        "{}",
        stdout_of(&out)
    );
}

/// A ready core.python environment of pack `p` built from the local wheel fixture, and the
/// installed `packenvd_fixture/__init__.py` in its build.
async fn ready_wheel_env(pool: &PgPool, env: &Env) -> (i64, Row, std::path::PathBuf) {
    let reqs = wheel_requirements(&env.dir.path().join("wheels"));
    env.pack_dir("p", &[("requirements.txt", &reqs)]);
    add_pack(pool, "p").await;
    let id = request(pool, "p", "core.python").await;
    env.worker(pool).drain().await.unwrap();
    let built = row(pool, id).await;
    assert_eq!(built.status, "ready", "{:?}", built.install_error);
    let build = Path::new(built.metadata["build_dir"].as_str().unwrap());
    let module = std::fs::read_dir(build.join("lib"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .join("site-packages/packenvd_fixture/__init__.py")
        })
        .find(|p| p.exists())
        .expect("the installed module");
    (id, built, module)
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn packenvd_verify_names_an_installed_file_with_a_line_appended_and_the_rebuild_restores_it(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let (id, built, module) = ready_wheel_env(&pool, &env).await;
    // Unchanged, it verifies.
    let out = packenvd(&env, &pool, &["verify", "p", "core.python"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));

    // One line appended: the file is still there, the interpreter still runs and pip check
    // still passes. Written as a new file over the old one: appending in place would also
    // change uv's cache, whose files uv hard-links into builds, and the rebuild would link the
    // changed file again (the shared-cache half of issue 21, not this check's).
    let mut text = std::fs::read(&module).unwrap();
    text.extend_from_slice(b"VERSION = \"tampered\"\n");
    let new = module.with_extension("new");
    std::fs::write(&new, text).unwrap();
    std::fs::rename(&new, &module).unwrap();
    assert_eq!(python_import(&built), "tampered");
    let out = packenvd(&env, &pool, &["verify", "p", "core.python"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout_of(&out));
    assert!(
        stdout_of(&out).contains(
            "BROKEN  p core.python: package packenvd-fixture 0.1.0: packenvd_fixture/__init__.py differs from what was installed (sha256 in RECORD "
        ),
        "{}",
        stdout_of(&out)
    );
    let r = row(&pool, id).await;
    assert_eq!(r.status, "outdated");
    assert!(
        r.install_error
            .as_deref()
            .unwrap_or("")
            .contains("differs from what was installed"),
        "{:?}",
        r.install_error
    );

    env.worker(&pool).drain().await.unwrap();
    let rebuilt = row(&pool, id).await;
    assert_eq!(rebuilt.status, "ready", "{:?}", rebuilt.install_error);
    assert_ne!(rebuilt.metadata["build_id"], built.metadata["build_id"]);
    assert_eq!(python_import(&rebuilt), "0.1.0");
    let out = packenvd(&env, &pool, &["verify", "p", "core.python"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_record_with_a_malformed_hash_fails_verification_saying_so_and_is_rebuilt(pool: PgPool) {
    let env = Env::new(&[]);
    let (id, built, module) = ready_wheel_env(&pool, &env).await;
    let dist_info = std::fs::read_dir(module.parent().unwrap().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("packenvd_fixture-")
                && p.extension().is_some_and(|e| e == "dist-info")
        })
        .expect("the dist-info");
    let record = dist_info.join("RECORD");
    let text = std::fs::read_to_string(&record).unwrap();
    let edited: String = text
        .lines()
        .map(|l| match l.strip_prefix("packenvd_fixture/__init__.py,") {
            Some(rest) => format!(
                "packenvd_fixture/__init__.py,sha256=???,{}\n",
                rest.rsplit(',').next().unwrap()
            ),
            None => format!("{l}\n"),
        })
        .collect();
    assert_ne!(edited, text);
    std::fs::write(&record, edited).unwrap();
    make_stale(&pool).await;

    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let reason = found[0].failure.clone().expect("a failure");
    assert_eq!(
        reason,
        "package packenvd-fixture 0.1.0: RECORD lists packenvd_fixture/__init__.py with the malformed hash \"sha256=???\" (not sha256=<43 characters of URL-safe base64>): what was installed cannot be told"
    );
    assert_eq!(status_of(&pool, id).await, "outdated");

    env.worker(&pool).drain().await.unwrap();
    let rebuilt = row(&pool, id).await;
    assert_eq!(rebuilt.status, "ready", "{:?}", rebuilt.install_error);
    assert_ne!(rebuilt.metadata["build_id"], built.metadata["build_id"]);
    make_stale(&pool).await;
    let found = run_pass(&pool, &env.settings, &Scope::Stale).await.unwrap();
    assert!(
        found.len() == 1 && found[0].failure.is_none() && found[0].unchecked.is_none(),
        "{found:?}"
    );
}
