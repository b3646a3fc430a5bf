//! `pulse-producer`: load simulator and books check for pulse-ingestor.

#![warn(clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pulse_producer::ledger::{Diff, Holder, Ledger, compare};
use pulse_producer::load::{LoadConfig, Mode, run};
use pulse_producer::processor::{KeyTotal, Totals};
use pulse_producer::traffic::{Amounts, Skew, Traffic};

#[derive(Parser)]
#[command(
    version,
    about = "Load simulator and books check for pulse-ingestor",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send pulses (the default).
    Run(RunArgs),
    /// Compare a ledger with the reference Processor's totals — or, with `--database-url`, with
    /// what the Processor stored in PostgreSQL, or with `--ingestor`, with what the service
    /// holds (its live usage API); exit 1 with a diff if they differ.
    Verify {
        #[arg(long, num_args = 1.., required = true)]
        ledger: Vec<PathBuf>,
        /// Base URL of the reference Processor.
        #[arg(
            long,
            env = "PROCESSOR_BASE_URL",
            default_value = "http://127.0.0.1:8090"
        )]
        processor: String,
        /// Compare with an ingestor's `GET /v1/usage` of every tenant in the ledger instead:
        /// what is not delivered yet (live, sealed and dead-lettered windows), exactly.
        #[arg(long, conflicts_with = "processor")]
        ingestor: Option<String>,
        /// Compare with the Processor's PostgreSQL instead (`window_usage`: per window, key and
        /// aggregation, exactly).
        #[arg(long, conflicts_with_all = ["processor", "ingestor"])]
        database_url: Option<String>,
        /// `ADMIN_TOKEN` of that ingestor, when API keys are on.
        #[arg(long, env = "ADMIN_TOKEN", requires = "ingestor")]
        admin_token: Option<String>,
        /// Or a trusted (`*`) API key of it.
        #[arg(long, requires = "ingestor")]
        api_key: Option<String>,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Ingestor base URL; repeat or comma-separate to spread over replicas.
    #[arg(
        long,
        env = "INGESTOR_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8070"
    )]
    url: Vec<String>,
    #[arg(long, value_enum, env = "PRODUCER_MODE", default_value = "tenants")]
    mode: Mode,
    /// How long to send.
    #[arg(long, env = "PRODUCER_DURATION", default_value = "100s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many pulses (0: only the duration limits).
    #[arg(long, default_value_t = 0)]
    count: u64,
    #[arg(long, env = "PRODUCER_TENANTS", default_value_t = 3000)]
    tenants: usize,
    #[arg(long, env = "PRODUCER_SKUS", default_value_t = 10)]
    skus: usize,
    #[arg(long, value_enum, default_value = "uniform")]
    skew: Skew,
    /// How amounts are drawn: `cents` (0.01–1000.00) or `fine` (up to 9 fractional digits,
    /// magnitudes up to 10^12), which exercises exact sums.
    #[arg(long, value_enum, default_value = "cents")]
    amounts: Amounts,
    /// `tenants` mode: shortest pause between a tenant's pulses.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    min_delay: Duration,
    /// `tenants` mode: longest pause between a tenant's pulses.
    #[arg(long, default_value = "1000ms", value_parser = humantime::parse_duration)]
    max_delay: Duration,
    /// `rate` mode: pulses (requests) per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// `max` mode: connections; `rate` mode: most requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Pulses per request via POST /ingest/batch (0: single pulses to /ingest).
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Send a pulse_id with every pulse.
    #[arg(long)]
    ids: bool,
    /// Fraction of pulses that re-send an earlier pulse with the same id (implies --ids).
    #[arg(long, default_value_t = 0.0)]
    duplicate_ratio: f64,
    /// Fraction of requests with a malformed body (must get 4xx).
    #[arg(long, default_value_t = 0.0)]
    malformed_ratio: f64,
    #[arg(long, env = "PRODUCER_API_KEY")]
    api_key: Option<String>,
    /// Compress request bodies with gzip or zstd (sent with Content-Encoding).
    #[arg(long, value_enum)]
    compress: Option<pulse_producer::load::Compress>,
    /// Retries of a request answered 503 or lost in transport (only when all its pulses have ids).
    #[arg(long, default_value_t = 5)]
    retries: u32,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Walk distinct (tenant, sku) keys in order (tenants x skus of them) instead of drawing.
    #[arg(long)]
    distinct: bool,
    /// Stamp pulses with their time of use: `off`, `now`, `skew=<±duration>` (clock skew), or
    /// `late=<fraction>:<max delay>` (that fraction sent up to that late). The ledger then also
    /// keeps totals per event window (`--window`), which `verify` checks.
    #[arg(long, default_value = "off")]
    event_time: pulse_producer::traffic::EventTime,
    /// The service's WINDOW, for the ledger's totals per event window.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Write the acknowledged totals here, for `verify`.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // reqwest is built without a default crypto provider (see the workspace Cargo.toml).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.cmd {
        Some(Cmd::Verify {
            ledger,
            ingestor: Some(url),
            admin_token,
            api_key,
            ..
        }) => verify_usage(&ledger, &url, admin_token.as_deref(), api_key.as_deref()).await,
        Some(Cmd::Verify {
            ledger,
            database_url: Some(url),
            ..
        }) => verify_database(&ledger, &url).await,
        Some(Cmd::Verify {
            ledger, processor, ..
        }) => verify(&ledger, &processor).await,
        Some(Cmd::Run(a)) => load(a).await,
        None => load(cli.run).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn load(a: RunArgs) -> anyhow::Result<ExitCode> {
    let run_id = format!("{:x}", rand::random::<u64>());
    let ids = a.ids || a.duplicate_ratio > 0.0;
    let cfg = LoadConfig {
        targets: a
            .url
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect(),
        mode: a.mode,
        duration: a.duration,
        count: a.count,
        concurrency: a.concurrency,
        rate: a.rate,
        batch: a.batch,
        min_delay: a.min_delay,
        max_delay: a.max_delay,
        traffic: Traffic::new(a.tenants, a.skus, a.skew, ids, run_id)
            .with_amounts(a.amounts)
            .with_event_time(a.event_time),
        window_secs: match a.event_time {
            pulse_producer::traffic::EventTime::Off => 0,
            _ => a.window.as_secs().max(1),
        },
        duplicate_ratio: a.duplicate_ratio,
        malformed_ratio: a.malformed_ratio,
        api_key: a.api_key,
        compress: a.compress,
        retries: a.retries,
        timeout: a.timeout,
        distinct: a.distinct,
    };
    let (report, ledger) = run(cfg).await?;
    print!("{report}");
    if let Some(p) = &a.ledger {
        ledger.save(p)?;
        println!(
            "ledger               {} ({} keys, total {})",
            p.display(),
            ledger.totals().len(),
            pulse_producer::money::canonical(&ledger.total_amount())
        );
    }
    if let Some(p) = &a.report_json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(if report.malformed_accepted > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn merged(ledgers: &[PathBuf]) -> anyhow::Result<Ledger> {
    let mut expected = Ledger::default();
    for p in ledgers {
        expected.merge(&Ledger::load(p)?);
    }
    Ok(expected)
}

/// The ledger against an ingestor's live usage: every tenant's windows summed per key (what is
/// still to deliver plus what was dead-lettered), so it holds while nothing has been delivered.
async fn verify_usage(
    ledgers: &[PathBuf],
    ingestor: &str,
    admin_token: Option<&str>,
    api_key: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use futures::{StreamExt, TryStreamExt};
    let expected = merged(ledgers)?.totals();
    let tenants: std::collections::BTreeSet<&str> =
        expected.iter().map(|k| k.tenant_id.as_str()).collect();
    let client = reqwest::Client::new();
    let base = ingestor.trim_end_matches('/');
    let found: Vec<Vec<KeyTotal>> = futures::stream::iter(&tenants)
        .map(|&t| {
            let client = client.clone();
            async move {
                let url = reqwest::Url::parse_with_params(
                    &format!("{base}/v1/usage"),
                    [("tenant_id", t)],
                )?;
                let mut req = client.get(url);
                if let Some(token) = admin_token {
                    req = req.bearer_auth(token);
                }
                if let Some(key) = api_key {
                    req = req.header("x-api-key", key);
                }
                let usage: Usage = req.send().await?.error_for_status()?.json().await?;
                usage.totals(t)
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let found: Vec<KeyTotal> = found.into_iter().flatten().collect();
    report_diff(
        &expected,
        (&found, Holder::Ingestor),
        &format!(
            "ingestor: {} keys of {} tenants",
            found.len(),
            tenants.len()
        ),
    )
}

/// `GET /v1/usage`, as much of it as the books need (amounts as exact decimal text).
#[derive(serde::Deserialize)]
struct Usage {
    windows: Vec<UsageWindow>,
}

#[derive(serde::Deserialize)]
struct UsageWindow {
    usage: Vec<KeyUsage>,
}

#[derive(serde::Deserialize)]
struct KeyUsage {
    product_sku: String,
    use_unit: String,
    used_amount_text: String,
    dead_lettered_text: Option<String>,
    /// A meter's other aggregations are not in the ledger (it keeps sums).
    #[serde(default)]
    aggregation: Option<String>,
}

impl Usage {
    /// One tenant's usage summed per key over its windows, delivered or not yet.
    fn totals(self, tenant: &str) -> anyhow::Result<Vec<KeyTotal>> {
        use pulse_producer::money::{Dec, parse};
        let exact = |t: &str| parse(t).ok_or_else(|| anyhow::anyhow!("not a decimal: {t:?}"));
        let mut sums: std::collections::BTreeMap<(String, String), Dec> = Default::default();
        let sums_only = |k: &KeyUsage| k.aggregation.as_deref().unwrap_or("sum") == "sum";
        for k in self
            .windows
            .into_iter()
            .flat_map(|w| w.usage)
            .filter(sums_only)
        {
            let mut amount = exact(&k.used_amount_text)?;
            if let Some(dead) = &k.dead_lettered_text {
                amount += exact(dead)?;
            }
            *sums.entry((k.product_sku, k.use_unit)).or_default() += amount;
        }
        Ok(sums
            .into_iter()
            .map(|((product_sku, use_unit), used_amount)| KeyTotal {
                tenant_id: tenant.to_string(),
                product_sku,
                use_unit,
                used_amount,
                window_start: None,
                aggregation: None,
            })
            .collect())
    }
}

/// Prints the diff and a summary line; exit 1 unless the books balance.
fn report_diff(
    expected: &[KeyTotal],
    (found, holder): (&[KeyTotal], Holder),
    summary: &str,
) -> anyhow::Result<ExitCode> {
    let diff = Diff {
        holder,
        ..compare(expected, found)
    };
    print!("{diff}");
    println!("{summary}");
    Ok(if diff.balanced() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn verify(ledgers: &[PathBuf], processor: &str) -> anyhow::Result<ExitCode> {
    let expected = merged(ledgers)?;
    let totals: Totals = reqwest::get(format!("{}/totals", processor.trim_end_matches('/')))
        .await?
        .error_for_status()?
        .json()
        .await?;
    check_books(
        &expected,
        &totals.window_totals,
        (&totals.totals, Holder::Processor),
        &format!(
            "processor: {} records, {} deliveries, {} re-delivered record ids",
            totals.records, totals.deliveries, totals.redelivered
        ),
    )
}

/// The ledger against the Processor's database: the same check, on `window_usage`.
async fn verify_database(ledgers: &[PathBuf], url: &str) -> anyhow::Result<ExitCode> {
    use pulse_producer::processor::postgres::{OwedRow, PgStore};
    let expected = merged(ledgers)?;
    let owed = PgStore::new(url, 1)?.owed().await?;
    let totals = |rows: Vec<OwedRow>, windowed: bool| -> anyhow::Result<Vec<KeyTotal>> {
        rows.into_iter()
            .map(|r| {
                let amount = pulse_producer::money::parse(&r.used_amount)
                    .ok_or_else(|| anyhow::anyhow!("not a decimal: {:?}", r.used_amount))?;
                let key = (r.tenant_id, r.product_sku, r.use_unit);
                Ok(KeyTotal {
                    window_start: windowed.then_some(r.window_start as u64),
                    ..KeyTotal::new(key, &r.aggregation, amount)
                })
            })
            .collect()
    };
    let windows = totals(owed.windows, true)?;
    let keys = totals(owed.keys, false)?;
    let summary = format!(
        "database: {} window totals, {} key totals",
        windows.len(),
        keys.len()
    );
    check_books(&expected, &windows, (&keys, Holder::Database), &summary)
}

/// The ledger against the Processor's totals: sums per event window (stamped pulses: every
/// window's records, amendments included, key by key), meters per key, sums per key.
fn check_books(
    expected: &Ledger,
    window_totals: &[KeyTotal],
    (totals, holder): (&[KeyTotal], Holder),
    summary: &str,
) -> anyhow::Result<ExitCode> {
    let sums = |v: &[KeyTotal]| -> Vec<KeyTotal> {
        v.iter()
            .filter(|k| k.aggregation.is_none())
            .cloned()
            .collect()
    };
    let per_window = expected.window_totals();
    if !per_window.is_empty() {
        let diff = compare(&per_window, &sums(window_totals));
        print!("per event window: {diff}");
        if !diff.balanced() {
            return Ok(ExitCode::from(1));
        }
    }
    if !meters_balance(expected, totals) {
        return Ok(ExitCode::from(1));
    }
    report_diff(&expected.totals(), (&sums(totals), holder), summary)
}

/// A meter's `count`, `max` and `min` per key against the ledger's (which keys are metered is
/// the ingestor's meters file: the ledger judges those the Processor reports). `latest` is
/// counted, not checked: the ledger does not know the ingestor's order of measurements.
fn meters_balance(expected: &Ledger, totals: &[KeyTotal]) -> bool {
    let judged = |k: &&KeyTotal| matches!(k.aggregation(), "count" | "max" | "min");
    let found: Vec<KeyTotal> = totals.iter().filter(judged).cloned().collect();
    if found.is_empty() {
        return true;
    }
    let slot = |k: &KeyTotal| {
        (
            k.tenant_id.clone(),
            k.product_sku.clone(),
            k.use_unit.clone(),
            k.aggregation.clone(),
        )
    };
    let wanted: std::collections::BTreeSet<_> = found.iter().map(slot).collect();
    let known: Vec<KeyTotal> = expected
        .meters()
        .into_iter()
        .filter(|k| wanted.contains(&slot(k)))
        .collect();
    let diff = compare(&known, &found);
    print!("meters (count, max, min): {diff}");
    let latest = totals
        .iter()
        .filter(|k| k.aggregation() == "latest")
        .count();
    if latest > 0 {
        println!(
            "{latest} latest-value totals not checked: the ledger does not order measurements"
        );
    }
    diff.balanced()
}
