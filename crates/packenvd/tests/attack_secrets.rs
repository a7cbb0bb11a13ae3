//! Attacks on the daemon's secrets (DESIGN §6), by a hostile step, with the daemon running as
//! an unprivileged user as it does in production: its environment and memory, a descriptor its
//! parent left open, its credential file, its database login.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;
use sqlx::PgPool;

/// The user the daemon runs as in these tests.
const NOBODY: u32 = 65534;

/// Every file under `dir`, concatenated.
fn all_text(dir: &Path) -> String {
    tree(dir)
        .iter()
        .filter_map(|p| std::fs::read(dir.join(p)).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the hostile step does: everything it can think of to find a secret, written to the
/// scratch directory for the test to search.
fn spy_script(out: &Path, url_file: &Path) -> String {
    let o = out.display();
    format!(
        r#"
for p in /proc/[0-9]*; do
  echo "== $p"; cat $p/environ; cat $p/cmdline; head -c 65536 $p/mem
done > {o}/proc.txt 2>&1
cat <&7 > {o}/fd7.txt 2>&1
ls -l /proc/self/fd > {o}/fds.txt 2>&1
env > {o}/env.txt
cat {url} > {o}/url-file.txt 2>&1
cat "$HOME/.pgpass" > {o}/pgpass.txt 2>&1
for d in /run/credentials/*; do cat $d/* ; done > {o}/credentials.txt 2>&1
echo spied > {o}/done.txt
"#,
        url = url_file.display()
    )
}

#[sqlx::test(migrations = false)]
async fn a_step_finds_no_database_secret_in_the_daemons_environment_memory_descriptors_or_files(
    _pool: PgPool,
) {
    if !is_root() {
        eprintln!("skipped: running the daemon as another user needs root");
        return;
    }
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let decoy = format!("decoy-{}", uuid::Uuid::new_v4().simple());
    let inherited_secret = format!("fd-{}", uuid::Uuid::new_v4().simple());
    let cluster = PrivateCluster::start_with_password(&password);
    let url = cluster.url();
    let pool = PgPool::connect(&url).await.unwrap();
    packenvd::store::MIGRATOR.run(&pool).await.unwrap();

    let env = Env::new(&[]);
    // The database URL in a credential file only the daemon's user may read, as systemd's
    // LoadCredential= would provide it.
    let url_file = env.dir.path().join("credentials/database_url");
    std::fs::create_dir_all(url_file.parent().unwrap()).unwrap();
    std::fs::write(&url_file, &url).unwrap();
    // A file the daemon's parent opened and did not close.
    let inherited = env.dir.path().join("parent-secret.txt");
    std::fs::write(&inherited, &inherited_secret).unwrap();
    std::fs::create_dir_all(&env.settings.envs_root).unwrap();
    std::fs::create_dir_all(&env.settings.cache_dir).unwrap();
    for p in [
        &env.settings.envs_root,
        &env.settings.cache_dir,
        &env.scratch(),
        &url_file,
        &env.settings.packs_dir,
    ] {
        give_to(p, NOBODY);
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    add_runtime(
        &pool,
        "t.spy",
        json!([{"name": "spy", "command": "sh", "args": ["-c", spy_script(&env.scratch(), &url_file)]}]),
    )
    .await;
    env.pack_dir("p", &[]);
    give_to(&env.settings.packs_dir, NOBODY);
    add_pack(&pool, "p").await;
    let id = request(&pool, "p", "t.spy").await;

    let d = Daemon::spawn_as(
        &env,
        "",
        "nobody",
        NOBODY,
        &inherited,
        &[
            (
                "PACKENVD_DATABASE_URL_FILE",
                &url_file.display().to_string(),
            ),
            ("PACKENVD_TEST_DECOY", &decoy),
        ],
    );
    eventually(Duration::from_secs(30), "the spy's build", || async {
        status_of(&pool, id).await == "ready" || d.output().contains("ERROR")
    })
    .await;
    let r = row(&pool, id).await;
    assert_eq!(r.status, "ready", "{:?}\n{}", r.install_error, d.output());
    // Without any sandbox: another process of the daemon's user cannot read its environment
    // or memory, because the daemon is not dumpable.
    for file in ["environ", "mem"] {
        let out = std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--",
                "head",
                "-c",
                "100000",
            ])
            .arg(format!("/proc/{}/{file}", d.child.id()))
            .output()
            .unwrap();
        assert!(!out.status.success(), "/proc/<daemon>/{file} was readable");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&decoy));
    }
    assert_eq!(
        std::fs::read_to_string(env.scratch().join("done.txt")).unwrap(),
        "spied\n"
    );

    let found = all_text(&env.scratch());
    let places = [
        ("what the step could write", found.as_str()),
        ("the install log", r.install_log.as_deref().unwrap_or("")),
        ("the daemon's log", &d.output()),
    ];
    for (place, text) in places {
        for secret in [&password, &decoy, &inherited_secret] {
            assert!(!text.contains(secret.as_str()), "{secret} found in {place}");
        }
    }
    // The step saw its own kind of environment only, and no descriptor above 2.
    let fds = std::fs::read_to_string(env.scratch().join("fds.txt")).unwrap();
    assert!(
        !fds.contains("parent-secret"),
        "the inherited descriptor reached the step:\n{fds}"
    );
    let url_file_out = std::fs::read_to_string(env.scratch().join("url-file.txt")).unwrap();
    assert!(
        url_file_out.contains("Permission denied"),
        "the credential file was readable: {url_file_out}"
    );
    println!(
        "FIGURE secrets: the daemon as uid {NOBODY}; a step read /proc of every process, fd 7, \
         the credential file and ~/.pgpass: none of 3 secrets found"
    );
    pool.close().await;
}

#[sqlx::test(migrations = false)]
async fn pgpassword_still_supplies_the_password_though_it_is_scrubbed_from_the_environment(
    _pool: PgPool,
) {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let cluster = PrivateCluster::start_with_password(&password);
    let with_password = cluster.url();
    let pool = PgPool::connect(&with_password).await.unwrap();
    packenvd::store::MIGRATOR.run(&pool).await.unwrap();
    let without_password = with_password.replacen(&format!(":{password}@"), "@", 1);
    assert_ne!(without_password, with_password);

    let env = Env::new(&[]);
    // No ~/.pgpass or PGPASSFILE to supply it instead.
    let home = env.dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let status = |pgpassword: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_packenvd"));
        cmd.arg("status")
            .env("DATABASE_URL", &without_password)
            .env("HOME", &home)
            .env_remove("PGPASSFILE")
            .env_remove("PGPASSWORD");
        if let Some(p) = pgpassword {
            cmd.env("PGPASSWORD", p);
        }
        cmd.output().unwrap()
    };
    let out = status(Some(&password));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 environment(s)"));
    let out = status(None);
    assert!(!out.status.success(), "the server asks for a password");
    pool.close().await;
}
