//! `POST /ingest`, `POST /ingest/batch` and `POST /ingest/batch/partial`: decode, check, queue,
//! and (durable) answer once committed.

mod answer;
mod checks;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

pub use answer::Accepted;
use answer::{Counted, Shape, refusal};
use checks::{
    authorise, body, decode_error, format, idempotency_key, rate_limit, timestamp_errors,
};

use super::error::{ApiError, IngestErrors};
use super::{AppState, RequestStart};
use crate::ingest::{CommitError, Refused, SubmitError};
use crate::pulse::Pulse;
use crate::store::LateRefusal;

/// Queues the pulses and, in durable mode, waits for their commit.
async fn submit(
    state: &AppState,
    started: Option<RequestStart>,
    pulses: Vec<Pulse>,
    shape: &Shape,
) -> Result<Response, ApiError> {
    let n = pulses.len();
    state.metrics.pulses_received.inc_by(n as u64);
    if let Some(why) = state.health.failure() {
        // Never acknowledge a pulse this replica could not deliver.
        return Err(ApiError::Unavailable(format!(
            "this replica is stopping ({why}); retry on another"
        )));
    }
    let unavailable = ApiError::Unavailable;
    let rx = state
        .ingest
        .submit(pulses, shape.detail())
        .map_err(|e| match e {
            SubmitError::Full => unavailable("ingest queue is full; retry later".into()),
            SubmitError::Closed => unavailable("shutting down; retry on another replica".into()),
        })?;
    let Some(rx) = rx else {
        return Ok(Accepted::queued(n).into_response());
    };
    // Answer before the request timeout would: once queued, a pulse may be committed, and a
    // 408 would tell the client it was not. A little before the deadline we answer the
    // ambiguous 503 instead; a job whose client is gone by the time a worker takes it is
    // dropped uncounted (see `ingest::worker`).
    let timeout = state.cfg.limits.request_timeout;
    let margin = (timeout / 10).min(std::time::Duration::from_secs(1));
    let deadline =
        started.map_or_else(tokio::time::Instant::now, |s| s.0.into()) + timeout - margin;
    let Ok(answer) = tokio::time::timeout_at(deadline, rx).await else {
        return Err(ApiError::Ambiguous(
            "the request timed out while its pulses were being committed; they may have been counted: retry with the same pulse_id or Idempotency-Key to count them exactly once".into(),
        ));
    };
    match answer {
        Ok(answer) => committed(state, shape, answer),
        Err(_) => Err(unavailable("shutting down; retry later".into())),
    }
}

/// Counts a stamped pulse the write script refused, by why.
fn count_late_refusal(state: &AppState, why: LateRefusal) {
    let label = match why {
        LateRefusal::Closed => "window_closed",
        LateRefusal::TooOld => "too_old",
        LateRefusal::OlderThanDedupe => "older_than_dedupe",
    };
    state
        .metrics
        .timestamps_refused
        .with_label_values(&[label])
        .inc();
}

/// The answer to a durable request, from its commit's outcome.
fn committed(
    state: &AppState,
    shape: &Shape,
    answer: Result<crate::ingest::Outcome, CommitError>,
) -> Result<Response, ApiError> {
    // The request's i-th pulse as the answer names it.
    let field_error = |i: usize, field: &str, message: String| crate::pulse::FieldError {
        index: shape.is_batch().then(|| shape.original(i)),
        field: field.into(),
        message,
    };
    match answer {
        Ok(o) => {
            for (_, r) in &o.refused {
                if let Refused::Late(why) = r {
                    count_late_refusal(state, *why);
                }
            }
            if !o.stamped_windows.is_empty() {
                let m = &state.metrics.late_pulses;
                m.with_label_values(&["sealed_window"]).inc_by(o.late_joined as u64);
                m.with_label_values(&["amendment"]).inc_by(o.amended as u64);
                m.with_label_values(&["ahead"]).inc_by(o.ahead as u64);
            }
            Ok(Accepted::committed(&o, shape).into_response())
        }
        Err(CommitError::Unavailable(_)) => Err(ApiError::Unavailable(
            "storage unavailable; nothing was counted, retry later".into(),
        )),
        Err(CommitError::Closed { items }) => {
            for (_, why) in &items {
                count_late_refusal(state, *why);
            }
            Err(ApiError::Invalid(
                items
                    .into_iter()
                    .map(|(i, why)| {
                        let (f, m) = refusal(Refused::Late(why), Counted::Nothing);
                        field_error(i, f, m)
                    })
                    .collect(),
            ))
        }
        Err(CommitError::Overflow { items }) => Err(ApiError::Invalid(
            items
                .into_iter()
                .map(|i| {
                    let (f, m) = refusal(Refused::Overflow, Counted::Nothing);
                    field_error(i, f, m)
                })
                .collect(),
        )),
        Err(CommitError::Partial(_)) => Err(ApiError::Ambiguous(
            "storage failed part-way or could not confirm the write; the pulses may have been counted: retry with the same pulse_id or Idempotency-Key to count them exactly once".into(),
        )),
    }
}

/// One pulse.
///
/// Durable mode answers 202 after the pulse is committed to Redis, exactly once.
#[utoipa::path(
    post, path = "/ingest", tag = "ingest",
    request_body(content = Pulse, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The pulse's id, when the body has no pulse_id", min_length = 1, max_length = 256, pattern = "^[\\x20-\\x7E]+$"),
    ),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "Counted (or recognised as a re-send)", body = Accepted),
        IngestErrors,
    )
)]
pub async fn one(
    State(state): State<AppState>,
    started: Option<Extension<RequestStart>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    accept(&state, started.map(|e| e.0), &headers, raw, Shape::One).await
}

/// What `POST /ingest/batch` answers.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// `items`: the answer lists every item: counted or a re-send, and its window.
    #[param(pattern = "^items$")]
    detail: Option<String>,
}

/// Many pulses, all or nothing.
///
/// A JSON array or NDJSON (one object per line). One bad item rejects the batch, with every bad
/// index listed. With `Idempotency-Key`, item i without its own pulse_id gets an id derived
/// from the key and i, so a retried batch counts once. `?detail=items` answers per item.
#[utoipa::path(
    post, path = "/ingest/batch", tag = "ingest",
    request_body(content(
        (crate::pulse::Batch = "application/json"),
        (String = "application/x-ndjson"),
    )),
    params(
        BatchQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "The batch's id: item ids derive from it", min_length = 1, max_length = 256, pattern = "^[\\x20-\\x7E]+$"),
    ),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "Counted (re-sends recognised)", body = Accepted),
        IngestErrors,
    )
)]
pub async fn batch(
    State(state): State<AppState>,
    started: Option<Extension<RequestStart>>,
    q: Result<Query<BatchQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::Malformed(e.body_text()))?;
    let detail = match q.detail.as_deref() {
        None => false,
        Some("items") => true,
        Some(other) => {
            return Err(ApiError::Invalid(vec![crate::pulse::FieldError {
                index: None,
                field: "detail".into(),
                message: format!("must be items, got {other:?}"),
            }]));
        }
    };
    let shape = Shape::Batch {
        detail,
        index: Vec::new(),
    };
    accept(&state, started.map(|e| e.0), &headers, raw, shape).await
}

/// Many pulses, item by item: the valid ones counted in one atomic step, the others refused.
///
/// The body of `/ingest/batch`, but an item that is not a valid pulse (or whose timestamp is
/// out of range) is refused on its own, named in `items` with its errors, and the valid ones are
/// counted together — all of them or none, as one request. The answer lists every item:
/// `counted`, `duplicate` or `refused` (with no valid item: 202, nothing counted, every item
/// refused). With `Idempotency-Key`,
/// item ids derive from the key and the item's index in the body, so a retry counts once.
#[utoipa::path(
    post, path = "/ingest/batch/partial", tag = "ingest",
    request_body(content(
        (crate::pulse::AnyBatch = "application/json"),
        (String = "application/x-ndjson"),
    )),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The batch's id: item ids derive from it", min_length = 1, max_length = 256, pattern = "^[\\x20-\\x7E]+$"),
    ),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "The valid items counted (re-sends recognised), every item's fate listed", body = Accepted),
        IngestErrors,
    )
)]
pub async fn partial(
    State(state): State<AppState>,
    started: Option<Extension<RequestStart>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let shape = Shape::Partial {
        index: Vec::new(),
        refused: Vec::new(),
    };
    accept(&state, started.map(|e| e.0), &headers, raw, shape).await
}

/// The request's pulses, decoded and validated as its shape says (recording in the shape
/// where each came from and, for a partial batch, what was refused). Timestamps out of range
/// refuse the request, or — partial batch — their items; a partial batch may come back empty.
fn decode(
    state: &AppState,
    raw: &[u8],
    fmt: crate::pulse::BodyFormat,
    key: Option<&str>,
    shape: &mut Shape,
) -> Result<Vec<Pulse>, ApiError> {
    // A batch can never be larger than the queue it must fit into.
    let max = state
        .cfg
        .limits
        .max_batch_items
        .min(state.ingest.capacity());
    let decoder = &state.decoder;
    let pulses = match shape {
        Shape::One => vec![
            decoder
                .decode_one(raw, key)
                .map_err(|e| decode_error(state, e))?,
        ],
        Shape::Batch { index, .. } => {
            let pulses = decoder
                .decode_batch(raw, fmt, key, max)
                .map_err(|e| decode_error(state, e))?;
            *index = (0..pulses.len()).collect();
            pulses
        }
        Shape::Partial { index, refused } => {
            let (valid, errors) = decoder
                .decode_items(raw, fmt, key, max)
                .map_err(|e| decode_error(state, e))?;
            return Ok(in_range(state, valid, errors, index, refused));
        }
    };
    let errors = timestamp_errors(state, &pulses);
    if errors.is_empty() {
        return Ok(pulses);
    }
    let batch = shape.is_batch();
    Err(ApiError::Invalid(
        errors
            .into_iter()
            .map(|e| crate::pulse::FieldError {
                index: e.index.filter(|_| batch),
                ..e
            })
            .collect(),
    ))
}

/// A partial batch's valid items whose timestamps are in range (their body indexes into
/// `index`); the others' problems into `refused`.
fn in_range(
    state: &AppState,
    valid: Vec<(usize, Pulse)>,
    mut errors: Vec<crate::pulse::FieldError>,
    index: &mut Vec<usize>,
    refused: &mut Vec<crate::pulse::FieldError>,
) -> Vec<Pulse> {
    let (idx, pulses): (Vec<usize>, Vec<Pulse>) = valid.into_iter().unzip();
    let stamps = timestamp_errors(state, &pulses);
    let bad: std::collections::HashSet<usize> = stamps.iter().filter_map(|e| e.index).collect();
    errors.extend(stamps.into_iter().map(|e| crate::pulse::FieldError {
        index: e.index.map(|i| idx[i]),
        ..e
    }));
    let (kept_idx, kept): (Vec<usize>, Vec<Pulse>) = idx
        .into_iter()
        .zip(pulses)
        .enumerate()
        .filter(|(i, _)| !bad.contains(i))
        .map(|(_, p)| p)
        .unzip();
    *index = kept_idx;
    *refused = errors;
    kept
}

/// Every ingest route: decode and validate, check the key and the tenants' limits, then
/// queue and (durable) wait for the commit.
async fn accept(
    state: &AppState,
    started: Option<RequestStart>,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let body = raw.as_ref().ok().cloned();
    match count(state, started, headers, raw, shape).await {
        Ok(r) => Ok(r),
        Err(e) => {
            // The rejections stream names the tenant the request named, also when the
            // refusal is about another field (a 422 on the amount, a 413).
            let mut resp = e.into_response();
            if let Some(r) = resp.extensions_mut().get_mut::<super::error::Rejection>()
                && r.tenant.is_empty()
            {
                r.tenant = body.as_deref().map(named_tenants).unwrap_or_default();
            }
            Ok(resp)
        }
    }
}

/// The tenants a request body names (`tenant_id` of the object, or of a batch's items: at
/// most a few, comma-separated), as far as it parses: for the rejections stream.
fn named_tenants(body: &[u8]) -> String {
    let items: Vec<serde_json::Value> = match serde_json::from_slice(body) {
        Ok(serde_json::Value::Array(a)) => a,
        Ok(v) => vec![v],
        Err(_) => body
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect(),
    };
    let mut names: Vec<&str> = Vec::new();
    for t in items.iter().filter_map(|i| i.get("tenant_id")?.as_str()) {
        if !t.is_empty() && !names.contains(&t) {
            names.push(t);
        }
    }
    let more = names.len() > 3;
    let mut s: String = names.iter().take(3).copied().collect::<Vec<_>>().join(",");
    if more {
        s.push_str(",…");
    }
    s.chars().take(300).collect()
}

/// Decodes, authorises, rate-limits and counts one request.
async fn count(
    state: &AppState,
    started: Option<RequestStart>,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
    mut shape: Shape,
) -> Result<Response, ApiError> {
    let fmt = format(headers, &shape)?;
    let raw = body(raw)?;
    let key = idempotency_key(state, headers)?;
    let pulses = decode(state, &raw, fmt, key, &mut shape)?;
    if pulses.is_empty() {
        // A partial batch with no valid item: nothing to count, every item answered refused.
        return Ok(Accepted::committed(&crate::ingest::Outcome::default(), &shape).into_response());
    }
    authorise(state, headers, &pulses)?;
    let taken = rate_limit(state, &pulses)?;
    let answer = submit(state, started, pulses, &shape).await;
    // A request refused with nothing counted spends none of its tenants' tokens.
    if let (Err(e), Some(taken), Some(limits)) = (&answer, taken, &state.rate_limits)
        && e.nothing_counted()
    {
        limits.refund(taken);
    }
    answer
}
