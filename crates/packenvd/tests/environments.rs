//! Real environments built from the seeded runtimes, with local fixtures only (no network).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use sqlx::PgPool;

fn seeded_ready(r: &Row) {
    assert_eq!(
        r.status,
        "ready",
        "error: {:?}\nlog:\n{}",
        r.install_error,
        r.install_log.as_deref().unwrap_or("")
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_python_pack_with_a_local_wheel_becomes_ready_and_imports_it(pool: PgPool) {
    let env = Env::new(&[]);
    let wheels = env.dir.path().join("wheels");
    let reqs = wheel_requirements(&wheels);
    env.pack_dir("pyp", &[("requirements.txt", &reqs)]);
    add_pack(&pool, "pyp").await;
    let id = request(&pool, "pyp", "core.python").await;
    env.worker(&pool).drain().await.unwrap();

    let r = row(&pool, id).await;
    seeded_ready(&r);
    let env_path = r.env_path.clone().unwrap();
    assert_eq!(Path::new(&env_path), env.envs_root().join("pyp/python"));
    assert!(
        Path::new(&env_path).is_symlink(),
        "env_path is the switchable link"
    );
    // Actions start from the resolved build, which metadata names.
    let python = r.metadata["executables"]["python"].as_str().unwrap();
    let build_dir = r.metadata["build_dir"].as_str().unwrap();
    assert!(python.starts_with(build_dir), "{python} not in {build_dir}");
    assert!(
        r.metadata["interpreter_version"]
            .as_str()
            .unwrap()
            .starts_with("Python 3"),
        "{}",
        r.metadata
    );
    let out = Command::new(python)
        .args([
            "-c",
            "import packenvd_fixture; print(packenvd_fixture.VERSION)",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0.1.0");
    // The log shows every step.
    let log = r.install_log.unwrap();
    assert!(
        log.contains("'create venv'") && log.contains("'install requirements'"),
        "{log}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_node_pack_with_a_file_dependency_becomes_ready_and_requires_it(pool: PgPool) {
    let env = Env::new(&[]);
    // The dependency lies inside the pack (a path out of it is refused), named absolutely:
    // core.nodejs runs npm on a copy of package.json in the build directory.
    let pack = env.pack_dir("nodep", &[]);
    let dep = pack.join("node-dep");
    std::fs::create_dir_all(&dep).unwrap();
    for f in ["index.js", "package.json"] {
        std::fs::copy(fixtures().join("node-dep").join(f), dep.join(f)).unwrap();
    }
    let package_json = serde_json::json!({
        "name": "nodep", "version": "1.0.0", "private": true,
        "dependencies": {"packenvd-fixture-dep": format!("file:{}", dep.display())}
    });
    std::fs::write(pack.join("package.json"), package_json.to_string()).unwrap();
    add_pack(&pool, "nodep").await;
    let id = request(&pool, "nodep", "core.nodejs").await;
    env.worker(&pool).drain().await.unwrap();

    let r = row(&pool, id).await;
    seeded_ready(&r);
    let node_path = r.metadata["env_vars"]["NODE_PATH"].as_str().unwrap();
    assert!(node_path.starts_with(r.metadata["build_dir"].as_str().unwrap()));
    let node = r.metadata["executables"]["node"].as_str().unwrap();
    let out = Command::new(node)
        .args(["-e", "console.log(require('packenvd-fixture-dep').answer)"])
        .env("NODE_PATH", node_path)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_shell_pack_becomes_ready_with_no_directory(pool: PgPool) {
    let env = Env::new(&[]);
    env.pack_dir("sh", &[("run.sh", "echo hi\n")]);
    add_pack(&pool, "sh").await;
    let id = request(&pool, "sh", "core.shell").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    seeded_ready(&r);
    assert_eq!(r.env_path, None);
    assert_eq!(r.metadata["requires_environment"], false);
    assert!(
        tree(env.envs_root()).is_empty(),
        "{:?}",
        tree(env.envs_root())
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_uninstallable_requirement_fails_naming_the_step_the_status_and_the_output(
    pool: PgPool,
) {
    let env = Env::new(&[]);
    let empty_index = env.dir.path().join("no-wheels");
    std::fs::create_dir_all(&empty_index).unwrap();
    let reqs = format!(
        "--no-index\n--find-links {}\npackenvd-no-such-package==1.0\n",
        empty_index.display()
    );
    env.pack_dir("bad", &[("requirements.txt", &reqs)]);
    add_pack(&pool, "bad").await;
    let id = request(&pool, "bad", "core.python").await;
    env.worker(&pool).drain().await.unwrap();

    let r = row(&pool, id).await;
    assert_eq!(
        r.status, "failed",
        "a missing package is permanent: no retry"
    );
    assert_eq!(r.attempts, 1);
    let error = r.install_error.unwrap();
    let first = error.lines().next().unwrap();
    // "install requirements" or "install requirements (uv)", as the host has uv or not.
    assert!(first.contains("step 'install requirements"), "{error}");
    assert!(first.contains("pip install"), "{error}");
    assert!(first.contains("exited with status 1"), "{error}");
    assert!(
        error.contains("packenvd-no-such-package"),
        "the output's tail follows: {error}"
    );
    // The failed build is gone at once; nothing is served (only the record of the
    // environment's name stays).
    assert_eq!(
        tree(&env.envs_root().join("bad")),
        [packenv_core::layout::PACK_RECORD]
    );
}
