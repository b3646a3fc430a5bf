//! The downstream Processor: the record format, the HTTP client and the retry policy.
//!
//! A batch is a JSON array of [`Record`]s POSTed with an `Idempotency-Key` derived from its
//! record ids. 2xx from the URL itself: delivered (redirects are never followed, invariant 14).
//! Connection errors, timeouts, 3xx, 401/403 (credentials being rotated), 408, 429 and 5xx:
//! retryable (`Retry-After` is honoured, capped); the records stay in Redis. Any other status:
//! a permanent rejection, whose records are dead-lettered by the drain (invariant 5). A
//! Processor that already holds a `record_id` should answer 2xx (upsert), not 409.

use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
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
    /// the n-th such record of the key. A window's total for a key is the sum of its records;
    /// book an amendment as an adjustment if the period's invoice is final.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub amends: Option<u32>,
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

/// Why a batch was not delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProcessorError {
    /// Worth trying again later; the records stay in Redis.
    #[error("retryable ({reason}): {detail}")]
    Retryable {
        /// Low-cardinality reason, used as a metric label.
        reason: &'static str,
        detail: String,
        /// The Processor's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The Processor refused the batch for good; its records go to dead-letter.
    #[error("rejected with status {status}: {body}")]
    Rejected { status: u16, body: String },
}

/// The Processor client.
#[derive(Clone)]
pub struct ProcessorClient {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
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
        })
    }

    /// POSTs one serialised batch.
    pub async fn send(&self, batch_id: &str, body: bytes::Bytes) -> Result<(), ProcessorError> {
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
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "transport"
                };
                return Err(ProcessorError::Retryable {
                    reason,
                    detail: e.to_string(),
                    retry_after: None,
                });
            }
        };
        answer(resp).await
    }
}

/// What the Processor's answer to a batch means: the Processor contract is generated from this
/// function's annotation, beside the code that reads the answer.
#[utoipa::path(
    post, path = "/", tag = "processor",
    operation_id = "processor_batches", summary = "A batch of aggregated records.",
    description = "Headers: `Content-Type: application/json`, `Idempotency-Key` (derived from the batch's record ids: a re-sent batch carries the same key), `Authorization: Bearer PROCESSOR_TOKEN` when set. Answer 2xx only when the whole batch is stored — also for record ids already held.",
    params(
        ("Idempotency-Key" = String, Header, description = "The batch's id, stable across re-sends"),
        ("Authorization" = Option<String>, Header, description = "Bearer PROCESSOR_TOKEN, when configured"),
    ),
    request_body(content = Vec<Record>, content_type = "application/json"),
    responses(
        (status = 200, description = "Stored (any 2xx): the records are deleted from Redis"),
        (status = 401, description = "Credentials refused (a token being rotated): retried later, counted in ingestor_processor_auth_failures_total"),
        (status = 403, description = "As 401"),
        (status = 408, description = "Retried with backoff"),
        (status = 409, description = "Permanent refusal, treated as 422. Answer 2xx for a duplicate instead"),
        (status = 422, description = "Permanent refusal of some records. Name them with a Rejected body: those are dead-lettered with your reasons and the rest of the batch is POSTed again as a batch of its own. An unstructured 400/409/422 (or one naming ids not in the batch) is narrowed down by halving the batch, within 64 extra POSTs; both halves refused alike means the whole batch is refused. Any other permanent status (404, 410, 413...) dead-letters the whole batch. Dead letters are kept and replayable record by record", body = Rejected),
        (status = 429, description = "Retried after Retry-After (capped by DELIVERY_MAX_BACKOFF)",
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Any 5xx (or no answer, or a 3xx, which is never followed): retried with capped exponential backoff; the records stay in Redis"),
    )
)]
pub(crate) async fn answer(resp: reqwest::Response) -> Result<(), ProcessorError> {
    let status = resp.status();
    if status.is_success() {
        // Read the body so the connection is reused; a failure here is a dropped
        // connection after a 2xx, which still means "accepted".
        let _ = resp.bytes().await;
        return Ok(());
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let code = status.as_u16();
    // A permanent refusal may name the records it refuses: read enough of it for that
    // (bounded); other answers are only logged.
    let limit = if is_permanent(code) {
        MAX_REJECTION_BODY
    } else {
        512
    };
    let body = read_bounded(resp, limit).await;
    let body = if is_permanent(code) {
        body
    } else {
        body.chars().take(512).collect()
    };
    match code {
        300..=399 => Err(ProcessorError::Retryable {
            reason: "status_3xx",
            detail: format!(
                "redirect to {:?} not followed; point PROCESSOR_URL at the final address",
                location.unwrap_or_default()
            ),
            retry_after,
        }),
        // Credentials rejected (a token being rotated): the records wait, and
        // `ingestor_processor_auth_failures_total` alerts someone.
        401 | 403 => Err(ProcessorError::Retryable {
            reason: "status_auth",
            detail: body,
            retry_after,
        }),
        408 => Err(ProcessorError::Retryable {
            reason: "status_408",
            detail: body,
            retry_after,
        }),
        429 => Err(ProcessorError::Retryable {
            reason: "status_429",
            detail: body,
            retry_after,
        }),
        500..=599 => Err(ProcessorError::Retryable {
            reason: "status_5xx",
            detail: body,
            retry_after,
        }),
        _ => Err(ProcessorError::Rejected { status: code, body }),
    }
}

/// How much of a refusal's body is read: enough for a `{"rejected": [...]}` naming every record
/// of a large batch.
pub const MAX_REJECTION_BODY: usize = 1 << 20;

/// Whether a status is a permanent refusal (see [`ProcessorClient::send`]).
fn is_permanent(code: u16) -> bool {
    !matches!(code, 200..=399 | 401 | 403 | 408 | 429 | 500..=599)
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

/// A refusal naming the records it is about (at most 1 MiB of it is read).
#[derive(Deserialize, ToSchema)]
pub struct Rejected {
    rejected: Vec<RejectedRecord>,
}

/// One refused record.
#[derive(Deserialize, ToSchema)]
pub struct RejectedRecord {
    /// A record_id of the refused batch.
    record_id: String,
    /// Why (any JSON value): kept with the dead letter.
    #[serde(default)]
    reason: serde_json::Value,
}

/// The records a refusal names: `{"rejected": [{"record_id": "...", "reason": ...}, ...]}`
/// (the Processor contract). `None` for any other body.
pub fn named_rejections(body: &str) -> Option<Vec<(String, serde_json::Value)>> {
    let named: Rejected = serde_json::from_str(body).ok()?;
    if named.rejected.is_empty() {
        return None;
    }
    Some(
        named
            .rejected
            .into_iter()
            .map(|o| (o.record_id, o.reason))
            .collect(),
    )
}

/// Statuses a Processor may use for a refusal of some records only: an unstructured refusal
/// with one of these is narrowed down by halving the batch. Any other permanent status (a
/// wrong URL's 404, a 413, 410...) is about the batch and dead-letters it whole.
pub fn may_be_per_record(status: u16) -> bool {
    matches!(status, 400 | 409 | 422)
}

/// Capped exponential backoff with jitter: attempt 0 waits about 100 ms, doubling up to `max`;
/// the wait is uniformly drawn from the upper half so that replicas do not retry in step.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(20));
    let cap = base.min(max);
    let half = cap / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn window_times_are_rfc3339() {
        assert_eq!(rfc3339(1_795_341_600), "2026-11-22T10:00:00Z");
    }

    proptest! {
        #[test]
        fn backoff_is_capped_and_grows(attempt in 0u32..64, max_ms in 1u64..120_000) {
            let max = Duration::from_millis(max_ms);
            let d = backoff(attempt, max);
            prop_assert!(d <= max);
            let uncapped = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(20));
            prop_assert!(d >= uncapped.min(max) / 2);
        }
    }
}
