//! The checks an ingest request passes before its pulses are queued: content type, body size,
//! `Idempotency-Key`, decoding errors, the API key, timestamps and the tenants' rate limits.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};

use super::super::AppState;
use super::super::error::ApiError;
use super::answer::Shape;
use crate::pulse::{BodyFormat, DecodeError, Pulse};

/// A missing content type is read as JSON, as the earlier service's clients did not always set
/// one; anything else that is not JSON (or NDJSON for batches) is refused.
pub(super) fn format(headers: &HeaderMap, shape: &Shape) -> Result<BodyFormat, ApiError> {
    let allow_ndjson = shape.is_batch();
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
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
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" if allow_ndjson => {
            Ok(BodyFormat::Ndjson)
        }
        _ => Err(ApiError::UnsupportedMediaType(if allow_ndjson {
            "content type must be application/json or application/x-ndjson".into()
        } else {
            "content type must be application/json".into()
        })),
    }
}

pub(super) fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge("request body is larger than the limit".into())
        } else {
            ApiError::Malformed(r.body_text())
        }
    })
}

pub(super) fn idempotency_key<'h>(
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
        .decoder
        .idempotency_key(key)
        .map_err(|e| ApiError::Invalid(vec![e]))?;
    Ok(Some(key))
}

pub(super) fn decode_error(state: &AppState, e: DecodeError) -> ApiError {
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
pub(super) fn authorise(
    state: &AppState,
    headers: &HeaderMap,
    pulses: &[Pulse],
) -> Result<(), ApiError> {
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
/// `DEDUPE_TTL` less `MAX_FUTURE_SKEW` of now: a re-send of a pulse stamped earlier could
/// arrive after its id is forgotten. Any pulse outside refuses the whole request (422), each named.
pub(super) fn timestamp_errors(
    state: &AppState,
    pulses: &[Pulse],
) -> Vec<crate::pulse::FieldError> {
    if pulses.iter().all(|p| p.timestamp_ms.is_none()) {
        return Vec::new();
    }
    let now = state.store.redis_now_ms();
    let ms = |d: std::time::Duration| d.as_millis() as i64;
    let oldest = now - ms(state.cfg.late_max_age);
    let newest = now + ms(state.cfg.max_future_skew);
    // A pulse's marker lives DEDUPE_TTL from its first arrival, which may have been up to
    // MAX_FUTURE_SKEW before its time: a re-send is recognised if it comes within DEDUPE_TTL
    // less the skew of the pulse's time (the write script checks the same by the deployment's
    // recorded settings).
    let id_window = state
        .cfg
        .dedupe_ttl
        .saturating_sub(state.cfg.max_future_skew);
    let oldest_with_id = now - ms(id_window);
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
                    "of a pulse with an id must be within DEDUPE_TTL less MAX_FUTURE_SKEW ({}) of now (from {}): a re-send could not be recognised",
                    humantime::format_duration(id_window),
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
pub(super) fn rate_limit(
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
