//! `pulse-processor`: the Processor as a process — in memory (tests, demos), or on PostgreSQL
//! with `DATABASE_URL` (the schema is migrated at start).

#![warn(clippy::too_many_lines)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use pulse_producer::processor::postgres::PgStore;
use pulse_producer::processor::{Faults, Processor, quiet_drop_panics, router};

/// Receives record batches from pulse-ingestor and upserts them by record_id: into PostgreSQL
/// with --database-url, else in memory (serving /totals).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "PROCESSOR_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Append every accepted batch to this JSONL file.
    #[arg(long, env = "PROCESSOR_JOURNAL")]
    journal: Option<PathBuf>,
    /// PostgreSQL to store records in (`postgres://user:password@host:5432/db`; no TLS).
    /// Without it the records are kept in memory.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Most connections to the database.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    database_pool_size: usize,
    #[command(flatten)]
    faults: Faults,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    quiet_drop_panics();
    let p = match &args.database_url {
        Some(url) => {
            let db = PgStore::new(url, args.database_pool_size)?;
            db.migrate().await?;
            Processor::with_database(args.faults, args.journal, db)?
        }
        None => Processor::new(args.faults, args.journal)?,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("pulse-processor listening on {}", listener.local_addr()?);
    axum::serve(listener, router(p))
        .with_graceful_shutdown(stopped())
        .await?;
    Ok(())
}

/// SIGTERM or Ctrl-C: stop accepting, answer the batches in flight (their transactions end),
/// exit.
async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
