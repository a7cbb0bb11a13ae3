//! The library's error, and how errors are printed: each message says what was being done, and
//! the chain of causes follows once.

use std::fmt;

/// What can stop a packenvd command or the daemon's start-up. Errors of single rows never
/// surface here: they are written to their row.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{what}")]
    Db {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error(
        "the database lacks migration(s) {pending:?} and this database user may not apply them: \
         run `packenvd migrate` as the owner of the schema, re-apply deploy/db-role.sql, then \
         start packenvd again"
    )]
    MigrationDenied {
        pending: Vec<i64>,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("verification scheduler")]
    Scheduler(#[source] tokio_cron_scheduler::JobSchedulerError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A database error while doing `what`.
    pub fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Db { what, source }
    }
}

/// Prints an error and its causes as `top: cause: cause`, skipping a cause whose text the
/// message before it already ends with (some errors repeat their source in their own text).
#[derive(Debug)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = e.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = e.source();
        }
        Ok(())
    }
}

/// `Chain` of any error, for `tracing` fields: `error = %chain(&e)`.
pub fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn causes_are_printed_once() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(chain(&Outer(io())).to_string(), "outer: disk on fire");
        assert_eq!(chain(&Repeats(io())).to_string(), "wrapper: disk on fire");
    }
}
