//! The `pulse-ingestor` binary: configuration, telemetry, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use pulse_ingestor::app::{App, shutdown_signal};
use pulse_ingestor::config::Config;
use pulse_ingestor::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(64);
        }
    };
    telemetry::init(cfg.log_format);
    let app = match App::build(cfg).await {
        Ok(a) => a,
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
