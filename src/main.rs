//! The `pulse-ingestor` binary: command line, configuration, telemetry, run until SIGTERM/SIGINT.
//!
//! Exit codes: 0 after a clean shutdown; 64 for a usage or configuration error (every bad
//! variable listed at once); 1 when the service could not start or stopped because a task
//! failed (its supervisor should replace it).

#![warn(clippy::too_many_lines)]

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pulse_ingestor::app::{App, AppError, shutdown_signal};
use pulse_ingestor::config::{Config, SETTINGS};
use pulse_ingestor::telemetry;

/// mimalloc: the request path allocates per request (bodies, pulses, the router's boxed
/// services); glibc malloc spent about a third of the ingestor's instructions on it
/// (BENCHMARKS.md, callgrind).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PULSE_GIT_COMMIT"),
    ")"
);

/// Exact, bounded usage-pulse ingestion into hourly Redis generations, delivered to a billing
/// Processor. Configured by environment variables (and a `.env` file in the working directory).
#[derive(Parser)]
#[command(name = "pulse-ingestor", version = VERSION, after_help = settings_help())]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Change the deployment's SHARDS. Run it while no replica runs: it copies every
    /// remembered pulse id to its tenant's new shard, then records the new count. Start the
    /// replicas with the new SHARDS afterwards.
    Reshard {
        /// The new shard count.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16_384))]
        shards: u32,
        /// Run although replicas were seen in the last minute (only when they are surely gone).
        #[arg(long)]
        force: bool,
    },
    /// Print the OpenAPI 3.1 document of this API (what `GET /openapi.json` serves), or with
    /// `--processor` the contract of the Processor it delivers to. `docs/` holds both.
    Openapi {
        #[arg(long)]
        processor: bool,
    },
}

/// The settings table printed after `--help`.
fn settings_help() -> String {
    let mut s = String::from(
        "Settings (environment variables; durations take units such as 500ms, 5s, 1h):\n",
    );
    for st in SETTINGS {
        let default = if st.default.is_empty() {
            "unset".to_string()
        } else {
            st.default.to_string()
        };
        s.push_str(&format!(
            "  {:<22} {}  [default: {}]\n",
            st.name, st.help, default
        ));
    }
    s.push_str("  RUST_LOG               Log filter  [default: info]\n");
    s
}

/// Writes to stderr, ignoring failure (a closed stderr must not panic the process).
fn eprint_quiet(s: &str) {
    let _ = std::io::stderr().write_all(s.as_bytes());
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprint_quiet(&format!("cannot start the runtime: {e}\n"));
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    if let Some(Command::Openapi { processor }) = cli.command {
        use utoipa::OpenApi;
        let doc = if processor {
            pulse_ingestor::http::openapi::ProcessorDoc::openapi()
        } else {
            pulse_ingestor::http::openapi::ApiDoc::openapi()
        };
        let text = doc.to_pretty_json().expect("the document serialises");
        println!("{text}");
        return ExitCode::SUCCESS;
    }
    let _ = dotenvy::dotenv();
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprint_quiet(&e.to_string());
            return ExitCode::from(64);
        }
    };
    if let Some(Command::Reshard { shards, force }) = cli.command {
        return reshard(cfg, shards, force).await;
    }
    let _log = telemetry::init(cfg.log_format);
    let app = match App::build(cfg).await {
        Ok(a) => a,
        Err(e @ (AppError::Config(_) | AppError::ApiKeys(_))) => {
            tracing::error!(error = %e, "cannot start");
            // Also straight to stderr: a configuration error must be seen whatever RUST_LOG is.
            eprint_quiet(&format!("{e}\n"));
            return ExitCode::from(64);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            ExitCode::from(1)
        }
    }
}

async fn reshard(cfg: Config, shards: u32, force: bool) -> ExitCode {
    let store = match pulse_ingestor::store::Store::new(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprint_quiet(&format!("cannot reach Redis: {e}\n"));
            return ExitCode::from(1);
        }
    };
    match store.reshard(shards, force).await {
        Ok(r) => {
            println!(
                "SHARDS {} -> {}: {} pulse ids moved to their new shard, {} older ids copied to every shard. Start the replicas with SHARDS={}.",
                r.from, r.to, r.markers_moved, r.markers_copied_everywhere, r.to
            );
            ExitCode::SUCCESS
        }
        Err(e @ pulse_ingestor::store::reshard::ReshardError::ReplicasRunning(_)) => {
            eprint_quiet(&format!("{e}\n"));
            ExitCode::from(64)
        }
        Err(e) => {
            eprint_quiet(&format!("reshard failed: {e}\n"));
            ExitCode::from(1)
        }
    }
}
