//! Logging on stderr, as text or JSON, with a filter that SIGHUP can change.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, colored on a terminal.
    Text,
    /// One JSON object per line, with the row's fields on every state change.
    Json,
}

/// Changes the log filter of the running process.
#[derive(Debug, Clone)]
pub struct LogFilter(reload::Handle<EnvFilter, Registry>);

impl LogFilter {
    /// Applies `level` (tracing `EnvFilter` syntax, checked by the config already).
    pub fn set(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.0.modify(|f| *f = filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, level: &str) -> LogFilter {
    let (filter, handle) =
        reload::Layer::new(EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    LogFilter(handle)
}
