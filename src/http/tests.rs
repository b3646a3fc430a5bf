//! The router without a network or a Redis: refusals that never reach the store, driven with
//! `oneshot`, and the error plumbing (status, `Retry-After`, the admin `route_layer`). Redis is
//! a closed port here, so every store call fails at once.

use std::collections::HashMap;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{AppState, router};
use crate::config::Config;
use crate::store::Store;

/// The service's state against a Redis that is not there.
fn state(extra: &[(&str, &str)]) -> AppState {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut vars: HashMap<String, String> = [
        ("REDIS_URL", format!("redis://127.0.0.1:{port}")),
        ("REDIS_TIMEOUT", "200ms".into()),
        ("WORKERS", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let cfg = Config::from_map(&vars).unwrap();
    let store = Store::new(&cfg).unwrap();
    crate::app::assemble(cfg, store, CancellationToken::new())
        .unwrap()
        .0
}

async fn call(
    state: &AppState,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    call_from(state, req, [127, 0, 0, 1]).await
}

/// As a client at `ip` (what the server loop records for each connection).
async fn call_from(
    state: &AppState,
    mut req: Request<Body>,
    ip: [u8; 4],
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            ip, 40000,
        ))));
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

fn post(path: &str, content_type: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn refusals_name_what_is_wrong_without_touching_redis() {
    let s = state(&[("MAX_BODY_BYTES", "2048"), ("ALLOWED_UNITS", "KB")]);
    let cases = [
        (
            "/ingest",
            "application/json",
            "{\"tenant_id\": ",
            400,
            "malformed",
        ),
        ("/ingest", "text/plain", "{}", 415, "application/json"),
        (
            "/ingest",
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":1.0000000001,"use_unit":"KB"}"#,
            422,
            "more than 9 fractional digits",
        ),
        (
            "/ingest",
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"TB"}"#,
            422,
            "use_unit must be one of",
        ),
        (
            "/ingest/batch",
            "application/x-ndjson",
            "{\"tenant_id\":\"t\",\"product_sku\":\"s\",\"used_amount\":1,\"use_unit\":\"KB\"}\n7\n",
            422,
            "[1].item",
        ),
    ];
    for (path, ct, body, status, text) in cases {
        let (got, _, reply) = call(&s, post(path, ct, body)).await;
        assert_eq!(got.as_u16(), status, "{body} -> {reply}");
        assert!(reply.to_string().contains(text), "{body} -> {reply}");
    }
    let big = format!(
        r#"{{"tenant_id":"{}","product_sku":"s","used_amount":1,"use_unit":"KB"}}"#,
        "x".repeat(4096)
    );
    let (got, _, _) = call(&s, post("/ingest", "application/json", &big)).await;
    assert_eq!(got, StatusCode::PAYLOAD_TOO_LARGE);
    let mut req = post("/ingest/batch", "application/json", "[]");
    req.headers_mut()
        .insert(header::CONTENT_ENCODING, "br".parse().unwrap());
    let (got, _, reply) = call(&s, req).await;
    assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(
        reply["error"].as_str().unwrap().contains("\"br\""),
        "{reply}"
    );
}

#[tokio::test]
async fn a_storage_failure_is_503_with_the_configured_retry_after() {
    let s = state(&[("RETRY_AFTER", "7s")]);
    let (got, headers, reply) = call(
        &s,
        Request::get("/admin/pending").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    assert_eq!(
        reply["error"], "storage unavailable",
        "no internals: {reply}"
    );
    let (got, headers, _) = call(
        &s,
        Request::get("/v1/usage?tenant_id=t")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    // Readiness too: every 503 says when to come back.
    let (got, headers, reply) =
        call(&s, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(headers[header::RETRY_AFTER], "7");
}

/// Without ADMIN_TOKEN the admin routes answer loopback clients only, and nobody may set a
/// dead letter aside.
#[tokio::test]
async fn without_a_token_admin_routes_answer_loopback_only() {
    let s = state(&[]);
    let (got, _, reply) = call_from(
        &s,
        Request::post("/admin/flush").body(Body::empty()).unwrap(),
        [10, 1, 2, 3],
    )
    .await;
    assert_eq!(got, StatusCode::FORBIDDEN, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("loopback"));
    let (got, _, _) = call(
        &s,
        post(
            "/admin/dead-letters/set-aside",
            "application/json",
            r#"{"record_id":"x","operator":"o","reason":"r"}"#,
        ),
    )
    .await;
    assert_eq!(
        got,
        StatusCode::UNAUTHORIZED,
        "setting aside needs a token, even locally"
    );
}

#[tokio::test]
async fn every_admin_route_wants_the_token_before_doing_anything() {
    let s = state(&[("ADMIN_TOKEN", "sesame")]);
    for (method, path) in [
        ("POST", "/admin/flush"),
        ("GET", "/admin/pending"),
        ("GET", "/admin/dead-letters"),
        ("POST", "/admin/dead-letters/replay"),
        ("GET", "/admin/rejections"),
    ] {
        let req = |auth: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .header(header::AUTHORIZATION, auth)
                .body(Body::empty())
                .unwrap()
        };
        let (got, _, _) = call(&s, req("Bearer wrong")).await;
        assert_eq!(got, StatusCode::UNAUTHORIZED, "{method} {path}");
        // With the token the route runs, and meets the missing Redis.
        let (got, _, _) = call(&s, req("Bearer sesame")).await;
        assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}");
    }
    // An unknown path is a 404, not a 401: the layer guards the admin routes only.
    let (got, _, _) = call(&s, Request::get("/admin/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(got, StatusCode::NOT_FOUND);
}
