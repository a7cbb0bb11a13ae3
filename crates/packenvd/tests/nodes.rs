//! Many hosts (DESIGN §8): real daemon processes, one envs root per simulated node, one
//! database. Every node's step appends the build it makes to its own `builds.log`, so a test
//! can count builds per node and pack.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use sqlx::PgPool;

/// The runtime every node builds: it records the build in the node's scratch directory
/// (`<node dir>/scratch`, three levels above a build directory) and leaves a file in it.
fn traced_runtime(extra: &str) -> serde_json::Value {
    shell_runtime(&format!(
        "{extra}echo {{env_path}} >> {{env_path}}/../../../scratch/builds.log && echo ok > {{env_path}}/ok"
    ))
}

/// The platform: packs on disk (one directory every node reads) and their requests.
struct Platform {
    packs: Env,
    url: String,
}

impl Platform {
    async fn new(pool: &PgPool, runtimes: &[(&str, serde_json::Value)]) -> Platform {
        for (r, spec) in runtimes {
            add_runtime(pool, r, spec.clone()).await;
        }
        Platform {
            packs: Env::new(&[]),
            url: database_url(pool),
        }
    }

    /// Packs `p0`…`p{n-1}`, each requested for `runtime`, in two statements.
    async fn request_packs(&self, pool: &PgPool, n: usize, runtime: &str) {
        for i in 0..n {
            self.packs.pack_dir(&format!("p{i}"), &[]);
        }
        sqlx::query(
            "INSERT INTO pack (ref, label) SELECT 'p' || i, 'p' || i FROM generate_series(0, $1 - 1) i
             ON CONFLICT DO NOTHING",
        )
        .bind(n as i32)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "SELECT count(r.id) FROM generate_series(0, $1 - 1) i,
                    LATERAL request_pack_environment('p' || i, $2) r",
        )
        .bind(n as i32)
        .bind(runtime)
        .execute(pool)
        .await
        .unwrap();
    }

    /// A host: its own envs root, cache and scratch; the platform's packs.
    fn node(&self, name: &str) -> Env {
        let packs = self.packs.settings.packs_dir.display().to_string();
        Env::new(&[("packs_dir", &packs), ("node_name", name)])
    }
}

/// `packenvd run` for node `env` (its name is the instance's too), with short timers.
fn start(env: &Env, url: &str, vars: &[(&str, &str)]) -> Daemon {
    let name = env.settings.node_name.clone();
    let mut all = vec![
        ("PACKENVD_NODE_NAME", name.as_str()),
        ("PACKENVD_LEASE", "3s"),
        ("PACKENVD_NODE_TTL", "10s"),
        ("PACKENVD_POLL_INTERVAL", "500ms"),
        ("PACKENVD_CONCURRENCY", "4"),
    ];
    all.extend_from_slice(vars);
    Daemon::spawn(env, url, &name, &all, &[])
}

/// The builds node `env` ran, by pack.
fn builds(env: &Env) -> BTreeMap<String, usize> {
    let log = std::fs::read_to_string(env.scratch().join("builds.log")).unwrap_or_default();
    let mut by_pack = BTreeMap::new();
    for line in log.lines() {
        let pack = Path::new(line)
            .parent()
            .and_then(|p| p.file_name())
            .expect("a build directory in a pack directory")
            .to_string_lossy()
            .into_owned();
        *by_pack.entry(pack).or_default() += 1;
    }
    by_pack
}

/// Node rows by (node, status).
async fn node_rows(pool: &PgPool) -> BTreeMap<(String, String), i64> {
    sqlx::query_as::<_, (String, String, i64)>(
        "SELECT node, status::text, count(*) FROM pack_environment_node GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(n, s, c)| ((n, s), c))
    .collect()
}

async fn parents(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT status::text, count(*) FROM pack_environment GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn ready_on(pool: &PgPool, node: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pack_environment_node WHERE node = $1 AND status = 'ready'",
    )
    .bind(node)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every ready row of `node` names a build on that node's own disk, under its envs root.
async fn assert_on_own_disk(pool: &PgPool, env: &Env) {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT env_path, metadata ->> 'build_dir' FROM pack_environment_node
         WHERE node = $1 AND status = 'ready'",
    )
    .bind(&env.settings.node_name)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!rows.is_empty());
    for (env_path, build_dir) in rows {
        assert!(
            Path::new(&env_path).starts_with(env.envs_root()),
            "{env_path} is not under {}",
            env.envs_root().display()
        );
        assert!(Path::new(&env_path).join("ok").is_file(), "{env_path}/ok");
        let build_dir = build_dir.expect("build_dir");
        assert!(Path::new(&build_dir).starts_with(env.envs_root()));
    }
}

/// Waits until `cond`, failing with the daemons' output.
async fn until<F, Fut>(limit: Duration, what: &str, daemons: &[&Daemon], mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !cond().await {
        if started.elapsed() > limit {
            let logs: Vec<String> = daemons
                .iter()
                .map(|d| {
                    d.output()
                        .lines()
                        .rev()
                        .take(12)
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!(
                "not {what} after {limit:?}; daemons' last lines (newest first):\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn three_nodes_each_build_every_environment_once_on_their_own_disk(pool: PgPool) {
    const PACKS: usize = 300;
    let platform = Platform::new(&pool, &[("t.env", traced_runtime(""))]).await;
    let nodes: Vec<Env> = ["a", "b", "c"].iter().map(|n| platform.node(n)).collect();
    let daemons: Vec<Daemon> = nodes.iter().map(|n| start(n, &platform.url, &[])).collect();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    // Registered before the request, so each node's rows are made by it and count for the
    // parents (a node that joins later catches up without holding them back).
    until(
        Duration::from_secs(30),
        "3 nodes registered",
        &refs,
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM packenvd_node")
                .fetch_one(&pool)
                .await
                .unwrap()
                == 3
        },
    )
    .await;
    let started = Instant::now();
    platform.request_packs(&pool, PACKS, "t.env").await;
    until(Duration::from_secs(240), "all ready", &refs, || async {
        parents(&pool).await.get("ready") == Some(&(PACKS as i64))
    })
    .await;
    println!(
        "FIGURE 3 nodes x {PACKS} environments converged in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for node in &nodes {
        let name = &node.settings.node_name;
        assert_eq!(ready_on(&pool, name).await, PACKS as i64, "node {name}");
        let built = builds(node);
        assert_eq!(built.len(), PACKS, "node {name} built every pack");
        assert!(
            built.values().all(|&n| n == 1),
            "node {name} built a pack twice: {:?}",
            built.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
        );
        assert_on_own_disk(&pool, node).await;
    }
    assert_eq!(
        node_rows(&pool).await.len(),
        3,
        "only ready rows, of three nodes"
    );
    // The runner's view: each host reads its own node's row.
    for node in &nodes {
        let (status, env_path): (String, String) = sqlx::query_as(
            "SELECT status::text, env_path FROM pack_environment_for_node('p7', 't.env', $1)",
        )
        .bind(&node.settings.node_name)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(status, "ready");
        assert_eq!(Path::new(&env_path), node.envs_root().join("p7/t.env"));
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_late_node_catches_up_while_parents_stay_ready_and_a_reset_rebuilds_on_all(pool: PgPool) {
    const PACKS: usize = 30;
    let platform = Platform::new(&pool, &[("t.env", traced_runtime(""))]).await;
    let nodes: Vec<Env> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| platform.node(n))
        .collect();
    let mut daemons: Vec<Daemon> = nodes[..3]
        .iter()
        .map(|n| start(n, &platform.url, &[]))
        .collect();
    platform.request_packs(&pool, PACKS, "t.env").await;
    let refs: Vec<&Daemon> = daemons.iter().collect();
    until(Duration::from_secs(120), "all ready", &refs, || async {
        parents(&pool).await.get("ready") == Some(&(PACKS as i64))
    })
    .await;

    // The fourth node: it builds everything, and no parent leaves `ready` meanwhile.
    daemons.push(start(&nodes[3], &platform.url, &[]));
    let started = Instant::now();
    loop {
        let p = parents(&pool).await;
        assert_eq!(
            p,
            BTreeMap::from([("ready".to_string(), PACKS as i64)]),
            "a catching-up node turned a parent back"
        );
        if ready_on(&pool, "d").await == PACKS as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "d did not catch up: {:?}\n{}",
            node_rows(&pool).await,
            daemons[3].output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(builds(&nodes[3]).values().all(|&n| n == 1));
    assert_eq!(builds(&nodes[3]).len(), PACKS);
    assert_on_own_disk(&pool, &nodes[3]).await;

    // An operator's reset of one parent: rebuilt from scratch on all four.
    let before: Vec<String> = sqlx::query_scalar(
        "SELECT n.metadata ->> 'build_id' FROM pack_environment_node n
         JOIN pack_environment pe ON pe.id = n.env_id WHERE pe.pack_ref = 'p3' ORDER BY n.node",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE pack_environment SET status = 'pending' WHERE pack_ref = 'p3'")
        .execute(&pool)
        .await
        .unwrap();
    let refs: Vec<&Daemon> = daemons.iter().collect();
    until(
        Duration::from_secs(60),
        "p3 rebuilt on all four",
        &refs,
        || async {
            nodes.iter().all(|n| builds(n).get("p3") == Some(&2))
                && parents(&pool).await.get("ready") == Some(&(PACKS as i64))
        },
    )
    .await;
    let after: Vec<String> = sqlx::query_scalar(
        "SELECT n.metadata ->> 'build_id' FROM pack_environment_node n
         JOIN pack_environment pe ON pe.id = n.env_id
         WHERE pe.pack_ref = 'p3' AND n.status = 'ready' ORDER BY n.node",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(after.len(), 4);
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "{before:?} {after:?}"
    );
    for n in &nodes {
        let built = builds(n);
        assert_eq!(
            built.values().sum::<usize>(),
            PACKS + 1,
            "only p3 was rebuilt"
        );
    }
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_killed_node_keeps_its_rows_blocks_nobody_after_its_ttl_and_finishes_on_return(
    pool: PgPool,
) {
    const PACKS: usize = 8;
    // Slow enough that the killed node holds builds when it dies.
    let platform = Platform::new(&pool, &[("t.env", traced_runtime("sleep 2; "))]).await;
    let (a, b) = (platform.node("a"), platform.node("b"));
    let da = start(&a, &platform.url, &[]);
    let mut db = start(&b, &platform.url, &[]);
    platform.request_packs(&pool, PACKS, "t.env").await;
    until(
        Duration::from_secs(30),
        "b building",
        &[&da, &db],
        || async {
            node_rows(&pool)
                .await
                .contains_key(&("b".to_string(), "installing".to_string()))
        },
    )
    .await;
    db.signal(Signal::SIGKILL);
    db.wait_exit(Duration::from_secs(5)).expect("b died");
    let killed = Instant::now();

    // a builds its own rows only; after b's ttl the parents are ready without b.
    until(
        Duration::from_secs(60),
        "parents ready without b",
        &[&da],
        || async { parents(&pool).await.get("ready") == Some(&(PACKS as i64)) },
    )
    .await;
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "parents went ready before b was gone ({waited:?})"
    );
    println!(
        "FIGURE parents ready {:.1} s after a node's kill -9 (node_ttl 10s)",
        waited.as_secs_f64()
    );
    assert_eq!(builds(&a).len(), PACKS);
    assert!(
        builds(&a).values().all(|&n| n == 1),
        "a built only its own rows"
    );
    let b_rows = node_rows(&pool).await;
    let b_ready = b_rows
        .get(&("b".to_string(), "ready".to_string()))
        .copied()
        .unwrap_or(0);
    assert!(b_ready < PACKS as i64, "{b_rows:?}");
    let stolen: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pack_environment_node WHERE node = 'b' AND claimed_by = 'a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stolen, 0);
    let gone: bool = sqlx::query_scalar("SELECT gone FROM packenvd_node WHERE name = 'b'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(gone);

    // b returns: it finishes its rows, and no parent leaves `ready` meanwhile.
    let db = start(&b, &platform.url, &[]);
    let started = Instant::now();
    while ready_on(&pool, "b").await < PACKS as i64 {
        assert_eq!(
            parents(&pool).await,
            BTreeMap::from([("ready".to_string(), PACKS as i64)])
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "b did not finish: {:?}\n{}",
            node_rows(&pool).await,
            db.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(builds(&b).len(), PACKS, "b built every pack");
    assert_on_own_disk(&pool, &b).await;
    drop(da);
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_node_without_npm_builds_the_rest_and_says_what_it_lacks(pool: PgPool) {
    let platform = Platform::new(
        &pool,
        &[
            ("t.env", traced_runtime("")),
            (
                "t.npm",
                serde_json::json!({"installers": [
                    {"name": "npm", "command": "npm", "args": ["--version"]},
                    {"name": "mark", "command": "sh", "args": ["-c", "echo ok > {env_path}/ok"]}
                ]}),
            ),
        ],
    )
    .await;
    let (a, c) = (platform.node("a"), platform.node("c"));
    // c's PATH: everything of the system's but npm.
    let bin = c.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for dir in ["/usr/local/bin", "/usr/bin", "/bin"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            if name != "npm" && name != "npx" && !bin.join(&name).exists() {
                std::os::unix::fs::symlink(e.path(), bin.join(&name)).unwrap();
            }
        }
    }
    let path = bin.display().to_string();
    // c alone: nobody can build t.npm, so c tries, and its failure says what it lacks.
    let dc = start(&c, &platform.url, &[("PATH", &path)]);
    until(Duration::from_secs(30), "c registered", &[&dc], || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM packenvd_node")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    platform.request_packs(&pool, 3, "t.env").await;
    platform.request_packs(&pool, 3, "t.npm").await;
    until(
        Duration::from_secs(60),
        "t.npm failed on c",
        &[&dc],
        || async {
            parents(&pool).await == BTreeMap::from([("ready".into(), 3), ("failed".into(), 3)])
        },
    )
    .await;
    let error: String = sqlx::query_scalar(
        "SELECT install_error FROM pack_environment WHERE pack_ref = 'p0' AND runtime_ref = 't.npm'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(error.contains("`npm` not found on PATH"), "{error}");

    // a can: it takes t.npm over, and c's rows of it are withdrawn.
    let da = start(&a, &platform.url, &[]);
    until(
        Duration::from_secs(90),
        "all ready",
        &[&da, &dc],
        || async { parents(&pool).await.get("ready") == Some(&6) },
    )
    .await;
    // Both live: a new environment of t.npm goes to a only.
    platform.request_packs(&pool, 4, "t.npm").await;
    until(Duration::from_secs(60), "p3 ready", &[&da, &dc], || async {
        parents(&pool).await.get("ready") == Some(&7)
    })
    .await;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT pe.runtime_ref, n.node, n.status::text FROM pack_environment_node n
         JOIN pack_environment pe ON pe.id = n.env_id GROUP BY 1, 2, 3 ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("t.env".into(), "a".into(), "ready".into()),
            ("t.env".into(), "c".into(), "ready".into()),
            ("t.npm".into(), "a".into(), "ready".into()),
        ],
        "c has no row of t.npm"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"))
        .arg("nodes")
        .env("DATABASE_URL", &platform.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line_c = text
        .lines()
        .find(|l| l.contains(" c "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line_c.contains("t.npm (no npm)"), "{text}");
    let line_a = text.lines().find(|l| l.contains(" a ")).unwrap();
    assert!(!line_a.contains("t.npm (no npm)"), "{text}");
}

#[sqlx::test(migrator = "packenvd::store::MIGRATOR")]
async fn a_node_whose_envs_root_was_wiped_rebuilds_its_environments_at_start(pool: PgPool) {
    const PACKS: usize = 5;
    let platform = Platform::new(&pool, &[("t.env", traced_runtime(""))]).await;
    let a = platform.node("a");
    let d = start(&a, &platform.url, &[]);
    platform.request_packs(&pool, PACKS, "t.env").await;
    until(Duration::from_secs(60), "all ready", &[&d], || async {
        ready_on(&pool, "a").await == PACKS as i64
    })
    .await;
    d.signal(Signal::SIGTERM);
    let mut d = d;
    d.wait_exit(Duration::from_secs(20)).expect("stopped");
    std::fs::remove_dir_all(a.envs_root()).unwrap();

    let d = start(&a, &platform.url, &[]);
    until(Duration::from_secs(60), "rebuilt", &[&d], || async {
        builds(&a).values().all(|&n| n == 2)
            && builds(&a).len() == PACKS
            && ready_on(&pool, "a").await == PACKS as i64
    })
    .await;
    assert_on_own_disk(&pool, &a).await;
    assert!(
        d.output().contains("missing_on_disk=5"),
        "the start says what it found: {}",
        d.output()
    );
    assert_eq!(parents(&pool).await.get("ready"), Some(&(PACKS as i64)));
}

/// A database of the single-host release, with environments built by it: the upgrade's
/// migration and the first node's start take them over as they are; nothing is rebuilt there.
#[sqlx::test(migrations = false)]
async fn an_upgrade_from_a_single_host_rebuilds_nothing_and_a_second_node_catches_up(pool: PgPool) {
    // The schema of the single-host release: its migration only. Named, not the oldest file:
    // 20261127000000_platform_schemas.sql came later and sorts first, so this upgrade also
    // applies it after a newer one, as deployed databases get it.
    let old = tempfile::tempdir().unwrap();
    let first = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("20261127000001_")
        })
        .unwrap();
    std::fs::copy(&first, old.path().join(first.file_name().unwrap())).unwrap();
    sqlx::migrate::Migrator::new(old.path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();

    let platform = Platform::new(&pool, &[("t.env", traced_runtime(""))]).await;
    let a = platform.node("a");
    platform.request_packs(&pool, 4, "t.env").await;
    // p0..p2 built by the old daemon on this host; p3 still pending.
    let mut builds_before = Vec::new();
    for i in 0..3 {
        let loc =
            packenv_core::layout::EnvLocation::new(a.envs_root(), &format!("p{i}"), "t.env", None)
                .unwrap();
        let token = uuid::Uuid::new_v4().to_string();
        let dir = loc.create_build_dir(&token).unwrap();
        std::fs::write(dir.join("ok"), "ok\n").unwrap();
        loc.switch_to(&dir).unwrap();
        sqlx::query(
            "UPDATE pack_environment SET status = 'ready', env_path = $2,
                    metadata = jsonb_build_object('build_dir', $3::text, 'build_id', $4::text),
                    installed_at = now(), last_verified = now()
             WHERE pack_ref = $1",
        )
        .bind(format!("p{i}"))
        .bind(
            a.envs_root()
                .join(format!("p{i}/t.env"))
                .display()
                .to_string(),
        )
        .bind(dir.display().to_string())
        .bind(&token)
        .execute(&pool)
        .await
        .unwrap();
        builds_before.push(dir.display().to_string());
    }

    packenvd::store::MIGRATOR.run(&pool).await.unwrap();
    let da = start(&a, &platform.url, &[]);
    until(Duration::from_secs(60), "p3 built", &[&da], || async {
        ready_on(&pool, "a").await == 4
    })
    .await;
    assert_eq!(
        builds(&a),
        BTreeMap::from([("p3".to_string(), 1)]),
        "only the pending one was built"
    );
    let kept: Vec<String> = sqlx::query_scalar(
        "SELECT n.metadata ->> 'build_dir' FROM pack_environment_node n
         JOIN pack_environment pe ON pe.id = n.env_id
         WHERE n.node = 'a' AND pe.pack_ref <> 'p3' ORDER BY pe.pack_ref",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(kept, builds_before);
    assert_eq!(parents(&pool).await.get("ready"), Some(&4));
    let marker = std::fs::read_to_string(a.envs_root().join(".packenvd-root")).unwrap();
    assert!(marker.contains("node = \"a\""), "{marker}");

    // A second host joins: it builds all four; the parents never leave `ready`.
    let b = platform.node("b");
    let db = start(&b, &platform.url, &[]);
    let started = Instant::now();
    while ready_on(&pool, "b").await < 4 {
        assert_eq!(parents(&pool).await.get("ready"), Some(&4));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            db.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(builds(&b).len(), 4);
    assert_on_own_disk(&pool, &b).await;
}
