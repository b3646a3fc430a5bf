//! The downstream Processor: the record format and the HTTP client. A batch is a JSON array of
//! [`Record`]s POSTed with an `Idempotency-Key` derived from its record ids; redirects are never
//! followed (invariant 14). What each answer means — retry, refusal, delivered — is the
//! delivery policy's (`flush/policy.rs`), where the Processor contract is generated.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use utoipa::ToSchema;

/// A record as the Processor receives it (the first four fields are those the earlier Go
/// ingestor posted). Its schema in the Processor contract is derived from this type.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Record {
    pub tenant_id: String,
    pub product_sku: String,
    /// The window's exact total for the key, a JSON number in canonical decimal form (no
    /// exponent, no trailing zeros): parse it as a decimal to read it without loss.
    pub used_amount: ExactNumber,
    /// The same total as a string, for clients whose JSON parser reads numbers as doubles.
    #[schema(pattern = r"^\d+(\.\d+)?$")]
    pub used_amount_text: String,
    pub use_unit: String,
    /// Stable id of (window, shard, tenant, sku, unit, amendment): a re-delivery carries the
    /// same id. Upsert by it.
    pub record_id: String,
    /// RFC 3339, UTC.
    #[schema(format = DateTime)]
    pub window_start: String,
    #[schema(format = DateTime)]
    pub window_end: String,
    /// `sum`, or a meter's `count`, `max`, `min`, `latest`: each aggregation of a key is a
    /// record of its own.
    pub aggregation: String,
    /// For `latest`: when its value was measured (RFC 3339, ms); of a key's records for one
    /// window, the one with the latest `latest_at` holds the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub latest_at: Option<String>,
    /// Present on an amendment: late pulses of this window counted after its delivery began,
    /// the n-th such record of the key (n = 1, 2, …; the window's own record has none). How a
    /// window's records of one key and aggregation combine: `sum` and `count` add up; `max`
    /// and `min` take the largest or smallest; `latest` takes the value of the record with the
    /// greatest `latest_at` (equal times: the highest `amends`, which was counted later). Book
    /// an amendment as an adjustment if the period's invoice is final.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub amends: Option<u32>,
    /// When the window becomes final (RFC 3339, UTC): no pulse is counted in it after this
    /// moment, so every record it will ever have (its own and its amendments) holds pulses
    /// counted before it. Amendments still pending at that moment are delivered within one
    /// window plus `STABILISATION_DELAY` after it. A billing period can be closed once every
    /// window in it is past `final_at` and delivered. The same for every record of a window.
    #[schema(format = DateTime)]
    pub final_at: String,
}

/// Decimal text written into JSON as a number, verbatim — never through a float.
#[derive(Debug, Clone)]
pub struct ExactNumber(Box<serde_json::value::RawValue>);

impl PartialEq for ExactNumber {
    fn eq(&self, o: &Self) -> bool {
        self.as_str() == o.as_str()
    }
}

impl ExactNumber {
    /// `text` is canonical decimal text from [`crate::amount`]: a valid JSON number.
    pub fn new(text: &str) -> Self {
        ExactNumber(
            serde_json::value::RawValue::from_string(text.to_string())
                .expect("canonical decimal text is a JSON number"),
        )
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

/// In the contract: a non-negative JSON number.
impl utoipa::PartialSchema for ExactNumber {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Number)
            .minimum(Some(0.0))
            .into()
    }
}

impl ToSchema for ExactNumber {}

impl Serialize for ExactNumber {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Formats unix seconds as RFC 3339 UTC (`2026-11-22T10:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .to_string()
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-11-22T10:00:00.250Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

/// The Processor client.
#[derive(Clone)]
pub struct ProcessorClient {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    /// What the deliveries through this client last saw (shown to operators).
    health: std::sync::Arc<crate::delivery_health::DeliveryHealth>,
}

impl ProcessorClient {
    pub fn new(
        url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        // reqwest is built without a default crypto provider (aws-lc needs cmake and minutes of
        // build); ring is installed once, here. A second install is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64)
            // Only a 2xx from this URL is a delivery (invariant 14): following a redirect would
            // turn the POST into a bodiless GET whose 200 deletes undelivered records.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(ProcessorClient {
            http,
            url: url.to_string(),
            token,
            health: std::sync::Arc::new(crate::delivery_health::DeliveryHealth::new(url)),
        })
    }

    /// Whether delivery works, as this replica last saw it.
    pub fn health(&self) -> &crate::delivery_health::DeliveryHealth {
        &self.health
    }

    /// The configured URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A GET of the URL at start-up, to tell an operator early when it looks wrong: nothing
    /// answers there (DNS, TLS, connection), or 404/410 (no such path). A Processor takes POST
    /// only, so a 405 (or any other answer) says the path exists.
    pub async fn probe(&self) -> Reply {
        match self.http.get(&self.url).send().await {
            Ok(r) => Reply::Answered {
                status: r.status().as_u16(),
                retry_after: None,
                location: None,
                body: String::new(),
            },
            Err(e) => no_answer(&e),
        }
    }

    /// POSTs one serialised batch; reads at most `body_limit(status)` bytes of an answer
    /// that is not a 2xx. What the answer means is the delivery policy's call
    /// (`flush::policy::classify`).
    pub async fn send(
        &self,
        batch_id: &str,
        body: bytes::Bytes,
        body_limit: fn(u16) -> usize,
    ) -> Reply {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", batch_id)
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return no_answer(&e),
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            // Read the body so the connection is reused; a failure here is a dropped
            // connection after a 2xx, which still means "accepted".
            let _ = resp.bytes().await;
            return Reply::Answered {
                status,
                retry_after: None,
                location: None,
                body: String::new(),
            };
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let location = header("location");
        Reply::Answered {
            status,
            retry_after,
            location,
            body: read_bounded(resp, body_limit(status)).await,
        }
    }
}

/// What came back from one POST.
#[derive(Debug)]
pub enum Reply {
    /// An HTTP answer (redirects are not followed).
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        location: Option<String>,
        /// The body of a non-2xx answer, as much as was read.
        body: String,
    },
    /// No answer: a timeout, a refused connection, a broken transfer.
    NoAnswer {
        /// Low-cardinality reason, used as a metric label.
        reason: &'static str,
        detail: String,
    },
}

/// Why a request got no answer: `dns` or `tls` (the endpoint is wrong), `timeout`, `connect`,
/// `transport`; the detail is the whole error chain.
fn no_answer(e: &reqwest::Error) -> Reply {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    let lower = detail.to_lowercase();
    let reason = if lower.contains("dns error") || lower.contains("failed to lookup address") {
        "dns"
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        "tls"
    } else if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    };
    Reply::NoAnswer { reason, detail }
}

/// The body as text, at most `limit` bytes of it (the rest is not read).
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < limit {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c[..c.len().min(limit - buf.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_times_are_rfc3339() {
        assert_eq!(rfc3339(1_795_341_600), "2026-11-22T10:00:00Z");
    }
}
