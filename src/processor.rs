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
use serde::Serialize;

/// One aggregated record, as the Processor receives it. The first four fields are those the
/// earlier Go ingestor posted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub tenant_id: String,
    pub product_sku: String,
    /// The exact total as a JSON number in canonical decimal form (no exponent, no trailing
    /// zeros): a Processor that parses numbers as decimals reads it without loss.
    pub used_amount: ExactNumber,
    /// The same total as a string, for clients whose JSON parser reads numbers as doubles.
    pub used_amount_text: String,
    pub use_unit: String,
    /// Stable identity of `(window_start, tenant, sku, unit[, amendment])`: a re-delivery
    /// carries the same id.
    pub record_id: String,
    /// RFC 3339, UTC.
    pub window_start: String,
    pub window_end: String,
    /// How the key's pulses were aggregated over the window: `sum` (the default), or a
    /// meter's `count`, `max`, `min`, `latest` (see README "Meters").
    pub aggregation: String,
    /// For `latest`: the event time of the value (RFC 3339, ms), to combine it with the
    /// window's other records of the key (the latest wins).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_at: Option<String>,
    /// Set on an amendment: late pulses of this window counted after its delivery began, the
    /// n-th such record of the key. Add it to the window's total (a Processor whose invoice for
    /// the period is final books it as an adjustment).
    #[serde(skip_serializing_if = "Option::is_none")]
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

/// The records a refusal names: `{"rejected": [{"record_id": "...", "reason": ...}, ...]}`
/// (the Processor contract). `None` for any other body.
pub fn named_rejections(body: &str) -> Option<Vec<(String, serde_json::Value)>> {
    #[derive(serde::Deserialize)]
    struct Named {
        rejected: Vec<One>,
    }
    #[derive(serde::Deserialize)]
    struct One {
        record_id: String,
        #[serde(default)]
        reason: serde_json::Value,
    }
    let named: Named = serde_json::from_str(body).ok()?;
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
