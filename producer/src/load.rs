//! The load modes and the report.
//!
//! - `max`: closed loop, `concurrency` connections sending as fast as answers come back.
//! - `rate`: open loop at a fixed rate; latency is measured from each request's *intended*
//!   send time, so a stalled server shows up as latency (no coordinated omission).
//! - `tenants`: the earlier producer's model, one task per tenant sleeping a random delay
//!   between sends.
//!
//! Requests that fail with 503 or a transport error are retried (same body, same pulse ids)
//! up to `retries` times when every pulse in them carries an id, so the books stay exact.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::ledger::Ledger;
use crate::traffic::{Pulse, Traffic, malformed};

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tenants,
    Rate,
    Max,
}

/// Everything a load run needs.
/// How request bodies are compressed (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Gzip,
    Zstd,
}

impl Compress {
    /// The body compressed, and its `Content-Encoding`.
    pub fn apply(self, body: &[u8]) -> (Vec<u8>, &'static str) {
        use std::io::Write;
        match self {
            Compress::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(body).expect("writing to memory");
                (e.finish().expect("writing to memory"), "gzip")
            }
            Compress::Zstd => (
                zstd::bulk::compress(body, 3).expect("compressing in memory"),
                "zstd",
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URL of the ingestor(s); requests rotate over them.
    pub targets: Vec<String>,
    pub mode: Mode,
    pub duration: Duration,
    /// Stop after this many pulses (0: no limit).
    pub count: u64,
    pub concurrency: usize,
    pub rate: f64,
    pub batch: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub traffic: Traffic,
    pub duplicate_ratio: f64,
    pub malformed_ratio: f64,
    pub api_key: Option<String>,
    /// Compress request bodies (`Content-Encoding`).
    pub compress: Option<Compress>,
    pub retries: u32,
    pub timeout: Duration,
    /// Walk distinct (tenant, sku) keys in order instead of drawing them.
    pub distinct: bool,
    /// With stamped pulses: the service's window length, for the ledger's totals per window
    /// (0: none).
    pub window_secs: u64,
}

/// The outcome of a run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub requests: u64,
    pub pulses_sent: u64,
    pub pulses_acknowledged: u64,
    pub ok_2xx: u64,
    /// Client errors by status.
    pub status_4xx: BTreeMap<u16, u64>,
    pub status_5xx: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub retries: u64,
    /// Malformed bodies that were (wrongly) accepted.
    pub malformed_accepted: u64,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub pulses_per_s: f64,
    pub latency_ms: Latency,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

struct Shared {
    cfg: LoadConfig,
    http: reqwest::Client,
    ledger: Mutex<Ledger>,
    report: Mutex<Report>,
    hist: Mutex<Histogram<u64>>,
    recent: Mutex<Vec<Pulse>>,
    seq: AtomicU64,
    pulses: AtomicU64,
    stop: AtomicBool,
    deadline: Instant,
}

const RECENT: usize = 10_000;

impl Shared {
    fn done(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || Instant::now() >= self.deadline
            || (self.cfg.count > 0 && self.pulses.load(Ordering::Relaxed) >= self.cfg.count)
    }

    fn target(&self, n: u64) -> &str {
        &self.cfg.targets[(n as usize) % self.cfg.targets.len()]
    }

    /// The pulses of one request: new ones, or re-sends of recent ones.
    fn make(&self, tenant: Option<usize>) -> Vec<Pulse> {
        let mut rng = rand::rng();
        let n = self.cfg.batch.max(1);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if self.cfg.duplicate_ratio > 0.0 && rng.random_bool(self.cfg.duplicate_ratio.min(1.0))
            {
                let recent = self.recent.lock().unwrap();
                if let Some(p) = recent.get(rng.random_range(0..recent.len().max(1))) {
                    out.push(p.clone());
                    continue;
                }
            }
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let p = match tenant {
                Some(t) => self.cfg.traffic.pulse_for(t, seq, &mut rng),
                None if self.cfg.distinct => self.cfg.traffic.distinct(seq, &mut rng),
                None => self.cfg.traffic.pulse(seq, &mut rng),
            };
            if p.pulse_id.is_some() {
                let mut recent = self.recent.lock().unwrap();
                if recent.len() < RECENT {
                    recent.push(p.clone());
                } else {
                    let i = rng.random_range(0..RECENT);
                    recent[i] = p.clone();
                }
            }
            out.push(p);
        }
        out
    }

    /// Sends one request (with retries) and books its outcome. `intended` is when it should
    /// have been sent.
    async fn send(&self, tenant: Option<usize>, intended: Instant) {
        let seq = self.seq.load(Ordering::Relaxed);
        let malformed_body = self.cfg.malformed_ratio > 0.0
            && rand::rng().random_bool(self.cfg.malformed_ratio.min(1.0));
        let (path, body, pulses) = self.request(tenant, malformed_body);
        let retryable = !pulses.is_empty() && pulses.iter().all(|p| p.pulse_id.is_some());
        let (body, encoding) = match self.cfg.compress {
            Some(c) => {
                let (b, e) = c.apply(&body);
                (b, Some(e))
            }
            None => (body, None),
        };
        let body = bytes::Bytes::from(body);
        let mut attempt = 0;
        let mut target_n = seq;
        loop {
            let url = format!("{}{}", self.target(target_n), path);
            let mut req = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(k) = &self.cfg.api_key {
                req = req.header("x-api-key", k);
            }
            if let Some(e) = encoding {
                req = req.header("content-encoding", e);
            }
            let res = req.send().await;
            let (status, retry_after) = match &res {
                Ok(r) => (
                    Some(r.status().as_u16()),
                    r.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
                ),
                Err(_) => (None, None),
            };
            if let Ok(r) = res {
                let _ = r.bytes().await;
            }
            let again = matches!(status, None | Some(503))
                && retryable
                && attempt < self.cfg.retries
                && !self.stop.load(Ordering::Relaxed);
            if again {
                attempt += 1;
                target_n += 1; // another replica, if there are several
                self.report.lock().unwrap().retries += 1;
                let wait = Duration::from_millis(retry_after.map_or(50, |s| (s * 1000).min(1000)));
                tokio::time::sleep(wait).await;
                continue;
            }
            self.book(intended, status, &pulses, malformed_body);
            return;
        }
    }

    /// One request's path, body and pulses: a malformed body, a batch or one pulse.
    fn request(
        &self,
        tenant: Option<usize>,
        malformed_body: bool,
    ) -> (&'static str, Vec<u8>, Vec<Pulse>) {
        if malformed_body {
            let (b, _) = malformed(&mut rand::rng());
            return ("/ingest", b.as_bytes().to_vec(), Vec::new());
        }
        let pulses = self.make(tenant);
        self.pulses
            .fetch_add(pulses.len() as u64, Ordering::Relaxed);
        if self.cfg.batch > 0 {
            let body = serde_json::to_vec(&pulses).expect("serialises");
            ("/ingest/batch", body, pulses)
        } else {
            let body = serde_json::to_vec(&pulses[0]).expect("serialises");
            ("/ingest", body, pulses)
        }
    }

    /// Books a request's outcome: latency, status, and its pulses in the ledger if acknowledged.
    fn book(&self, intended: Instant, status: Option<u16>, pulses: &[Pulse], malformed_body: bool) {
        let latency = intended.elapsed();
        let _ = self
            .hist
            .lock()
            .unwrap()
            .record(latency.as_micros().max(1) as u64);
        let mut rep = self.report.lock().unwrap();
        rep.requests += 1;
        rep.pulses_sent += pulses.len() as u64;
        match status {
            Some(s) if (200..300).contains(&s) => {
                rep.ok_2xx += 1;
                if malformed_body {
                    rep.malformed_accepted += 1;
                } else {
                    drop(rep);
                    let mut l = self.ledger.lock().unwrap();
                    for p in pulses {
                        l.acknowledged(p);
                    }
                }
            }
            Some(s) if (400..500).contains(&s) => *rep.status_4xx.entry(s).or_default() += 1,
            Some(s) => *rep.status_5xx.entry(s).or_default() += 1,
            None => rep.transport_errors += 1,
        }
    }
}

/// Runs the load and returns the report and the ledger.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<(Report, Ledger)> {
    let http = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .pool_max_idle_per_host(cfg.concurrency.max(64))
        .build()?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        http,
        ledger: Mutex::new(Ledger::with_windows(cfg.window_secs)),
        report: Mutex::new(Report::default()),
        hist: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")),
        recent: Mutex::new(Vec::new()),
        seq: AtomicU64::new(0),
        pulses: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        deadline: started + cfg.duration,
        cfg: cfg.clone(),
    });
    {
        let s = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            s.stop.store(true, Ordering::Relaxed);
        });
    }
    let progress = progress(shared.clone(), started);
    drive(&shared, started).await;
    progress.abort();
    let (rep, ledger) = summary(&shared, started);
    Ok((rep, ledger))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "mode                 {}", self.mode)?;
        writeln!(f, "elapsed              {:.1} s", self.elapsed_s)?;
        writeln!(
            f,
            "requests             {} ({:.0}/s)",
            self.requests, self.requests_per_s
        )?;
        writeln!(
            f,
            "pulses sent          {} ({:.0}/s)",
            self.pulses_sent, self.pulses_per_s
        )?;
        writeln!(
            f,
            "pulses acknowledged  {} (distinct)",
            self.pulses_acknowledged
        )?;
        writeln!(f, "2xx                  {}", self.ok_2xx)?;
        writeln!(f, "4xx                  {:?}", self.status_4xx)?;
        writeln!(f, "5xx                  {:?}", self.status_5xx)?;
        writeln!(f, "transport errors     {}", self.transport_errors)?;
        writeln!(f, "retries              {}", self.retries)?;
        if self.malformed_accepted > 0 {
            writeln!(f, "MALFORMED ACCEPTED   {}", self.malformed_accepted)?;
        }
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency ms           p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )
    }
}

/// A live bar on a terminal; plain lines every 5 s otherwise (logs, CI, files).
fn progress(s: Arc<Shared>, started: Instant) -> tokio::task::JoinHandle<()> {
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    tokio::spawn(async move {
        let mut last = (0, Instant::now());
        let period = if bar.is_some() {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::time::sleep(period).await;
            let r = s.report.lock().unwrap().clone();
            let p99 = s.hist.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
            let rate = (r.requests - last.0) as f64 / last.1.elapsed().as_secs_f64();
            last = (r.requests, Instant::now());
            let line = format!(
                "requests {} ({rate:.0}/s), 2xx {}, 4xx {}, 5xx {}, transport errors {}, p99 {p99:.2} ms",
                r.requests,
                r.ok_2xx,
                r.status_4xx.values().sum::<u64>(),
                r.status_5xx.values().sum::<u64>(),
                r.transport_errors
            );
            match &bar {
                Some(b) => b.set_message(line),
                None => eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64()),
            }
        }
    })
}

/// Sends the load in the configured mode until the duration or count is reached.
async fn drive(shared: &Arc<Shared>, started: Instant) {
    let mut tasks = tokio::task::JoinSet::new();
    match shared.cfg.mode {
        Mode::Max => {
            for _ in 0..shared.cfg.concurrency.max(1) {
                let s = shared.clone();
                tasks.spawn(async move {
                    while !s.done() {
                        s.send(None, Instant::now()).await;
                    }
                });
            }
        }
        Mode::Tenants => {
            for t in 0..shared.cfg.traffic.tenants {
                let s = shared.clone();
                tasks.spawn(async move {
                    loop {
                        let d = rand::rng()
                            .random_range(s.cfg.min_delay..=s.cfg.max_delay.max(s.cfg.min_delay));
                        tokio::time::sleep(d).await;
                        if s.done() {
                            break;
                        }
                        s.send(Some(t), Instant::now()).await;
                    }
                });
            }
        }
        Mode::Rate => {
            let s = shared.clone();
            let limit = Arc::new(Semaphore::new(shared.cfg.concurrency.max(1)));
            let interval = Duration::from_secs_f64(1.0 / shared.cfg.rate.max(0.001));
            let mut i: u32 = 0;
            let mut inflight = tokio::task::JoinSet::new();
            while !s.done() {
                let intended = started + interval * i;
                tokio::time::sleep_until(intended.into()).await;
                let permit = limit.clone().acquire_owned().await.expect("not closed");
                let s2 = s.clone();
                inflight.spawn(async move {
                    s2.send(None, intended).await;
                    drop(permit);
                });
                i += 1;
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// The report of the run, and its ledger.
fn summary(shared: &Shared, started: Instant) -> (Report, Ledger) {
    let elapsed = started.elapsed().as_secs_f64();
    let mut rep = shared.report.lock().unwrap().clone();
    let hist = shared.hist.lock().unwrap();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    rep.mode = format!("{:?}", shared.cfg.mode).to_lowercase();
    rep.elapsed_s = elapsed;
    rep.requests_per_s = rep.requests as f64 / elapsed;
    rep.pulses_per_s = rep.pulses_sent as f64 / elapsed;
    rep.latency_ms = Latency {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p999: ms(0.999),
        max: hist.max() as f64 / 1000.0,
    };
    let ledger = shared.ledger.lock().unwrap().clone();
    rep.pulses_acknowledged = ledger.pulses;
    (rep, ledger)
}
