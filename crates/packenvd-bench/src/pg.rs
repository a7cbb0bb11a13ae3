//! The PostgreSQL server in `DATABASE_URL`: one fresh database per scenario, so no scenario
//! sees another's rows, dead tuples or statistics.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

#[derive(Debug)]
pub struct Cluster {
    base_url: String,
    admin: PgPool,
    prefix: String,
    next: AtomicU32,
}

/// A scenario's database; dropped by [`Cluster::drop_db`].
#[derive(Debug)]
pub struct Db {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl Cluster {
    pub async fn connect(base_url: &str) -> anyhow::Result<Cluster> {
        let admin = pool(base_url, 2)
            .await
            .context("cannot connect to DATABASE_URL")?;
        Ok(Cluster {
            base_url: base_url.to_owned(),
            admin,
            prefix: format!("packenvd_bench_{}", std::process::id()),
            next: AtomicU32::new(1),
        })
    }

    /// `SELECT version()`, for the report.
    pub async fn server_version(&self) -> anyhow::Result<String> {
        Ok(sqlx::query_scalar("SELECT version()")
            .fetch_one(&self.admin)
            .await?)
    }

    /// Creates an empty database; `pool_size` is the harness's own pool on it.
    pub async fn fresh_db(&self, tag: &str, pool_size: u32) -> anyhow::Result<Db> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}_{n}_{tag}", self.prefix);
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&self.admin)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let url = with_database(&self.base_url, &name);
        let pool = pool(&url, pool_size).await?;
        Ok(Db { name, url, pool })
    }

    /// A fresh database with packenvd's schema and seeded runtimes.
    pub async fn packenvd_db(&self, tag: &str, pool_size: u32) -> anyhow::Result<Db> {
        let db = self.fresh_db(tag, pool_size).await?;
        packenvd::store::MIGRATOR
            .run(&db.pool)
            .await
            .context("applying packenvd's migrations")?;
        Ok(db)
    }

    pub async fn drop_db(&self, db: Db) {
        db.pool.close().await;
        // FORCE: a daemon killed a moment ago may still hold a backend.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.name);
        if let Err(e) = sqlx::query(&sql).execute(&self.admin).await {
            eprintln!("warning: cannot drop {}: {e}", db.name);
        }
    }
}

pub async fn pool(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.application_name("packenvd-bench"))
        .await
}

/// `base` with its database name replaced, keeping query parameters such as `?host=/socket/dir`.
pub fn with_database(base: &str, db: &str) -> String {
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let path_end = base[path_start..]
        .find('?')
        .map_or(base.len(), |i| path_start + i);
    format!("{}/{}{}", &base[..path_start], db, &base[path_end..])
}

/// `url` with query parameter `key` set to `value` (replaced when present).
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    let (head, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(key))
        .map(str::to_owned)
        .collect();
    params.push(format!("{key}={value}"));
    format!("{head}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_the_socket_directory() {
        let base = "postgres://postgres@localhost/postgres?host=/tmp/x";
        assert_eq!(
            with_database(base, "b1"),
            "postgres://postgres@localhost/b1?host=/tmp/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5433", "b1"),
            "postgres://u@h:5433/b1"
        );
        assert_eq!(
            with_param(base, "host", "/tmp/y"),
            "postgres://postgres@localhost/postgres?host=/tmp/y"
        );
        assert_eq!(
            with_param("postgres://h/db", "port", "5432"),
            "postgres://h/db?port=5432"
        );
    }
}
