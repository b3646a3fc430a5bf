//! Operator routes under `/admin`, guarded by `ADMIN_TOKEN` (bearer) when it is set.

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;

/// Whether the request carries `Authorization: Bearer <ADMIN_TOKEN>` (false when no token is
/// configured). Constant-time: the token must not leak through timing.
pub(super) fn has_admin_token(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.cfg.security.admin_token else {
        return false;
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(subtle::ConstantTimeEq::ct_eq(
        given.as_bytes(),
        expected.as_bytes(),
    ))
}

/// The `route_layer` of every `/admin` route: with `ADMIN_TOKEN` set, the bearer token must
/// match (401 otherwise); without one, only loopback clients are answered (403 otherwise) —
/// the service listens on every interface by default, and its admin routes move money.
pub(super) async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.cfg.security.admin_token.is_none() {
        let loopback = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .is_some_and(|c| c.0.ip().is_loopback());
        if loopback {
            next.run(req).await
        } else {
            ApiError::Forbidden(
                "admin routes answer loopback clients only while ADMIN_TOKEN is not set".into(),
            )
            .into_response()
        }
    } else if has_admin_token(&state, req.headers()) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// `POST /admin/flush`: seal an ended window now and drain every ended window without waiting
/// for the stabilisation delay. The current window is never cut short.
#[utoipa::path(
    post, path = "/admin/flush", tag = "admin",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "What was sealed and delivered", body = super::Report),
        super::error::AdminErrors,
    )
)]
pub async fn flush(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (seal, report) = state.scheduler.flush_now(&state.shutdown).await?;
    Ok((StatusCode::OK, Json(json!({"seal": seal, "drain": report}))).into_response())
}

/// `GET /admin/pending`: pending windows with their record counts and ages, and dead letters.
#[utoipa::path(
    get, path = "/admin/pending", tag = "admin",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Pending windows and dead letters", body = super::Report),
        super::error::AdminErrors,
    )
)]
pub async fn pending(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut conn = state.store.conn().await?;
    let now = state.store.time(&mut conn).await?;
    let status = state.scheduler.pending_status(now).await?;
    let records: u64 = status.windows.iter().map(|w| w.records).sum();
    let dead: u64 = status.dead_letters.iter().map(|w| w.records).sum();
    Ok((
        StatusCode::OK,
        Json(json!({
            "redis_time": now,
            "pending_windows": status.windows.len(),
            "pending_records": records,
            "dead_letter_records": dead,
            "windows": status.windows,
            "dead_letters": status.dead_letters,
        })),
    )
        .into_response())
}

/// Which dead letter to replay; none: all of them.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReplayQuery {
    /// Replay only this record (its `record_id` in `GET /admin/dead-letters`).
    #[param(min_length = 1, max_length = 64)]
    record_id: Option<String>,
}

/// `POST /admin/dead-letters/replay`: moves dead-lettered records back into their windows for
/// another delivery (after the Processor was fixed) — all of them, or one (`?record_id=`).
#[utoipa::path(
    post, path = "/admin/dead-letters/replay", tag = "admin",
    params(ReplayQuery),
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Records moved back for delivery", body = super::Report),
        super::error::DeadLetterErrors,
    )
)]
pub async fn replay(
    State(state): State<AppState>,
    Query(q): Query<ReplayQuery>,
) -> Result<Response, ApiError> {
    let store = &state.store;
    if let Some(id) = q.record_id {
        let Some(d) = store.find_dead_letter(&id).await? else {
            return Err(ApiError::NotFound(format!(
                "no dead letter with record_id {id:?}"
            )));
        };
        let Some(moved) = state.scheduler.drainer.replay_record(&d).await? else {
            return Err(ApiError::Unavailable(format!(
                "shard {} is being drained; retry",
                d.shard
            )));
        };
        return Ok((StatusCode::OK, Json(json!({"replayed_records": moved}))).into_response());
    }
    let mut moved = 0u64;
    let mut busy = Vec::new();
    // Every shard that may hold dead letters — those of an earlier, larger SHARDS too — and
    // each under its drain lock, so no drain finishes a window while records come back.
    let shards = store.shards_to_drain().await?;
    for shard in 0..shards {
        match state.scheduler.drainer.replay_shard(shard).await? {
            Some(n) => moved += n,
            None => busy.push(shard),
        }
    }
    if !busy.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "replayed {moved} records; shards {busy:?} are being drained, retry to replay them"
        )));
    }
    Ok((StatusCode::OK, Json(json!({"replayed_records": moved}))).into_response())
}

/// A request to set one dead letter aside for good.
#[derive(serde::Deserialize, utoipa::ToSchema)]
pub struct SetAside {
    /// The record (its `record_id` in `GET /admin/dead-letters`).
    #[schema(min_length = 1, max_length = 64)]
    record_id: String,
    /// Who sets it aside (kept in the audit trail).
    #[schema(min_length = 1, max_length = 256)]
    operator: String,
    /// Why (kept in the audit trail).
    #[schema(min_length = 1, max_length = 1024)]
    reason: String,
}

/// `POST /admin/dead-letters/set-aside`: removes one dead-lettered record for good — the only
/// way a record leaves without a delivery — leaving an audit entry (who, when, why, the exact
/// amount) in Redis and in the log. Always requires `ADMIN_TOKEN` (401 without it, saying so
/// when none is configured).
#[utoipa::path(
    post, path = "/admin/dead-letters/set-aside", tag = "admin",
    request_body(content = SetAside, content_type = "application/json"),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The record set aside, with its audit entry", body = super::Report),
        super::error::DeadLetterErrors,
    )
)]
pub async fn set_aside(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // Never without a token: with ADMIN_TOKEN unset, nobody may set a record aside.
    if state.cfg.security.admin_token.is_none() {
        return Err(ApiError::AdminTokenNotConfigured);
    }
    if !has_admin_token(&state, &headers) {
        return Err(ApiError::Unauthorized);
    }
    let req: SetAside = serde_json::from_slice(&body).map_err(|e| {
        ApiError::Malformed(format!("expected {{record_id, operator, reason}}: {e}"))
    })?;
    let blank = |s: &str| s.trim().is_empty();
    if blank(&req.operator)
        || blank(&req.reason)
        || req.operator.len() > 256
        || req.reason.len() > 1024
    {
        return Err(ApiError::Invalid(vec![crate::pulse::FieldError {
            index: None,
            field: "operator".into(),
            message: "operator (at most 256 bytes) and reason (at most 1024) are required".into(),
        }]));
    }
    let Some(d) = state.store.find_dead_letter(&req.record_id).await? else {
        return Err(ApiError::NotFound(format!(
            "no dead letter with record_id {:?}",
            req.record_id
        )));
    };
    let key = crate::store::keys::decode_field(d.field.as_bytes());
    let amount = crate::store::dead_letter_total(&d.value);
    let entry = json!({
        "operator": req.operator,
        "reason": req.reason,
        "record_id": d.record_id,
        "shard": d.shard,
        "window_start": d.window.start,
        "window_end": d.window.end,
        "tenant_id": key.as_ref().map(|k| &k.tenant),
        "product_sku": key.as_ref().map(|k| &k.sku),
        "use_unit": key.as_ref().map(|k| &k.unit),
        "used_amount_text": amount,
    });
    if state.store.set_aside(&d, &entry).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "record {:?} is no longer dead-lettered (replayed or set aside meanwhile)",
            req.record_id
        )));
    }
    state.metrics.dead_letters_set_aside.inc();
    tracing::warn!(
        operator = %req.operator,
        reason = %req.reason,
        record_id = %d.record_id,
        window_start = d.window.start,
        tenant = ?key.as_ref().map(|k| &k.tenant),
        amount = ?amount,
        "dead letter set aside for good"
    );
    Ok((StatusCode::OK, Json(json!({"set_aside": entry}))).into_response())
}

/// `GET /admin/dead-letters/set-aside`: the audit trail of records set aside, newest first per
/// shard (up to 1,000 per shard).
#[utoipa::path(
    get, path = "/admin/dead-letters/set-aside", tag = "admin",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Audit entries: who, when, why, the record and its exact amount", body = super::Report),
        super::error::AdminErrors,
    )
)]
pub async fn set_aside_log(State(state): State<AppState>) -> Result<Response, ApiError> {
    let entries = state.store.set_aside_log(1000).await?;
    let list: Vec<Box<serde_json::value::RawValue>> = entries
        .into_iter()
        .filter_map(|e| serde_json::value::RawValue::from_string(e).ok())
        .collect();
    Ok((StatusCode::OK, Json(json!({"set_aside": list}))).into_response())
}

/// `GET /admin/rejections`: the most recent refused requests (status, reason, tenant, time),
/// newest first — what an operator needs to tell a team why its pulses bounce.
#[utoipa::path(
    get, path = "/admin/rejections", tag = "admin",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Recent refused requests, newest first", body = super::Report),
        super::error::AdminErrors,
    )
)]
pub async fn rejections(State(state): State<AppState>) -> Result<Response, ApiError> {
    let entries = state.store.recent_rejections(100).await?;
    let list: Vec<_> = entries
        .into_iter()
        .map(|(id, fields)| {
            let mut o = serde_json::Map::new();
            // Stream ids start with the time in milliseconds.
            o.insert(
                "time_ms".into(),
                json!(id.split('-').next().and_then(|t| t.parse::<u64>().ok())),
            );
            for (k, v) in fields {
                o.insert(k, json!(v));
            }
            serde_json::Value::Object(o)
        })
        .collect();
    Ok((StatusCode::OK, Json(json!({"rejections": list}))).into_response())
}

/// `GET /admin/dead-letters`: dead-lettered records with their amounts and the Processor's
/// reason (up to 1,000 per window).
#[utoipa::path(
    get, path = "/admin/dead-letters", tag = "admin",
    security((), ("admin_token" = [])),
    responses(
        (status = 200, description = "Dead-lettered records with their exact amounts and reasons", body = super::Report),
        super::error::AdminErrors,
    )
)]
pub async fn dead_letters(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = &state.store;
    let mut conn = store.conn().await?;
    let mut out = Vec::new();
    let shards = store.shards_to_drain().await?;
    for shard in 0..shards {
        for w in store.dead_windows(&mut conn, shard).await? {
            for d in store.dead_letters_of(&mut conn, shard, &w, 1000).await? {
                let key = crate::store::keys::decode_field(d.field.as_bytes());
                let amount = crate::store::dead_letter_total(&d.value);
                let value: serde_json::Value =
                    serde_json::from_str(&d.value).unwrap_or(json!(d.value));
                out.push(DeadLetter {
                    shard,
                    window_start: w.start,
                    record_id: d.record_id,
                    tenant_id: key.as_ref().map(|k| k.tenant.clone()),
                    product_sku: key.as_ref().map(|k| k.sku.clone()),
                    use_unit: key.as_ref().map(|k| k.unit.clone()),
                    aggregation: key.as_ref().map(|k| k.aggregation.clone()),
                    amends: (w.amendment > 0).then_some(w.amendment),
                    used_amount: amount.as_deref().map(crate::processor::ExactNumber::new),
                    used_amount_text: amount,
                    reason: value["reason"].clone(),
                });
            }
        }
    }
    Ok((StatusCode::OK, Json(DeadLetters { records: out })).into_response())
}

/// `GET /admin/dead-letters` body. Typed rather than a `json!` value, so amounts stay exact.
#[derive(serde::Serialize)]
struct DeadLetters {
    records: Vec<DeadLetter>,
}

#[derive(serde::Serialize)]
struct DeadLetter {
    shard: u32,
    window_start: u64,
    /// The record's id at the Processor: what replay and set-aside take.
    record_id: String,
    tenant_id: Option<String>,
    product_sku: Option<String>,
    use_unit: Option<String>,
    /// `sum`, or a meter's `count`, `max`, `min`, `latest`: a key's aggregations are records
    /// of their own, each possibly dead-lettered.
    aggregation: Option<String>,
    /// The amendment the record belongs to, if not the window itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    amends: Option<u32>,
    /// Exact: a JSON number in canonical decimal form.
    used_amount: Option<crate::processor::ExactNumber>,
    /// The same amount as text.
    used_amount_text: Option<String>,
    reason: serde_json::Value,
}
