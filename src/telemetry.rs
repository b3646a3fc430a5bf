//! Logging: human-readable on a terminal, JSON lines with `LOG_FORMAT=json`; `RUST_LOG` filters.
//!
//! Logging can never stop the service (invariant 13). Lines go through `tracing-appender`'s
//! non-blocking writer — a bounded queue drained by its own thread that drops lines when full —
//! into a writer that swallows write errors (a closed pipe, a full disk) and counts them in
//! `ingestor_log_write_errors_total`. No task ever blocks on stderr, and nothing panics when it
//! is gone (tracing-subscriber reports a failed write with `eprintln!`, which panics on a broken
//! stderr; here no write ever fails as far as it can tell).

use std::io::{IsTerminal, Write};
use std::sync::LazyLock;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Log lines that could not be written (stderr closed or failing) or were dropped because the
/// writer fell behind.
pub static LOG_WRITE_ERRORS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::IntCounter::new(
        "ingestor_log_write_errors_total",
        "Log lines dropped because stderr could not take them.",
    )
    .expect("valid metric")
});

/// stderr that never reports an error.
struct Forgiving(std::io::Stderr);

impl Write for Forgiving {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.write_all(buf).is_err() {
            LOG_WRITE_ERRORS.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// Keeps the log writer's thread; dropping it flushes what is queued.
pub struct LogGuard {
    /// Held, never read: dropping it flushes the log writer.
    _flush_on_drop: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(16_384)
        .finish(Forgiving(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
    };
    LogGuard {
        _flush_on_drop: installed.ok().map(|()| guard),
    }
}
