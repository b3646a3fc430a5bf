//! The HTTP API: `router(state)` builds every route.
//!
//! | route | what |
//! |---|---|
//! | `POST /ingest` | one pulse |
//! | `POST /ingest/batch` | a JSON array or NDJSON of pulses, all or nothing (`?detail=items`: per item) |
//! | `POST /ingest/batch/partial` | the same, item by item: valid pulses counted together, others refused |
//! | `GET /v1/usage`, `GET /v1/status`, `GET /ui` | live usage of a tenant; the page and what it polls |
//! | `GET /healthz`, `GET /readyz` | liveness (every task alive); readiness (Redis answers, no eviction, queue has room) |
//! | `GET /metrics`, `GET /openapi.json` | Prometheus text format; the contract |
//! | `/admin/*` | operators, behind the admin token (`route_layer`) |
//!
//! Errors are `ApiError` (`error.rs`): handlers return it with `?`; the request middleware
//! (`record`) counts every request, records refused ingest requests from the response's
//! `Rejection` extension and gives every 503 its `Retry-After`.

mod admin;
pub(crate) mod error;
mod serve;
pub(crate) use serve::serve;
mod status;

mod health;
mod ingest;
mod layers;
pub mod openapi;
mod usage;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware;
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::flush::Scheduler;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::pulse::Decoder;
use crate::store::Store;

/// What every handler can reach, behind one `Arc` (extractors clone the state per request).
pub(crate) type AppState = Arc<AppContext>;

/// The parts of the service the HTTP layer uses.
pub(crate) struct AppContext {
    pub(crate) cfg: Arc<Config>,
    /// Request bodies into pulses (the `limits` section of the configuration bounds them).
    pub(crate) decoder: Arc<Decoder>,
    pub(crate) ingest: Ingest,
    pub(crate) store: Store,
    pub(crate) scheduler: Arc<Scheduler>,
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled at shutdown; admin drains stop with it.
    pub(crate) shutdown: CancellationToken,
    /// Set when a long-lived task failed: health checks and ingest answer 503.
    pub(crate) health: Arc<crate::supervise::Health>,
    /// API keys, when `API_KEYS_FILE` is set.
    pub(crate) api_keys: Option<Arc<crate::tenancy::ApiKeys>>,
    /// Per-tenant rate limits, when `RATE_LIMIT` or overrides are set.
    pub(crate) rate_limits: Option<Arc<crate::tenancy::RateLimits>>,
    /// The meters in force (`METERS_FILE`), reloaded by their watcher.
    pub(crate) meters: Arc<crate::meters::Meters>,
    /// Bounds the rejection records being written at once.
    pub(crate) rejection_slots: Arc<tokio::sync::Semaphore>,
}

/// The operator routes (`/admin/*`), behind the admin token. With [`api_routes`] and
/// `/metrics`, the routes the router serves: the contract test compares them with the
/// documented paths.
pub(crate) fn admin_routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/admin/flush", post(admin::flush)),
        ("/admin/pending", get(admin::pending)),
        ("/admin/dead-letters", get(admin::dead_letters)),
        ("/admin/dead-letters/replay", post(admin::replay)),
        (
            "/admin/dead-letters/set-aside",
            post(admin::set_aside).get(admin::set_aside_log),
        ),
        ("/admin/rejections", get(admin::rejections)),
    ]
}

/// The routes open to clients (ingest, usage, health, the contract).
pub(crate) fn api_routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/ingest", post(ingest::one)),
        ("/ingest/batch", post(ingest::batch)),
        ("/ingest/batch/partial", post(ingest::partial)),
        ("/healthz", get(health::healthz)),
        ("/readyz", get(health::readyz)),
        ("/openapi.json", get(openapi::openapi_json)),
        ("/v1/usage", get(usage::usage)),
        ("/v1/status", get(status::status)),
        ("/ui", get(usage::ui)),
    ]
}

fn with_routes(
    router: Router<AppState>,
    routes: Vec<(&'static str, MethodRouter<AppState>)>,
) -> Router<AppState> {
    routes
        .into_iter()
        .fold(router, |r, (path, handlers)| r.route(path, handlers))
}

/// The paths the router serves (every route's, fixed: none has a parameter), for the request
/// span and the per-route metrics, which run around the router and so before it has matched.
fn served_paths(metrics_here: bool) -> Arc<[&'static str]> {
    let mut paths: Vec<&'static str> = api_routes()
        .into_iter()
        .chain(admin_routes())
        .map(|(p, _)| p)
        .collect();
    if metrics_here {
        paths.push("/metrics");
    }
    paths.into()
}

/// The route a request is for, as axum would match it: its path if the router serves it,
/// else `unmatched`.
fn route_of(paths: &[&'static str], req: &Request) -> &'static str {
    let path = req.uri().path();
    paths
        .iter()
        .find(|p| **p == path)
        .copied()
        .unwrap_or("unmatched")
}

/// The service the HTTP server runs: every route, inside the request layers.
///
/// The layers wrap the router as a whole, not each route (`Router::layer` would): axum clones a
/// route's boxed service on every request, and with the layers inside it that is one heap
/// allocation per layer and method — 45 per single-pulse request, ~20 % of the ingestor's
/// instructions (BENCHMARKS.md, round four). Around the router they are cloned with the
/// connection's service, once per request, without allocating.
pub(crate) fn router(
    state: AppState,
) -> impl Service<Request, Response = Response, Error = std::convert::Infallible, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static {
    let body_limit = state.cfg.limits.max_body_bytes;
    let metrics_here = state.cfg.metrics_addr.is_none();
    let paths = served_paths(metrics_here);
    // Operator routes: the admin token is checked once, for all of them.
    let admin = with_routes(Router::new(), admin_routes()).route_layer(
        middleware::from_fn_with_state(state.clone(), admin::require_token),
    );
    let api = with_routes(Router::new(), api_routes()).merge(admin);
    // With METRICS_ADDR set, /metrics lives on its own listener only.
    let api = if metrics_here {
        api.route("/metrics", get(health::metrics))
    } else {
        api
    };
    let span_paths = paths.clone();
    ServiceBuilder::new()
        .map_response(axum::response::IntoResponse::into_response)
        // Failures are logged by `recorded` with their route and reason, not as TraceLayer's
        // bare ERROR "response failed".
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &Request| request_span(route_of(&span_paths, req), req))
                .on_failure(()),
        )
        // A panic in one handler answers that request 500 and leaves the rest running.
        .layer(CatchPanicLayer::custom(panic_response(
            state.metrics.clone(),
        )))
        .layer(layers::RecordLayer(state.clone(), paths))
        // A request that is not done in time (a body trickling in) is answered 408.
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            state.cfg.limits.request_timeout,
        ))
        .service(layers::EncodingCheck::new(
            DefaultBodyLimit::max(body_limit).layer(api.with_state(state)),
        ))
}

/// The span of one request, with the route it is for (low cardinality, unlike the URI).
fn request_span(route: &'static str, req: &Request) -> tracing::Span {
    // DEBUG, like TraceLayer's own span: at the default INFO level it costs the request nothing.
    tracing::debug_span!("request", method = %req.method(), matched_path = route)
}

fn panic_response(
    metrics: Arc<Metrics>,
) -> impl Fn(Box<dyn std::any::Any + Send + 'static>) -> Response + Clone {
    move |panic| {
        metrics.handler_panics.inc();
        tracing::error!(panic = %crate::supervise::panic_message(&*panic), "request handler panicked");
        let body = axum::Json(error::ErrorBody::message(
            "internal error; nothing was counted for this request unless a retry with the same pulse_id says so",
        ));
        axum::response::IntoResponse::into_response((
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            body,
        ))
    }
}

/// The router of the separate metrics listener (`METRICS_ADDR`).
pub(crate) fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .with_state(state)
}

/// Refuses a `Content-Encoding` other than gzip, zstd or identity with a 415 that names it, and
/// hands the decompression layer the spelling it knows: `x-gzip` is gzip (RFC 9110 §8.4.1.3),
/// codings are case-insensitive, and `identity` is no coding at all — so what this check
/// accepts is exactly what gets decoded, never tower-http's bodiless 415.
/// `Err`: the refusal's message.
fn supported_encoding(req: &mut Request) -> Result<bool, String> {
    use axum::http::{HeaderValue, header::CONTENT_ENCODING};
    if let Some(v) = req.headers().get(CONTENT_ENCODING) {
        let enc = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
        match enc.as_str() {
            "gzip" | "x-gzip" => {
                req.headers_mut()
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                return Ok(true);
            }
            "zstd" => {
                req.headers_mut()
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("zstd"));
                return Ok(true);
            }
            "identity" | "" => {
                req.headers_mut().remove(CONTENT_ENCODING);
            }
            _ => {
                return Err(format!(
                    "content encoding {enc:?} is not supported; send gzip, zstd or no encoding"
                ));
            }
        }
    }
    Ok(false)
}

/// A JSON object (operator answers, health).
pub struct Report;

impl utoipa::PartialSchema for Report {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Object)
            .description(Some("A JSON object"))
            .into()
    }
}

impl utoipa::ToSchema for Report {}

/// When a request started; handlers that wait for a commit answer before the request timeout
/// (see `ingest::submit`).
#[derive(Clone, Copy)]
pub(crate) struct RequestStart(pub Instant);

/// Counts every request by route and status, and times it; records a refused ingest request in
/// the rejections stream, gives every 503 the configured `Retry-After` and closes the
/// connection after a 413.
fn recorded(
    state: &AppState,
    route: &'static str,
    started: Instant,
    mut resp: Response,
) -> Response {
    if let Some(r) = resp.extensions_mut().remove::<error::Rejection>()
        && route.starts_with("/ingest")
    {
        note_rejection(state, r);
    }
    // Overload and unavailability answer 503 with Retry-After, always: here, once, for every
    // route (a 503 that carries its own is left alone).
    if resp.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE {
        let why = resp.extensions_mut().remove::<error::Unavailable>();
        // A probe's 503 says why in its body, and probes poll: not logged.
        if !matches!(route, "/readyz" | "/healthz") {
            log_unavailable(route, why);
        }
        if !resp.headers().contains_key(axum::http::header::RETRY_AFTER) {
            error::set_retry_after(&mut resp, state.cfg.retry_after);
        }
    }
    // A body refused for its size was not read to its end, so the connection cannot carry
    // another request: say so, or a client reuses it and loses its next request.
    if resp.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    state
        .metrics
        .observe_request(route, resp.status(), started.elapsed());
    resp
}

/// One WARN line per 503 with its route and reason — at most one a second, with how many
/// were not logged (a full queue answers thousands).
fn log_unavailable(route: &str, why: Option<error::Unavailable>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static QUIET: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST.swap(now, Ordering::Relaxed) == now {
        QUIET.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let reason = why.map_or_else(|| "unavailable".to_string(), |u| u.0);
    tracing::warn!(
        route,
        %reason,
        not_logged_since = QUIET.swap(0, Ordering::Relaxed),
        "answered 503"
    );
}

/// Records a refused request in the capped rejections stream, off the request path; under a
/// flood of bad requests at most 64 records are in flight and the rest are only counted.
fn note_rejection(state: &AppState, r: error::Rejection) {
    let Ok(permit) = state.rejection_slots.clone().try_acquire_owned() else {
        return;
    };
    let store = state.store.clone();
    tokio::spawn(async move {
        let _ = store.record_rejection(r.status, &r.reason, &r.tenant).await;
        drop(permit);
    });
}

#[cfg(test)]
mod tests;
