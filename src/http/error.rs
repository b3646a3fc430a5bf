//! `ApiError`: every way a request can fail, each mapped to one documented status code.
//! Clients see a message about their input, never internals.
//!
//! Handlers return `Result<_, ApiError>` and use `?`: a [`StoreError`] converts into a 503 (and
//! is logged once, when the response is made). A refusal of the client's request carries a
//! [`Rejection`] in its response extensions, which the request middleware records in the
//! rejections stream (`/admin/rejections`). Every 503 gets `Retry-After: RETRY_AFTER` from that
//! middleware, whichever part of the service answered it; a 429 carries the limiter's own wait.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, PartialSchema, ToSchema};

use crate::pulse::FieldError;
use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// 400: the body is not JSON of the expected shape.
    Malformed(String),
    /// 401: admin token missing or wrong.
    Unauthorized,
    /// 401: the route always needs the admin token and none is configured (setting aside).
    AdminTokenNotConfigured,
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
            ApiError::Unauthorized | ApiError::AdminTokenNotConfigured | ApiError::NoApiKey(_) => {
                StatusCode::UNAUTHORIZED
            }
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
            | ApiError::AdminTokenNotConfigured
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

    /// The body clients see.
    fn body(&self) -> ErrorBody<'_> {
        let error: Cow<'_, str> = match self {
            ApiError::Malformed(m) => {
                return ErrorBody {
                    error: "malformed JSON".into(),
                    detail: Some(m),
                    fields: None,
                };
            }
            ApiError::Unauthorized => "missing or invalid admin token".into(),
            ApiError::AdminTokenNotConfigured => "setting a dead letter aside needs ADMIN_TOKEN, which is not configured on this replica: set it, restart, and send it as a bearer token".into(),
            ApiError::NoApiKey(m) => (*m).into(),
            ApiError::TooManyRequests { tenant, .. } => {
                format!("rate limit of tenant {tenant:?} exceeded; retry later").into()
            }
            ApiError::Forbidden(m)
            | ApiError::TooLarge(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Unavailable(m)
            | ApiError::Ambiguous(m)
            | ApiError::NotFound(m) => m.as_str().into(),
            ApiError::Invalid(errors) => {
                let summary = errors
                    .iter()
                    .map(|e| match e.index {
                        Some(i) => format!("[{i}].{} {}", e.field, e.message),
                        None => format!("{} {}", e.field, e.message),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return ErrorBody {
                    error: summary.into(),
                    detail: None,
                    fields: Some(errors),
                };
            }
            ApiError::Storage(_) => "storage unavailable".into(),
        };
        ErrorBody::message(error)
    }
}

/// Every error body.
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    /// What went wrong, about the client's input.
    #[schema(value_type = String)]
    pub error: Cow<'a, str>,
    /// More detail (malformed JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// Each invalid field (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<&'a [FieldError]>,
}

impl<'a> ErrorBody<'a> {
    /// A body with only its message.
    pub fn message(error: impl Into<Cow<'a, str>>) -> Self {
        ErrorBody {
            error: error.into(),
            detail: None,
            fields: None,
        }
    }
}

/// A documented refusal: status, meaning, whether it carries `Retry-After`.
type Refusal = (u16, &'static str, bool);

/// The error answers of a route family, as `utoipa::IntoResponses`: each an [`ErrorBody`].
fn refusals(list: &[Refusal]) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    list.iter()
        .map(|&(status, description, retry_after)| {
            let mut r = ResponseBuilder::new().description(description);
            if status != 408 {
                r = r.content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(Ref::from_schema_name("Error"))))
                        .build(),
                );
            }
            if retry_after {
                r = r.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(u64::schema())
                        .description(Some("Seconds"))
                        .build(),
                );
            }
            (status.to_string(), r.build().into())
        })
        .collect()
}

/// The refusals both ingest routes share (their 202 differs).
pub struct IngestErrors;

impl IntoResponses for IngestErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        refusals(&[
            (
                400,
                "Not JSON, not the expected shape, duplicate keys",
                false,
            ),
            (401, "API keys on: X-API-Key missing or unknown", false),
            (
                403,
                "API keys on: the key may not send for this tenant",
                false,
            ),
            (
                408,
                "The request (a body trickling in) took longer than REQUEST_TIMEOUT; nothing was queued",
                false,
            ),
            (
                413,
                "Body over MAX_BODY_BYTES, batch over MAX_BATCH_ITEMS, or more of a tenant's pulses than its rate limit can ever admit per request",
                false,
            ),
            (415, "Content type not accepted", false),
            (
                422,
                "A field is missing or invalid (each is named; batch items with their index)",
                false,
            ),
            (429, "The tenant is over its rate limit", true),
            (
                500,
                "A bug: the handler panicked (counted; the service keeps running)",
                false,
            ),
            (
                503,
                "Queue full, Redis unavailable or refusing writes, shutting down, or the commit outlasted REQUEST_TIMEOUT (may have been counted): retry with the same pulse_id or Idempotency-Key",
                true,
            ),
        ])
    }
}

/// The error answers every `/admin` route shares.
pub struct AdminErrors;

impl IntoResponses for AdminErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        refusals(&[
            (
                401,
                "ADMIN_TOKEN is set and the bearer token is missing or wrong",
                false,
            ),
            (
                503,
                "Redis unavailable (or, for replay, a shard is being drained)",
                true,
            ),
        ])
    }
}

/// The refusals of the routes that act on one dead letter.
pub struct DeadLetterErrors;

impl IntoResponses for DeadLetterErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        refusals(&[
            (400, "Not the expected JSON body", false),
            (
                401,
                "The bearer token is missing or wrong; setting aside: also when ADMIN_TOKEN is not configured (the body says so)",
                false,
            ),
            (404, "No dead letter with that record_id", false),
            (422, "Operator or reason missing or too long", false),
            (
                503,
                "Redis unavailable, or the shard is being drained",
                true,
            ),
        ])
    }
}

/// Why a request was answered 503 (a response extension the request middleware logs).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        match &self {
            // The reason of a 503, for the one log line the request middleware writes (with
            // the route); the client sees no internals.
            ApiError::Storage(e) => {
                resp.extensions_mut()
                    .insert(Unavailable(format!("redis: {e}")));
            }
            ApiError::Unavailable(m) | ApiError::Ambiguous(m) => {
                resp.extensions_mut().insert(Unavailable(m.clone()));
            }
            _ => {}
        }
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
