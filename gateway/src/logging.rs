//! Log output through `tracing`: plain lines or JSON, filtered by `log.level` or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Colour only where a person reads it: stderr is a terminal, and `NO_COLOR` is not set
/// (<https://no-color.org>). Logs in a file or a pipe stay free of escape codes.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. Logs go to stderr; stdout carries only the "listening" lines.
pub fn init(log: &Log) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v)
            .map_err(|e| anyhow::anyhow!("RUST_LOG: invalid filter {v:?}: {e}"))?,
        _ => EnvFilter::try_new(&log.level).map_err(|e| {
            anyhow::anyhow!("config: log.level: invalid filter {:?}: {e}", log.level)
        })?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let result = match log.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
