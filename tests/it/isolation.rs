//! Isolation: one tenant's or one record's trouble never costs another tenant's money — a full
//! key, a refused record, a rate-limited batch, a big tenant's usage, a missing replica.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use pulse_producer::processor::{Faults, RejectStyle};

fn key(t: &str, s: &str, u: &str) -> Key {
    (t.to_string(), s.to_string(), u.to_string())
}

fn pulse_with_id(t: &str, s: &str, u: &str, a: f64, id: &str) -> serde_json::Value {
    let mut p = pulse(t, s, u, a);
    p["pulse_id"] = serde_json::json!(id);
    p
}

/// Waits until Redis time is not within `margin` seconds of the end of a `len`-second window,
/// so that a scenario of under `margin` seconds stays in one window.
async fn early_in_window(redis: &RedisServer, len: u64, margin: u64) {
    let ok = eventually(Duration::from_secs(len), || async {
        let (now, _): (u64, u64) = redis.cmd(&["TIME"]);
        now % len < len - margin
    })
    .await;
    assert!(ok);
}

/// Fills `tenant`'s key to 4,611 × 10^18 — the next 10^18 leaves the exact range.
async fn fill_key(c: &reqwest::Client, base: &str, tenant: &str) {
    for k in [1000, 1000, 1000, 1000, 611] {
        let items: Vec<String> = (0..k)
            .map(|_| pulse_text(tenant, "SKU", "KB", "1000000000000000000"))
            .collect();
        let (s, b) = post_raw(
            c,
            &format!("{base}/ingest/batch"),
            format!("[{}]", items.join(",")),
        )
        .await;
        assert_eq!(s, 202, "{b}");
    }
}

/// Finding 1: a tenant at the key limit, while four other tenants ingest concurrently (single
/// pulses, committed in the same group commits): every other tenant's pulse is 202 and
/// counted; only the requests carrying the full key are refused, each with its items named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_key_refuses_only_the_requests_that_carry_it() {
    let app = TestApp::start(&[
        ("MAX_AMOUNT", "1000000000000000000"),
        ("MAX_BATCH_ITEMS", "1000"),
        ("WORKERS", "1"),
        ("COMMIT_LINGER", "2ms"),
    ])
    .await;
    early_in_window(app.redis(), 3600, 120).await;
    let c = http();
    let base = app.base.clone();
    fill_key(&c, &base, "hog").await;
    // The hog keeps sending (each of its pulses overflows) while the victims send theirs.
    let hog = {
        let (c, base) = (c.clone(), base.clone());
        tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..200 {
                let body = format!(
                    "[{},{}]",
                    pulse_text("hog", "OTHER", "KB", "1"),
                    pulse_text("hog", "SKU", "KB", "1000000000000000000")
                );
                let (s, b) = post_raw(&c, &format!("{base}/ingest/batch"), body).await;
                if s == 422 {
                    assert_eq!(b["fields"][0]["index"], 1, "{b}");
                    assert!(b["error"].as_str().unwrap().contains("largest exact total"));
                    refused += 1;
                }
            }
            refused
        })
    };
    let mut victims = Vec::new();
    for v in 0..4 {
        let (c, base) = (c.clone(), base.clone());
        victims.push(tokio::spawn(async move {
            let mut statuses = BTreeMap::<u16, u32>::new();
            for _ in 0..100 {
                let (s, _) = post_raw(
                    &c,
                    &format!("{base}/ingest"),
                    pulse_text(&format!("victim-{v}"), "SKU", "KB", "0.5"),
                )
                .await;
                *statuses.entry(s).or_default() += 1;
            }
            statuses
        }));
    }
    for v in victims {
        let statuses = v.await.unwrap();
        assert_eq!(statuses, BTreeMap::from([(202, 100)]), "victim answers");
    }
    let refused = hog.await.unwrap();
    assert_eq!(
        refused, 200,
        "every request carrying the full key is refused"
    );
    let totals = app.redis().totals("pulses");
    for v in 0..4 {
        assert_eq!(
            totals[&key(&format!("victim-{v}"), "SKU", "KB")],
            money::parse("50").unwrap(),
            "victim {v}"
        );
    }
    assert!(
        !totals.contains_key(&key("hog", "OTHER", "KB")),
        "a refused request counts nothing, not even its other items"
    );
    assert_eq!(
        totals[&key("hog", "SKU", "KB")],
        money::parse("4611000000000000000000").unwrap()
    );
    app.stop().await.unwrap();
}

/// Finding 2: enqueued mode does not retry an overflowing commit forever: the pulses queued
/// behind it are committed, and shutdown is prompt, not a deadline that drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_mode_never_retries_what_cannot_succeed() {
    let app = TestApp::start(&[
        ("MAX_AMOUNT", "1000000000000000000"),
        ("MAX_BATCH_ITEMS", "1000"),
        ("ACK_MODE", "enqueued"),
        ("WORKERS", "1"),
        ("SHUTDOWN_TIMEOUT", "30s"),
    ])
    .await;
    early_in_window(app.redis(), 3600, 120).await;
    let c = http();
    fill_key(&c, &app.base, "hog").await;
    // Enqueued: fill_key's batches were all 202, some of them overflowed in the worker.
    let (s, _) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        pulse_text("hog", "SKU", "KB", "1000000000000000000"),
    )
    .await;
    assert_eq!(s, 202);
    for i in 0..50 {
        let (s, _) = post_raw(
            &c,
            &format!("{}/ingest", app.base),
            pulse_text("after", "SKU", "KB", &format!("{}", i + 1)),
        )
        .await;
        assert_eq!(s, 202);
    }
    let ok = eventually(Duration::from_secs(10), || async {
        app.redis().totals("pulses").get(&key("after", "SKU", "KB"))
            == Some(&money::parse("1275").unwrap())
    })
    .await;
    assert!(ok, "pulses behind an overflowing commit are committed");
    let failed = metric(&c, &app.base, "ingestor_pulses_total{outcome=\"failed\"}")
        .await
        .unwrap();
    assert!(failed >= 1.0, "the overflowing pulse is counted as failed");
    let started = Instant::now();
    app.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown does not wait for a retry that cannot succeed"
    );
}

/// Finding 5: a batch refused 429 because one of its tenants is over its limit takes nothing
/// from the other tenants' buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_batch_leaves_other_tenants_tokens_untouched() {
    let app = TestApp::start(&[
        ("RATE_LIMIT", "0.01"),
        ("RATE_LIMIT_BURST", "60"),
        ("RATE_LIMIT_OVERRIDES", "small=0.01:1"),
    ])
    .await;
    let c = http();
    let (s, _, _) = app.post_pulse(&pulse("small", "S", "u", 1.0)).await;
    assert_eq!(s, 202);
    let mixed: Vec<serde_json::Value> = (0..30)
        .map(|_| pulse("busy", "S", "u", 1.0))
        .chain([pulse("small", "S", "u", 1.0)])
        .collect();
    for _ in 0..3 {
        let (s, h, b) = app.post_batch(&serde_json::json!(mixed)).await;
        assert_eq!(s, 429, "{b}");
        assert!(h.get("retry-after").is_some());
        assert!(b["error"].as_str().unwrap().contains("small"), "{b}");
    }
    // busy's whole burst of 60 is still there.
    let busy: Vec<serde_json::Value> = (0..60).map(|_| pulse("busy", "S", "u", 1.0)).collect();
    let (s, _, b) = app.post_batch(&serde_json::json!(busy)).await;
    assert_eq!(s, 202, "{b}");
    let (s, _, _) = app.post_pulse(&pulse("busy", "S", "u", 1.0)).await;
    assert_eq!(s, 429, "and then it is spent");
    let _ = c;
    let totals = app.redis().totals("pulses");
    assert_eq!(totals[&key("busy", "S", "u")], dec(60.0));
    assert_eq!(totals[&key("small", "S", "u")], dec(1.0));
    app.stop().await.unwrap();
}

/// Finding 4, with each way a Processor can word a refusal of one tenant among 1,000: the
/// other 999 are delivered exactly, the one is dead-lettered alone, a replay re-strands nobody,
/// and an operator can set the one aside for good, with an audit entry.
async fn one_refused_tenant_among_a_thousand(style: RejectStyle) {
    let (p, purl) = processor(Faults {
        reject_tenant: Some("unknown".into()),
        reject_style: style,
        ..Faults::default()
    })
    .await;
    let app = TestApp::start(&[
        ("PROCESSOR_URL", &format!("{purl}/batches")),
        ("ADMIN_TOKEN", "sesame"),
        ("WINDOW", "2s"),
        ("BATCH_SIZE", "500"),
        ("MAX_BATCH_ITEMS", "1000"),
    ])
    .await;
    early_in_window(app.redis(), 2, 1).await;
    let mut expected = BTreeMap::new();
    let items: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            let t = if i == 500 {
                "unknown".to_string()
            } else {
                format!("t{i}")
            };
            let a = (i % 7 + 1) as f64 * 0.25;
            if t != "unknown" {
                expected.insert(key(&t, "S", "u"), dec(a));
            }
            pulse(&t, "S", "u", a)
        })
        .collect();
    let (s, _, b) = app.post_batch(&serde_json::json!(items)).await;
    assert_eq!(s, 202, "{b}");
    let c = http();
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth("sesame");
    let base = app.base.clone();
    let dead_letters = || auth(c.get(format!("{base}/admin/dead-letters"))).json_reply();
    let settled = async |want_dead: usize| {
        eventually(Duration::from_secs(30), || async {
            let _ = auth(c.post(format!("{base}/admin/flush"))).send().await;
            let d = dead_letters().await;
            by_key(&p.records()) == expected
                && d["records"].as_array().map(Vec::len) == Some(want_dead)
        })
        .await
    };
    assert!(settled(1).await, "999 delivered, 1 dead-lettered");
    let d = dead_letters().await;
    let dead = &d["records"][0];
    assert_eq!(dead["tenant_id"], "unknown");
    assert_eq!(dead["used_amount_text"], "1");
    let record_id = dead["record_id"].as_str().unwrap().to_string();
    // Replay: the good ones stay delivered, the bad one comes back alone.
    let r = auth(c.post(format!("{}/admin/dead-letters/replay", app.base)))
        .json_reply()
        .await;
    assert_eq!(r["replayed_records"], 1, "{r}");
    assert!(settled(1).await, "replay re-strands nobody");
    // Setting aside needs the token, an operator and a reason; it is audited.
    let r = c
        .post(format!("{}/admin/dead-letters/set-aside", app.base))
        .json(&serde_json::json!({"record_id": record_id, "operator": "ops", "reason": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = auth(c.post(format!("{}/admin/dead-letters/set-aside", app.base)))
        .json(&serde_json::json!({"record_id": record_id, "operator": "ada", "reason": "customer does not exist"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        settled(0).await,
        "the record set aside is gone from the dead letters"
    );
    let log = auth(c.get(format!("{}/admin/dead-letters/set-aside", app.base)))
        .json_reply()
        .await;
    let e = &log["set_aside"][0];
    assert_eq!(e["entry"]["operator"], "ada", "{log}");
    assert_eq!(e["entry"]["used_amount_text"], "1", "{log}");
    assert_eq!(e["entry"]["tenant_id"], "unknown", "{log}");
    assert!(e["time"].as_u64().unwrap() > 0);
    assert_eq!(
        p.totals().records,
        999,
        "nothing of the unknown tenant was accepted"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_naming_the_refused_record_costs_only_that_record() {
    one_refused_tenant_among_a_thousand(RejectStyle::Named).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstructured_refusal_is_narrowed_down_to_the_refused_record() {
    one_refused_tenant_among_a_thousand(RejectStyle::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_naming_ids_not_in_the_batch_is_narrowed_down_too() {
    one_refused_tenant_among_a_thousand(RejectStyle::Foreign).await;
}

/// A refusal about the batch itself (here a 410) is not halved: the batch is dead-lettered
/// whole, at the cost of one POST. (A wrong URL's 404 is retried instead: `operator.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_the_whole_batch_costs_one_post_not_two_n() {
    let (p, purl) = processor(Faults {
        error_rate: 1.0,
        fail_status: 410,
        ..Faults::default()
    })
    .await;
    let app = TestApp::start(&[
        ("PROCESSOR_URL", &format!("{purl}/batches")),
        ("WINDOW", "2s"),
        ("BATCH_SIZE", "100"),
    ])
    .await;
    let items: Vec<serde_json::Value> = (0..100)
        .map(|i| pulse(&format!("t{i}"), "S", "u", 1.0))
        .collect();
    let (s, _, _) = app.post_batch(&serde_json::json!(items)).await;
    assert_eq!(s, 202);
    let c = http();
    let ok = eventually(Duration::from_secs(20), || async {
        app.flush_now().await;
        let d = c
            .get(format!("{}/admin/dead-letters", app.base))
            .json_reply()
            .await;
        d["records"].as_array().map(Vec::len) == Some(100)
    })
    .await;
    assert!(ok);
    assert_eq!(
        metric(&c, &app.base, "ingestor_delivery_isolation_posts_total").await,
        Some(0.0)
    );
    let _ = p;
    app.stop().await.unwrap();
}

/// Findings 6 and 7: a tenant with 20,000 keys in a window reads its usage (exact), and a
/// tenant with no usage in a sealed window costs no scan of the other tenants' data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reads_only_the_tenants_own_keys_however_many() {
    let app = TestApp::start(&[("MAX_BATCH_ITEMS", "1000"), ("WINDOW", "2s")]).await;
    early_in_window(app.redis(), 2, 1).await;
    // Others' data in the window that will be sealed.
    let items: Vec<serde_json::Value> = (0..1000)
        .map(|i| pulse(&format!("o{i}"), "S", "u", 1.0))
        .collect();
    let (s, _, _) = app.post_batch(&serde_json::json!(items)).await;
    assert_eq!(s, 202);
    // Sealed and pending (no Processor): a tenant with nothing there costs no scan.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    app.flush_now().await;
    let c = http();
    let _: () = app.redis().cmd(&["CONFIG", "RESETSTAT"]);
    let u = c
        .get(format!("{}/v1/usage?tenant_id=nobody", app.base))
        .json_reply()
        .await;
    assert!(
        u["windows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["usage"].as_array().unwrap().is_empty()),
        "{u}"
    );
    let stats: String = app.redis().cmd(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_hscan"), "{stats}");
    assert!(!stats.contains("cmdstat_hgetall"), "{stats}");
    // A big tenant: 20,000 keys in the current window.
    for chunk in 0..20 {
        let items: Vec<serde_json::Value> = (0..1000)
            .map(|i| pulse("big", &format!("sku-{chunk}-{i}"), "u", 0.5))
            .collect();
        let (s, _, b) = app.post_batch(&serde_json::json!(items)).await;
        assert_eq!(s, 202, "{b}");
    }
    let r = c
        .get(format!("{}/v1/usage?tenant_id=big", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let u: serde_json::Value = r.json().await.unwrap();
    let mut keys = 0;
    let mut sum = Dec::from(0);
    for w in u["windows"].as_array().unwrap() {
        for k in w["usage"].as_array().unwrap() {
            keys += 1;
            sum += money::parse(k["used_amount_text"].as_str().unwrap()).unwrap();
        }
    }
    assert_eq!(keys, 20_000);
    assert_eq!(sum, dec(10_000.0));
    app.stop().await.unwrap();
}

/// Finding 8: with `REDIS_WAIT_REPLICAS` and a replica that stops answering, a commit waiting
/// for it does not hold up the usage reads (or anything else on the shared connection); and
/// what was acknowledged is all there once the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_replica_slows_only_the_commits_that_wait_for_it() {
    let master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let ok = eventually(Duration::from_secs(10), || async {
        replica.role().as_deref() == Some("slave")
            && master
                .cmd::<String>(&["INFO", "replication"])
                .contains(",state=online,")
    })
    .await;
    assert!(ok);
    let app = TestApp::spawn(settings(
        &master,
        &[
            ("REDIS_WAIT_REPLICAS", "1"),
            ("REDIS_WAIT_TIMEOUT", "3s"),
            ("REQUEST_TIMEOUT", "10s"),
        ],
    ))
    .await;
    let (s, _, b) = app
        .post_pulse(&pulse_with_id("a", "S", "u", 1.0, "id-0"))
        .await;
    assert_eq!(s, 202, "a commit with the replica present: {b}");
    replica.signal("STOP");
    let c = http();
    let started = Instant::now();
    let commit = {
        let (c, base) = (c.clone(), app.base.clone());
        tokio::spawn(async move {
            let r = post(
                &c,
                &format!("{base}/ingest"),
                &pulse_with_id("a", "S", "u", 1.0, "id-1"),
            )
            .await;
            (r.0, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let u = c
        .get(format!("{}/v1/usage?tenant_id=a", app.base))
        .send()
        .await
        .unwrap();
    let usage_answered = started.elapsed();
    assert_eq!(u.status().as_u16(), 200);
    let (status, commit_answered) = commit.await.unwrap();
    assert_eq!(
        status, 503,
        "the replica never confirmed: the ambiguous 503"
    );
    assert!(
        usage_answered < commit_answered,
        "usage ({usage_answered:?}) answered while the commit waited ({commit_answered:?})"
    );
    replica.signal("CONT");
    // The retry with the same id settles it exactly.
    let ok = eventually(Duration::from_secs(10), || async {
        app.post_pulse(&pulse_with_id("a", "S", "u", 1.0, "id-1"))
            .await
            .0
            == 202
    })
    .await;
    assert!(ok);
    assert_eq!(master.totals("pulses")[&key("a", "S", "u")], dec(2.0));
    app.stop().await.unwrap();
}

/// Finding 3: enqueued mode with `REDIS_WAIT_REPLICAS` retries a commit whose `WAIT` fell short
/// under its token — but never once the token may have expired, when a re-send would count
/// again. (The real binary, with its commit tokens kept 3 s instead of 600 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_mode_never_resends_a_commit_whose_token_may_have_expired() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut vars = settings(
        &redis,
        &[
            ("ACK_MODE", "enqueued"),
            ("REDIS_WAIT_REPLICAS", "1"),
            ("REDIS_WAIT_TIMEOUT", "100ms"),
            ("PULSE_INGESTOR_FAULT", "short-token"),
        ],
    );
    vars.remove("LISTEN_ADDR");
    let ing = Ingestor::spawn(&vars, dir.path(), "enqueued-wait").await;
    let c = http();
    let (s, _, _) = post(
        &c,
        &format!("{}/ingest", ing.base),
        &pulse("t", "S", "u", 5.0),
    )
    .await;
    assert_eq!(s, 202);
    // No replica ever confirms: the commit is retried, then given up before its token expires.
    let ok = eventually(Duration::from_secs(15), || async {
        ing.log_text().contains("could not be committed")
    })
    .await;
    assert!(ok, "the loss is logged: {}", ing.log_text());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        redis.totals("pulses")[&key("t", "S", "u")],
        dec(5.0),
        "counted once, never again after its token expired"
    );
    assert!(
        ing.log_text().contains("[\"t\",\"S\",\"u\"]=5"),
        "the log names key and amount"
    );
}
