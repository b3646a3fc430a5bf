//! The ingest core against a real redis-server: exact totals, dedupe, key encoding, window
//! boundaries, bad input, overload and shutdown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures::StreamExt;
use rand::Rng;
use serde_json::json;

const PREFIX: &str = "pulses";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pulses_over_three_thousand_tenants_sum_exactly() {
    let app = TestApp::start(&[]).await;
    let mut rng = rand::rng();
    let pulses: Vec<(String, String, String, f64)> = (0..10_000)
        .map(|i| {
            let t = format!("tenant-{}", i % 3000);
            let s = format!("SKU-{}", rng.random_range(0..10));
            let u = ["KB", "MB", "GB"][rng.random_range(0..3)].to_string();
            (t, s, u, f64::from(rng.random_range(1u32..100_000)) / 100.0)
        })
        .collect();
    let app_ref = &app;
    let statuses: Vec<u16> = futures::stream::iter(pulses.iter().cloned())
        .map(|(t, s, u, a)| async move { app_ref.post_pulse(&pulse(&t, &s, &u, a)).await.0 })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|&s| s == 202),
        "every pulse is acknowledged"
    );
    let mut expected: BTreeMap<Key, Dec> = BTreeMap::new();
    for (t, s, u, a) in &pulses {
        *expected
            .entry((t.clone(), s.clone(), u.clone()))
            .or_default() += dec(*a);
    }
    app.assert_books(PREFIX, &expected);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pulse_id_sent_five_times_concurrently_counts_once() {
    let app = TestApp::start(&[]).await;
    let c = http();
    let mut body = pulse("t-1", "SKU-1", "KB", 10.0);
    body["pulse_id"] = json!("p-1");
    let url = format!("{}/ingest", app.base);
    let replies = futures::future::join_all((0..5).map(|_| post(&c, &url, &body))).await;
    assert!(replies.iter().all(|r| r.0 == 202));
    let accepted: u64 = replies
        .iter()
        .map(|r| r.2["accepted"].as_u64().unwrap())
        .sum();
    let duplicates: u64 = replies
        .iter()
        .map(|r| r.2["duplicates"].as_u64().unwrap())
        .sum();
    assert_eq!((accepted, duplicates), (1, 4));
    // Another tenant may use the same id.
    let mut other = pulse("t-2", "SKU-1", "KB", 1.0);
    other["pulse_id"] = json!("p-1");
    assert_eq!(post(&c, &url, &other).await.2["accepted"], 1);
    // The Idempotency-Key header works the same way.
    for _ in 0..3 {
        let r = c
            .post(&url)
            .header("idempotency-key", "k-9")
            .json(&pulse("t-3", "SKU-1", "KB", 2.5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let totals = app.redis().totals(PREFIX);
    assert_eq!(
        totals[&("t-1".into(), "SKU-1".into(), "KB".into())],
        dec(10.0)
    );
    assert_eq!(
        totals[&("t-2".into(), "SKU-1".into(), "KB".into())],
        dec(1.0)
    );
    assert_eq!(
        totals[&("t-3".into(), "SKU-1".into(), "KB".into())],
        dec(2.5)
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_redis_error_counts_once() {
    let app = TestApp::start(&[]).await;
    let mut body = pulse("t-1", "SKU-1", "KB", 7.25);
    body["pulse_id"] = json!("retry-1");
    // Redis refuses writes (out of memory): the first attempt fails cleanly.
    let _: () = app.redis().cmd(&["CONFIG", "SET", "maxmemory", "1"]);
    let (status, headers, reply) = app.post_pulse(&body).await;
    assert_eq!(status, 503, "{reply}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        app.redis().totals(PREFIX).is_empty(),
        "nothing was counted by the failed attempt"
    );
    let _: () = app.redis().cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    // The client retries, twice even: counted once.
    assert_eq!(app.post_pulse(&body).await.2["accepted"], 1);
    assert_eq!(app.post_pulse(&body).await.2["duplicates"], 1);
    assert_eq!(
        app.redis().totals(PREFIX)[&("t-1".into(), "SKU-1".into(), "KB".into())],
        dec(7.25)
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_utf8_names_round_trip_and_naive_joins_do_not_collide() {
    let app = TestApp::start(&[]).await;
    let names = [
        ("a:b", "c", "d", 1.0),
        ("a", "b:c", "d", 2.0),
        ("a|b", "c", "d", 4.0),
        ("a", "b|c", "d", 8.0),
        ("say \"hi\"", "sku with spaces", "KB/sec", 16.0),
        ("Zürich 東京 🚀", "ß", "µs", 32.0),
        ("{pulses:0}", "}{", "\\", 64.0),
    ];
    for (t, s, u, a) in names {
        assert_eq!(app.post_pulse(&pulse(t, s, u, a)).await.0, 202);
    }
    let expected: BTreeMap<Key, Dec> = names
        .iter()
        .map(|(t, s, u, a)| ((t.to_string(), s.to_string(), u.to_string()), dec(*a)))
        .collect();
    app.assert_books(PREFIX, &expected);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_boundary_during_load_puts_each_pulse_in_exactly_one_window() {
    // The scheduler is far away from the boundary logic here: writes seal by themselves.
    let app = TestApp::start(&[("WINDOW", "2s")]).await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    let started = Instant::now();
    let sent = Arc::new(std::sync::Mutex::new(Dec::default()));
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (c, url, sent) = (c.clone(), url.clone(), sent.clone());
            tokio::spawn(async move {
                let mut i = 0u32;
                while started.elapsed() < Duration::from_millis(4500) {
                    let a = f64::from(i % 100 + 1) / 4.0;
                    let (s, _, _) = post(&c, &url, &pulse(&format!("t-{w}"), "SKU", "KB", a)).await;
                    assert_eq!(s, 202);
                    *sent.lock().unwrap() += dec(a);
                    i += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let windows = app.redis().window_sums(PREFIX);
    let sealed = windows.keys().filter(|k| *k != "current").count();
    assert!(sealed >= 2, "at least two boundaries passed: {windows:?}");
    let total: Dec = windows.values().sum();
    let sent = sent.lock().unwrap().clone();
    assert!(
        total == sent,
        "sum of all windows {total} equals the sum sent {sent}"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_names_the_field() {
    let app = TestApp::start(&[
        ("MAX_BODY_BYTES", "2048"),
        ("ALLOWED_UNITS", "KB,MB"),
        ("MAX_AMOUNT", "1000"),
    ])
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    let batch = format!("{}/ingest/batch", app.base);
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        // (url, content type, body, status, text the error must contain)
        (
            &one,
            "application/json",
            "{\"tenant_id\": ",
            400,
            "malformed",
        ),
        (&one, "application/json", "[1,2]", 400, "object"),
        (
            &one,
            "text/plain",
            r#"{"tenant_id":"t"}"#,
            415,
            "application/json",
        ),
        (
            &one,
            "application/json",
            r#"{"product_sku":"s","used_amount":1,"use_unit":"KB"}"#,
            422,
            "tenant_id is required",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"","product_sku":"s","used_amount":1,"use_unit":"KB"}"#,
            422,
            "tenant_id must not be empty",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"a\u0007b","used_amount":1,"use_unit":"KB"}"#,
            422,
            "product_sku must not contain control",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":"12 KB","use_unit":"KB"}"#,
            422,
            "used_amount must be a number",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":-1,"use_unit":"KB"}"#,
            422,
            "used_amount must not be negative",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":1e999,"use_unit":"KB"}"#,
            422,
            "used_amount must be at most",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":1001,"use_unit":"KB"}"#,
            422,
            "used_amount must be at most",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"TB"}"#,
            422,
            "use_unit must be one of",
        ),
        (
            &one,
            "application/json",
            r#"{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unity":"TB"}"#,
            422,
            "use_unity must be one of",
        ),
        (
            &batch,
            "application/json",
            r#"[{"tenant_id":"t","product_sku":"s","used_amount":1,"use_unit":"KB"},{"tenant_id":"t","product_sku":"s","used_amount":-1,"use_unit":"KB"},7]"#,
            422,
            "[1].used_amount",
        ),
        (&batch, "application/json", "[]", 422, "at least one"),
    ];
    for (url, ct, body, status, text) in cases {
        let r = c
            .post(url)
            .header("content-type", ct)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let reply: serde_json::Value = r.json().await.unwrap();
        assert_eq!(got, status, "{body} -> {reply}");
        assert!(
            reply.to_string().contains(text),
            "{body} -> {reply} should mention {text:?}"
        );
    }
    // The batch lists every bad index.
    let r = c
        .post(&batch)
        .json(&json!([
            pulse("t", "s", "KB", 1.0),
            pulse("", "s", "KB", 1.0),
            pulse("t", "s", "KB", -2.0),
            7
        ]))
        .send()
        .await
        .unwrap();
    let reply: serde_json::Value = r.json().await.unwrap();
    let idx: Vec<u64> = reply["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [1, 2, 3]);
    // Over the body limit: 413.
    let big = format!(
        r#"{{"tenant_id":"{}","product_sku":"s","used_amount":1,"use_unit":"KB"}}"#,
        "x".repeat(4096)
    );
    let r = c
        .post(&one)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Nothing bad was counted; the service still answers.
    assert!(app.redis().totals(PREFIX).is_empty());
    assert_eq!(post(&c, &one, &pulse("t", "s", "KB", 1.0)).await.0, 202);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let app = TestApp::start(&[
        ("QUEUE_CAPACITY", "4"),
        ("WORKERS", "1"),
        ("WORKER_BATCH", "1"),
        ("REDIS_TIMEOUT", "5s"),
    ])
    .await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    assert_eq!(post(&c, &url, &pulse("warm", "s", "KB", 1.0)).await.0, 202);
    // Redis stops answering for 1.5 s; the worker waits, the queue fills.
    let _: () = app.redis().cmd(&["CLIENT", "PAUSE", "1500", "ALL"]);
    let bodies: Vec<_> = (0..20)
        .map(|i| pulse(&format!("t-{i}"), "s", "KB", 1.0))
        .collect();
    let replies = futures::future::join_all(bodies.iter().map(|b| post(&c, &url, b))).await;
    let shed: Vec<_> = replies.iter().filter(|r| r.0 == 503).collect();
    let ok = replies.iter().filter(|r| r.0 == 202).count();
    assert!(!shed.is_empty(), "some requests are shed");
    assert!(ok >= 1, "queued requests are committed once Redis answers");
    assert_eq!(
        ok + shed.len(),
        20,
        "every request is either committed or refused"
    );
    for (_, h, body) in &shed {
        assert_eq!(h.get("retry-after").unwrap(), "1");
        assert!(body["error"].as_str().unwrap().contains("queue is full"));
    }
    // Exactly the acknowledged pulses are in Redis.
    let totals = app.redis().totals(PREFIX);
    assert_eq!(totals.len(), ok + 1);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_accept_json_arrays_and_ndjson() {
    let app = TestApp::start(&[]).await;
    let c = http();
    let url = format!("{}/ingest/batch", app.base);
    let arr = json!([
        pulse("t", "s", "KB", 1.5),
        pulse("t", "s", "KB", 2.5),
        pulse("u", "s", "KB", 1.0)
    ]);
    let r = c
        .post(&url)
        .header("idempotency-key", "b-1")
        .json(&arr)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The same batch again with the same key: all duplicates.
    let r = c
        .post(&url)
        .header("idempotency-key", "b-1")
        .json(&arr)
        .send()
        .await
        .unwrap();
    let reply: serde_json::Value = r.json().await.unwrap();
    assert_eq!(reply["duplicates"], 3, "{reply}");
    let nd = "{\"tenant_id\":\"t\",\"product_sku\":\"s\",\"used_amount\":1,\"use_unit\":\"KB\"}\n{\"tenant_id\":\"v\",\"product_sku\":\"s\",\"used_amount\":2,\"use_unit\":\"KB\"}\n";
    let r = c
        .post(&url)
        .header("content-type", "application/x-ndjson")
        .body(nd)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let totals = app.redis().totals(PREFIX);
    assert_eq!(totals[&("t".into(), "s".into(), "KB".into())], dec(5.0));
    assert_eq!(totals[&("u".into(), "s".into(), "KB".into())], dec(1.0));
    assert_eq!(totals[&("v".into(), "s".into(), "KB".into())], dec(2.0));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_mode_answers_before_the_write_and_keeps_the_totals() {
    let app = TestApp::start(&[("ACK_MODE", "enqueued"), ("REDIS_TIMEOUT", "5s")]).await;
    let _: () = app.redis().cmd(&["CLIENT", "PAUSE", "1000", "ALL"]);
    let started = Instant::now();
    let mut sent = Dec::default();
    for i in 0..50 {
        let a = f64::from(i) + 0.5;
        let (s, _, body) = app.post_pulse(&pulse("t", "s", "KB", a)).await;
        assert_eq!(s, 202);
        assert_eq!(body["status"], "queued");
        sent += dec(a);
    }
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "answers came while Redis was paused"
    );
    let key: Key = ("t".into(), "s".into(), "KB".into());
    let ok = eventually(Duration::from_secs(5), || {
        let v = app.redis().totals(PREFIX).get(&key).cloned();
        let sent = sent.clone();
        async move { v == Some(sent) }
    })
    .await;
    assert!(
        ok,
        "the queue is committed after the answers: {:?}",
        app.redis().totals(PREFIX).get(&key)
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_keeps_every_acknowledged_pulse_and_exits_zero() {
    let redis = RedisServer::start();
    let logs = tempfile::tempdir().unwrap();
    let mut ing = Ingestor::spawn(&settings(&redis, &[]), logs.path(), "ingestor").await;
    let c = http();
    let url = format!("{}/ingest", ing.base);
    let acked = Arc::new(std::sync::Mutex::new(BTreeMap::<Key, Dec>::new()));
    let stop_at = Instant::now() + Duration::from_secs(3);
    let tasks: Vec<_> = (0..32)
        .map(|w| {
            let (c, url, acked) = (c.clone(), url.clone(), acked.clone());
            tokio::spawn(async move {
                let mut i = 0u32;
                while Instant::now() < stop_at {
                    let a = f64::from(i % 50 + 1) / 2.0;
                    let t = format!("t-{w}-{}", i % 7);
                    if let Ok(r) = c.post(&url).json(&pulse(&t, "s", "KB", a)).send().await
                        && r.status() == 202
                    {
                        *acked
                            .lock()
                            .unwrap()
                            .entry((t, "s".into(), "KB".into()))
                            .or_default() += dec(a);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ing.signal("TERM");
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        ing.wait(Duration::from_secs(15)).await,
        Some(0),
        "exit code; log:\n{}",
        ing.log_text()
    );
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    assert_books(&acked, &redis.totals(PREFIX));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_by_timeouts_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start(&[
        ("HEADER_READ_TIMEOUT", "500ms"),
        ("REQUEST_TIMEOUT", "2500ms"),
        ("MAX_CONNECTIONS", "3"),
    ])
    .await;
    // Slow-loris: headers that never finish are cut after the header timeout.
    let mut loris = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    loris
        .write_all(b"POST /ingest HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), loris.read_to_end(&mut buf))
        .await
        .expect("server closes the connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        started.elapsed()
    );
    // A body that trickles in is answered 408 when the request timeout passes.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tenant_id\"").await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(6), slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // At the connection cap, a new client waits until a slot frees.
    let idle: Vec<_> =
        futures::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(app.addr))).await;
    let _ = http(); // installs the TLS crypto provider reqwest needs
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!("{}/ingest", app.base);
    assert!(
        c.post(&url)
            .json(&pulse("t", "s", "KB", 1.0))
            .send()
            .await
            .is_err(),
        "no slot while 3 connections are open"
    );
    drop(idle);
    let ok = eventually(Duration::from_secs(5), || async {
        c.post(&url)
            .json(&pulse("t", "s", "KB", 1.0))
            .send()
            .await
            .is_ok_and(|r| r.status() == 202)
    })
    .await;
    assert!(ok, "served once the idle connections are gone");
    app.stop().await.unwrap();
}
