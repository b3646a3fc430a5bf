//! `ApiError`: every way a request can fail, each mapped to one documented status code.
//! Clients see a message about their input, never internals.
//!
//! Handlers return `Result<_, ApiError>` and use `?`: a [`StoreError`] converts into a 503 (and
//! is logged once, when the response is made). A refusal of the client's request carries a
//! [`Rejection`] in its response extensions, which the request middleware records in the
//! rejections stream (`/admin/rejections`). Every 503 gets `Retry-After: RETRY_AFTER` from that
//! middleware, whichever part of the service answered it; a 429 carries the limiter's own wait.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::pulse::FieldError;
use crate::store::StoreError;

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
    /// 404: an admin route's object does not exist (a dead letter by record id).
    NotFound(String),
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
    /// 503: queue full, shutting down, a busy shard: nothing was counted.
    Unavailable(String),
    /// 503: a commit that may have counted (a timeout, a failure part-way, replicas that did
    /// not confirm): a retry with the same ids settles it.
    Ambiguous(String),
    /// 503: a Redis call failed.
    Storage(StoreError),
}

impl ApiError {
    /// Whether the request was certainly not counted (its rate-limit tokens go back).
    pub fn nothing_counted(&self) -> bool {
        !matches!(self, ApiError::Ambiguous(_))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Storage(e)
    }
}

/// A refused request as the rejections stream keeps it: status, a reason an operator can pass
/// on to the team, and the tenant when known. Never a key.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub status: u16,
    pub reason: String,
    pub tenant: String,
}

impl ApiError {
    /// The one status mapping.
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::NoApiKey(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) | ApiError::Ambiguous(_) | ApiError::Storage(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// For a refusal of the client's request (4xx other than a bad admin token): what the
    /// rejections stream records.
    fn rejection(&self) -> Option<Rejection> {
        let (reason, tenant) = match self {
            ApiError::Malformed(m) => (format!("malformed JSON: {m}"), String::new()),
            ApiError::TooLarge(m) | ApiError::UnsupportedMediaType(m) | ApiError::Forbidden(m) => {
                (m.clone(), String::new())
            }
            ApiError::Invalid(errs) => (
                errs.iter()
                    .map(|e| format!("{} {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
                String::new(),
            ),
            ApiError::NoApiKey(m) => (m.to_string(), String::new()),
            ApiError::TooManyRequests { tenant, .. } => {
                ("rate limit exceeded".into(), tenant.clone())
            }
            ApiError::Unauthorized
            | ApiError::NotFound(_)
            | ApiError::Unavailable(_)
            | ApiError::Ambiguous(_)
            | ApiError::Storage(_) => {
                return None;
            }
        };
        Some(Rejection {
            status: self.status().as_u16(),
            reason,
            tenant,
        })
    }

    /// The JSON body clients see.
    fn body(&self) -> serde_json::Value {
        match self {
            ApiError::Malformed(m) => json!({"error": "malformed JSON", "detail": m}),
            ApiError::Unauthorized => json!({"error": "missing or invalid admin token"}),
            ApiError::NoApiKey(m) => json!({"error": m}),
            ApiError::TooManyRequests { tenant, .. } => {
                json!({"error": format!("rate limit of tenant {tenant:?} exceeded; retry later")})
            }
            ApiError::Forbidden(m) | ApiError::TooLarge(m) | ApiError::UnsupportedMediaType(m) => {
                json!({"error": m})
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
                json!({"error": summary, "fields": errors})
            }
            ApiError::Unavailable(message)
            | ApiError::Ambiguous(message)
            | ApiError::NotFound(message) => {
                json!({"error": message})
            }
            ApiError::Storage(_) => json!({"error": "storage unavailable"}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Storage(e) = &self {
            // Logged here, once; the client sees no internals.
            tracing::warn!(error = %e, "request failed on redis");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(r) = self.rejection() {
            resp.extensions_mut().insert(r);
        }
        if let ApiError::TooManyRequests { retry_after, .. } = self {
            set_retry_after(&mut resp, retry_after);
        }
        resp
    }
}

/// Sets `Retry-After` in whole seconds, rounded up: coming back early would only be refused
/// again.
pub(super) fn set_retry_after(resp: &mut Response, retry_after: Duration) {
    let secs = retry_after.as_secs_f64().ceil().max(1.0).to_string();
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&secs).expect("digits are a valid header"),
    );
}
