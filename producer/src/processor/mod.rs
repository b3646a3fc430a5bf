//! The Processor: what the demo, the end-to-end tests and the benchmarks deliver to, and with a
//! database (`DATABASE_URL`, [`postgres`]) the last mile of the service itself.
//!
//! `POST /` (or `/batches`) takes a JSON array of records and upserts each by `record_id`, so a
//! re-delivered record replaces itself instead of adding up. In memory (tests, demos) every
//! accepted batch is appended to an optional JSONL journal; `GET /totals` combines the stored
//! records per (tenant, sku, unit) and aggregation, over all windows and per window, by the
//! contract's rules ([`combine`]); `GET /records` lists them. In PostgreSQL a batch is one
//! transaction, a conflicting record is refused by name, and `GET /usage` answers what a tenant
//! owes over a billing period in a time zone. Failure injection: an error rate, a status to
//! answer, latency, failing the first N batches, accepting and then dropping the connection,
//! rejecting batches that hold a given tenant, holding a transaction open before `COMMIT`.

pub mod combine;
pub mod metrics;
pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::money::Dec;
use combine::Combined;

/// A record as the ingestor delivers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub record_id: String,
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    /// Read from the JSON number's text as an exact decimal.
    #[serde(with = "crate::money::number")]
    pub used_amount: Dec,
    /// The same total as text; when present it must equal `used_amount` exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_amount_text: Option<String>,
    pub window_start: String,
    pub window_end: String,
    /// Set on an amendment (late pulses after the window's delivery began): the n-th record
    /// of the key for that window; the window's total is the sum of its records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amends: Option<u32>,
    /// How the key was aggregated (`sum`, `count`, `max`, `min`, `latest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<String>,
    /// For `latest`: the event time of its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_at: Option<String>,
    /// RFC 3339: after this no pulse is counted in this window any more (absent from
    /// ingestors that do not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_at: Option<String>,
}

/// How the Processor misbehaves, all off by default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Faults {
    /// Fraction of batches answered with `--fail-status` (0.0–1.0).
    #[arg(long, env = "PROCESSOR_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status answered to failed batches.
    #[arg(long, env = "PROCESSOR_FAIL_STATUS", default_value_t = 500)]
    pub fail_status: u16,
    /// Fail the first N batches with `--fail-status`.
    #[arg(long, env = "PROCESSOR_FAIL_FIRST", default_value_t = 0)]
    pub fail_first: u64,
    /// Delay before answering each batch.
    #[arg(long, env = "PROCESSOR_LATENCY", value_parser = humantime::parse_duration)]
    pub latency: Option<Duration>,
    /// `Retry-After` seconds sent with failures.
    #[arg(long, env = "PROCESSOR_RETRY_AFTER")]
    pub retry_after: Option<u64>,
    /// Fraction of batches stored and then answered by dropping the connection.
    #[arg(long, env = "PROCESSOR_DROP_RATE", default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Refuse (422) the records of this tenant; the rest of the batch is not accepted either
    /// (the ingestor re-sends it). See `--reject-style`.
    #[arg(long, env = "PROCESSOR_REJECT_TENANT")]
    pub reject_tenant: Option<String>,
    /// How a refusal for `--reject-tenant` is answered: `named` (`{"rejected": [{"record_id",
    /// "reason"}]}`, the contract), `plain` (`{"error": ...}` naming nobody) or `foreign`
    /// (names record ids that are not in the batch).
    #[arg(long, env = "PROCESSOR_REJECT_STYLE", default_value = "named")]
    pub reject_style: RejectStyle,
    /// Require this bearer token.
    #[arg(long, env = "PROCESSOR_TOKEN")]
    pub token: Option<String>,
    /// With a database: hold each batch's transaction open this long before `COMMIT` (to kill
    /// the Processor mid-delivery in a test).
    #[arg(long, env = "PROCESSOR_HOLD_COMMIT", value_parser = humantime::parse_duration)]
    pub hold_commit: Option<Duration>,
}

/// How the reference Processor words a refusal of some records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RejectStyle {
    /// `{"rejected": [{"record_id", "reason"}]}`: the contract.
    #[default]
    Named,
    /// `{"error": "..."}`, naming no record.
    Plain,
    /// Names record ids that are not in the batch.
    Foreign,
}

/// What the Processor holds.
#[derive(Default)]
pub struct Books {
    records: HashMap<String, Record>,
    /// Deliveries per record id (more than one means a re-delivery).
    deliveries: HashMap<String, u64>,
    /// Records received in accepted batches, re-deliveries included.
    delivered: u64,
    /// Record ids delivered again with another amount, window or aggregation: a broken
    /// contract (an upserting Processor would overwrite one with the other).
    conflicts: Vec<(Record, Record)>,
}

/// The running Processor's shared state.
pub struct Processor {
    books: Mutex<Books>,
    faults: Mutex<Faults>,
    batches_seen: AtomicU64,
    batches_accepted: AtomicU64,
    journal: Option<Mutex<std::fs::File>>,
    /// Where records are kept when there is a database (the books stay empty then).
    db: Option<postgres::PgStore>,
    metrics: metrics::Metrics,
}

/// Totals as `GET /totals` reports them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub records: usize,
    pub deliveries: u64,
    /// Record ids delivered more than once.
    pub redelivered: usize,
    pub batches_accepted: u64,
    pub batches_seen: u64,
    /// Per (tenant, sku, unit) and aggregation, combined over windows ([`combine`]).
    pub totals: Vec<KeyTotal>,
    /// Per window start, the `sum` records summed over keys (canonical decimal text).
    pub windows: BTreeMap<String, String>,
    /// Per window, key and aggregation: the window's records (amendments included) combined.
    #[serde(default)]
    pub window_totals: Vec<KeyTotal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyTotal {
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    /// Exact.
    #[serde(with = "crate::money::number")]
    pub used_amount: Dec,
    /// The window (Unix seconds) for totals per window and key; absent for totals per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<u64>,
    /// A meter's aggregation (`count`, `max`, `min`, `latest`); absent for `sum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<String>,
}

impl KeyTotal {
    /// A key's total for `aggregation` (`sum` is carried as `None`).
    pub fn new(key: (String, String, String), aggregation: &str, used_amount: Dec) -> Self {
        let (tenant_id, product_sku, use_unit) = key;
        KeyTotal {
            tenant_id,
            product_sku,
            use_unit,
            used_amount,
            window_start: None,
            aggregation: combine::label(aggregation),
        }
    }

    /// The aggregation's name (`sum` when absent).
    pub fn aggregation(&self) -> &str {
        combine::aggregation_of(self.aggregation.as_deref())
    }
}

/// Unix seconds of an RFC 3339 window start (0 when it does not parse).
fn unix_secs(t: &str) -> u64 {
    humantime::parse_rfc3339_weak(t)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

impl Processor {
    pub fn new(faults: Faults, journal: Option<std::path::PathBuf>) -> std::io::Result<Arc<Self>> {
        let journal = match journal {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            None => None,
        };
        Ok(Arc::new(Processor {
            books: Mutex::new(Books::default()),
            faults: Mutex::new(faults),
            batches_seen: AtomicU64::new(0),
            batches_accepted: AtomicU64::new(0),
            journal,
            db: None,
            metrics: metrics::Metrics::default(),
        }))
    }

    /// A Processor that keeps its records in PostgreSQL (migrated already).
    pub fn with_database(
        faults: Faults,
        journal: Option<std::path::PathBuf>,
        db: postgres::PgStore,
    ) -> std::io::Result<Arc<Self>> {
        let mut p = Self::new(faults, journal)?;
        Arc::get_mut(&mut p).expect("not shared yet").db = Some(db);
        Ok(p)
    }

    /// Replaces the fault settings (tests turn an outage off this way).
    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }

    /// Every stored record.
    pub fn records(&self) -> Vec<Record> {
        let mut v: Vec<Record> = self
            .books
            .lock()
            .unwrap()
            .records
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.window_start, &a.record_id).cmp(&(&b.window_start, &b.record_id)));
        v
    }

    /// Record ids delivered twice with different contents (first, then second).
    pub fn conflicts(&self) -> Vec<(Record, Record)> {
        self.books.lock().unwrap().conflicts.clone()
    }

    /// Removes every record of one key (to prove `verify` notices).
    pub fn remove_key(&self, tenant: &str, sku: &str, unit: &str) -> usize {
        let mut b = self.books.lock().unwrap();
        let before = b.records.len();
        b.records
            .retain(|_, r| !(r.tenant_id == tenant && r.product_sku == sku && r.use_unit == unit));
        before - b.records.len()
    }

    /// The stored records combined per key and aggregation ([`combine`]): over all windows,
    /// and per window.
    pub fn totals(&self) -> Totals {
        type Agg = (String, String, String, String);
        let b = self.books.lock().unwrap();
        let mut per_key: BTreeMap<Agg, Combined> = BTreeMap::new();
        let mut per_window: BTreeMap<(u64, Agg), Combined> = BTreeMap::new();
        let mut windows: BTreeMap<String, Dec> = BTreeMap::new();
        for r in b.records.values() {
            let start = unix_secs(&r.window_start);
            let agg = combine::aggregation_of(r.aggregation.as_deref());
            let key = (
                r.tenant_id.clone(),
                r.product_sku.clone(),
                r.use_unit.clone(),
                agg.to_string(),
            );
            let add = |c: &mut Combined| {
                c.add(
                    agg,
                    &r.used_amount,
                    r.latest_at.as_deref(),
                    start,
                    r.amends.unwrap_or(0),
                )
            };
            add(per_window.entry((start, key.clone())).or_default());
            add(per_key.entry(key).or_default());
            if agg == "sum" {
                *windows.entry(r.window_start.clone()).or_default() += &r.used_amount;
            }
        }
        let total = |(t, s, u, a): Agg, c: Combined| KeyTotal::new((t, s, u), &a, c.value());
        Totals {
            records: b.records.len(),
            deliveries: b.delivered,
            redelivered: b.deliveries.values().filter(|&&n| n > 1).count(),
            batches_accepted: self.batches_accepted.load(Ordering::Relaxed),
            batches_seen: self.batches_seen.load(Ordering::Relaxed),
            totals: per_key.into_iter().map(|(k, c)| total(k, c)).collect(),
            windows: windows
                .into_iter()
                .map(|(w, a)| (w, crate::money::canonical(&a)))
                .collect(),
            window_totals: per_window
                .into_iter()
                .map(|((w, k), c)| KeyTotal {
                    window_start: Some(w),
                    ..total(k, c)
                })
                .collect(),
        }
    }

    fn accept(&self, records: Vec<Record>, raw: &[u8]) {
        {
            let mut b = self.books.lock().unwrap();
            b.delivered += records.len() as u64;
            self.metrics
                .records
                .with_label_values(&["inserted"])
                .inc_by(records.len() as u64);
            for r in records {
                *b.deliveries.entry(r.record_id.clone()).or_default() += 1;
                if let Some(old) = b.records.get(&r.record_id)
                    && (old.used_amount != r.used_amount
                        || old.window_start != r.window_start
                        || old.window_end != r.window_end
                        || old.aggregation != r.aggregation
                        || old.amends != r.amends
                        || old.final_at != r.final_at)
                {
                    let old = old.clone();
                    b.conflicts.push((old, r.clone()));
                }
                b.records.insert(r.record_id.clone(), r);
            }
        }
        self.metrics.batches.with_label_values(&["stored"]).inc();
        self.journal(raw);
    }

    /// Appends an accepted batch to the journal, if there is one.
    fn journal(&self, raw: &[u8]) {
        self.batches_accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            let mut f = j.lock().unwrap();
            let _ = f.write_all(raw);
            let _ = f.write_all(b"\n");
        }
    }
}

fn status(code: u16, msg: &str, retry_after: Option<u64>) -> Response {
    let mut r = (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(serde_json::json!({"error": msg})),
    )
        .into_response();
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert("retry-after", s.to_string().parse().expect("digits"));
    }
    r
}

async fn batches(State(p): State<Arc<Processor>>, headers: HeaderMap, body: Bytes) -> Response {
    let n = p.batches_seen.fetch_add(1, Ordering::Relaxed);
    let f = p.faults.lock().unwrap().clone();
    if let Some(d) = f.latency {
        tokio::time::sleep(d).await;
    }
    if let Some(t) = &f.token {
        let ok = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {t}"));
        if !ok {
            return status(401, "missing or wrong token", None);
        }
    }
    if headers.get("idempotency-key").is_none() {
        return status(400, "Idempotency-Key header is required", None);
    }
    let records: Vec<Record> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return status(400, &format!("bad batch: {e}"), None),
    };
    if let Some(r) = records.iter().find(|r| {
        r.used_amount_text
            .as_deref()
            .is_some_and(|t| crate::money::parse(t).as_ref() != Some(&r.used_amount))
    }) {
        return status(
            400,
            &format!(
                "record {}: used_amount_text differs from used_amount",
                r.record_id
            ),
            None,
        );
    }
    let fail =
        n < f.fail_first || (f.error_rate > 0.0 && rand::rng().random_bool(f.error_rate.min(1.0)));
    if fail {
        return status(f.fail_status, "failing on purpose", f.retry_after);
    }
    if let Some(refusal) = refuse_tenant(&f, &records) {
        return refusal;
    }
    let answer = match &p.db {
        Some(db) => store_in_database(&p, db, records, &body, f.hold_commit).await,
        None => {
            let count = records.len();
            p.accept(records, &body);
            (StatusCode::OK, Json(serde_json::json!({"accepted": count}))).into_response()
        }
    };
    if answer.status().is_success()
        && f.drop_rate > 0.0
        && rand::rng().random_bool(f.drop_rate.min(1.0))
    {
        // Stored, but the answer is lost: the connection task ends without a response.
        panic!("{DROP_MARKER}");
    }
    answer
}

/// `--reject-tenant`: the refusal of a batch holding that tenant, worded as `--reject-style`.
fn refuse_tenant(f: &Faults, records: &[Record]) -> Option<Response> {
    let t = f.reject_tenant.as_ref()?;
    if !records.iter().any(|r| &r.tenant_id == t) {
        return None;
    }
    let reason = format!("tenant {t} is not billable");
    let named = |ids: Vec<String>| {
        let rejected: Vec<_> = ids
            .into_iter()
            .map(|id| serde_json::json!({"record_id": id, "reason": reason}))
            .collect();
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({"rejected": rejected})),
        )
            .into_response()
    };
    Some(match f.reject_style {
        RejectStyle::Named => named(
            records
                .iter()
                .filter(|r| &r.tenant_id == t)
                .map(|r| r.record_id.clone())
                .collect(),
        ),
        RejectStyle::Foreign => named(vec!["not-a-record-of-this-batch".into()]),
        RejectStyle::Plain => status(422, &reason, None),
    })
}

/// Stores a batch in the database: 2xx once committed; the records it cannot take are named in
/// a 422 (the rest is committed, so the ingestor's re-send of it is a no-op); 503 when the
/// database cannot be reached (the ingestor keeps the records and retries).
async fn store_in_database(
    p: &Processor,
    db: &postgres::PgStore,
    records: Vec<Record>,
    raw: &[u8],
    hold: Option<Duration>,
) -> Response {
    let mut invalid = Vec::new();
    let records: Vec<Record> = records
        .into_iter()
        .filter(|r| match postgres::invalid(r) {
            Some(reason) => {
                invalid.push((r.record_id.clone(), reason));
                false
            }
            None => true,
        })
        .collect();
    let timer = p.metrics.transaction.start_timer();
    let stored = match db.store(&records, hold).await {
        Ok(s) => s,
        Err(e) => {
            timer.stop_and_discard();
            p.metrics.batches.with_label_values(&["failed"]).inc();
            tracing::warn!(error = %e, records = records.len(), "batch not stored; the ingestor retries it");
            return status(503, "database unavailable; retry", Some(1));
        }
    };
    timer.observe_duration();
    let m = &p.metrics;
    m.records
        .with_label_values(&["inserted"])
        .inc_by(stored.inserted);
    m.records
        .with_label_values(&["duplicate"])
        .inc_by(stored.duplicates);
    let refused: Vec<_> = [("conflict", stored.refused), ("invalid", invalid)]
        .into_iter()
        .flat_map(|(kind, list)| list.into_iter().map(move |(id, why)| (kind, id, why)))
        .collect();
    if refused.is_empty() {
        m.batches.with_label_values(&["stored"]).inc();
        p.journal(raw);
        let body = serde_json::json!({"accepted": records.len(), "inserted": stored.inserted});
        return (StatusCode::OK, Json(body)).into_response();
    }
    m.batches.with_label_values(&["refused"]).inc();
    let named: Vec<_> = refused
        .into_iter()
        .map(|(kind, record_id, reason)| {
            m.records.with_label_values(&["refused"]).inc();
            m.refused.with_label_values(&[kind]).inc();
            tracing::error!(%record_id, %reason, "record refused, the stored one is kept");
            serde_json::json!({"record_id": record_id, "reason": reason})
        })
        .collect();
    let body = serde_json::json!({"rejected": named});
    (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
}

/// `GET /usage`: a billing period of one tenant.
#[derive(Deserialize)]
struct UsageQuery {
    tenant_id: String,
    /// First day, `YYYY-MM-DD`, local time of `tz`.
    from: String,
    /// The day after the last one (exclusive).
    to: String,
    /// An IANA time zone (`America/Sao_Paulo`); UTC when absent.
    #[serde(default = "utc")]
    tz: String,
}

fn utc() -> String {
    "UTC".into()
}

/// What a tenant owes over `[from, to)` local time of `tz`, per (sku, unit, aggregation), the
/// amounts as exact decimal text (`billing_usage` in the database).
async fn usage(
    State(p): State<Arc<Processor>>,
    axum::extract::Query(q): axum::extract::Query<UsageQuery>,
) -> Response {
    let Some(db) = &p.db else {
        return status(404, "GET /usage needs a database (DATABASE_URL)", None);
    };
    match db.usage(&q.tenant_id, &q.from, &q.to, &q.tz).await {
        Ok(lines) => Json(serde_json::json!({
            "tenant_id": q.tenant_id, "from": q.from, "to": q.to, "tz": q.tz, "usage": lines,
        }))
        .into_response(),
        // Class 22, data exception: a date or time zone that does not parse.
        Err(postgres::StoreError::Db(e))
            if e.code().is_some_and(|c| c.code().starts_with("22")) =>
        {
            let detail = e.as_db_error().map(|d| d.message().to_string());
            status(400, &detail.unwrap_or_else(|| e.to_string()), None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "usage query failed");
            status(503, "database unavailable; retry", Some(1))
        }
    }
}

/// Ready when the database answers (always, in memory).
async fn readyz(State(p): State<Arc<Processor>>) -> Response {
    match &p.db {
        Some(db) if !db.ready().await => status(503, "database does not answer", None),
        _ => "ok".into_response(),
    }
}

async fn metrics_text(State(p): State<Arc<Processor>>) -> String {
    p.metrics.render()
}

/// The panic message that means "drop this connection on purpose"; the binary's panic hook
/// keeps it quiet.
pub const DROP_MARKER: &str = "reference processor drops this connection on purpose";

async fn totals(State(p): State<Arc<Processor>>) -> Response {
    if p.db.is_some() {
        let msg =
            "the records are in PostgreSQL: GET /usage, or pulse-producer verify --database-url";
        return status(404, msg, None);
    }
    Json(p.totals()).into_response()
}

/// Counters only — cheap enough to poll while a large drain is running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub records: usize,
    pub deliveries: u64,
    pub batches_accepted: u64,
    pub batches_seen: u64,
}

impl Processor {
    pub fn stats(&self) -> Stats {
        let b = self.books.lock().unwrap();
        Stats {
            records: b.records.len(),
            deliveries: b.delivered,
            batches_accepted: self.batches_accepted.load(Ordering::Relaxed),
            batches_seen: self.batches_seen.load(Ordering::Relaxed),
        }
    }
}

async fn stats(State(p): State<Arc<Processor>>) -> Json<Stats> {
    Json(p.stats())
}

async fn records(State(p): State<Arc<Processor>>) -> Json<Vec<Record>> {
    Json(p.records())
}

#[derive(Deserialize)]
struct RemoveKey {
    tenant_id: String,
    product_sku: String,
    use_unit: String,
}

async fn remove(
    State(p): State<Arc<Processor>>,
    Json(k): Json<RemoveKey>,
) -> Json<serde_json::Value> {
    let removed = p.remove_key(&k.tenant_id, &k.product_sku, &k.use_unit);
    Json(serde_json::json!({"removed": removed}))
}

/// The Processor's routes.
pub fn router(p: Arc<Processor>) -> axum::Router {
    axum::Router::new()
        .route("/", post(batches))
        .route("/batches", post(batches))
        .route("/totals", get(totals))
        .route("/stats", get(stats))
        .route("/records", get(records))
        .route("/admin/remove", post(remove))
        .route("/usage", get(usage))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(p)
}

/// Binds and serves in the background; returns the address.
pub async fn spawn(p: Arc<Processor>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(p)).await;
    });
    Ok(local)
}

/// Silences the deliberate connection-dropping panics; other panics print as usual.
pub fn quiet_drop_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !msg.contains(DROP_MARKER) {
            default(info);
        }
    }));
}
