//! Row 4 (issue 13): Python environments as the default runtime builds them with uv, with pip
//! only, and as the old default commands built them (`python3 -m venv`, whose ensurepip copies
//! pip into every environment, then that pip), measured in one run. Per variant: a cold build
//! (fresh cache), a warm rebuild (an operator's reset, same cache) of a pack whose three
//! requirements come from a loopback index, and the disk a second environment with the same
//! requirements adds. Rows 4b and 4c: a fleet of packs made `outdated` at once, and a platform
//! that re-requests every pack when it starts.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};

use super::{elapsed, fixtures, timed_build, wait_settled, Ctx};
use crate::pg::Db;
use crate::procs::{self, DaemonDirs};

/// How the environments are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// core.python on a host with uv.
    Uv,
    /// core.python on a host without uv: a pip-less venv that the interpreter's pip fills.
    PipOnly,
    /// The commands core.python ran before issue 13: `python3 -m venv` (with ensurepip), then
    /// the venv's own pip.
    Old,
}

pub const VARIANTS: [Variant; 3] = [Variant::Uv, Variant::PipOnly, Variant::Old];

/// The old default, as the first migration seeded core.python.
pub(super) const OLD_RUNTIME: &str = "bench.python-venv-ensurepip";
const OLD_SPEC: &str = r#"{
  "installers": [
    {"name": "create venv", "order": 1,
     "command": "python3", "args": ["-m", "venv", "{env_path}"]},
    {"name": "install requirements", "order": 2,
     "condition": {"file_exists": "{pack_path}/requirements.txt"},
     "command": "{env_path}/bin/python",
     "args": ["-m", "pip", "install", "--no-input", "-r", "{pack_path}/requirements.txt"]}
  ],
  "executable_templates": {"python": "{env_path}/bin/python", "pip": "{env_path}/bin/pip"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}"#;

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Uv => "core.python, uv",
            Variant::PipOnly => "core.python, pip only",
            Variant::Old => "old commands (venv + ensurepip + pip)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Variant::Uv => "uv",
            Variant::PipOnly => "pip",
            Variant::Old => "old",
        }
    }

    fn runtime(self) -> &'static str {
        match self {
            Variant::Old => OLD_RUNTIME,
            _ => "core.python",
        }
    }
}

/// What a variant needs from this host, checked before anything is built: uv for
/// [`Variant::Uv`], a PATH without uv for the others. Each variant's PATH holds the real
/// binaries, not pyenv's shims (a shell script that costs ~0.3 s a call here): a production host
/// has real ones, and the row measures packenvd, not pyenv.
#[derive(Debug, Clone)]
pub struct Host {
    with_uv: Result<String, String>,
    without_uv: Result<String, String>,
}

impl Host {
    pub fn probe(ctx: &Ctx) -> anyhow::Result<Host> {
        let python = real_python3()?;
        let system = "/usr/local/bin:/usr/bin:/bin";
        let no_uv = ctx.dir("bin-without-uv")?;
        std::os::unix::fs::symlink(&python, no_uv.join("python3"))?;
        let path = format!("{}:{system}", no_uv.display());
        let without_uv = match std::env::split_paths(&path).find(|d| d.join("uv").exists()) {
            Some(d) => Err(format!("uv is in {}: no PATH without it", d.display())),
            None => Ok(path),
        };
        let with_uv = match real_uv() {
            Ok(uv) => {
                let bin = ctx.dir("bin-with-uv")?;
                std::os::unix::fs::symlink(&python, bin.join("python3"))?;
                std::os::unix::fs::symlink(&uv, bin.join("uv"))?;
                Ok(format!("{}:{system}", bin.display()))
            }
            Err(e) => Err(e),
        };
        Ok(Host {
            with_uv,
            without_uv,
        })
    }

    /// The daemon's PATH for `variant`, or why this host cannot run it.
    fn path(&self, variant: Variant) -> Result<String, String> {
        match variant {
            Variant::Uv => self.with_uv.clone(),
            _ => self.without_uv.clone(),
        }
    }
}

/// The interpreter behind `python3` on PATH (a pyenv shim resolves to a real one).
fn real_python3() -> anyhow::Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .current_dir("/")
        .output()
        .context("python3")?;
    ensure!(out.status.success(), "python3 does not run");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The uv binary on PATH; behind a pyenv shim, the one the shim runs.
fn real_uv() -> Result<PathBuf, String> {
    let version = std::process::Command::new("uv").arg("--version").output();
    match version {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "`uv --version` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Err(format!("uv not found on PATH: {e}")),
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("uv"))
                .find(|f| f.is_file())
        })
        .ok_or("uv not found on PATH")?;
    let script = std::fs::read(&on_path).is_ok_and(|b| b.starts_with(b"#!"));
    if script {
        if let Ok(o) = std::process::Command::new("pyenv")
            .args(["which", "uv"])
            .output()
        {
            if o.status.success() {
                return Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
            }
        }
    }
    std::fs::canonicalize(&on_path).map_err(|e| format!("{}: {e}", on_path.display()))
}

/// Request → ready times of one variant, and disk per extra environment.
#[derive(Debug, Default)]
pub struct EnvTimes {
    pub cold: Vec<Duration>,
    pub warm: Vec<Duration>,
    /// Requests for wheel files (GET or HEAD) the index saw during warm builds (0 when the cache
    /// did its job).
    pub warm_downloads: usize,
    /// Bytes the first environment occupies (files hard-linked from a cache counted once).
    pub first_disk: Vec<u64>,
    /// Bytes a second environment with the same requirements adds to the first.
    pub extra_disk: Vec<u64>,
}

#[derive(Debug)]
pub struct Environments {
    pub samples: usize,
    pub variants: Vec<(Variant, Result<EnvTimes, String>)>,
}

/// The loopback index with `names` (version 1.0) in it; killed on drop.
struct Index {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Index {
    async fn start(ctx: &Ctx, names: &[String]) -> anyhow::Result<Index> {
        use tokio::io::AsyncBufReadExt;
        let work = ctx.dir("index")?;
        let wheels = work.join("wheels");
        std::fs::create_dir_all(&wheels)?;
        make_wheels(&wheels, names)?;
        let log = work.join("served.log");
        let mut child = tokio::process::Command::new("python3")
            .arg(fixtures().join("index_server.py"))
            .arg(&wheels)
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("python3 tests/fixtures/index_server.py")?;
        let out = child.stdout.take().context("index stdout")?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("index_server.py printed no port")??
            .context("index_server.py exited")?;
        let port = line.trim().parse().context("index_server.py's port")?;
        Ok(Index { child, port, log })
    }

    /// A requirements.txt that installs `names` from this index.
    fn requirements(&self, names: &[&str]) -> String {
        let mut req = format!(
            "--index-url http://127.0.0.1:{}/simple/\n--trusted-host 127.0.0.1\n",
            self.port
        );
        for n in names {
            req.push_str(&format!("{n}==1.0\n"));
        }
        req
    }

    fn served_files(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("/files/"))
            .count()
    }

    /// A daemon's directories for `variant`, allowed to reach this index.
    fn daemon_dirs(
        &self,
        ctx: &Ctx,
        host: &Host,
        variant: Variant,
        tag: &str,
    ) -> anyhow::Result<DaemonDirs> {
        let mut dirs = ctx.daemon_dirs(tag)?;
        // Steps may connect to ports 80 and 443 by default (Landlock); the loopback index
        // stands in for a registry there.
        dirs.settings
            .push(("PACKENVD_STEP_TCP_PORTS".into(), self.port.to_string()));
        if let Ok(path) = host.path(variant) {
            dirs.settings.push(("PATH".into(), path));
        }
        Ok(dirs)
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn make_wheels(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        let out = std::process::Command::new("python3")
            .arg(fixtures().join("make_wheel.py"))
            .arg(dir)
            .args([name, "1.0"])
            .output()
            .context("python3 tests/fixtures/make_wheel.py")?;
        ensure!(
            out.status.success(),
            "make_wheel.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const SHARED: [&str; 3] = ["bench-a", "bench-b", "bench-c"];
/// One of these joins the shared three in each fleet pack: most requirements shared, not all.
const EXTRA: [&str; 5] = ["bench-x0", "bench-x1", "bench-x2", "bench-x3", "bench-x4"];

fn all_wheels() -> Vec<String> {
    SHARED
        .iter()
        .chain(EXTRA.iter())
        .map(|s| s.to_string())
        .collect()
}

/// A database for one daemon, with the old runtime beside packenvd's.
pub(super) async fn database(ctx: &Ctx, tag: &str, connections: u32) -> anyhow::Result<Db> {
    let db = ctx.cluster.packenvd_db(tag, connections).await?;
    let spec: serde_json::Value = serde_json::from_str(OLD_SPEC)?;
    sqlx::query("INSERT INTO runtime (ref, name, installers) VALUES ($1, 'python-old', $2)")
        .bind(OLD_RUNTIME)
        .bind(spec)
        .execute(&db.pool)
        .await?;
    Ok(db)
}

/// Row 4: per sample and variant, a daemon with a fresh cache builds pack A (cold), A again
/// after a reset (warm), and pack B with the same requirements (for the disk it adds).
pub async fn environments(ctx: &Ctx, samples: usize) -> anyhow::Result<Environments> {
    let host = Host::probe(ctx)?;
    let index = Index::start(ctx, &all_wheels()).await?;
    let req = index.requirements(&SHARED);
    let mut variants = Vec::new();
    for variant in VARIANTS {
        if let Err(e) = host.path(variant) {
            variants.push((variant, Err(e)));
            continue;
        }
        let mut times = EnvTimes::default();
        let mut result = Ok(());
        for i in 1..=samples {
            let r = async {
                let tag = format!("env-{}{i}", variant.tag());
                let dirs = index.daemon_dirs(ctx, &host, variant, &tag)?;
                for pack in ["a", "b"] {
                    std::fs::create_dir_all(dirs.packs_dir.join(pack))?;
                    std::fs::write(dirs.packs_dir.join(pack).join("requirements.txt"), &req)?;
                }
                // A database per daemon: each daemon here is a new node (its own envs root),
                // and a second node on one database would also build the first one's packs.
                let db = database(ctx, "env", 2).await?;
                let r = one_sample(&db, &dirs, variant, &index).await;
                ctx.cluster.drop_db(db).await;
                r
            }
            .await;
            match r {
                Ok(s) => {
                    eprintln!(
                        "packenvd-bench: {} {i}: cold {:.3} s, warm {:.3} s, +{} KB per extra environment",
                        variant.label(),
                        s.cold.as_secs_f64(),
                        s.warm.as_secs_f64(),
                        s.extra_disk / 1024
                    );
                    times.cold.push(s.cold);
                    times.warm.push(s.warm);
                    times.warm_downloads += s.warm_downloads;
                    times.first_disk.push(s.first_disk);
                    times.extra_disk.push(s.extra_disk);
                }
                Err(e) => {
                    eprintln!("packenvd-bench: {}: {e:#}", variant.label());
                    result = Err(first_line(&e));
                    break;
                }
            }
        }
        variants.push((variant, result.map(|()| times)));
    }
    Ok(Environments { samples, variants })
}

fn first_line(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    s.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(100)
        .collect()
}

struct Sample {
    cold: Duration,
    warm: Duration,
    warm_downloads: usize,
    first_disk: u64,
    extra_disk: u64,
}

async fn one_sample(
    db: &Db,
    dirs: &DaemonDirs,
    variant: Variant,
    index: &Index,
) -> anyhow::Result<Sample> {
    sqlx::query("INSERT INTO pack (ref, label) VALUES ('a', ''), ('b', '')")
        .execute(&db.pool)
        .await?;
    let mut d = procs::spawn_packenvd(dirs, &db.url, "bench-env", None, true)?;
    d.wait_ready().await?;
    let runtime = variant.runtime();
    let result = async {
        let (id, cold) = timed_build(db, &mut d, "a", runtime, None).await?;
        let before = index.served_files();
        let (_, warm) = timed_build(db, &mut d, "a", runtime, Some(id)).await?;
        let warm_downloads = index.served_files() - before;
        timed_build(db, &mut d, "b", runtime, None).await?;
        let a = build_dir(db, "a").await?;
        let b = build_dir(db, "b").await?;
        let first_disk = disk_usage(&[&a])?;
        let extra_disk = disk_usage(&[&a, &b])?.saturating_sub(first_disk);
        Ok(Sample {
            cold,
            warm,
            warm_downloads,
            first_disk,
            extra_disk,
        })
    }
    .await;
    d.stop(Duration::from_secs(15)).await;
    result
}

/// The build directory `pack`'s environment link names.
async fn build_dir(db: &Db, pack: &str) -> anyhow::Result<PathBuf> {
    let env_path: Option<String> =
        sqlx::query_scalar("SELECT env_path FROM pack_environment WHERE pack_ref = $1")
            .bind(pack)
            .fetch_one(&db.pool)
            .await?;
    let env_path = env_path.with_context(|| format!("{pack} has no env_path"))?;
    std::fs::canonicalize(&env_path).with_context(|| format!("resolving {env_path}"))
}

/// Bytes allocated to the trees `roots`, each inode counted once (as `du` does): files
/// hard-linked from a cache or from each other cost nothing more. Symlinks are not followed.
fn disk_usage(roots: &[&Path]) -> anyhow::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack: Vec<PathBuf> = roots.iter().map(|p| p.to_path_buf()).collect();
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).with_context(|| p.display().to_string())?;
        if seen.insert((md.dev(), md.ino())) {
            total += md.blocks() * 512;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(total)
}

/// Row 4b: `n` packs, each with the three shared requirements and one of five others, built
/// once; then all made `outdated` in one statement (as an interpreter upgrade would) and
/// timed until every one is `ready` again, at the daemon's default concurrency.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    pub packs: usize,
    /// The first build of the fleet (cold cache).
    pub first: Duration,
    /// `outdated` committed → the last row ready.
    pub rebuild: Duration,
}

pub async fn fleet(ctx: &Ctx, variant: Variant, n: usize) -> anyhow::Result<Fleet> {
    let host = Host::probe(ctx)?;
    host.path(variant).map_err(anyhow::Error::msg)?;
    let index = Index::start(ctx, &all_wheels()).await?;
    let dirs = index.daemon_dirs(ctx, &host, variant, &format!("fleet-{}", variant.tag()))?;
    for i in 0..n {
        let pack = dirs.packs_dir.join(format!("f{i}"));
        std::fs::create_dir_all(&pack)?;
        let names = [SHARED[0], SHARED[1], SHARED[2], EXTRA[i % EXTRA.len()]];
        std::fs::write(pack.join("requirements.txt"), index.requirements(&names))?;
    }
    let db = database(ctx, "fleet", 4).await?;
    let result = async {
        sqlx::query(
            "INSERT INTO pack (ref, label) SELECT 'f' || g, '' FROM generate_series(0, $1::bigint - 1) g",
        )
        .bind(n as i64)
        .execute(&db.pool)
        .await?;
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-fleet", None, false)?;
        d.wait_ready().await?;
        let limit = Duration::from_secs(3600);
        let r = async {
            let start: DateTime<Utc> = sqlx::query_scalar(
                "SELECT max(clock_timestamp()) FROM (
                     SELECT request_pack_environment(ref, $1) FROM pack) r",
            )
            .bind(variant.runtime())
            .fetch_one(&db.pool)
            .await?;
            let built = wait_settled(&db.pool, limit).await?;
            let outdated: DateTime<Utc> = sqlx::query_scalar(
                "WITH u AS (UPDATE pack_environment SET status = 'outdated' RETURNING 1)
                 SELECT clock_timestamp() FROM (SELECT count(*) FROM u) c",
            )
            .fetch_one(&db.pool)
            .await?;
            let rebuilt = wait_settled(&db.pool, limit).await?;
            Ok::<_, anyhow::Error>(Fleet {
                packs: n,
                first: elapsed(start, built),
                rebuild: elapsed(outdated, rebuilt),
            })
        }
        .await;
        d.stop(Duration::from_secs(15)).await;
        r
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}

/// Row 4c: `n` ready packs on the default runtime, then every one requested again in one
/// statement (nothing changed); timed until every request is answered, and checked that each
/// was answered by its current build, not rebuilt.
#[derive(Debug, Clone, Copy)]
pub struct Rerequest {
    pub packs: usize,
    pub variant: Variant,
    pub took: Duration,
    /// Rows whose build directory changed (0 when every answer came from the current build).
    pub rebuilt: usize,
}

pub async fn rerequest(ctx: &Ctx, n: usize) -> anyhow::Result<Rerequest> {
    let host = Host::probe(ctx)?;
    let variant = if host.path(Variant::Uv).is_ok() {
        Variant::Uv
    } else {
        Variant::PipOnly
    };
    host.path(variant).map_err(anyhow::Error::msg)?;
    let work = ctx.dir("rerequest-wheels")?;
    let req = super::wheelhouse(&work)?;
    let mut dirs = ctx.daemon_dirs("rerequest")?;
    if let Ok(path) = host.path(variant) {
        dirs.settings.push(("PATH".into(), path));
    }
    // One pack directory: the rows differ, their manifests do not.
    let shared = dirs.packs_dir.join("shared");
    std::fs::create_dir_all(&shared)?;
    std::fs::write(shared.join("requirements.txt"), &req)?;
    let db = database(ctx, "rerequest", 4).await?;
    let result = async {
        sqlx::query(
            "INSERT INTO pack (ref, label, storage_path)
             SELECT 'r' || g, '', $2 FROM generate_series(1, $1::bigint) g",
        )
        .bind(n as i64)
        .bind(shared.display().to_string())
        .execute(&db.pool)
        .await?;
        let mut d = procs::spawn_packenvd(&dirs, &db.url, "bench-rerequest", None, false)?;
        d.wait_ready().await?;
        let limit = Duration::from_secs(3600);
        let request = "SELECT max(clock_timestamp()) FROM (
                           SELECT request_pack_environment(ref, 'core.python') FROM pack) r";
        let builds = "SELECT id, metadata->>'build_dir' FROM pack_environment";
        let r = async {
            let _: DateTime<Utc> = sqlx::query_scalar(request).fetch_one(&db.pool).await?;
            wait_settled(&db.pool, limit).await?;
            let before: HashMap<i64, Option<String>> = sqlx::query_as(builds)
                .fetch_all(&db.pool)
                .await?
                .into_iter()
                .collect();
            let asked: DateTime<Utc> = sqlx::query_scalar(request).fetch_one(&db.pool).await?;
            let answered = wait_settled(&db.pool, limit).await?;
            let after: Vec<(i64, Option<String>)> =
                sqlx::query_as(builds).fetch_all(&db.pool).await?;
            let rebuilt = after
                .iter()
                .filter(|(id, b)| before.get(id) != Some(b))
                .count();
            ensure!(after.len() == n, "{} rows, expected {n}", after.len());
            Ok::<_, anyhow::Error>(Rerequest {
                packs: n,
                variant,
                took: elapsed(asked, answered),
                rebuilt,
            })
        }
        .await;
        d.stop(Duration::from_secs(15)).await;
        r
    }
    .await;
    ctx.cluster.drop_db(db).await;
    result
}
