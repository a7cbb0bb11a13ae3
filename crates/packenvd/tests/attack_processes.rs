//! Steps cannot outlive or outgrow their build (DESIGN §6): whatever a step starts, `setsid`
//! and double forks included, dies when the step ends, times out, is cancelled, or its daemon
//! dies; memory, processes and file size are capped with a clear error; with a build user,
//! steps run as that user and the finished build is the daemon's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use sqlx::PgPool;

/// A step body that leaves a `setsid` process and a double-forked one behind, each touching
/// `<scratch>/<tag>-<n>` after `after` seconds, and carrying `needle` in its command line.
fn leave_behind(env: &Env, tag: &str, needle: &str, after: u32) -> String {
    let s = env.scratch().display().to_string();
    format!(
        "setsid sh -c 'sleep {after}; touch {s}/{tag}-1 # {needle}' </dev/null >/dev/null 2>&1 & \
         (sh -c 'sleep {after}; touch {s}/{tag}-2 # {needle}' </dev/null >/dev/null 2>&1 &) ; "
    )
}

fn needle(tag: &str) -> String {
    format!("packenvd-{tag}-{}", uuid::Uuid::new_v4().simple())
}

async fn gone(needle: &str, within: Duration) -> Vec<String> {
    let started = Instant::now();
    loop {
        let left = processes_with(needle);
        if left.is_empty() || started.elapsed() > within {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn nothing_a_step_starts_outlives_it_even_in_a_new_session(pool: PgPool) {
    let env = Env::new(&[]);
    let n = needle("done");
    add_runtime(
        &pool,
        "t.bg",
        shell_runtime(&(leave_behind(&env, "late", &n, 2) + "exit 0")),
    )
    .await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.bg").await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(status_of(&pool, id).await, "ready");
    let left = gone(&n, Duration::from_secs(1)).await;
    assert!(left.is_empty(), "survivors: {left:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in [1, 2] {
        assert!(
            !env.scratch().join(format!("late-{i}")).exists(),
            "a process the step left wrote after the build was ready"
        );
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_timed_out_step_takes_its_detached_processes_with_it(pool: PgPool) {
    let env = Env::new(&[("max_attempts", "1")]);
    let n = needle("timeout");
    add_runtime(
        &pool,
        "t.hang",
        serde_json::json!([{"name": "hang", "timeout": "1s", "command": "sh",
            "args": ["-c", leave_behind(&env, "late", &n, 3) + "sleep 600"]}]),
    )
    .await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.hang").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "failed");
    assert!(r.install_error.unwrap().contains("timed out after 1s"));
    let left = gone(&n, Duration::from_secs(1)).await;
    assert!(left.is_empty(), "survivors: {left:?}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn sigterm_and_kill_minus_9_leave_no_step_process_behind(pool: PgPool) {
    let env = Env::new(&[]);
    for (signal, tag) in [(Signal::SIGTERM, "term"), (Signal::SIGKILL, "kill")] {
        let n = needle(tag);
        let rt = format!("t.{tag}");
        add_runtime(
            &pool,
            &rt,
            shell_runtime(&(leave_behind(&env, tag, &n, 60) + "sleep 600")),
        )
        .await;
        env.pack_dir(tag, &[]);
        add_pack(&pool, tag).await;
        let id = request(&pool, tag, &rt).await;
        let mut d = Daemon::spawn(
            &env,
            &database_url(&pool),
            tag,
            &[("PACKENVD_SHUTDOWN_GRACE", "1s")],
            &[],
        );
        eventually(Duration::from_secs(15), "the step's processes", || async {
            status_of(&pool, id).await == "installing" && processes_with(&n).len() >= 2
        })
        .await;
        let killed = Instant::now();
        d.signal(signal);
        assert!(d.wait_exit(Duration::from_secs(15)).is_some());
        let left = gone(&n, Duration::from_secs(5)).await;
        assert!(left.is_empty(), "after {signal}: survivors {left:?}");
        println!(
            "FIGURE {signal}: every process of the step gone {:.2} s after the signal",
            killed.elapsed().as_secs_f64()
        );
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_over_its_memory_or_file_size_limit_fails_saying_which(pool: PgPool) {
    let env = Env::new(&[
        ("max_attempts", "1"),
        ("step_memory_limit", "512MiB"),
        ("step_max_file_size", "1MiB"),
    ]);
    add_runtime(
        &pool,
        "t.mem",
        shell_runtime("python3 -c 'b = bytearray(2 * 1024 ** 3)'"),
    )
    .await;
    add_runtime(
        &pool,
        "t.file",
        serde_json::json!([{"name": "write", "command": "sh", "args": ["-c", "head -c 2097152 /dev/zero > {env_path}/big"]}]),
    )
    .await;
    let mut ids = Vec::new();
    for (p, rt) in [("m", "t.mem"), ("f", "t.file")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        ids.push(request(&pool, p, rt).await);
    }
    env.worker(&pool).drain().await.unwrap();
    let mem = row(&pool, ids[0]).await.install_error.unwrap();
    assert!(
        mem.contains("MemoryError") && mem.contains("step_memory_limit is 536870912 bytes"),
        "{mem}"
    );
    let file = row(&pool, ids[1]).await.install_error.unwrap();
    assert!(
        file.contains("step 'write'") && file.contains("step_max_file_size"),
        "{file}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn with_a_build_user_steps_run_as_it_cannot_fork_bomb_and_the_build_is_the_daemons(
    pool: PgPool,
) {
    if !is_root() {
        eprintln!("skipped: switching to a build user needs root (or CAP_SETUID)");
        return;
    }
    // One build at a time: the process limit is the build user's, shared by its builds (a
    // fork bomb starves the other builds of the same user until it ends; see the README).
    let env = Env::new(&[
        ("build_user", "65534:65534"),
        ("step_max_processes", "40"),
        ("max_attempts", "1"),
        ("concurrency", "1"),
    ]);
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    give_to(&env.scratch(), 65534);
    let secret = env.dir.path().join("root-only.txt");
    std::fs::write(&secret, "root's").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let who = format!(
        "id -u > {{env_path}}/uid; grep CapEff /proc/self/status > {{env_path}}/caps; cat {} > {{env_path}}/stolen 2>&1 || true",
        secret.display()
    );
    add_runtime(&pool, "t.who", shell_runtime(&who)).await;
    add_runtime(
        &pool,
        "t.bomb",
        shell_runtime("i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; wait"),
    )
    .await;
    let mut ids = Vec::new();
    for (p, rt) in [("w", "t.who"), ("b", "t.bomb")] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
        ids.push(request(&pool, p, rt).await);
    }
    std::fs::set_permissions(
        &env.settings.packs_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, ids[0]).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let build = std::path::PathBuf::from(r.metadata["build_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(build.join("uid")).unwrap().trim(),
        "65534"
    );
    let caps = std::fs::read_to_string(build.join("caps")).unwrap();
    assert_eq!(
        caps.trim(),
        "CapEff:\t0000000000000000",
        "a step holds no capability"
    );
    let stolen = std::fs::read_to_string(build.join("stolen")).unwrap();
    assert!(stolen.contains("Permission denied"), "{stolen}");
    use std::os::unix::fs::MetadataExt;
    for path in [build.clone(), build.join("uid")] {
        assert_eq!(
            std::fs::metadata(&path).unwrap().uid(),
            0,
            "{} is not the daemon's",
            path.display()
        );
    }
    let bomb = row(&pool, ids[1]).await;
    assert_eq!(bomb.status, "failed");
    let error = bomb.install_error.unwrap();
    assert!(error.contains("step_max_processes is 40"), "{error}");
}
