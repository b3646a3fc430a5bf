//! `ApiError`: every way a request can fail, each mapped to one documented status code.
//! Clients see a message about their input, never internals.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::pulse::FieldError;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the body is not JSON of the expected shape.
    Malformed(String),
    /// 401: admin token missing or wrong.
    Unauthorized,
    /// 401: `X-API-Key` missing or unknown.
    NoApiKey(&'static str),
    /// 403: the key may not send for this tenant.
    Forbidden(String),
    /// 429: over the tenant's rate limit.
    TooManyRequests {
        tenant: String,
        retry_after: Duration,
    },
    /// 413: body or batch too large.
    TooLarge(String),
    /// 415: neither JSON nor NDJSON.
    UnsupportedMediaType(String),
    /// 422: fields are missing or invalid; each is named.
    Invalid(Vec<FieldError>),
    /// 503: queue full, Redis unavailable, or shutting down; retry after the given time.
    Unavailable {
        message: String,
        retry_after: Duration,
    },
}

impl ApiError {
    /// For a refusal of the client's request (4xx): its status, a reason an operator can pass
    /// on to the team, and the tenant when known. Never includes a key.
    pub fn rejection(&self) -> Option<(u16, String, String)> {
        let none = String::new();
        Some(match self {
            ApiError::Malformed(m) => (400, format!("malformed JSON: {m}"), none),
            ApiError::TooLarge(m) => (413, m.clone(), none),
            ApiError::UnsupportedMediaType(m) => (415, m.clone(), none),
            ApiError::Invalid(errs) => (
                422,
                errs.iter()
                    .map(|e| format!("{} {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
                none,
            ),
            ApiError::NoApiKey(m) => (401, m.to_string(), none),
            ApiError::Forbidden(m) => (403, m.clone(), none),
            ApiError::TooManyRequests { tenant, .. } => {
                (429, "rate limit exceeded".into(), tenant.clone())
            }
            ApiError::Unauthorized | ApiError::Unavailable { .. } => return None,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::Malformed(m) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "malformed JSON", "detail": m}),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({"error": "missing or invalid admin token"}),
            ),
            ApiError::NoApiKey(m) => (StatusCode::UNAUTHORIZED, json!({"error": m})),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, json!({"error": m})),
            ApiError::TooManyRequests { tenant, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": format!("rate limit of tenant {tenant:?} exceeded; retry later")}),
            ),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, json!({"error": m})),
            ApiError::UnsupportedMediaType(m) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({"error": m}))
            }
            ApiError::Invalid(errors) => {
                let summary = errors
                    .iter()
                    .map(|e| match e.index {
                        Some(i) => format!("[{i}].{} {}", e.field, e.message),
                        None => format!("{} {}", e.field, e.message),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"error": summary, "fields": errors}),
                )
            }
            ApiError::Unavailable { message, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, json!({"error": message}))
            }
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::Unavailable { retry_after, .. }
        | ApiError::TooManyRequests { retry_after, .. } = self
        {
            // Whole seconds, rounded up: coming back early would only be refused again.
            let secs = retry_after.as_secs_f64().ceil().max(1.0).to_string();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&secs).expect("digits are a valid header"),
            );
        }
        resp
    }
}
