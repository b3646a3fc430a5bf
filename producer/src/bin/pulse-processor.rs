//! `pulse-processor`: the reference Processor as a process.

#![warn(clippy::too_many_lines)]

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use pulse_producer::processor::{Faults, Processor, quiet_drop_panics, router};

/// Receives record batches from pulse-ingestor, upserts them by record_id, serves /totals.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "PROCESSOR_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Append every accepted batch to this JSONL file.
    #[arg(long, env = "PROCESSOR_JOURNAL")]
    journal: Option<PathBuf>,
    #[command(flatten)]
    faults: Faults,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    quiet_drop_panics();
    let p = Processor::new(args.faults, args.journal)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("pulse-processor listening on {}", listener.local_addr()?);
    axum::serve(listener, router(p))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
