//! An operator's first hour (issue 34): what is in force is what is shown, and a wrong
//! Processor URL is an endpoint problem — retried and shown — never a reason to dead-letter.

use std::time::Duration;

use crate::common::*;
use pulse_producer::processor::Faults;

/// A deployment that recorded 1 h windows, then a replica started with `WINDOW=10s` (the
/// README's quick start, then its demo): the 1 h window stays in force until its end, and
/// `/v1/status` and `/readyz` say so — the window running, and when the 10 s one takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_window_in_force_and_when_a_recorded_one_takes_over() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("WINDOW", "1h")])).await;
    app.flush_now().await;
    app.stop().await.unwrap();
    let app = TestApp::spawn(settings(&redis, &[("WINDOW", "10s")])).await;
    let c = http();
    let s = c.get(format!("{}/v1/status", app.base)).json_reply().await;
    let (start, end) = (
        s["window_start"].as_u64().unwrap(),
        s["window_end"].as_u64().unwrap(),
    );
    assert_eq!(end - start, 3600, "{s}");
    assert_eq!(s["window_secs"], 3600, "{s}");
    assert_eq!(s["recorded_window_secs"], 10, "{s}");
    assert_eq!(s["configured_window_secs"], 10, "{s}");
    assert_eq!(s["recorded_window_from"], end, "{s}");
    assert!(s["seconds_to_seal"].as_u64().unwrap() <= 3600, "{s}");
    let r = c.get(format!("{}/readyz", app.base)).json_reply().await;
    assert_eq!(r["window"]["secs"], 3600, "{r}");
    assert_eq!(r["window"]["recorded_from"], end, "{r}");
    app.stop().await.unwrap();
}

/// `PROCESSOR_URL` pointed at a path the Processor does not serve (`/process`, not
/// `/batches`): every POST answers 404. Nothing is dead-lettered; the window stays pending,
/// the endpoint metric counts, and `/v1/status` and `/readyz` say the URL looks wrong. Once
/// a replica has the right URL the window is delivered whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_processor_path_is_retried_and_shown_never_dead_lettered() {
    let (p, purl) = processor(Faults::default()).await;
    let redis = RedisServer::start();
    let wrong = format!("{purl}/process");
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("PROCESSOR_URL", &wrong),
            ("WINDOW", "2s"),
            ("DELIVERY_MAX_ATTEMPTS", "2"),
        ],
    ))
    .await;
    let (s, _, _) = app.post_pulse(&pulse("t-1", "S", "KB", 1.5)).await;
    assert_eq!(s, 202);
    let c = http();
    let shown = eventually(Duration::from_secs(20), || async {
        app.flush_now().await;
        metric(&c, &app.base, "ingestor_processor_endpoint_errors_total")
            .await
            .unwrap_or(0.0)
            > 0.0
    })
    .await;
    assert!(shown);
    let d = c
        .get(format!("{}/admin/dead-letters", app.base))
        .json_reply()
        .await;
    assert_eq!(d["records"].as_array().map(Vec::len), Some(0), "{d}");
    let s = c.get(format!("{}/v1/status", app.base)).json_reply().await;
    let problem = s["delivery"]["endpoint_problem"].as_str().unwrap_or("");
    assert!(
        problem.contains("looks wrong") && problem.contains("404"),
        "{s}"
    );
    let r = c.get(format!("{}/readyz", app.base)).json_reply().await;
    assert!(r["delivery"]["endpoint_problem"].is_string(), "{r}");
    let u = c
        .get(format!("{}/v1/usage?tenant_id=t-1", app.base))
        .json_reply()
        .await;
    assert!(
        u["windows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "retrying" || w["state"] == "delivering"),
        "{u}"
    );
    app.stop().await.unwrap();
    let fixed = format!("{purl}/batches");
    let app = TestApp::spawn(settings(
        &redis,
        &[("PROCESSOR_URL", &fixed), ("WINDOW", "2s")],
    ))
    .await;
    let ok = eventually(Duration::from_secs(20), || async {
        app.flush_now().await;
        p.records().len() == 1
    })
    .await;
    assert!(ok, "{:?}", p.records());
    let s = c.get(format!("{}/v1/status", app.base)).json_reply().await;
    assert!(s["delivery"]["last_success"].is_u64(), "{s}");
    assert!(s["delivery"]["endpoint_problem"].is_null(), "{s}");
    app.stop().await.unwrap();
}

/// Finding 8: the lines and answers an operator reads say what happened — the tenant a refused
/// request named, why setting aside is refused, a 503's route and reason, how long the
/// shutdown took (not the uptime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_an_operator_reads_say_what_happened() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let vars = settings(
        &redis,
        &[("LOG_FORMAT", "json"), ("REDIS_TIMEOUT", "300ms")],
    );
    let c = http();
    let mut first = Ingestor::spawn(&vars, dir.path(), "first").await;
    let bad = serde_json::json!({"tenant_id": "t-named", "product_sku": "s", "used_amount": -1, "use_unit": "KB"});
    let (s, _, _) = post(&c, &format!("{}/ingest", first.base), &bad).await;
    assert_eq!(s, 422);
    let named = eventually(Duration::from_secs(10), || async {
        let r = c
            .get(format!("{}/admin/rejections", first.base))
            .json_reply()
            .await;
        r["rejections"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["tenant"] == "t-named"))
    })
    .await;
    assert!(named, "the rejection names no tenant");
    let r = c
        .post(format!("{}/admin/dead-letters/set-aside", first.base))
        .json(&serde_json::json!({"record_id": "x", "operator": "o", "reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body = r.text().await.unwrap();
    assert!(body.contains("not configured"), "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.signal("TERM");
    assert_eq!(first.wait(Duration::from_secs(20)).await, Some(0));
    let log = first.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("shutdown complete"))
        .unwrap_or_else(|| panic!("{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let took = v["shutdown_ms"].as_u64().expect(line);
    assert!(
        took < 2500,
        "the shutdown took {took} ms of a 3 s uptime? {line}"
    );
    assert!(v["uptime_s"].as_u64().expect(line) >= 3, "{line}");
    // Redis gone: each 503 says its route and reason, and no bare "response failed".
    let second = Ingestor::spawn(&vars, dir.path(), "second").await;
    redis.kill();
    let (s, _, _) = post(
        &c,
        &format!("{}/ingest", second.base),
        &pulse("t", "s", "KB", 1.0),
    )
    .await;
    assert_eq!(s, 503);
    let logged = eventually(Duration::from_secs(5), || async {
        second.log_text().contains("answered 503")
    })
    .await;
    let log = second.log_text();
    assert!(logged, "{log}");
    let line = log.lines().find(|l| l.contains("answered 503")).unwrap();
    assert!(
        line.contains("\"route\":\"/ingest\"") && line.contains("\"reason\":\"storage unavailable"),
        "{line}"
    );
    assert!(!log.contains("response failed"), "{log}");
}
