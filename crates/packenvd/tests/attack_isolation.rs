//! Packs are isolated from each other, and steps from everything outside their build (DESIGN
//! §6, issue 21): each test performs one attack a hostile step would, and fails without the
//! protection it names. CI runs them as root; the daemon of each test is the test process
//! itself (as root its steps run as packenvd's own unprivileged build id) or, where the
//! attack needs a daemon of the steps' own uid, a `packenvd run` as an unprivileged user.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;

/// The uid a root daemon without `build_user` runs its steps as (when the host has no
/// `packenvd-build` user, as CI's has not).
const STEPS_UID: u32 = packenvd::config::ROOTS_BUILD_ID;

fn needle(tag: &str) -> String {
    format!("packenvd-{tag}-{}", uuid::Uuid::new_v4().simple())
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_that_kills_its_supervisor_leaves_nothing_behind(pool: PgPool) {
    assert!(is_root(), "CI runs this as root");
    let env = Env::new(&[("max_attempts", "1")]);
    let n = needle("orphan");
    let s = env.scratch().display().to_string();
    // The attack: a process in a new session, then the step kills its own parent
    // (the supervisor, when it ran in the step's namespace) and the whole process group.
    let script = format!(
        "setsid sh -c 'sleep 3; touch {s}/late # {n}' </dev/null >/dev/null 2>&1 & \
         sleep 0.5; kill -9 $PPID; echo parent-kill=$?; kill -9 1; echo init-kill=$?; exit 0"
    );
    add_runtime(&pool, "t.orphan", shell_runtime(&script)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.orphan").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let started = Instant::now();
    while !processes_with(&n).is_empty() && started.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        processes_with(&n).is_empty(),
        "the step's orphan outlived its build: {:?}",
        processes_with(&n)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !env.scratch().join("late").exists(),
        "a process the step left behind wrote after the build was ready"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_that_kills_its_supervisor_still_times_out_with_everything_it_started(pool: PgPool) {
    assert!(is_root(), "CI runs this as root");
    let env = Env::new(&[("max_attempts", "1")]);
    let n = needle("hang");
    let script = format!(
        "setsid sh -c 'sleep 600 # {n}' </dev/null >/dev/null 2>&1 & sleep 0.3; kill -9 $PPID; sleep 600"
    );
    add_runtime(
        &pool,
        "t.hang",
        serde_json::json!([{"name": "hang", "timeout": "2s", "command": "sh", "args": ["-c", script]}]),
    )
    .await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.hang").await;
    let started = Instant::now();
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "failed");
    let error = r.install_error.unwrap_or_default();
    assert!(error.contains("timed out after 2s"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(processes_with(&n).is_empty(), "{:?}", processes_with(&n));
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_step_cannot_signal_a_concurrent_build_or_a_process_of_its_own_uid(pool: PgPool) {
    assert!(is_root(), "CI runs this as root");
    let env = Env::new(&[("max_attempts", "1"), ("concurrency", "4")]);
    let s = env.scratch();
    // A process of the steps' own uid outside any build (an action runner, say).
    let mut bystander = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={STEPS_UID}"),
            &format!("--regid={STEPS_UID}"),
            "--clear-groups",
            "--",
            "sleep",
            "600",
        ])
        .spawn()
        .expect("setpriv");
    std::fs::write(s.join("bystander"), bystander.id().to_string()).unwrap();
    let n = needle("victim");
    add_runtime(
        &pool,
        "t.victim",
        shell_runtime(&format!("sleep 6 # {n}\nexit 0")),
    )
    .await;
    // The attacker is told the victim's pid as the host sees it: harder than finding it.
    let sd = s.display();
    let attack = format!(
        "i=0; while [ ! -s {sd}/victim ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
         kill -STOP $(cat {sd}/victim) 2>>{sd}/attack; echo victim=$? >> {sd}/attack; \
         kill -9 $(cat {sd}/victim) 2>>{sd}/attack; echo victim=$? >> {sd}/attack; \
         kill -9 $(cat {sd}/bystander) 2>>{sd}/attack; echo bystander=$? >> {sd}/attack; exit 0"
    );
    add_runtime(&pool, "t.attacker", shell_runtime(&attack)).await;
    for p in ["victim", "attacker"] {
        env.pack_dir(p, &[]);
        add_pack(&pool, p).await;
    }
    let victim = request(&pool, "victim", "t.victim").await;
    let attacker = request(&pool, "attacker", "t.attacker").await;
    let worker = env.worker(&pool);
    let run = tokio::spawn(async move { worker.drain().await });
    wait_for("the victim's step", Duration::from_secs(30), || {
        !processes_with(&n).is_empty()
    })
    .await;
    let pid = processes_with(&n)
        .iter()
        .filter_map(|l| l.split(':').next()?.parse::<u32>().ok())
        .min()
        .expect("victim pid");
    std::fs::write(s.join("victim"), pid.to_string()).unwrap();
    run.await.unwrap().unwrap();
    let attack = std::fs::read_to_string(s.join("attack")).unwrap_or_default();
    let (v, a) = (row(&pool, victim).await, row(&pool, attacker).await);
    assert_eq!(a.status, "ready", "{:?}", a.install_error);
    assert_eq!(
        v.status, "ready",
        "the attacker's step signalled the victim's: {:?}\n{attack}",
        v.install_error
    );
    assert!(
        attack.contains("victim=1") && !attack.contains("victim=0"),
        "{attack}"
    );
    assert!(attack.contains("bystander=1"), "{attack}");
    let alive = !has_exited(bystander.id());
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(alive, "the step killed a process of its uid: {attack}");
}

/// The unix sockets of PostgreSQL servers this host listens on.
fn postgres_sockets() -> Vec<String> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| p.contains("/.s.PGSQL."))
        .map(str::to_owned)
        .collect()
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn no_step_can_connect_to_a_postgresql_socket(pool: PgPool) {
    assert!(is_root(), "CI runs this as root");
    // A server whose socket every local user can reach, as a shared server's is.
    let (cluster, _cluster_pool) = reachable_database().await;
    let url = cluster.url();
    let dir = url.rsplit("host=").next().unwrap().to_owned();
    let socket = format!("{dir}/.s.PGSQL.5432");
    assert!(
        postgres_sockets().contains(&socket),
        "{socket} not in /proc/net/unix"
    );
    // Reachable without the protection: a plain process of the steps' uid connects.
    let probe = "import socket,sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        try:\n    s.connect(sys.argv[1]); print('connected')\n\
        except OSError as e:\n    print('refused', e)\n";
    let direct = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={STEPS_UID}"),
            &format!("--regid={STEPS_UID}"),
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            probe,
            &socket,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout).trim(),
        "connected",
        "the test's premise: the socket is reachable outside a step"
    );
    let env = Env::new(&[("max_attempts", "1")]);
    let out = env.scratch().join("sockets");
    let script = format!(
        "for s in $(grep -o '/[^ ]*[.]s[.]PGSQL[.][0-9]*' /proc/net/unix) {socket}; do \
         echo \"$s $(/usr/bin/python3 -c \"$PROBE\" $s)\" >> {out}; done",
        out = out.display()
    );
    add_runtime(
        &pool,
        "t.db",
        serde_json::json!([{"name": "reach the database", "command": "sh",
            "args": ["-c", script],
            "env": {"PROBE": probe}}]),
    )
    .await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.db").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let tried = std::fs::read_to_string(&out).unwrap();
    assert!(tried.contains(&socket), "{tried}");
    assert!(
        !tried.contains("connected"),
        "a step connected to PostgreSQL:\n{tried}"
    );
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_root_daemons_steps_run_unprivileged_with_no_capability(pool: PgPool) {
    assert!(is_root(), "CI runs this as root");
    let env = Env::new(&[]);
    let secret = env.dir.path().join("root-only");
    std::fs::write(&secret, "root's secret").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let script = format!(
        "id -u > {{env_path}}/uid; grep -E '^(CapEff|CapPrm|CapAmb|NoNewPrivs)' /proc/self/status > {{env_path}}/caps; \
         cat {} > {{env_path}}/stolen 2>&1; true",
        secret.display()
    );
    add_runtime(&pool, "t.who", shell_runtime(&script)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.who").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, id).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let build = PathBuf::from(r.metadata["build_dir"].as_str().unwrap());
    let read = |f: &str| std::fs::read_to_string(build.join(f)).unwrap();
    assert_eq!(read("uid").trim(), STEPS_UID.to_string());
    let caps = read("caps");
    for line in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(caps.contains(line), "{caps}");
    }
    assert!(!read("stolen").contains("secret"), "{}", read("stolen"));
}

#[test]
fn a_root_daemon_refuses_landlock_off() {
    assert!(is_root(), "CI runs this as root");
    let loaded = packenvd::config::Settings::load(
        packenvd::config::Layers {
            file: None,
            flags: [("landlock", "off".to_string())].into(),
            env: [("DATABASE_URL".to_string(), "postgres://unused".to_string())].into(),
        },
        true,
    );
    let Err(err) = loaded else {
        panic!("landlock = off accepted for a root daemon")
    };
    let err = err.to_string();
    assert!(
        err.contains("landlock") && err.contains("refused for a daemon running as root"),
        "{err}"
    );
}

/// A Python environment of `pack` from the fixture wheel: its installed module file.
fn installed_module(build: &Path) -> PathBuf {
    let lib = build.join("lib");
    let site = std::fs::read_dir(&lib)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("python"))
        .expect("lib/pythonX.Y")
        .path()
        .join("site-packages/packenvd_fixture/__init__.py");
    assert!(site.is_file(), "{}", site.display());
    site
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn one_packs_build_cannot_change_what_anothers_environment_runs(pool: PgPool) {
    assert!(is_root(), "CI runs this as root");
    let env = Env::new(&[("max_attempts", "1")]);
    let reqs = wheel_requirements(&env.dir.path().join("wheels"));
    env.pack_dir("victim", &[("requirements.txt", &reqs)]);
    add_pack(&pool, "victim").await;
    let victim = request(&pool, "victim", "core.python").await;
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, victim).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let module = installed_module(Path::new(r.metadata["build_dir"].as_str().unwrap()));
    let original = std::fs::read(&module).unwrap();

    // The attacker's step runs in a runtime of the same name, so it gets the same cache as
    // core.python did when caches were shared per runtime; it appends to every copy of the
    // victim's module it can find (its cache entries, hard links, the environment itself)
    // and replaces every cache entry by a new file, as a build backend would.
    let scratch = env.scratch().display().to_string();
    let root = env.dir.path().display().to_string();
    let attack = format!(
        "n=0; for f in $(find {root} -path '*packenvd_fixture*' -type f 2>/dev/null); do \
           if echo 'raise SystemExit(\"poisoned\")' >> $f 2>/dev/null; then n=$((n+1)); echo \"appended $f\" >> {scratch}/attack; fi; \
           if cp $f $f.new 2>/dev/null && echo 'raise SystemExit(\"poisoned\")' >> $f.new && mv -f $f.new $f 2>/dev/null; then \
             n=$((n+1)); echo \"replaced $f\" >> {scratch}/attack; fi; \
         done; echo \"changed=$n\" >> {scratch}/attack; exit 0"
    );
    sqlx::query("INSERT INTO runtime (ref, name, installers) VALUES ('evil.python', 'Python', $1)")
        .bind(shell_runtime(&attack))
        .execute(&pool)
        .await
        .unwrap();
    env.pack_dir("attacker", &[]);
    add_pack(&pool, "attacker").await;
    let attacker = request(&pool, "attacker", "evil.python").await;
    env.worker(&pool).drain().await.unwrap();
    assert_eq!(row(&pool, attacker).await.status, "ready");
    let attack = std::fs::read_to_string(env.scratch().join("attack")).unwrap_or_default();
    assert!(attack.contains("changed="), "the attack ran: {attack}");
    assert_eq!(
        std::fs::read(&module).unwrap(),
        original,
        "the victim's ready environment was changed:\n{attack}"
    );
    // Nor does the victim's next build get anything of the attacker's.
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE id = $1")
        .bind(victim)
        .execute(&pool)
        .await
        .unwrap();
    env.worker(&pool).drain().await.unwrap();
    let r = row(&pool, victim).await;
    assert_eq!(r.status, "ready", "{:?}", r.install_error);
    let rebuilt = installed_module(Path::new(r.metadata["build_dir"].as_str().unwrap()));
    assert_eq!(
        std::fs::read(&rebuilt).unwrap(),
        original,
        "the victim's rebuild installed a poisoned file:\n{attack}"
    );
    assert!(attack.contains("changed=0"), "{attack}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn an_unprivileged_daemons_steps_cannot_signal_it(pool: PgPool) {
    assert!(
        is_root(),
        "CI runs this as root (to start the daemon as nobody)"
    );
    let _ = pool;
    let (cluster, pool) = reachable_database().await;
    let env = Env::new(&[]);
    hand_to_daemon_user(&env, DAEMON_UID);
    let s = env.scratch().display().to_string();
    // The step is told the daemon's host pid, which from its own namespace it cannot see.
    let script = format!(
        "i=0; while [ ! -s {s}/daemon ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
         kill -STOP $(cat {s}/daemon) 2>>{s}/attack; echo stop=$? >> {s}/attack; \
         kill -9 $(cat {s}/daemon) 2>>{s}/attack; echo kill=$? >> {s}/attack; exit 0"
    );
    add_runtime(&pool, "t.parricide", shell_runtime(&script)).await;
    env.pack_dir("p", &[]);
    add_pack(&pool, "p").await;
    let inherited = env.dir.path().join("inherited");
    std::fs::write(&inherited, "").unwrap();
    let mut daemon = Daemon::spawn_as(&env, &cluster.url(), "d1", DAEMON_UID, &inherited, &[]);
    // setpriv execs the daemon: the child's pid is the daemon's.
    std::fs::write(env.scratch().join("daemon"), daemon.child.id().to_string()).unwrap();
    let id = request(&pool, "p", "t.parricide").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let st = status_of(&pool, id).await;
        if st == "ready" || st == "failed" || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let attack = std::fs::read_to_string(env.scratch().join("attack")).unwrap_or_default();
    assert_eq!(status, "ready", "{attack}\n{}", daemon.output());
    assert!(
        attack.contains("stop=1") && attack.contains("kill=1"),
        "{attack}"
    );
    assert!(
        daemon.wait_exit(Duration::from_millis(100)).is_none(),
        "the daemon died"
    );
}

#[tokio::test]
async fn the_start_up_line_warns_when_steps_could_reach_the_database_over_tcp() {
    let warning = |url: &str| {
        let mut env = Env::new(&[]);
        env.settings.database_url = packenvd::config::Secret::new(url);
        async move {
            // The whole Env, not only its settings: its directories hold the supervisor.
            let env = env;
            let p = packenvd::hardening::Protections::detect(&env.settings)
                .await
                .expect("protections");
            p.missing
                .into_iter()
                .find(|m| m.contains("connect to the database"))
        }
    };
    let open = warning("postgres://packenvd:pw@db.example:443/packenvd")
        .await
        .expect("port 443 is in step_tcp_ports");
    assert!(
        open.contains("db.example:443") && open.contains("step_tcp_ports lets them"),
        "{open}"
    );
    assert_eq!(
        warning("postgres://packenvd:pw@db.example:5432/packenvd").await,
        None,
        "Landlock keeps steps off port 5432"
    );
    assert_eq!(
        warning("postgres://packenvd@/packenvd?host=/run/postgresql").await,
        None,
        "the socket is covered in every step's namespace"
    );
}
