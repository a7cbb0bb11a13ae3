//! A PostgreSQL cluster of a test's own, and the loopback package index fixture.

use std::path::{Path, PathBuf};

use super::fixtures;

/// A PostgreSQL cluster of one test's own, for tests that stop and start the server (the
/// shared test server must stay up for every other test). Runs as `postgres` when we are root.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    as_postgres: bool,
    bindir: PathBuf,
    /// With a password, local connections need it (scram-sha-256) and the socket directory
    /// is reachable by every user, like a shared server's.
    password: Option<String>,
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        Self::start_with(None)
    }

    /// A cluster whose `postgres` role has `password`, needed for every connection, and whose
    /// socket any local user can reach.
    pub fn start_with_password(password: &str) -> PrivateCluster {
        Self::start_with(Some(password.to_owned()))
    }

    fn start_with(password: Option<String>) -> PrivateCluster {
        let bindir = [
            "/usr/lib/postgresql/17/bin",
            "/usr/lib/postgresql/16/bin",
            "/usr/lib/postgresql/15/bin",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").exists())
        .or_else(|| {
            let out = std::process::Command::new("sh")
                .args(["-c", "dirname \"$(command -v initdb)\""])
                .output()
                .ok()?;
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .expect("initdb not found");
        let dir = tempfile::Builder::new()
            .prefix("packenvd-pg-")
            .tempdir()
            .expect("tempdir");
        let as_postgres = nix::unistd::Uid::effective().is_root();
        if as_postgres {
            let status = std::process::Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let cluster = PrivateCluster {
            dir,
            as_postgres,
            bindir,
            password,
        };
        let data = cluster.data();
        let mut initdb = vec![
            "-D".to_string(),
            data.clone(),
            "-U".into(),
            "postgres".into(),
            "--no-sync".into(),
            "--no-instructions".into(),
        ];
        match &cluster.password {
            None => initdb.push("--auth=trust".into()),
            Some(pw) => {
                let pwfile = cluster.dir.path().join("pwfile");
                std::fs::write(&pwfile, pw).expect("pwfile");
                if as_postgres {
                    std::os::unix::fs::chown(&pwfile, Some(postgres_uid()), None).expect("chown");
                }
                initdb.push("--auth=scram-sha-256".into());
                initdb.push(format!("--pwfile={}", pwfile.display()));
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    cluster.dir.path(),
                    std::fs::Permissions::from_mode(0o711),
                )
                .expect("chmod");
            }
        }
        let args: Vec<&str> = initdb.iter().map(String::as_str).collect();
        cluster.pg("initdb", &args);
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nfsync = off\n",
            cluster.dir.path().display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{data}/postgresql.conf"))
            .expect("conf");
        std::io::Write::write_all(&mut f, conf.as_bytes()).expect("conf");
        cluster.ctl("start");
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let exe = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect(tool);
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start` (waits until ready) or `pg_ctl stop` (fast).
    pub fn ctl(&self, action: &str) {
        let data = self.data();
        let log = self.dir.path().join("postgres.log").display().to_string();
        match action {
            "start" => self.pg("pg_ctl", &["-D", &data, "-l", &log, "-w", "start"]),
            _ => self.pg("pg_ctl", &["-D", &data, "-w", "-m", "fast", "stop"]),
        }
    }

    pub fn url(&self) -> String {
        match &self.password {
            None => format!(
                "postgres://postgres@localhost/postgres?host={}",
                self.dir.path().display()
            ),
            Some(pw) => format!(
                "postgres://postgres:{pw}@localhost/postgres?host={}",
                self.dir.path().display()
            ),
        }
    }
}

fn postgres_uid() -> u32 {
    nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("a postgres user")
        .uid
        .as_raw()
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = std::panic::catch_unwind(|| {
            self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
        });
    }
}

/// tests/fixtures/index_server.py on a loopback port: a package index whose every request is
/// logged, to tell a download from a cache hit.
pub struct IndexServer {
    child: std::process::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl IndexServer {
    pub fn start(wheels: &Path, log: PathBuf) -> IndexServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(fixtures().join("index_server.py"))
            .arg(wheels)
            .arg(&log)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("index server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port");
        IndexServer {
            child,
            port: line.trim().parse().expect("port number"),
            log,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for IndexServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
