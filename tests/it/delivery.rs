//! Seal and delivery against real redis-server, real replica processes and the reference
//! Processor: books per key and per window, outages, a killed lock holder, dead letters.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use pulse_ingestor::app::App;
use pulse_ingestor::config::Config;
use pulse_ingestor::store::Store;
use pulse_producer::processor::{Faults, Processor, Record};
use serde_json::json;

type Books = Arc<Mutex<(BTreeMap<Key, Dec>, BTreeMap<u64, Dec>)>>;

/// Sends single pulses to the given replicas in turn for `dur`, recording what got 202 per key
/// and per window (the 202 names the window).
async fn load(bases: Vec<String>, dur: Duration, workers: usize, tenants: usize) -> Books {
    let books: Books = Default::default();
    let c = http();
    let until = Instant::now() + dur;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (c, books, bases) = (c.clone(), books.clone(), bases.clone());
            tokio::spawn(async move {
                let mut i = 0usize;
                while Instant::now() < until {
                    let base = &bases[(w + i) % bases.len()];
                    let t = format!("tenant-{}", (w * 7919 + i) % tenants);
                    let s = format!("SKU-{}", i % 10);
                    let a = ((i % 997) + 1) as f64 / 100.0;
                    let (status, _, body) =
                        post(&c, &format!("{base}/ingest"), &pulse(&t, &s, "KB", a)).await;
                    if status == 202 {
                        let win = body["window_start"]
                            .as_u64()
                            .expect("a single pulse names its window");
                        let mut b = books.lock().unwrap();
                        *b.0.entry((t, s, "KB".into())).or_default() += dec(a);
                        *b.1.entry(win).or_default() += dec(a);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    books
}

fn by_window(records: &[Record]) -> BTreeMap<u64, Dec> {
    let mut m = BTreeMap::new();
    for r in records {
        let t = humantime::parse_rfc3339(&r.window_start).unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        *m.entry(secs).or_default() += &r.used_amount;
    }
    m
}

fn assert_windows(expected: &BTreeMap<u64, Dec>, found: &BTreeMap<u64, Dec>) {
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        found.keys().collect::<Vec<_>>(),
        "same windows"
    );
    for (w, v) in expected {
        assert!(
            *v == found[w],
            "window {w}: sent {v}, delivered {}",
            found[w]
        );
    }
}

/// Waits until every shard has moved past the window starting at `start`, that is until that
/// window is sealed everywhere (by a scheduler tick or a write).
async fn wait_sealed(redis: &RedisServer, shards: u32, start: u64) {
    let ok = eventually(Duration::from_secs(10), || async {
        (0..shards).all(|s| {
            let w: Option<u64> =
                redis.cmd(&["GET", &pulse_ingestor::store::Keys::new("pulses").window(s)]);
            w.is_some_and(|w| w > start)
        })
    })
    .await;
    assert!(ok, "window {start} was not sealed on every shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_every_window_once_and_the_books_balance() {
    let redis = RedisServer::start();
    let (proc_, purl) = processor(Faults::default()).await;
    let logs = tempfile::tempdir().unwrap();
    let vars = settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("BATCH_SIZE", "50"),
        ],
    );
    let a = Ingestor::spawn(&vars, logs.path(), "a").await;
    let b = Ingestor::spawn(&vars, logs.path(), "b").await;
    let books = load(
        vec![a.base.clone(), b.base.clone()],
        Duration::from_millis(4500),
        16,
        500,
    )
    .await;
    let (keys, windows) = books.lock().unwrap().clone();
    wait_sealed(&redis, 8, *windows.keys().last().unwrap()).await;
    wait_delivered(&a.base, Duration::from_secs(20)).await;
    assert!(
        windows.len() >= 2,
        "load spanned at least two windows: {windows:?}"
    );
    let records = proc_.records();
    assert_books(&keys, &by_key(&records));
    assert_windows(&windows, &by_window(&records));
    let t = proc_.totals();
    assert_eq!(t.redelivered, 0, "no record was delivered twice");
    assert_eq!(t.deliveries as usize, t.records);
    // Both replicas took part in sealing or draining; neither logged an error.
    for r in [&a, &b] {
        assert!(!r.log_text().contains("ERROR"), "{}", r.log_text());
    }
    // Redis holds nothing but the current (empty) state.
    let left = redis.undelivered("pulses");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_outage_over_several_windows_loses_nothing_and_mixes_no_hours() {
    processor_outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_processor_outage_over_several_windows_loses_nothing() {
    processor_outage(true).await;
}

async fn processor_outage(on_cluster: bool) {
    let redis = RedisServer::start();
    let cluster = on_cluster.then(|| RedisCluster::start(3, 0));
    let port = free_port();
    let mut vars = settings(
        &redis,
        &[
            ("WINDOW", "1s"),
            ("PROCESSOR_URL", &format!("http://127.0.0.1:{port}/batches")),
            ("PROCESSOR_TIMEOUT", "500ms"),
            ("DELIVERY_MAX_ATTEMPTS", "2"),
        ],
    );
    if let Some(c) = &cluster {
        vars.remove("REDIS_URL");
        vars.insert("REDIS_CLUSTER_URLS".into(), c.urls());
    }
    let app = TestApp::spawn(vars).await;
    // Three or more windows while nothing listens at the Processor's address.
    let books = load(vec![app.base.clone()], Duration::from_millis(3500), 8, 50).await;
    let last = *books.lock().unwrap().1.keys().last().unwrap();
    match &cluster {
        None => wait_sealed(&redis, 8, last).await,
        Some(c) => {
            let ok = eventually(Duration::from_secs(10), || async {
                (0..8).all(|s| {
                    c.get_u64(&pulse_ingestor::store::Keys::new("pulses").window(s))
                        .is_some_and(|w| w > last)
                })
            })
            .await;
            assert!(ok, "window {last} was not sealed on every shard");
        }
    }
    let p = pending(&app.base).await;
    assert!(
        p["pending_windows"].as_u64().unwrap() >= 3,
        "windows wait for the Processor: {p}"
    );
    // The Processor comes up answering 500 for a while, then recovers.
    let proc_ = Processor::new(
        Faults {
            fail_first: 20,
            ..Faults::default()
        },
        None,
    )
    .unwrap();
    pulse_producer::processor::spawn(proc_.clone(), format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    app.wait_delivered(Duration::from_secs(30)).await;
    let (keys, windows) = books.lock().unwrap().clone();
    assert!(windows.len() >= 3, "{windows:?}");
    let records = proc_.records();
    assert_books(&keys, &by_key(&records));
    assert_windows(&windows, &by_window(&records));
    assert!(
        proc_.totals().batches_seen > proc_.totals().batches_accepted,
        "the 500s were seen and retried"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lock_holder_mid_drain_lets_the_other_replica_finish() {
    let redis = RedisServer::start();
    // Slow Processor: 100 batches of 100 records at 40 ms each take seconds to drain.
    let (proc_, purl) = processor(Faults {
        latency: Some(Duration::from_millis(40)),
        ..Faults::default()
    })
    .await;
    let logs = tempfile::tempdir().unwrap();
    let vars = settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("SHARDS", "1"),
            ("BATCH_SIZE", "100"),
            ("DELIVERY_CONCURRENCY", "1"),
            ("LOCK_TTL", "1s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    );
    let mut a = Ingestor::spawn(&vars, logs.path(), "a").await;
    let mut b = Ingestor::spawn(&vars, logs.path(), "b").await;
    let c = http();
    // 10,000 distinct keys in one window, in batches.
    let mut expected: BTreeMap<Key, Dec> = BTreeMap::new();
    let mut sent_window = None;
    for chunk in 0..10 {
        let items: Vec<_> = (0..1000)
            .map(|i| {
                let t = format!("tenant-{chunk}-{i}");
                expected.insert((t.clone(), "SKU".into(), "KB".into()), dec(1.25));
                pulse(&t, "SKU", "KB", 1.25)
            })
            .collect();
        let (s, _, body) = post(&c, &format!("{}/ingest/batch", a.base), &json!(items)).await;
        assert_eq!(s, 202, "{body}");
        sent_window.get_or_insert(body["window_start"].as_u64());
    }
    // Wait until a replica holds the lock and some batches are through, then kill it.
    let holder = loop {
        let mut found = None;
        for (i, r) in [&a, &b].iter().enumerate() {
            let m = c
                .get(format!("{}/metrics", r.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if m.lines().any(|l| l == "ingestor_drain_locks_held 1") {
                found = Some(i);
            }
        }
        if let Some(i) = found
            && proc_.totals().batches_accepted >= 5
        {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delivered_before = proc_.totals().records;
    let (victim, survivor) = if holder == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    victim.signal("KILL");
    assert_eq!(
        victim.wait(Duration::from_secs(5)).await,
        None,
        "killed by a signal, no exit code"
    );
    assert!(
        delivered_before < 10_000,
        "killed mid-drain ({delivered_before} delivered)"
    );
    wait_delivered(&survivor.base, Duration::from_secs(60)).await;
    let records = proc_.records();
    assert_books(&expected, &by_key(&records));
    let t = proc_.totals();
    assert_eq!(t.records, 10_000);
    // Records in flight when the holder died may arrive twice; the record_id keeps them single.
    assert!(t.deliveries >= 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_is_dead_lettered_and_the_rest_delivered_then_replayed() {
    let redis = RedisServer::start();
    let (proc_, purl) = processor(Faults {
        reject_tenant: Some("bad".into()),
        ..Faults::default()
    })
    .await;
    let vars = settings(
        &redis,
        &[
            ("WINDOW", "1s"),
            ("BATCH_SIZE", "1"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("ADMIN_TOKEN", "s3cret"),
        ],
    );
    let app = TestApp::spawn(vars).await;
    let c = http();
    let mut good = BTreeMap::new();
    for i in 0..20 {
        let t = format!("good-{i}");
        assert_eq!(
            post(
                &c,
                &format!("{}/ingest", app.base),
                &pulse(&t, "S", "KB", 2.0)
            )
            .await
            .0,
            202
        );
        good.insert((t, "S".to_string(), "KB".to_string()), dec(2.0));
    }
    for sku in ["S1", "S2", "S3"] {
        assert_eq!(
            post(
                &c,
                &format!("{}/ingest", app.base),
                &pulse("bad", sku, "KB", 5.0)
            )
            .await
            .0,
            202
        );
    }
    // Admin routes want the token.
    assert_eq!(
        c.get(format!("{}/admin/pending", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let admin = |path: &str| c.get(format!("{}{path}", app.base)).bearer_auth("s3cret");
    let ok = eventually(Duration::from_secs(15), || async {
        let p: serde_json::Value = admin("/admin/pending").json_reply().await;
        p["pending_windows"] == 0 && p["dead_letter_records"] == 3
    })
    .await;
    let p: serde_json::Value = admin("/admin/pending").json_reply().await;
    assert!(ok, "{p}");
    assert_books(&good, &by_key(&proc_.records()));
    // The dead letters can be inspected, with the Processor's reason.
    let dl: serde_json::Value = admin("/admin/dead-letters").json_reply().await;
    let recs = dl["records"].as_array().unwrap();
    assert_eq!(recs.len(), 3, "{dl}");
    for r in recs {
        assert_eq!(r["tenant_id"], "bad");
        assert_eq!(r["reason"]["status"], 422);
        assert_eq!(r["used_amount"], 5);
        assert_eq!(r["used_amount_text"], "5");
    }
    // Fix the Processor, replay, and everything arrives.
    proc_.set_faults(Faults::default());
    let r = c
        .post(format!("{}/admin/dead-letters/replay", app.base))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["replayed_records"], 3);
    let ok = eventually(Duration::from_secs(15), || async {
        let p: serde_json::Value = admin("/admin/pending").json_reply().await;
        p["pending_windows"] == 0 && p["dead_letter_records"] == 0 && proc_.records().len() == 23
    })
    .await;
    assert!(
        ok,
        "{}",
        admin("/admin/pending")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    );
    let mut all = good.clone();
    for sku in ["S1", "S2", "S3"] {
        all.insert(("bad".into(), sku.into(), "KB".into()), dec(5.0));
    }
    assert_books(&all, &by_key(&proc_.records()));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_seals_for_one_boundary_toggle_exactly_once() {
    let redis = RedisServer::start();
    // Windows long enough that the 200 racing calls (on a loaded CI machine) fall in one.
    let mut vars: HashMap<String, String> = settings(&redis, &[("WINDOW", "4s"), ("SHARDS", "4")]);
    vars.remove("LISTEN_ADDR");
    let store = Store::new(&Config::from_map(&vars).unwrap()).unwrap();
    let mut conn = store.conn().await.unwrap();
    let first = store.seal(&mut conn, 0).await.unwrap();
    for s in 0..4 {
        store.seal(&mut conn, s).await.unwrap();
    }
    // Wait for the next boundary, then 50 callers per shard race to seal it.
    let wait_us = (first.window_start + 4) * 1_000_000 - first.redis_now_micros;
    tokio::time::sleep(Duration::from_micros(wait_us) + Duration::from_millis(100)).await;
    let calls = (0..50).flat_map(|_| 0..4u32).map(|s| {
        let store = store.clone();
        async move {
            let mut c = store.conn().await.unwrap();
            store.seal(&mut c, s).await.unwrap()
        }
    });
    let replies = futures::future::join_all(calls).await;
    let toggles = replies.iter().filter(|r| r.toggled).count();
    assert_eq!(toggles, 4, "one toggle per shard");
    let windows: std::collections::HashSet<u64> = replies.iter().map(|r| r.window_start).collect();
    assert_eq!(windows.len(), 1, "every caller sees the same new window");
    for s in 0..4 {
        let g: String = redis.cmd(&["GET", &store.keys.generation(s)]);
        assert_ne!(g, first.generation, "shard {s} flipped once, not twice");
    }
}

/// Sends one pulse with an id; returns the answer's body.
async fn send_with_id(
    c: &reqwest::Client,
    base: &str,
    t: &str,
    id: &str,
    a: f64,
) -> serde_json::Value {
    let mut p = pulse(t, "S", "KB", a);
    p["pulse_id"] = serde_json::json!(id);
    let (status, _, body) = post(c, &format!("{base}/ingest"), &p).await;
    assert_eq!(status, 202, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_shard_count_keeps_pulse_ids_and_delivers_every_pulse() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let c = http();
    let mut expected: BTreeMap<Key, Dec> = BTreeMap::new();
    // Eight shards, no Processor yet: what is sealed stays pending.
    let app8 = TestApp::spawn(settings(&redis, &[("WINDOW", "2s"), ("SHARDS", "8")])).await;
    for i in 0..40 {
        let t = format!("tenant-{i}");
        send_with_id(&c, &app8.base, &t, &format!("id-{i}"), 1.0).await;
        *expected.entry((t, "S".into(), "KB".into())).or_default() += dec(1.0);
    }
    app8.stop().await.unwrap();

    // A replica with another SHARDS refuses to start: it would look for ids in other shards.
    let refused = App::build(
        Config::from_map(&settings(&redis, &[("WINDOW", "2s"), ("SHARDS", "2")])).unwrap(),
    )
    .await;
    match refused {
        Err(e @ pulse_ingestor::app::AppError::Config(_)) => {
            assert!(e.to_string().contains("reshard"), "{e}")
        }
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a replica with another SHARDS started"),
    }

    // The documented migration: the real binary, with the replicas stopped.
    let out = std::process::Command::new(bin("pulse-ingestor"))
        .args(["reshard", "--shards", "2"])
        .env_clear()
        .env("REDIS_URL", redis.url())
        .env("SHARDS", "8")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("40 pulse ids moved"), "{text}");

    // Two shards from now on: every id re-sent is recognised, new pulses count.
    let app2 = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("SHARDS", "2"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    for i in 0..40 {
        let t = format!("tenant-{i}");
        let body = send_with_id(&c, &app2.base, &t, &format!("id-{i}"), 1.0).await;
        assert_eq!(
            body["duplicates"], 1,
            "id-{i} counted again after the reshard: {body}"
        );
        let body = send_with_id(&c, &app2.base, &t, &format!("new-{i}"), 2.0).await;
        assert_eq!(body["accepted"], 1, "{body}");
        *expected.entry((t, "S".into(), "KB".into())).or_default() += dec(2.0);
    }
    let ok = eventually(Duration::from_secs(20), || async {
        let found = by_key(&p.records());
        found.len() == expected.len() && expected.iter().all(|(k, v)| found.get(k) == Some(v))
    })
    .await;
    assert!(ok, "every pulse of both shard counts is delivered");
    assert_books(&expected, &by_key(&p.records()));
    // Nothing is left in the old shards.
    let left = redis.undelivered("pulses");
    assert!(left.is_empty(), "{left:?}");
    app2.stop().await.unwrap();
}
