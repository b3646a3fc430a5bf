//! `pulse-ceiling`: a bench-only server that answers `POST /ingest` and `POST /ingest/batch` with
//! 202 after reading the body, doing no other work. It measures what the HTTP stack (axum on
//! tokio, as the ingestor uses) can do on this machine: the ceiling the benchmarks compare with.

#![warn(clippy::too_many_lines)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8071")]
    listen: SocketAddr,
}

async fn accept(body: Bytes) -> (StatusCode, &'static str) {
    std::hint::black_box(body);
    (
        StatusCode::ACCEPTED,
        r#"{"status":"committed","accepted":1,"duplicates":0}"#,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/ingest", post(accept))
        .route("/ingest/batch", post(accept));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("pulse-ceiling listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
