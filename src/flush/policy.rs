//! The delivery policy, in one place: what each answer of the Processor means ([`classify`] —
//! the Processor contract, `docs/processor-openapi.json`, is generated from its annotation),
//! how long to wait before a retry ([`backoff`]), which refusals may be about single records
//! ([`may_be_per_record`], narrowed within [`ISOLATION_BUDGET`] extra POSTs) and how a refusal
//! names them ([`named_rejections`]). `deliver.rs` carries it out.
//!
//! 2xx from the URL itself: delivered. Connection errors, timeouts, 3xx, 401/403 (credentials
//! being rotated), 408, 429 and 5xx: retryable (`Retry-After` is honoured, capped); the records
//! stay in Redis. 404 and 405, and a DNS or TLS failure, say the endpoint is wrong, not the
//! records: retried too (reason `endpoint`, never dead-lettered), counted in
//! `ingestor_processor_endpoint_errors_total` and shown on `/readyz` and the page. Any other
//! status: a permanent refusal, whose records are dead-lettered (invariant 5). A Processor
//! that already holds a `record_id` should answer 2xx (upsert).

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::processor::{Record, Reply};

/// Extra POSTs one batch may spend finding the records a Processor refuses without naming
/// them: enough to isolate a few bad records in a batch of 500 (about 2·log2(n) each).
pub const ISOLATION_BUDGET: u32 = 64;

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

/// How much of an answer's body is read: all of a refusal (bounded), a little of the rest.
pub fn body_limit(status: u16) -> usize {
    if is_permanent(status) {
        MAX_REJECTION_BODY
    } else {
        512
    }
}

/// What the Processor's answer to a batch means. The Processor contract is generated from this
/// annotation, beside the code that decides.
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
        (status = 404, description = "No such endpoint: PROCESSOR_URL looks wrong. Retried with backoff, never dead-lettered (as a DNS or TLS failure); counted in ingestor_processor_endpoint_errors_total and shown on /readyz and /ui"),
        (status = 405, description = "As 404: the URL does not take POST"),
        (status = 408, description = "Retried with backoff"),
        (status = 409, description = "Permanent refusal, treated as 422. Answer 2xx for a duplicate instead"),
        (status = 422, description = "Permanent refusal of some records. Name them with a Rejected body: those are dead-lettered with your reasons and the rest of the batch is POSTed again as a batch of its own. An unstructured 400/409/422 (or one naming ids not in the batch) is narrowed down by halving the batch, within 64 extra POSTs; both halves refused alike means the whole batch is refused. Any other permanent status (410, 413...) dead-letters the whole batch. Dead letters are kept and replayable record by record", body = Rejected),
        (status = 429, description = "Retried after Retry-After (capped by DELIVERY_MAX_BACKOFF)",
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Any 5xx (or no answer, or a 3xx, which is never followed): retried with capped exponential backoff; the records stay in Redis"),
    )
)]
pub fn classify(reply: Reply) -> Result<(), ProcessorError> {
    let (code, retry_after, location, body) = match reply {
        Reply::NoAnswer { reason, detail } if matches!(reason, "dns" | "tls") => {
            return Err(ProcessorError::Retryable {
                reason: ENDPOINT,
                detail: format!("the Processor URL looks wrong ({reason} failure): {detail}"),
                retry_after: None,
            });
        }
        Reply::NoAnswer { reason, detail } => {
            return Err(ProcessorError::Retryable {
                reason,
                detail,
                retry_after: None,
            });
        }
        Reply::Answered { status, .. } if (200..300).contains(&status) => return Ok(()),
        Reply::Answered {
            status,
            retry_after,
            location,
            body,
        } => (status, retry_after, location, body),
    };
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
        // The URL is wrong, not the records: they wait for it to be fixed.
        404 | 405 => Err(ProcessorError::Retryable {
            reason: ENDPOINT,
            detail: format!(
                "the Processor URL looks wrong: it answered {code} (no such endpoint for POST); check PROCESSOR_URL's path"
            ),
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

/// The retry reason of an answer that says the endpoint is wrong (404, 405, DNS, TLS).
pub const ENDPOINT: &str = "endpoint";

/// What the start-up probe of the URL (a GET; a Processor takes POST only) says: `Err` when
/// the URL looks wrong (no such host, TLS, 404/410), `Ok(Some)` when nothing answers yet (a
/// Processor not up: deliveries are retried), `Ok(None)` when something answers there.
pub fn probe_verdict(reply: Reply) -> Result<Option<String>, String> {
    match reply {
        Reply::NoAnswer { reason, detail } if matches!(reason, "dns" | "tls") => Err(format!(
            "the Processor URL looks wrong ({reason} failure): {detail}"
        )),
        Reply::NoAnswer { detail, .. } => {
            Ok(Some(format!("the Processor does not answer yet: {detail}")))
        }
        Reply::Answered { status, .. } if matches!(status, 404 | 410) => Err(format!(
            "the Processor URL looks wrong: a GET of it answered {status} (no such path); check PROCESSOR_URL's path"
        )),
        Reply::Answered { .. } => Ok(None),
    }
}

/// How much of a refusal's body is read: enough for a `{"rejected": [...]}` naming every record
/// of a large batch.
pub const MAX_REJECTION_BODY: usize = 1 << 20;

/// Whether a status is a permanent refusal (see [`classify`]).
fn is_permanent(code: u16) -> bool {
    !matches!(code, 200..=399 | 401 | 403 | 404 | 405 | 408 | 429 | 500..=599)
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
/// 413, 410...) is about the batch and dead-letters it whole.
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

    fn answered(status: u16) -> Reply {
        Reply::Answered {
            status,
            retry_after: None,
            location: None,
            body: "Not Found".into(),
        }
    }

    #[test]
    fn a_wrong_endpoint_is_retried_never_dead_lettered() {
        for status in [404, 405] {
            match classify(answered(status)) {
                Err(ProcessorError::Retryable { reason, detail, .. }) => {
                    assert_eq!(reason, ENDPOINT);
                    assert!(detail.contains("looks wrong"), "{detail}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        for reason in ["dns", "tls"] {
            let r = classify(Reply::NoAnswer {
                reason,
                detail: "x".into(),
            });
            assert!(
                matches!(
                    r,
                    Err(ProcessorError::Retryable {
                        reason: ENDPOINT,
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        assert!(matches!(
            classify(answered(410)),
            Err(ProcessorError::Rejected { status: 410, .. })
        ));
    }

    #[test]
    fn the_start_probe_tells_a_wrong_path_from_a_processor_not_up() {
        assert!(probe_verdict(answered(404)).is_err());
        assert_eq!(probe_verdict(answered(405)), Ok(None));
        assert!(matches!(
            probe_verdict(Reply::NoAnswer {
                reason: "connect",
                detail: "refused".into()
            }),
            Ok(Some(_))
        ));
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
