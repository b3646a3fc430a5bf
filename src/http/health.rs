//! `GET /healthz`, `GET /readyz`, `GET /metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// Alive: the process answers and every long-lived task is running.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "Alive", body = super::Report),
        (status = 503, description = "A long-lived task failed; the process is stopping", body = super::Report),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Response {
    match state.health.failure() {
        None => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failing", "reason": why})),
        )
            .into_response(),
    }
}

/// Ready: Redis answers a PING and the queue has room (below 90 % of its capacity). The body
/// also says which window is in force and whether delivery works (a Processor URL that looks
/// wrong does not make a replica unready: ingest still counts, and the records wait).
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = super::Report),
        (status = 503, description = "Not ready; the body says why (Redis, eviction policy, queue, failure, shutdown)", body = super::Report),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let redis = state.store.ping().await;
    let depth = state.ingest.depth();
    let capacity = state.ingest.capacity();
    let queue_ok = depth * 10 < capacity * 9;
    // Eviction would drop dedupe markers (double counts) or aggregates (loss).
    let eviction = match (&redis, state.cfg.redis.allow_eviction) {
        (Ok(()), false) => match state.store.eviction_policy().await {
            Ok(p) if p == "noeviction" => None,
            Ok(p) => Some(format!(
                "maxmemory-policy is {p}: Redis may evict dedupe markers or aggregates; set it to noeviction (or REDIS_ALLOW_EVICTION=true to accept the risk)"
            )),
            Err(_) => None,
        },
        _ => None,
    };
    let failure = state.health.failure();
    let window = match &redis {
        Ok(()) => super::status::window_now(&state).await.ok().map(|(now, w)| {
            json!({
                "start": w.start, "end": w.end, "secs": w.secs(), "seconds_to_seal": w.end.saturating_sub(now),
                "recorded_secs": w.recorded_secs, "recorded_from": w.recorded_from(),
            })
        }),
        Err(_) => None,
    };
    let ready = redis.is_ok()
        && queue_ok
        && eviction.is_none()
        && failure.is_none()
        && !state.shutdown.is_cancelled();
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "redis": match &redis { Ok(()) => "ok".to_string(), Err(e) => e.to_string() },
        "eviction": eviction,
        "failure": failure,
        "window": window,
        "delivery": super::status::delivery(&state),
        "queue_depth": depth,
        "queue_capacity": capacity,
        "shutting_down": state.shutdown.is_cancelled(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus text format.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Every metric (on METRICS_ADDR instead when it is set: then 404 here)", content_type = "text/plain", body = String),
        (status = 404, description = "METRICS_ADDR is set"),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.queue_depth.set(state.ingest.depth() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
