//! `GET /v1/usage` (what a tenant has used so far, exact, live), `GET /v1/status` (this
//! replica's window, queue and counters) and `GET /ui`, the page that shows them.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use crate::amount::Amount;
use crate::processor::{ExactNumber, rfc3339};
use crate::store::usage::{UsageFilter, WindowState};

/// Query parameters of `GET /v1/usage`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// The tenant.
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    tenant_id: String,
    /// Only this SKU.
    product_sku: Option<String>,
    /// Only this unit.
    use_unit: Option<String>,
    /// Only the window starting at this unix second.
    window: Option<u64>,
}

/// A tenant's usage.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Usage {
    tenant_id: String,
    /// Redis time when it was read (unix seconds): everything acknowledged before is in it.
    redis_time: u64,
    /// The windows holding the tenant's usage, oldest first: the live one and each sealed one
    /// not yet delivered.
    windows: Vec<UsageWindow>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageWindow {
    /// Unix seconds.
    window_start: u64,
    window_end: u64,
    /// Present for an amendment of the window: late pulses counted after its delivery began
    /// (delivered as its own records with `amends`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    amends: Option<u32>,
    #[schema(format = DateTime)]
    window_start_rfc3339: String,
    /// When the window becomes final (RFC 3339): no pulse is counted in it after this; its
    /// records carry the same `final_at`.
    #[schema(format = DateTime)]
    final_at: String,
    state: WindowState,
    usage: Vec<KeyUsage>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyUsage {
    product_sku: String,
    use_unit: String,
    /// `sum`, or a meter's `count`, `max`, `min`, `latest`.
    aggregation: String,
    /// Exact total, a JSON number in canonical decimal form.
    #[schema(value_type = f64)]
    used_amount: ExactNumber,
    used_amount_text: String,
    /// Part of it the Processor refused (dead-lettered), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_lettered_text: Option<String>,
}

/// Tenant keys read their own tenant only; a trusted (`*`) key or the admin token reads any.
fn authorise(state: &AppState, headers: &HeaderMap, tenant: &str) -> Result<(), ApiError> {
    let Some(keys) = &state.api_keys else {
        return Ok(());
    };
    if super::admin::has_admin_token(state, headers) {
        return Ok(());
    }
    let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) else {
        return Err(ApiError::NoApiKey("X-API-Key header is required"));
    };
    let set = keys.get();
    match set.lookup(key) {
        None => Err(ApiError::NoApiKey("unknown API key")),
        Some((crate::tenancy::Grant::Tenant(t), _)) if t != tenant => Err(ApiError::Forbidden(
            format!("this API key may not read tenant {tenant:?}"),
        )),
        Some(_) => Ok(()),
    }
}

/// What a tenant has used so far.
///
/// The live window's exact totals (every pulse acknowledged before the query is in them) and
/// each sealed window not yet delivered, with its state. Reads the tenant's own keys only.
#[utoipa::path(
    get, path = "/v1/usage", tag = "usage",
    params(UsageQuery),
    security((), ("api_key" = []), ("admin_token" = [])),
    responses(
        (status = 200, description = "The tenant's usage (empty windows list when none)", body = Usage),
        (status = 400, description = "A parameter is malformed", body = super::error::ErrorBody),
        (status = 401, description = "API keys on: X-API-Key missing or unknown", body = super::error::ErrorBody),
        (status = 403, description = "The key may not read this tenant", body = super::error::ErrorBody),
        (status = 422, description = "tenant_id is empty or too long", body = super::error::ErrorBody),
        (status = 503, description = "Redis unavailable", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Malformed(e.body_text()))?;
    if q.tenant_id.is_empty()
        || q.tenant_id.chars().count() > state.cfg.limits.max_field_len
        || q.tenant_id.chars().any(char::is_control)
    {
        return Err(ApiError::Invalid(vec![crate::pulse::FieldError {
            index: None,
            field: "tenant_id".into(),
            message: format!(
                "must be 1 to {} characters without control characters",
                state.cfg.limits.max_field_len
            ),
        }]));
    }
    authorise(&state, &headers, &q.tenant_id)?;
    let filter = UsageFilter {
        sku: q.product_sku,
        unit: q.use_unit,
        window: q.window,
    };
    let stabilisation = state.cfg.stabilisation_delay.as_secs();
    let u = state
        .store
        .usage_of(&q.tenant_id, &filter, stabilisation)
        .await?;
    let limits = {
        let shard = crate::store::keys::shard_of(&q.tenant_id, state.store.shards);
        let mut conn = state.store.conn().await?;
        state.store.late_limits(&mut conn, shard).await?
    };
    let windows = u
        .windows
        .into_iter()
        .map(|w| UsageWindow {
            window_start: w.start,
            window_end: w.end,
            amends: (w.amendment > 0).then_some(w.amendment),
            window_start_rfc3339: rfc3339(w.start),
            final_at: rfc3339(limits.final_at(w.end)),
            state: w.state,
            usage: w
                .keys
                .into_iter()
                .map(
                    |((product_sku, use_unit, aggregation), (amount, dead))| KeyUsage {
                        product_sku,
                        use_unit,
                        aggregation,
                        used_amount: ExactNumber::new(&amount.to_string()),
                        used_amount_text: amount.to_string(),
                        dead_lettered_text: (dead > Amount::ZERO).then(|| dead.to_string()),
                    },
                )
                .collect(),
        })
        .filter(|w| !w.usage.is_empty())
        .collect();
    Ok((
        StatusCode::OK,
        Json(Usage {
            tenant_id: q.tenant_id,
            redis_time: u.redis_now,
            windows,
        }),
    )
        .into_response())
}

/// The operator and tenant page: one self-contained HTML file that calls the API above.
#[utoipa::path(
    get, path = "/ui", tag = "usage",
    responses((status = 200, description = "The page", content_type = "text/html", body = String))
)]
pub async fn ui() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("ui.html"),
    )
        .into_response()
}
