//! `POST /ingest` and `POST /ingest/batch`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
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
fn check_timestamps(state: &AppState, pulses: &[Pulse], batch: bool) -> Result<(), ApiError> {
    if pulses.iter().all(|p| p.timestamp_ms.is_none()) {
        return Ok(());
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
            index: batch.then_some(i),
            field: "timestamp".into(),
            message,
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(errors))
    }
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
    batch: bool,
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
    let rx = state.ingest.submit(pulses).map_err(|e| match e {
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
                    index: batch.then_some(i),
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
                    index: batch.then_some(i),
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
    accept(&state, started.map(|e| e.0), &headers, raw, false).await
}

/// Many pulses, all or nothing.
///
/// A JSON array or NDJSON (one object per line). One bad item rejects the batch, with every bad
/// index listed. With `Idempotency-Key`, item i without its own pulse_id gets an id derived
/// from the key and i, so a retried batch counts once.
#[utoipa::path(
    post, path = "/ingest/batch", tag = "ingest",
    request_body(content(
        (openapi::Batch = "application/json"),
        (String = "application/x-ndjson"),
    )),
    params(
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
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    accept(&state, started.map(|e| e.0), &headers, raw, true).await
}

/// Both routes: decode and validate (one pulse, or a batch), check the key and the tenant's
/// limit, then queue and (durable) wait for the commit.
async fn accept(
    state: &AppState,
    started: Option<RequestStart>,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
    batch: bool,
) -> Result<Response, ApiError> {
    let fmt = format(headers, batch)?;
    let raw = body(raw)?;
    let key = idempotency_key(state, headers)?;
    let pulses = if batch {
        // A batch can never be larger than the queue it must fit into.
        let max = state.cfg.limits.max_batch_items;
        let max = max.min(state.ingest.capacity());
        let ndjson = fmt == Format::Ndjson;
        state.limits.decode_batch(&raw, ndjson, key, max)
    } else {
        state.limits.decode_one(&raw, key).map(|p| vec![p])
    }
    .map_err(|e| decode_error(state, e))?;
    check_timestamps(state, &pulses, batch)?;
    authorise(state, headers, &pulses)?;
    let taken = rate_limit(state, &pulses)?;
    let answer = submit(state, started, pulses, batch).await;
    // A request refused with nothing counted spends none of its tenants' tokens.
    if let (Err(e), Some(taken), Some(limits)) = (&answer, taken, &state.rate_limits)
        && e.nothing_counted()
    {
        limits.refund(taken);
    }
    answer
}
