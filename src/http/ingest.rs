//! `POST /ingest` and `POST /ingest/batch`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::{AppState, RequestStart, openapi};
use crate::ingest::{CommitError, SubmitError};
use crate::pulse::{DecodeError, Pulse};

/// Which body format a request declared.
#[derive(PartialEq)]
enum Format {
    Json,
    Ndjson,
}

/// A missing content type is read as JSON, as the earlier service's clients did not always set
/// one; anything else that is not JSON (or NDJSON for batches) is refused.
fn format(headers: &HeaderMap, allow_ndjson: bool) -> Result<Format, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Format::Json);
    };
    let ct = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match ct.as_str() {
        "application/json" => Ok(Format::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" if allow_ndjson => {
            Ok(Format::Ndjson)
        }
        _ => Err(ApiError::UnsupportedMediaType(if allow_ndjson {
            "content type must be application/json or application/x-ndjson".into()
        } else {
            "content type must be application/json".into()
        })),
    }
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge("request body is larger than the limit".into())
        } else {
            ApiError::Malformed(r.body_text())
        }
    })
}

fn idempotency_key<'h>(
    state: &AppState,
    headers: &'h HeaderMap,
) -> Result<Option<&'h str>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().map_err(|_| {
        ApiError::Invalid(vec![crate::pulse::FieldError {
            index: None,
            field: "Idempotency-Key".into(),
            message: "must be visible ASCII".into(),
        }])
    })?;
    state
        .limits
        .idempotency_key(key)
        .map_err(|e| ApiError::Invalid(vec![e]))?;
    Ok(Some(key))
}

fn decode_error(state: &AppState, e: DecodeError) -> ApiError {
    match e {
        DecodeError::Malformed(m) => ApiError::Malformed(m),
        DecodeError::Invalid(errs) => {
            state.metrics.pulses.with_label_values(&["rejected"]).inc();
            ApiError::Invalid(errs)
        }
        DecodeError::TooManyItems { max } => {
            ApiError::TooLarge(format!("a batch holds at most {max} pulses"))
        }
    }
}

/// With API keys on: the request's key must be known (401) and allowed every pulse's tenant
/// (403). The key itself is never logged.
fn authorise(state: &AppState, headers: &HeaderMap, pulses: &[Pulse]) -> Result<(), ApiError> {
    let Some(keys) = &state.api_keys else {
        return Ok(());
    };
    let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) else {
        return Err(ApiError::NoApiKey("X-API-Key header is required"));
    };
    let set = keys.get();
    let Some((grant, label)) = set.lookup(key) else {
        return Err(ApiError::NoApiKey("unknown API key"));
    };
    if let crate::tenancy::Grant::Tenant(t) = grant
        && let Some(other) = pulses.iter().find(|p| &p.tenant_id != t)
    {
        tracing::info!(key = label, tenant = %other.tenant_id, "pulse for another tenant refused");
        return Err(ApiError::Forbidden(format!(
            "this API key may not send pulses for tenant {:?}",
            other.tenant_id
        )));
    }
    Ok(())
}

/// Takes each tenant's pulses from its bucket; the first tenant over its limit answers 429.
/// Stamped pulses must fall in `[now - LATE_MAX_AGE, now + MAX_FUTURE_SKEW]` by the Redis clock
/// (as last seen: seconds of error do not matter for these bounds), and one with an id within
/// `DEDUPE_TTL` of now: a re-send of a pulse stamped earlier could arrive after its id is
/// forgotten. Any pulse outside refuses the whole request (422), each named.
fn timestamp_errors(state: &AppState, pulses: &[Pulse]) -> Vec<crate::pulse::FieldError> {
    if pulses.iter().all(|p| p.timestamp_ms.is_none()) {
        return Vec::new();
    }
    let now = state.store.redis_now_ms();
    let ms = |d: std::time::Duration| d.as_millis() as i64;
    let oldest = now - ms(state.cfg.late_max_age);
    let newest = now + ms(state.cfg.max_future_skew);
    let oldest_with_id = now - ms(state.cfg.dedupe_ttl);
    let rfc = |t: i64| crate::processor::rfc3339((t.max(0) / 1000) as u64);
    let mut errors = Vec::new();
    for (i, p) in pulses.iter().enumerate() {
        let Some(t) = p.timestamp_ms else { continue };
        let (reason, message) = if t < oldest {
            (
                "too_old",
                format!(
                    "is older than LATE_MAX_AGE ({}): accepted from {} to {}",
                    humantime::format_duration(state.cfg.late_max_age),
                    rfc(oldest),
                    rfc(newest)
                ),
            )
        } else if t > newest {
            (
                "too_far_ahead",
                format!(
                    "is further ahead than MAX_FUTURE_SKEW ({}): accepted from {} to {}",
                    humantime::format_duration(state.cfg.max_future_skew),
                    rfc(oldest),
                    rfc(newest)
                ),
            )
        } else if p.pulse_id.is_some() && t < oldest_with_id {
            (
                "older_than_dedupe",
                format!(
                    "of a pulse with an id must be within DEDUPE_TTL ({}) of now (from {}): a re-send could not be recognised",
                    humantime::format_duration(state.cfg.dedupe_ttl),
                    rfc(oldest_with_id)
                ),
            )
        } else {
            continue;
        };
        state
            .metrics
            .timestamps_refused
            .with_label_values(&[reason])
            .inc();
        errors.push(crate::pulse::FieldError {
            index: Some(i),
            field: "timestamp".into(),
            message,
        });
    }
    errors
}

/// Takes the request's pulses from its tenants' buckets: all or none.
fn rate_limit(
    state: &AppState,
    pulses: &[Pulse],
) -> Result<Option<crate::tenancy::Taken>, ApiError> {
    let Some(limits) = &state.rate_limits else {
        return Ok(None);
    };
    // A batch may hold thousands of pulses over thousands of tenants: count in a map.
    let mut per_tenant: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for p in pulses {
        *per_tenant.entry(&p.tenant_id).or_default() += 1;
    }
    let demand: Vec<(&str, u32)> = per_tenant.into_iter().collect();
    match limits.take_all(&demand) {
        Ok(taken) => Ok(Some(taken)),
        Err((i, crate::tenancy::LimitExceeded::Wait(retry_after))) => {
            state
                .metrics
                .pulses
                .with_label_values(&["limited"])
                .inc_by(pulses.len() as u64);
            Err(ApiError::TooManyRequests {
                tenant: demand[i].0.to_string(),
                retry_after,
            })
        }
        Err((i, crate::tenancy::LimitExceeded::TooLarge(max))) => {
            let (tenant, n) = demand[i];
            Err(ApiError::TooLarge(format!(
                "tenant {tenant:?} has {n} pulses in this request, but its rate limit admits at most {max} per request on this replica: split the batch"
            )))
        }
    }
}

/// Queues the pulses and, in durable mode, waits for their commit.
async fn submit(
    state: &AppState,
    started: Option<RequestStart>,
    pulses: Vec<Pulse>,
    shape: &Shape,
) -> Result<Response, ApiError> {
    let batch = !matches!(shape, Shape::One);
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
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"status": "queued", "pulses": n})),
        )
            .into_response());
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
        Ok(Ok(o)) => {
            let mut body = json!({"status": "committed", "accepted": o.accepted, "duplicates": o.duplicates});
            if let (Some(start), false) = (o.window_start, o.windows_mixed) {
                body["window_start"] = json!(start);
            }
            if let Some(items) = shape.items(&o) {
                body["items"] = items;
            }
            if !o.stamped_windows.is_empty() {
                // Stamped pulses: the windows their timestamps placed them in.
                body["windows"] = json!(o.stamped_windows);
                if o.window_start.is_none() && o.stamped_windows.len() == 1 {
                    body["window_start"] = json!(o.stamped_windows.first());
                }
                body["late"] = json!(o.late_joined);
                body["amended"] = json!(o.amended);
                body["ahead"] = json!(o.ahead);
                let m = &state.metrics.late_pulses;
                m.with_label_values(&["sealed_window"]).inc_by(o.late_joined as u64);
                m.with_label_values(&["amendment"]).inc_by(o.amended as u64);
                m.with_label_values(&["ahead"]).inc_by(o.ahead as u64);
            }
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Ok(Err(CommitError::Unavailable(_))) => Err(unavailable("storage unavailable; nothing was counted, retry later".into())),
        Ok(Err(CommitError::Closed { items })) => {
            state
                .metrics
                .timestamps_refused
                .with_label_values(&["window_closed"])
                .inc_by(items.len() as u64);
            Err(ApiError::Invalid(
            items
                .into_iter()
                .map(|i| crate::pulse::FieldError {
                    index: batch.then(|| shape.original(i)),
                    field: "timestamp".into(),
                    message: "window closed: the window this timestamp falls in is already delivered (LATE_PULSES=refuse); nothing of this request was counted".into(),
                })
                .collect(),
        ))
        }
        Ok(Err(CommitError::Overflow { items })) => Err(ApiError::Invalid(
            items
                .into_iter()
                .map(|i| crate::pulse::FieldError {
                    index: batch.then(|| shape.original(i)),
                    field: "used_amount".into(),
                    message: format!(
                        "would take this key's total for the window past {}, the largest exact total; nothing of this request was counted",
                        crate::amount::MAX_TOTAL
                    ),
                })
                .collect(),
        )),
        Ok(Err(CommitError::Partial(_))) => Err(ApiError::Ambiguous(
            "storage failed part-way or could not confirm the write; the pulses may have been counted: retry with the same pulse_id or Idempotency-Key to count them exactly once".into(),
        )),
        Err(_) => Err(unavailable("shutting down; retry later".into())),
    }
}

/// One pulse.
///
/// Durable mode answers 202 after the pulse is committed to Redis, exactly once.
#[utoipa::path(
    post, path = "/ingest", tag = "ingest",
    request_body(content = openapi::Pulse, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The pulse's id, when the body has no pulse_id", min_length = 1, max_length = 256, pattern = "^[\\x20-\\x7E]+$"),
    ),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "Counted (or recognised as a re-send)", body = openapi::Accepted),
        openapi::IngestErrors,
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
        (openapi::Batch = "application/json"),
        (String = "application/x-ndjson"),
    )),
    params(
        BatchQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "The batch's id: item ids derive from it", min_length = 1, max_length = 256, pattern = "^[\\x20-\\x7E]+$"),
    ),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "Counted (re-sends recognised)", body = openapi::Accepted),
        openapi::IngestErrors,
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
        (openapi::AnyBatch = "application/json"),
        (String = "application/x-ndjson"),
    )),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The batch's id: item ids derive from it", min_length = 1, max_length = 256, pattern = "^[\\x20-\\x7E]+$"),
    ),
    security((), ("api_key" = [])),
    responses(
        (status = 202, description = "The valid items counted (re-sends recognised), every item's fate listed", body = openapi::Accepted),
        openapi::IngestErrors,
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

/// What kind of ingest request, and what its answer must say.
#[derive(Debug)]
enum Shape {
    One,
    /// All or nothing; `detail`: answer per item. `index`: each pulse's index in the body.
    Batch {
        detail: bool,
        index: Vec<usize>,
    },
    /// Item by item: `refused` lists the problems of the items not counted.
    Partial {
        index: Vec<usize>,
        refused: Vec<crate::pulse::FieldError>,
    },
}

impl Shape {
    fn detail(&self) -> bool {
        matches!(
            self,
            Shape::Batch { detail: true, .. } | Shape::Partial { .. }
        )
    }

    /// The body index of the request's `i`-th pulse.
    fn original(&self, i: usize) -> usize {
        match self {
            Shape::Batch { index, .. } | Shape::Partial { index, .. } => {
                index.get(i).copied().unwrap_or(i)
            }
            Shape::One => i,
        }
    }

    /// The `items` of the answer, in body order, when asked for.
    fn items(&self, o: &crate::ingest::Outcome) -> Option<serde_json::Value> {
        if !self.detail() {
            return None;
        }
        let mut items: Vec<(usize, serde_json::Value)> = o
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let status = if it.counted { "counted" } else { "duplicate" };
                (
                    self.original(i),
                    json!({"index": self.original(i), "status": status, "window_start": it.window_start}),
                )
            })
            .collect();
        if let Shape::Partial { refused, .. } = self {
            let mut by_index: std::collections::BTreeMap<usize, Vec<serde_json::Value>> =
                Default::default();
            for e in refused {
                by_index
                    .entry(e.index.unwrap_or(0))
                    .or_default()
                    .push(json!({"field": e.field, "message": e.message}));
            }
            for (i, errors) in by_index {
                items.push((
                    i,
                    json!({"index": i, "status": "refused", "errors": errors}),
                ));
            }
        }
        items.sort_by_key(|(i, _)| *i);
        Some(serde_json::Value::Array(
            items.into_iter().map(|(_, v)| v).collect(),
        ))
    }
}

/// Every ingest route: decode and validate, check the key and the tenants' limits, then
/// queue and (durable) wait for the commit.
async fn accept(
    state: &AppState,
    started: Option<RequestStart>,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
    mut shape: Shape,
) -> Result<Response, ApiError> {
    let fmt = format(headers, !matches!(shape, Shape::One))?;
    let raw = body(raw)?;
    let key = idempotency_key(state, headers)?;
    // A batch can never be larger than the queue it must fit into.
    let max = state
        .cfg
        .limits
        .max_batch_items
        .min(state.ingest.capacity());
    let ndjson = fmt == Format::Ndjson;
    let pulses = match &mut shape {
        Shape::One => vec![
            state
                .limits
                .decode_one(&raw, key)
                .map_err(|e| decode_error(state, e))?,
        ],
        Shape::Batch { index, .. } => {
            let pulses = state
                .limits
                .decode_batch(&raw, ndjson, key, max)
                .map_err(|e| decode_error(state, e))?;
            *index = (0..pulses.len()).collect();
            pulses
        }
        Shape::Partial { index, refused } => {
            let (valid, mut errors) = state
                .limits
                .decode_items(&raw, ndjson, key, max)
                .map_err(|e| decode_error(state, e))?;
            let (idx, pulses): (Vec<usize>, Vec<Pulse>) = valid.into_iter().unzip();
            // Timestamps out of range are refused item by item too.
            let stamps = timestamp_errors(state, &pulses);
            let bad: std::collections::HashSet<usize> =
                stamps.iter().filter_map(|e| e.index).collect();
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
            if kept.is_empty() {
                // Nothing to count: every item is answered refused.
                let o = crate::ingest::Outcome::default();
                let body = json!({"status": "committed", "accepted": 0, "duplicates": 0, "items": shape.items(&o)});
                return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
            }
            kept
        }
    };
    if !matches!(shape, Shape::Partial { .. }) {
        let errors = timestamp_errors(state, &pulses);
        if !errors.is_empty() {
            let batch = !matches!(shape, Shape::One);
            return Err(ApiError::Invalid(
                errors
                    .into_iter()
                    .map(|e| crate::pulse::FieldError {
                        index: e.index.filter(|_| batch),
                        ..e
                    })
                    .collect(),
            ));
        }
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
