//! Changes an operator makes — a reshard, a prefix, a fresh deployment, an upgrade — never
//! double or misplace money.

use crate::common::*;
use pulse_ingestor::config::Config;
use pulse_ingestor::store::Store;

fn with_id(t: &str, id: &str, a: f64) -> serde_json::Value {
    let mut p = pulse(t, "S", "u", a);
    p["pulse_id"] = serde_json::json!(id);
    p
}

/// Sends `n` pulses with ids `<tag>-0..n` for tenants t0..t9; returns how many were counted.
async fn send_ids(app: &TestApp, tag: &str, n: usize) -> (u64, u64) {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| with_id(&format!("t{}", i % 10), &format!("{tag}-{i}"), 1.0))
        .collect();
    let (s, _, b) = app.post_batch(&serde_json::json!(items)).await;
    assert_eq!(s, 202, "{b}");
    (
        b["accepted"].as_u64().unwrap(),
        b["duplicates"].as_u64().unwrap(),
    )
}

/// A fresh deployment starts on the current marker layout: no lookup of the previous layout's
/// one-key-per-id markers (`EXISTS` per id) for its first `DEDUPE_TTL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_deployment_does_not_look_for_the_previous_marker_layout() {
    let app = TestApp::start(&[]).await;
    let _: () = app.redis().cmd(&["CONFIG", "RESETSTAT"]);
    assert_eq!(send_ids(&app, "a", 200).await, (200, 0));
    assert_eq!(
        send_ids(&app, "a", 200).await,
        (0, 200),
        "re-sends are recognised"
    );
    let stats: String = app.redis().cmd(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_exists"), "{stats}");
    app.stop().await.unwrap();
}

/// `reshard` with a prefix holding glob characters moves every marker: re-sent ids are
/// recognised under the new count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_moves_the_markers_of_a_prefix_with_glob_characters() {
    let redis = RedisServer::start();
    let vars = settings(&redis, &[("KEY_PREFIX", "bill[eu]*?"), ("SHARDS", "4")]);
    let app = TestApp::spawn(vars.clone()).await;
    assert_eq!(send_ids(&app, "r", 100).await, (100, 0));
    app.stop().await.unwrap();
    let store = Store::new(&Config::from_map(&vars).unwrap()).unwrap();
    let report = store.reshard(8, true).await.unwrap();
    assert_eq!(report.markers_moved, 100, "{report:?}");
    let app = TestApp::spawn(settings(
        &redis,
        &[("KEY_PREFIX", "bill[eu]*?"), ("SHARDS", "8")],
    ))
    .await;
    assert_eq!(send_ids(&app, "r", 100).await, (0, 100));
    let total: Dec = redis.totals("bill[eu]*?").values().sum();
    assert_eq!(total, dec(100.0));
    app.stop().await.unwrap();
}
