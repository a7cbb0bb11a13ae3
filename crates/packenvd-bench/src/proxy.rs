//! A counting proxy on a unix socket in front of the server, to count exactly the statements a
//! process sends. `pg_stat_database.xact_commit` would count transactions, but PostgreSQL 15
//! backends publish their counters at most once a second and up to 10 s late when idle, which
//! blurs a 10–60 s window; the wire does not lie.
//!
//! Only what the client sends is parsed (the frontend protocol: untyped start-up messages,
//! then `type, int32 length, body`); the server's replies are copied through untouched. A
//! statement is a simple `Query` ('Q') or an extended-protocol `Execute` ('E'); a `Sync` alone
//! is what sqlx's pool sends to check a connection, and is counted apart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Message counts since the proxy started.
#[derive(Debug, Default)]
pub struct Counts {
    pub query: AtomicU64,
    pub execute: AtomicU64,
    pub sync: AtomicU64,
    pub connections: AtomicU64,
}

/// A snapshot of [`Counts`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub statements: u64,
    pub executes: u64,
    pub syncs: u64,
    pub connections: u64,
}

impl Counts {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            statements: self.query.load(Ordering::Relaxed) + self.execute.load(Ordering::Relaxed),
            executes: self.execute.load(Ordering::Relaxed),
            syncs: self.sync.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;
    fn sub(self, o: Snapshot) -> Snapshot {
        Snapshot {
            statements: self.statements - o.statements,
            executes: self.executes - o.executes,
            syncs: self.syncs - o.syncs,
            connections: self.connections - o.connections,
        }
    }
}

#[derive(Debug, Clone)]
enum Upstream {
    Unix(PathBuf),
    Tcp(String, u16),
}

#[derive(Debug)]
pub struct Proxy {
    pub counts: Arc<Counts>,
    /// `url` rewritten to connect through the proxy.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a proxy for the server of `url` with its socket in `dir`.
pub fn start(url: &str, dir: &Path) -> anyhow::Result<Proxy> {
    let options: PgConnectOptions = url.parse().context("DATABASE_URL")?;
    let port = options.get_port();
    let upstream = match options.get_socket() {
        Some(dir) => Upstream::Unix(dir.join(format!(".s.PGSQL.{port}"))),
        None => Upstream::Tcp(options.get_host().to_owned(), port),
    };
    std::fs::create_dir_all(dir)?;
    let listener = UnixListener::bind(dir.join(format!(".s.PGSQL.{port}")))?;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            c.connections.fetch_add(1, Ordering::Relaxed);
            let upstream = upstream.clone();
            let c = c.clone();
            tokio::spawn(async move {
                let result = match &upstream {
                    Upstream::Unix(p) => match tokio::net::UnixStream::connect(p).await {
                        Ok(s) => relay(client, s, c).await,
                        Err(e) => Err(e),
                    },
                    Upstream::Tcp(h, p) => {
                        match tokio::net::TcpStream::connect((h.as_str(), *p)).await {
                            Ok(s) => relay(client, s, c).await,
                            Err(e) => Err(e),
                        }
                    }
                };
                // A process under test that is stopped drops its connections mid-stream.
                if let Err(e) = result {
                    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
                    if !matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe) {
                        eprintln!("proxy: {e}");
                    }
                }
            });
        }
    });
    let dir_text = dir.display().to_string();
    let url = crate::pg::with_param(url, "host", &dir_text);
    let url = crate::pg::with_param(&url, "port", &port.to_string());
    Ok(Proxy { counts, url, task })
}

async fn relay<S>(
    client: tokio::net::UnixStream,
    server: S,
    counts: Arc<Counts>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let up = forward_counting(BufReader::new(client_read), &mut server_write, &counts).await;
    let _ = server_write.shutdown().await;
    let _ = down.await;
    up
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

async fn forward_counting<R, W>(mut from: R, to: &mut W, counts: &Counts) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut body = Vec::new();
    // Start-up: untyped messages. An SSL or GSS request is answered with one byte ('N' from a
    // server without TLS) and followed by the real start-up message.
    loop {
        let len = from.read_u32().await? as usize;
        body.resize(len.saturating_sub(4), 0);
        from.read_exact(&mut body).await?;
        to.write_all(&(len as u32).to_be_bytes()).await?;
        to.write_all(&body).await?;
        let code = body
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if code != SSL_REQUEST && code != GSSENC_REQUEST {
            break;
        }
    }
    loop {
        let kind = from.read_u8().await?;
        let len = from.read_u32().await? as usize;
        body.resize(len.saturating_sub(4), 0);
        from.read_exact(&mut body).await?;
        match kind {
            b'Q' => counts.query.fetch_add(1, Ordering::Relaxed),
            b'E' => counts.execute.fetch_add(1, Ordering::Relaxed),
            b'S' => counts.sync.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        to.write_all(&[kind]).await?;
        to.write_all(&(len as u32).to_be_bytes()).await?;
        to.write_all(&body).await?;
    }
}
