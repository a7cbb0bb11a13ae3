//! Bad rows fail with a clear error naming the problem, before anything runs, without
//! writing outside the envs root and without touching other rows.

mod common;

use common::*;
use serde_json::json;
use sqlx::PgPool;

/// Builds the bad row next to a good one; returns the bad row's error.
async fn fails_alone(pool: &PgPool, env: &Env, bad_id: i64) -> String {
    env.pack_dir("good", &[]);
    add_pack(pool, "good").await;
    let good = request(pool, "good", "core.shell").await;
    env.worker(pool).drain().await.unwrap();
    assert_eq!(
        row(pool, good).await.status,
        "ready",
        "the good row is not affected"
    );
    let r = row(pool, bad_id).await;
    assert_eq!(r.status, "failed", "{r:?}");
    assert_eq!(r.attempts, 1, "a bad input is permanent: no retry");
    r.install_error.unwrap()
}

/// A runtime whose only step would leave a trace outside the envs root if it ran.
fn tracing_step(env: &Env) -> serde_json::Value {
    json!({"name": "trace", "command": "touch", "args": [env.scratch().join("ran").display().to_string()]})
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_unknown_template_variable_fails_before_anything_runs(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.typo",
        json!({"installers": [tracing_step(&env), {"name": "use", "command": "{env_pth}/bin/x"}]}),
    )
    .await;
    let id = request(&pool, "p", "t.typo").await;
    let error = fails_alone(&pool, &env, id).await;
    assert!(
        error.contains("runtime t.typo")
            && error.contains("step 'use'")
            && error.contains("{env_pth}"),
        "{error}"
    );
    assert!(!env.scratch().join("ran").exists(), "a step ran");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_unclosed_brace_fails_before_anything_runs(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(&pool, "t.brace", json!({"installers": [tracing_step(&env), {"name": "use", "command": "x", "args": ["{env_path"]}]})).await;
    let id = request(&pool, "p", "t.brace").await;
    let error = fails_alone(&pool, &env, id).await;
    assert!(
        error.contains("step 'use', args[0]: unclosed '{'"),
        "{error}"
    );
    assert!(!env.scratch().join("ran").exists());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn malformed_installers_json_fails_naming_where(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(&pool, "t.json", json!({"installers": [{"name": "a", "command": "true"}, {"name": "b", "command": "true", "args": "not-a-list"}]})).await;
    let id = request(&pool, "p", "t.json").await;
    let error = fails_alone(&pool, &env, id).await;
    assert!(
        error.contains("runtime t.json: invalid installers JSON at installers[1].args"),
        "{error}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_pack_ref_with_dot_dot_or_slash_fails_and_writes_nothing(pool: PgPool) {
    for (i, bad_ref) in ["../escape", "a/b", ".hidden"].into_iter().enumerate() {
        // A directory of its own each time, so a node of its own.
        let env = Env::new(&[("node_name", &format!("n{i}"))]);
        let rt = format!("t.trace{i}");
        add_runtime(&pool, &rt, json!({"installers": [tracing_step(&env)]})).await;
        // Packs the platform registered with a storage_path, so the path itself exists.
        let storage = env.dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        sqlx::query("INSERT INTO pack (ref, label, storage_path) VALUES ($1, 'bad', $2)")
            .bind(bad_ref)
            .bind(storage.display().to_string())
            .execute(&pool)
            .await
            .unwrap();
        let id = request(&pool, bad_ref, &rt).await;
        env.worker(&pool).drain().await.unwrap();
        let r = row(&pool, id).await;
        assert_eq!(r.status, "failed");
        let error = r.install_error.unwrap();
        assert!(
            error.contains(&format!("pack_ref {bad_ref:?} is not allowed")),
            "{error}"
        );
        assert!(!env.scratch().join("ran").exists());
        assert!(tree(env.envs_root()).is_empty());
        let outside: Vec<String> = tree(env.dir.path())
            .into_iter()
            .filter(|p| !p.starts_with("packs") && !p.starts_with("storage") && p != "scratch")
            // The node's envs root and its marker, made when the node starts.
            .filter(|p| p != "envs" && p != "envs/.packenvd-root")
            .collect();
        assert!(outside.is_empty(), "written: {outside:?}");
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_env_path_outside_the_envs_root_fails_and_writes_nothing(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.trace",
        json!({"installers": [tracing_step(&env)]}),
    )
    .await;
    let target = env.dir.path().join("elsewhere");
    let id = request(&pool, "p", "t.trace").await;
    sqlx::query("UPDATE pack_environment SET env_path = $2 WHERE id = $1")
        .bind(id)
        .bind(target.display().to_string())
        .execute(&pool)
        .await
        .unwrap();
    let error = fails_alone(&pool, &env, id).await;
    assert!(error.contains("is outside the envs root"), "{error}");
    assert!(!target.exists() && !env.scratch().join("ran").exists());
    // A path that climbs out with .. is refused the same way.
    let climbing = format!("{}/p/../../elsewhere", env.envs_root().display());
    sqlx::query("UPDATE pack_environment SET env_path = $2, status = 'pending' WHERE id = $1")
        .bind(id)
        .bind(&climbing)
        .execute(&pool)
        .await
        .unwrap();
    env.worker(&pool).drain().await.unwrap();
    assert!(row(&pool, id)
        .await
        .install_error
        .unwrap()
        .contains("is outside the envs root"));
    assert!(!target.exists());
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_missing_command_fails_at_once_naming_it(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.nocmd",
        json!([{"name": "install", "command": "no-such-installer-xyz"}]),
    )
    .await;
    let id = request(&pool, "p", "t.nocmd").await;
    let error = fails_alone(&pool, &env, id).await;
    assert!(
        error.contains("step 'install': `no-such-installer-xyz` not found on PATH (PATH="),
        "{error}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_missing_script_is_named_not_reported_as_an_os_error(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    add_runtime(
        &pool,
        "t.noscript",
        json!([{"name": "install", "command": "{pack_path}/install.sh"}]),
    )
    .await;
    let id = request(&pool, "p", "t.noscript").await;
    let error = fails_alone(&pool, &env, id).await;
    let script = env.settings.packs_dir.join("p/install.sh");
    assert!(
        error.contains(&format!(
            "step 'install' (`{0}`) could not be started: `{0}` does not exist",
            script.display()
        )) && !error.contains("os error"),
        "{error}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_script_whose_interpreter_is_gone_names_the_interpreter(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    // As in a venv whose Python was removed.
    add_runtime(
        &pool,
        "t.nointerp",
        json!([
            {"name": "make", "order": 1, "command": "sh", "args": ["-c",
             "mkdir -p {env_path}/bin && printf '#!{env_path}/gone/python\\n' > {env_path}/bin/tool && chmod +x {env_path}/bin/tool"]},
            {"name": "run", "order": 2, "command": "{env_path}/bin/tool"}
        ]),
    )
    .await;
    let id = request(&pool, "p", "t.nointerp").await;
    let error = fails_alone(&pool, &env, id).await;
    assert!(
        error.contains("step 'run' (`")
            && error.contains("/bin/tool` names `")
            && error.contains("/gone/python` in its #! line, which does not exist")
            && !error.contains("os error"),
        "{error}"
    );
}
