//! Tenant protection against real Redis and real HTTP: API keys bound to tenants, key file
//! reloads, per-tenant rate limits (single replica and shared by two), and keys kept out of logs.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;
use sha2::{Digest, Sha256};

const KEY_A: &str = "key-of-team-a-5f1c9e";
const KEY_SVC: &str = "key-of-billing-service-77d2";
const KEY_NEW: &str = "rotated-key-of-team-a-0b3e";

fn line(key: &str, who: &str, label: &str) -> String {
    format!(
        "{} {who} {label}\n",
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

async fn send(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap) {
    let mut r = c.post(url).json(body);
    if let Some(k) = key {
        r = r.header("x-api-key", k);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_bind_tenants_reload_without_restart_and_never_reach_the_logs() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        format!(
            "# team a\n{}{}",
            line(KEY_A, "t-a", "team-a"),
            line(KEY_SVC, "*", "billing")
        ),
    )
    .unwrap();
    let mut v = settings(&redis, &[]);
    v.insert("API_KEYS_FILE".into(), keys.display().to_string());
    let ing = Ingestor::spawn(&v, dir.path(), "ingestor").await;
    let c = http();
    let one = format!("{}/ingest", ing.base);
    let batch = format!("{}/ingest/batch", ing.base);
    // 401 without a key, or with an unknown one.
    assert_eq!(
        send(&c, &one, None, &pulse("t-a", "s", "KB", 1.0)).await.0,
        401
    );
    assert_eq!(
        send(&c, &one, Some("guess"), &pulse("t-a", "s", "KB", 1.0))
            .await
            .0,
        401
    );
    // A tenant key sends for its tenant only, in single and batch requests.
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-a", "s", "KB", 1.0))
            .await
            .0,
        202
    );
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-b", "s", "KB", 1.0))
            .await
            .0,
        403
    );
    let mixed = json!([pulse("t-a", "s", "KB", 1.0), pulse("t-b", "s", "KB", 1.0)]);
    assert_eq!(send(&c, &batch, Some(KEY_A), &mixed).await.0, 403);
    // A trusted key sends for anyone.
    assert_eq!(send(&c, &batch, Some(KEY_SVC), &mixed).await.0, 202);
    // Rotate: the new key replaces the old one, no restart.
    std::fs::write(
        &keys,
        format!(
            "{}{}",
            line(KEY_NEW, "t-a", "team-a-2"),
            line(KEY_SVC, "*", "billing")
        ),
    )
    .unwrap();
    let ok = eventually(Duration::from_secs(10), || async {
        send(&c, &one, Some(KEY_NEW), &pulse("t-a", "s", "KB", 1.0))
            .await
            .0
            == 202
    })
    .await;
    assert!(ok, "the rotated key works after the reload");
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-a", "s", "KB", 1.0))
            .await
            .0,
        401,
        "the old key is gone"
    );
    // Only what was allowed was counted: t-a 1 + 1 (batch) + 1 (new key); t-b 1 (batch).
    let totals = redis.totals("pulses");
    assert_eq!(totals[&("t-a".into(), "s".into(), "KB".into())], dec(3.0));
    assert_eq!(totals[&("t-b".into(), "s".into(), "KB".into())], dec(1.0));
    // No key value appears in any log line.
    let log = ing.log_text();
    assert!(log.contains("API keys reloaded"), "{log}");
    for k in [KEY_A, KEY_SVC, KEY_NEW, "guess"] {
        assert!(!log.contains(k), "key {k} leaked into the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_count_batch_items() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("RATE_LIMIT", "5"),
            ("RATE_LIMIT_BURST", "10"),
            ("RATE_LIMIT_OVERRIDES", "big=1000:1000"),
        ],
    ))
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    let batch = format!("{}/ingest/batch", app.base);
    // A batch of 8 takes 8 of the 10-pulse burst; 3 more do not fit.
    let eight = json!(
        (0..8)
            .map(|_| pulse("t", "s", "KB", 1.0))
            .collect::<Vec<_>>()
    );
    assert_eq!(send(&c, &batch, None, &eight).await.0, 202);
    let three = json!(
        (0..3)
            .map(|_| pulse("t", "s", "KB", 1.0))
            .collect::<Vec<_>>()
    );
    let (status, headers) = send(&c, &batch, None, &three).await;
    assert_eq!(status, 429);
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // Two single pulses still fit; the third does not.
    assert_eq!(
        send(&c, &one, None, &pulse("t", "s", "KB", 1.0)).await.0,
        202
    );
    assert_eq!(
        send(&c, &one, None, &pulse("t", "s", "KB", 1.0)).await.0,
        202
    );
    assert_eq!(
        send(&c, &one, None, &pulse("t", "s", "KB", 1.0)).await.0,
        429
    );
    // Other tenants have their own buckets; an override lifts one tenant's limit.
    assert_eq!(
        send(&c, &one, None, &pulse("u", "s", "KB", 1.0)).await.0,
        202
    );
    let many = json!(
        (0..500)
            .map(|_| pulse("big", "s", "KB", 1.0))
            .collect::<Vec<_>>()
    );
    assert_eq!(send(&c, &batch, None, &many).await.0, 202);
    // The bucket refills at 5 pulses/s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        send(&c, &one, None, &pulse("t", "s", "KB", 1.0)).await.0,
        202
    );
    let totals = redis.totals("pulses");
    assert_eq!(
        totals[&("t".into(), "s".into(), "KB".into())],
        dec(11.0),
        "8 + 2 + 1 counted, nothing limited"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_a_tenant_limit_within_tolerance() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let v = settings(
        &redis,
        &[
            ("RATE_LIMIT", "100"),
            ("RATE_LIMIT_BURST", "100"),
            ("RATE_LIMIT_REPLICAS", "2"),
        ],
    );
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let b = Ingestor::spawn(&v, dir.path(), "b").await;
    let c = http();
    // One tenant sends as fast as it can for 2 s, its requests spread evenly over both replicas.
    let started = Instant::now();
    let mut accepted = 0u32;
    let mut limited = 0u32;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let batch = json!(
            (0..5)
                .map(|_| pulse("hot", "s", "KB", 1.0))
                .collect::<Vec<_>>()
        );
        match send(&c, &format!("{base}/ingest/batch"), None, &batch)
            .await
            .0
        {
            202 => accepted += 5,
            429 => limited += 5,
            s => panic!("unexpected {s}"),
        }
        i += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The fleet admits burst + rate × time: 100 + 100/s × 2 s ≈ 300 pulses. Each replica holds
    // half the burst and half the rate; documented tolerance: ± 20 %.
    let expected = 100.0 + 100.0 * elapsed;
    let got = f64::from(accepted);
    assert!(limited > 0, "the limit was reached");
    assert!(
        got >= 0.8 * expected && got <= 1.2 * expected,
        "accepted {got}, expected about {expected:.0}"
    );
    assert_eq!(
        redis.totals("pulses")[&("hot".into(), "s".into(), "KB".into())],
        dec(got),
        "exactly the accepted ones were counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_recent_rejections_without_keys_and_metrics_can_move_off_the_api() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, line(KEY_A, "t-a", "team-a")).unwrap();
    let mut v = settings(
        &redis,
        &[
            ("ADMIN_TOKEN", "op-token"),
            ("RATE_LIMIT", "1"),
            ("RATE_LIMIT_BURST", "1"),
        ],
    );
    v.insert("API_KEYS_FILE".into(), keys.display().to_string());
    v.insert("METRICS_ADDR".into(), "127.0.0.1:0".into());
    let app = TestApp::spawn(v).await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    assert_eq!(
        send(
            &c,
            &one,
            Some("wrong-key-3a9"),
            &pulse("t-a", "s", "KB", 1.0)
        )
        .await
        .0,
        401
    );
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-b", "s", "KB", 1.0))
            .await
            .0,
        403
    );
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-a", "s", "KB", -1.0))
            .await
            .0,
        422
    );
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-a", "s", "KB", 1.0))
            .await
            .0,
        202
    );
    assert_eq!(
        send(&c, &one, Some(KEY_A), &pulse("t-a", "s", "KB", 1.0))
            .await
            .0,
        429
    );
    let url = format!("{}/admin/rejections", app.base);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        401,
        "admin routes want the token"
    );
    let ok = eventually(Duration::from_secs(5), || async {
        let r: serde_json::Value = c.get(&url).bearer_auth("op-token").json_reply().await;
        r["rejections"].as_array().is_some_and(|a| a.len() == 4)
    })
    .await;
    let r: serde_json::Value = c.get(&url).bearer_auth("op-token").json_reply().await;
    assert!(ok, "{r}");
    // Rejections are recorded off the request path, so two within a millisecond may land in
    // either order; the listing is newest first by the stream's own clock.
    let list = r["rejections"].as_array().unwrap();
    let mut statuses: Vec<&str> = list.iter().map(|e| e["status"].as_str().unwrap()).collect();
    let times: Vec<u64> = list
        .iter()
        .map(|e| e["time_ms"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {r}");
    statuses.sort();
    assert_eq!(statuses, ["401", "403", "422", "429"], "{r}");
    let by_status = |s: &str| list.iter().find(|e| e["status"] == s).unwrap();
    assert_eq!(by_status("429")["tenant"], "t-a");
    assert!(
        by_status("422")["reason"]
            .as_str()
            .unwrap()
            .contains("used_amount")
    );
    let text = r.to_string();
    assert!(
        !text.contains(KEY_A) && !text.contains("wrong-key-3a9"),
        "no key in the stream: {text}"
    );
    // /metrics moved to METRICS_ADDR.
    assert_eq!(
        c.get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let m = c
        .get(format!("http://{}/metrics", app.metrics_addr.unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), 200);
    let m = m.text().await.unwrap();
    assert!(
        m.contains("ingestor_pulses_total{outcome=\"limited\"} 1"),
        "{m}"
    );
    app.stop().await.unwrap();
}
