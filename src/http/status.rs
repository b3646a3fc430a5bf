//! `GET /v1/status`: this replica at a glance, as the page polls it — the window actually in
//! force (the scripts', not this replica's `WINDOW`) and when a recorded length takes over,
//! the queue, and whether delivery works.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use crate::delivery_health::DeliverySnapshot;
use crate::store::WindowInForce;

/// This replica at a glance (the page polls it).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Status {
    redis_time: u64,
    /// The window in force (the one Redis is writing into), whatever this replica's `WINDOW`.
    window_start: u64,
    window_end: u64,
    /// Its length, seconds.
    window_secs: u64,
    /// Seconds until the current window is sealed.
    seconds_to_seal: u64,
    /// The deployment's recorded window length: the windows after this one have it.
    recorded_window_secs: u64,
    /// When the recorded length takes over, if the window in force has another length.
    recorded_window_from: Option<u64>,
    /// This replica's `WINDOW` (set, or adopted from the deployment).
    configured_window_secs: u64,
    queue_depth: usize,
    queue_capacity: usize,
    /// Pulses accepted by this replica since it started (the page derives a rate).
    pulses_accepted_total: u64,
    shards: u32,
    ack_mode: String,
    version: String,
    /// Whether delivery works: configured, last success, last failure, a URL that looks wrong.
    delivery: DeliverySnapshot,
}

/// The window in force (shard 0's: every shard records the same settings), or the one this
/// replica's settings give before the first seal.
pub(super) async fn window_now(state: &AppState) -> Result<(u64, WindowInForce), ApiError> {
    let mut conn = state.store.conn().await?;
    let now = state.store.time(&mut conn).await?;
    let in_force = state.store.window_in_force(&mut conn, 0).await?;
    let w = in_force.filter(|w| w.end > now).unwrap_or_else(|| {
        let (len, off) = (state.store.window_secs, state.store.window_offset_secs);
        let start = now - now.saturating_sub(off) % len.max(1);
        WindowInForce {
            start,
            end: start + len,
            recorded_secs: in_force.map_or(len, |w| w.recorded_secs),
            recorded_offset_secs: off,
        }
    });
    Ok((now, w))
}

/// What delivery looks like from this replica.
pub(super) fn delivery(state: &AppState) -> DeliverySnapshot {
    state
        .scheduler
        .drainer
        .processor
        .as_ref()
        .map(|p| p.health().snapshot())
        .unwrap_or_default()
}

/// This replica's window, queue, counters and delivery.
#[utoipa::path(
    get, path = "/v1/status", tag = "usage",
    responses(
        (status = 200, description = "Status", body = Status),
        (status = 503, description = "Redis unavailable", body = super::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn status(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (now, w) = window_now(&state).await?;
    Ok(Json(Status {
        redis_time: now,
        window_start: w.start,
        window_end: w.end,
        window_secs: w.secs(),
        seconds_to_seal: w.end.saturating_sub(now),
        recorded_window_secs: w.recorded_secs,
        recorded_window_from: w.recorded_from(),
        configured_window_secs: state.cfg.window_secs(),
        queue_depth: state.ingest.depth(),
        queue_capacity: state.ingest.capacity(),
        pulses_accepted_total: state.metrics.pulses.with_label_values(&["accepted"]).get(),
        shards: state.store.shards,
        ack_mode: format!("{:?}", state.cfg.ack_mode).to_lowercase(),
        version: concat!(
            env!("CARGO_PKG_VERSION"),
            " (",
            env!("PULSE_GIT_COMMIT"),
            ")"
        )
        .into(),
        delivery: delivery(&state),
    })
    .into_response())
}
