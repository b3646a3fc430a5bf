//! Money-safety: paths that once deleted, lost or double-counted money, each pinned by a test
//! that failed before its fix (RELIABILITY.md, "found and fixed").

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use axum::routing::get;
use pulse_ingestor::config::Config;
use pulse_ingestor::store::lock::DrainLock;
use pulse_ingestor::store::{Store, WriteItem};
use pulse_producer::processor::Faults;

/// Sends pulses to tenants `t-0..n` and waits for their window to end.
async fn ingest_and_wait_for_the_window(
    c: &reqwest::Client,
    base: &str,
    n: usize,
) -> BTreeMap<Key, Dec> {
    let mut expected = BTreeMap::new();
    for i in 0..n {
        let t = format!("t-{i}");
        let (s, _, b) = post(c, &format!("{base}/ingest"), &pulse(&t, "S", "KB", 1.5)).await;
        assert_eq!(s, 202, "{b}");
        expected.insert((t, "S".to_string(), "KB".to_string()), dec(1.5));
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_processor_never_deletes_a_window() {
    // The Processor URL answers 301 to a login page that answers 200 to anything (an ingress
    // redirecting http to https, an auth proxy): following it turned the POST into a GET.
    let login = axum::Router::new()
        .route(
            "/batches",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::MOVED_PERMANENTLY,
                    [("location", "/login")],
                )
            }),
        )
        .route(
            "/login",
            get(|| async { "please log in" }).post(|| async { "please log in" }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, login).await.unwrap() });
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("http://{addr}/batches")),
        ],
    ))
    .await;
    let c = http();
    let expected = ingest_and_wait_for_the_window(&c, &app.base, 20).await;
    app.flush_now().await;
    let p = pending(&app.base).await;
    assert_eq!(p["pending_records"], 20, "nothing may be deleted: {p}");
    assert!(
        metric(
            &c,
            &app.base,
            "ingestor_delivery_failures_total{reason=\"status_3xx\"}"
        )
        .await
        .unwrap_or(0.0)
            > 0.0,
        "the redirect is counted as a failed delivery"
    );
    app.stop().await.unwrap();
    // Pointed at the real Processor, every record arrives.
    let (proc_, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let ok = eventually(Duration::from_secs(15), || async {
        proc_.records().len() == 20
    })
    .await;
    assert!(ok);
    let found: BTreeMap<Key, Dec> = proc_
        .records()
        .into_iter()
        .map(|r| ((r.tenant_id, r.product_sku, r.use_unit), r.used_amount))
        .collect();
    assert_books(&expected, &found);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_refusing_our_token_is_retried_not_dead_lettered() {
    let redis = RedisServer::start();
    let (proc_, purl) = processor(Faults {
        token: Some("new-token".into()),
        ..Faults::default()
    })
    .await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("PROCESSOR_TOKEN", "old-token"),
        ],
    ))
    .await;
    let c = http();
    ingest_and_wait_for_the_window(&c, &app.base, 10).await;
    app.flush_now().await;
    let p = pending(&app.base).await;
    assert_eq!(p["dead_letter_records"], 0, "{p}");
    assert_eq!(p["pending_records"], 10, "{p}");
    assert!(
        metric(&c, &app.base, "ingestor_processor_auth_failures_total")
            .await
            .unwrap()
            > 0.0
    );
    // The Processor's side of the rotation completes: the same records go through.
    proc_.set_faults(Faults {
        token: Some("old-token".into()),
        ..Faults::default()
    });
    let ok = eventually(Duration::from_secs(15), || async {
        proc_.records().len() == 10
    })
    .await;
    assert!(ok, "{}", pending(&app.base).await);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_its_rate_limit_can_never_admit_gets_413_not_an_endless_429() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(
        &redis,
        &[("RATE_LIMIT", "100"), ("RATE_LIMIT_REPLICAS", "4")],
    ))
    .await;
    let batch: Vec<serde_json::Value> = (0..60).map(|_| pulse("t", "s", "KB", 1.0)).collect();
    for _ in 0..3 {
        let (s, h, body) = app.post_batch(&serde_json::json!(batch)).await;
        assert_eq!(s, 413, "{body}");
        assert!(h.get("retry-after").is_none());
        assert!(
            body["error"].as_str().unwrap().contains("at most 25"),
            "{body}"
        );
    }
    let small: Vec<serde_json::Value> = (0..25).map(|_| pulse("t", "s", "KB", 1.0)).collect();
    let (s, _, body) = app.post_batch(&serde_json::json!(small)).await;
    assert_eq!(s, 202, "{body}");
    app.stop().await.unwrap();
}

/// The write script runs, its reply is lost, and the client library sends it again (redis-rs'
/// cluster client does this after an I/O error): the commit token makes the second run answer
/// the first one's flags instead of counting again — on one Redis and on a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_twice_counts_once() {
    let redis = RedisServer::start();
    let cluster = RedisCluster::start(3, 0);
    for vars in [settings(&redis, &[]), {
        let mut v = settings(&redis, &[]);
        v.remove("REDIS_URL");
        v.insert("REDIS_CLUSTER_URLS".into(), cluster.urls());
        v
    }] {
        let store = Store::new(&Config::from_map(&vars).unwrap()).unwrap();
        store.check_layout().await.unwrap();
        let mut conn = store.conn().await.unwrap();
        let amount = pulse_ingestor::amount::Amount::parse_decimal(
            "2.5",
            9,
            pulse_ingestor::amount::MAX_TOTAL,
        )
        .unwrap();
        let items = vec![WriteItem {
            field: pulse_ingestor::store::keys::encode_field("t", "s", "KB"),
            amount,
            digest: None,
            placement: 0,
            timestamp_ms: None,
            ops: String::new(),
        }];
        let first = store.write(&mut conn, 3, "token-1", &items).await.unwrap();
        let again = store.write(&mut conn, 3, "token-1", &items).await.unwrap();
        assert_eq!(first, again);
        store.write(&mut conn, 3, "token-2", &items).await.unwrap();
        let totals = if vars.contains_key("REDIS_CLUSTER_URLS") {
            cluster.totals("pulses")
        } else {
            redis.totals("pulses")
        };
        assert_eq!(
            totals[&("t".into(), "s".into(), "KB".into())],
            dec(5.0),
            "two commits, not three"
        );
    }
}

/// A slow upload plus a slow commit outlast the request timeout. The commit went to Redis, so
/// a 408 ("request timed out", read as "nothing happened") would be wrong: the service answers
/// the ambiguous 503 first, and a retry with the same id completes it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_after_queueing_is_told_it_may_have_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(
        &redis,
        &[("REQUEST_TIMEOUT", "3s"), ("REDIS_TIMEOUT", "2500ms")],
    ))
    .await;
    let c = http();
    assert_eq!(
        post(
            &c,
            &format!("{}/ingest", app.base),
            &pulse("warm", "s", "KB", 1.0)
        )
        .await
        .0,
        202
    );
    let mut p = pulse("t", "s", "KB", 4.0);
    p["pulse_id"] = serde_json::json!("p-1");
    let body = serde_json::to_vec(&p).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST /ingest HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Redis holds writes for 2 s: the commit lands after the handler's deadline (~2.7 s from the
    // request's start) but within REDIS_TIMEOUT.
    let _: () = redis.cmd(&["CLIENT", "PAUSE", "2000", "WRITE"]);
    tcp.write_all(&body).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "not a 408 that says nothing was counted: {answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    assert!(answer.contains("may have been counted"), "{answer}");
    // It was counted; the retry with the same id is recognised.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _, body) = post(&c, &format!("{}/ingest", app.base), &p).await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["duplicates"], 1, "{body}");
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(4.0)
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keeps_the_service_unready() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "volatile-lru"]);
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let c = http();
    let r = c.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["eviction"].as_str().unwrap().contains("volatile-lru"),
        "{body}"
    );
    app.stop().await.unwrap();
    let app = TestApp::spawn(settings(&redis, &[("REDIS_ALLOW_EVICTION", "true")])).await;
    let r = c.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 200, "overridden on purpose");
    app.stop().await.unwrap();
    let _: () = redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let r = c.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_literal_pulse_id_never_collides_with_a_batch_item_id() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let c = http();
    let r = c
        .post(format!("{}/ingest/batch", app.base))
        .header("idempotency-key", "k")
        .json(&serde_json::json!([pulse("t", "s", "KB", 1.0)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // A different pulse whose own id happens to read like the old derived form `<key>#<i>`.
    let mut p = pulse("t", "s", "KB", 2.0);
    p["pulse_id"] = serde_json::json!("k#0");
    let (s, _, body) = post(&c, &format!("{}/ingest", app.base), &p).await;
    assert_eq!(s, 202);
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(3.0)
    );
    app.stop().await.unwrap();
}

/// Replay takes the shard's drain lock: while a drain holds it, replay waits (and reports the
/// shard busy) instead of adding records to a window the drain may be finishing. And it covers
/// shards above the current SHARDS, which the listing shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_respects_the_drain_lock_and_reaches_every_shard() {
    let redis = RedisServer::start();
    let (proc_, purl) = processor(Faults {
        error_rate: 1.0,
        fail_status: 422,
        ..Faults::default()
    })
    .await;
    let vars8 = settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    );
    let app = TestApp::spawn(vars8.clone()).await;
    let c = http();
    // Tenants spread over the eight shards.
    let tenants: Vec<String> = (0..40).map(|i| format!("bad-{i}")).collect();
    for t in &tenants {
        assert_eq!(
            post(
                &c,
                &format!("{}/ingest", app.base),
                &pulse(t, "S", "KB", 1.0)
            )
            .await
            .0,
            202
        );
    }
    let ok = eventually(Duration::from_secs(15), || async {
        app.flush_now().await;
        pending(&app.base).await["dead_letter_records"] == 40
    })
    .await;
    assert!(ok, "{}", pending(&app.base).await);
    app.stop().await.unwrap();
    let store = Store::new(&Config::from_map(&vars8).unwrap()).unwrap();
    let high = (0..40)
        .map(|i| pulse_ingestor::store::keys::shard_of(&format!("bad-{i}"), 8))
        .max()
        .unwrap();
    assert!(high >= 2, "some dead letters sit in shards above 2");
    // Two shards from now on (the documented way), then a drain holds the highest shard's lock.
    store.reshard(2, false).await.unwrap();
    let mut conn = store.conn().await.unwrap();
    let held = DrainLock::with_token(high, "a-drain", Duration::from_secs(30));
    assert!(store.try_lock(&mut conn, &held).await.unwrap());
    proc_.set_faults(Faults::default());
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("SHARDS", "2"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let r = c
        .post(format!("{}/admin/dead-letters/replay", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "a drain holds shard {high}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("[{high}]")),
        "{body}"
    );
    store.release_lock(&mut conn, &held).await.unwrap();
    let r = c
        .post(format!("{}/admin/dead-letters/replay", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ok = eventually(Duration::from_secs(15), || async {
        app.flush_now().await;
        proc_.records().len() == 40
    })
    .await;
    assert!(ok, "every shard's dead letters were replayed and delivered");
    let p = pending(&app.base).await;
    assert_eq!(p["dead_letter_records"], 0, "{p}");
    app.stop().await.unwrap();
}

/// Pulse ids live in per-shard sets bucketed by `DEDUPE_TTL`: an id is recognised for at least
/// `DEDUPE_TTL` whichever bucket the re-send falls in, and counted again after twice that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulse_id_is_remembered_for_at_least_the_dedupe_ttl() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("DEDUPE_TTL", "2s")])).await;
    let c = http();
    let send = |id: &'static str| {
        let (c, url) = (c.clone(), format!("{}/ingest", app.base));
        async move {
            let mut p = pulse("t", "s", "KB", 1.0);
            p["pulse_id"] = serde_json::json!(id);
            let (s, _, body) = post(&c, &url, &p).await;
            assert_eq!(s, 202, "{body}");
            body
        }
    };
    assert_eq!(send("a").await["accepted"], 1);
    // Every 0.4 s for 1.6 s: across a bucket boundary, the id is still known.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(send("a").await["duplicates"], 1);
    }
    // Two TTLs after its last bucket began, it has expired.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert_eq!(send("a").await["accepted"], 1);
    let sets: Vec<String> = redis.cmd(&["KEYS", "{pulses:*}:seen:*"]);
    for k in &sets {
        let ttl: i64 = redis.cmd(&["TTL", k]);
        assert!(ttl > 0 && ttl <= 4, "{k} expires as a whole: {ttl}");
    }
    app.stop().await.unwrap();
}

/// Each marker hash gets its expiry from the first commit that writes it (noted once per bucket,
/// not set again per id): after many commits touching the same hashes, every one of them
/// expires within two DEDUPE_TTLs, and every id is still a duplicate when sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_marker_hash_expires_though_its_expiry_is_set_once() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("DEDUPE_TTL", "60s")])).await;
    let batch = |round: usize| {
        serde_json::Value::Array(
            (0..200)
                .map(|i| {
                    let mut p = pulse("t", "s", "KB", 1.0);
                    p["pulse_id"] = serde_json::json!(format!("id-{round}-{i}"));
                    p
                })
                .collect(),
        )
    };
    // 10 commits of 200 ids over the slot hashes of a first bucket: every hash is written by
    // several commits.
    for round in 0..10 {
        let (s, _, body) = app.post_batch(&batch(round)).await;
        assert_eq!(
            (s, &body["accepted"]),
            (202, &serde_json::json!(200)),
            "{body}"
        );
    }
    let keys: Vec<String> = redis.cmd(&["KEYS", "{pulses:*}:seen:*"]);
    assert!(
        keys.len() > 50,
        "ids spread over the slot hashes: {}",
        keys.len()
    );
    for k in &keys {
        let ttl: i64 = redis.cmd(&["TTL", k]);
        assert!(
            ttl > 0 && ttl <= 120,
            "{k} expires within two DEDUPE_TTLs: {ttl}"
        );
    }
    for round in 0..10 {
        let (s, _, body) = app.post_batch(&batch(round)).await;
        assert_eq!(
            (s, &body["duplicates"]),
            (202, &serde_json::json!(200)),
            "{body}"
        );
    }
    app.stop().await.unwrap();
}

/// The release that kept one string key per pulse id (the float layout's markers): they are no
/// longer read, so while they may be live — `DEDUPE_TTL` after the release before first started,
/// or for a deployment that release never ran — the start is refused, saying until when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_markers_of_the_float_layout_are_refused_at_start_until_they_expire() {
    let redis = RedisServer::start();
    let keys = pulse_ingestor::store::Keys::new("pulses");
    let start = |redis: &RedisServer| {
        let cfg = pulse_ingestor::config::Config::from_map(&settings(redis, &[])).unwrap();
        async move {
            pulse_ingestor::app::App::build(cfg)
                .await
                .err()
                .map(|e| e.to_string())
        }
    };
    // Only releases before the marker sets ran here: their markers' age is unknown.
    let _: i64 = redis.cmd(&["HSET", &keys.meta(), "shards_max", "8", "shards", "8"]);
    let refused = start(&redis).await.expect("refused");
    assert!(refused.contains("may be live"), "{refused}");
    // The release before started a minute ago: they are live for another 23 h 59 min.
    let now: Vec<String> = redis.cmd(&["TIME"]);
    let now: u64 = now[0].parse().unwrap();
    let since = (now - 60).to_string();
    let _: i64 = redis.cmd(&["HSET", &keys.meta(), "marker_sets_since", &since]);
    let refused = start(&redis).await.expect("refused");
    let until = format!("until Redis time {}", now - 60 + 86_400);
    assert!(refused.contains(&until), "{until:?} in {refused}");
    // A day after: they have expired, and it starts.
    let since = (now - 86_400).to_string();
    let _: i64 = redis.cmd(&["HSET", &keys.meta(), "marker_sets_since", &since]);
    assert_eq!(start(&redis).await, None);
}

/// What a remembered pulse id costs in Redis memory (the README states it), once a bucket is
/// sized from the one before it (the steady state: a deployment's first bucket, whose
/// predecessor is unknown, gets a default slot count): measured, and held to the layout's
/// budget of 24 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_pulse_id_costs_at_most_24_bytes() {
    remembered_id_cost(RedisServer::start(), 24.0).await;
}

/// An operator who lowers `hash-max-listpack-entries` to 128 (cheaper `HINCRBY` on small
/// aggregate hashes: BENCHMARKS.md) gets smaller slot hashes, which stay listpacks — 32 markers
/// per slot — at a byte or two more per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_slots_follow_the_redis_listpack_limit() {
    let redis = RedisServer::start_with(&["--hash-max-listpack-entries", "128"]);
    remembered_id_cost(redis, 26.0).await;
}

async fn remembered_id_cost(redis: RedisServer, budget: f64) {
    let app = TestApp::spawn(settings(
        &redis,
        &[("MAX_BATCH_ITEMS", "10000"), ("DEDUPE_TTL", "8s")],
    ))
    .await;
    let now = || -> u64 {
        let t: Vec<String> = redis.cmd(&["TIME"]);
        t[0].parse().unwrap()
    };
    let batch = |from: usize| {
        let items: Vec<serde_json::Value> = (from..from + 10_000)
            .map(|i| {
                let mut p = pulse(&format!("t-{}", i % 100), "s", "KB", 1.0);
                p["pulse_id"] = serde_json::json!(format!("id-{i}"));
                p
            })
            .collect();
        serde_json::json!(items)
    };
    // Three batches within one 8 s bucket, then three in the next.
    let at_boundary = || async {
        let t = now();
        tokio::time::sleep(Duration::from_millis((8 - t % 8) * 1000 + 100)).await;
        now() / 8
    };
    let first = at_boundary().await;
    for k in 0..3 {
        assert_eq!(app.post_batch(&batch(k * 10_000)).await.0, 202);
    }
    let bucket = at_boundary().await;
    assert_eq!(bucket, first + 1, "the first three batches took under 8 s");
    for k in 3..6 {
        assert_eq!(app.post_batch(&batch(k * 10_000)).await.0, 202);
    }
    assert_eq!(now() / 8, bucket, "the next three took under 8 s");
    let keys: Vec<String> = redis.cmd(&["KEYS", &format!("{{pulses:*}}:seen:8:{bucket}:*")]);
    let bytes: i64 = keys
        .iter()
        .map(|k| redis.cmd::<i64>(&["MEMORY", "USAGE", k, "SAMPLES", "0"]))
        .sum();
    let listpacks = keys
        .iter()
        .filter(|k| redis.cmd::<String>(&["OBJECT", "ENCODING", k]) == "listpack")
        .count();
    let held: i64 = keys.iter().map(|k| redis.cmd::<i64>(&["HLEN", k])).sum();
    assert_eq!(held, 30_000, "every id of the bucket is in its slot hashes");
    let per_id = bytes as f64 / 30_000.0;
    println!(
        "Redis memory per remembered pulse id: {per_id:.1} bytes ({} slot hashes, {listpacks} of them listpacks)",
        keys.len()
    );
    assert_eq!(listpacks, keys.len(), "every slot hash stays a listpack");
    assert!(per_id <= budget, "{per_id:.1} bytes per id");
    app.stop().await.unwrap();
}

/// An upgrade from the release that kept one set per bucket: its sets are still consulted
/// until they have expired, so a retry across the upgrade counts once; new markers go to the
/// slot hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_sets_of_the_release_before_are_honoured_until_they_expire() {
    let redis = RedisServer::start();
    // What that release left: its meta, and a marker in the current bucket's set.
    let meta = pulse_ingestor::store::Keys::new("pulses").meta();
    let _: i64 = redis.cmd(&["HSET", &meta, "shards_max", "8", "shards", "8"]);
    let _: i64 = redis.cmd(&["HSET", &meta, "marker_sets_since", "0"]);
    let t: Vec<String> = redis.cmd(&["TIME"]);
    let bucket = t[0].parse::<u64>().unwrap() / 3600;
    let digest = pulse_ingestor::store::keys::dedupe_digest("t", "old-id");
    let placement = pulse_ingestor::store::keys::placement_of("t");
    let member = pulse_ingestor::store::keys::marker_member(&digest, placement);
    let shard = pulse_ingestor::store::keys::shard_of("t", 8);
    let set = pulse_ingestor::store::Keys::new("pulses").seen(shard, &bucket.to_string());
    let _: i64 = redis::cmd("SADD")
        .arg(&set)
        .arg(&member[..])
        .query(&mut redis.conn())
        .unwrap();
    let _: i64 = redis.cmd(&["EXPIRE", &set, "7200"]);
    let app = TestApp::spawn(settings(&redis, &[("DEDUPE_TTL", "1h")])).await;
    let c = http();
    let mut p = pulse("t", "s", "KB", 1.0);
    p["pulse_id"] = serde_json::json!("old-id");
    let (s, _, body) = post(&c, &format!("{}/ingest", app.base), &p).await;
    assert_eq!(s, 202);
    assert_eq!(body["duplicates"], 1, "{body}");
    p["pulse_id"] = serde_json::json!("new-id");
    let (_, _, body) = post(&c, &format!("{}/ingest", app.base), &p).await;
    assert_eq!(body["accepted"], 1, "{body}");
    let (_, _, body) = post(&c, &format!("{}/ingest", app.base), &p).await;
    assert_eq!(body["duplicates"], 1, "{body}");
    let hashes: Vec<String> = redis.cmd(&[
        "KEYS",
        &format!(
            "{}*",
            pulse_ingestor::store::Keys::new("pulses").seen(shard, &format!("3600:{bucket}:"))
        ),
    ]);
    let held: i64 = hashes.iter().map(|h| redis.cmd::<i64>(&["HLEN", h])).sum();
    assert_eq!(
        held, 2,
        "old-id and new-id are in the slot hashes: {hashes:?}"
    );
    let meta: Vec<String> = redis.cmd(&["HMGET", &meta, "marker_sets_until"]);
    let until: u64 = meta[0].parse().unwrap();
    assert!(
        until >= t[0].parse::<u64>().unwrap() + 2 * 3600,
        "sets consulted for two TTLs and more"
    );
    app.stop().await.unwrap();
}

/// `REDIS_WAIT_REPLICAS=1`: a 202 means a replica has the pulse too; with no replica to
/// confirm, the answer is the ambiguous 503 (the pulse is on the master; a retry with the same
/// id settles it exactly once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_a_202_means_a_replica_has_it() {
    let master = RedisServer::start();
    let mut replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let ok = eventually(Duration::from_secs(10), || async {
        let info: String = replica.cmd(&["INFO", "replication"]);
        info.contains("master_link_status:up")
    })
    .await;
    assert!(ok);
    let app = TestApp::spawn(settings(
        &master,
        &[
            ("REDIS_WAIT_REPLICAS", "1"),
            ("REDIS_WAIT_TIMEOUT", "300ms"),
        ],
    ))
    .await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    for i in 0..20 {
        let mut p = pulse("t", "s", "KB", 1.0);
        p["pulse_id"] = serde_json::json!(format!("w-{i}"));
        assert_eq!(post(&c, &url, &p).await.0, 202);
        // Acknowledged means replicated: the replica holds it already.
        assert_eq!(
            replica.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
            dec(f64::from(i + 1)),
            "pulse {i} acknowledged before the replica had it"
        );
    }
    replica.crash();
    let mut p = pulse("t", "s", "KB", 1.0);
    p["pulse_id"] = serde_json::json!("w-last");
    let (s, h, body) = post(&c, &url, &p).await;
    assert_eq!(s, 503, "{body}");
    assert!(h.get("retry-after").is_some());
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("may have been counted"),
        "{body}"
    );
    assert!(
        metric(&c, &app.base, "ingestor_redis_wait_short_total")
            .await
            .unwrap()
            >= 1.0
    );
    app.stop().await.unwrap();
}
