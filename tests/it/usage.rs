//! Live usage (`GET /v1/usage`): exact, live, per window, by key, and at a cost that does not
//! grow with other tenants' data.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use pulse_producer::processor::Faults;

async fn usage(
    c: &reqwest::Client,
    base: &str,
    query: &str,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut r = c.get(format!("{base}/v1/usage?{query}"));
    if let Some(k) = key {
        r = r.header("x-api-key", k);
    }
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

/// (window start, state, sku, unit) → amount text.
fn rows(u: &serde_json::Value) -> BTreeMap<(u64, String, String, String), String> {
    let mut out = BTreeMap::new();
    for w in u["windows"].as_array().unwrap() {
        for k in w["usage"].as_array().unwrap() {
            out.insert(
                (
                    w["window_start"].as_u64().unwrap(),
                    w["state"].as_str().unwrap().to_string(),
                    k["product_sku"].as_str().unwrap().to_string(),
                    k["use_unit"].as_str().unwrap().to_string(),
                ),
                k["used_amount_text"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_exact_live_and_follows_a_window_until_it_is_delivered() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    p.set_faults(Faults {
        error_rate: 1.0,
        fail_status: 503,
        ..Faults::default()
    });
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "3s"),
            ("STABILISATION_DELAY", "1s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let c = http();
    // Start right after a boundary so the pulses share one window.
    let ok = eventually(Duration::from_secs(10), || async {
        let (now, _): (u64, u64) = redis.cmd(&["TIME"]);
        now % 3 == 0
    })
    .await;
    assert!(ok);
    let tenant = "Zürich: \"ops\" | 東京";
    for (sku, unit, a) in [
        ("SKU:1", "KB", "0.1"),
        ("SKU:1", "KB", "0.2"),
        ("s|2", "GB/sec", "123456789.123456789"),
    ] {
        // The amount as decimal text, verbatim (a serde_json::Value would make it a float).
        let r = c
            .post(format!("{}/ingest", app.base))
            .header("content-type", "application/json")
            .body(pulse_text(tenant, sku, unit, a))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // Another tenant's data never shows.
    assert_eq!(
        post(
            &c,
            &format!("{}/ingest", app.base),
            &pulse("other", "SKU:1", "KB", 5.0)
        )
        .await
        .0,
        202
    );
    let q = format!("tenant_id={}", urlencode(tenant));
    let (s, u) = usage(&c, &app.base, &q, None).await;
    assert_eq!(s, 200, "{u}");
    let r = rows(&u);
    let w = u["windows"][0]["window_start"].as_u64().unwrap();
    assert_eq!(r.len(), 2, "{u}");
    assert_eq!(
        r[&(w, "live".into(), "SKU:1".into(), "KB".into())],
        "0.3",
        "live and exact: {u}"
    );
    assert_eq!(
        r[&(w, "live".into(), "s|2".into(), "GB/sec".into())],
        "123456789.123456789"
    );
    // Filters.
    let (_, f) = usage(&c, &app.base, &format!("{q}&use_unit=KB"), None).await;
    assert_eq!(rows(&f).len(), 1);
    // The window ends: sealed and pending (the Processor refuses for now)...
    let ok = eventually(Duration::from_secs(10), || async {
        let (_, u) = usage(&c, &app.base, &q, None).await;
        rows(&u)
            .keys()
            .any(|k| k.0 == w && (k.1 == "waiting" || k.1 == "retrying" || k.1 == "delivering"))
    })
    .await;
    assert!(ok, "the sealed window shows as awaiting delivery");
    let (_, u) = usage(&c, &app.base, &q, None).await;
    assert_eq!(rows(&u).values().filter(|v| *v == "0.3").count(), 1, "{u}");
    // ...then delivered: gone from usage.
    p.set_faults(Faults::default());
    let ok = eventually(Duration::from_secs(15), || async {
        let (_, u) = usage(&c, &app.base, &q, None).await;
        !rows(&u).keys().any(|k| k.0 == w)
    })
    .await;
    assert!(ok, "a delivered window leaves the usage");
    // A tenant with no usage: 200 and no windows, not 404.
    let (s, u) = usage(&c, &app.base, "tenant_id=nobody", None).await;
    assert_eq!(s, 200);
    assert_eq!(u["windows"].as_array().unwrap().len(), 0);
    let (s, _) = usage(&c, &app.base, "tenant_id=", None).await;
    assert_eq!(s, 422);
    app.stop().await.unwrap();
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_key_reads_only_its_own_usage() {
    use sha2::{Digest, Sha256};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let h = |k: &str| hex::encode(Sha256::digest(k.as_bytes()));
    std::fs::write(
        &keys,
        format!("{} t-a a\n{} * svc\n", h("key-a"), h("key-svc")),
    )
    .unwrap();
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("API_KEYS_FILE", keys.to_str().unwrap()),
            ("ADMIN_TOKEN", "adm"),
        ],
    ))
    .await;
    let c = http();
    assert_eq!(usage(&c, &app.base, "tenant_id=t-a", None).await.0, 401);
    assert_eq!(
        usage(&c, &app.base, "tenant_id=t-a", Some("nope")).await.0,
        401
    );
    assert_eq!(
        usage(&c, &app.base, "tenant_id=t-a", Some("key-a")).await.0,
        200
    );
    assert_eq!(
        usage(&c, &app.base, "tenant_id=t-b", Some("key-a")).await.0,
        403
    );
    assert_eq!(
        usage(&c, &app.base, "tenant_id=t-b", Some("key-svc"))
            .await
            .0,
        200
    );
    let r = c
        .get(format!("{}/v1/usage?tenant_id=t-b", app.base))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the admin token reads any tenant");
    app.stop().await.unwrap();
}

/// The query reads the tenant's own keys: with 1,000,000 keys of other tenants in the same
/// shard's window, Redis spends about what it spends without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_query_costs_the_same_whatever_other_tenants_hold() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("SHARDS", "1")])).await;
    let c = http();
    for i in 0..10 {
        assert_eq!(
            post(
                &c,
                &format!("{}/ingest", app.base),
                &pulse("small", &format!("s{i}"), "KB", 1.0)
            )
            .await
            .0,
            202
        );
    }
    let cost = |n: usize| {
        let redis = &redis;
        let c = c.clone();
        let base = app.base.clone();
        async move {
            let info = |r: &RedisServer| -> (u64, u64) {
                // The write path is the write function (FCALL) on one Redis.
                let text: String = r.cmd(&["INFO", "commandstats"]);
                let field = |line: &str, k: &str| -> u64 {
                    line.split(&[':', ','][..])
                        .find_map(|p| p.strip_prefix(&format!("{k}=")))
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                text.lines()
                    .filter(|l| {
                        l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_fcall:")
                    })
                    .fold((0, 0), |(c, u), l| {
                        (c + field(l, "calls"), u + field(l, "usec"))
                    })
            };
            let (c0, u0) = info(redis);
            for _ in 0..n {
                let (s, u) = usage(&c, &base, "tenant_id=small", None).await;
                assert_eq!(s, 200);
                assert_eq!(rows(&u).len(), 10);
            }
            let (c1, u1) = info(redis);
            (u1 - u0) as f64 / (c1 - c0) as f64
        }
    };
    let alone = cost(50).await;
    // A million other tenants' keys in the same window of the same shard.
    let keys = pulse_ingestor::store::Keys::new("pulses");
    let generation: String = redis.cmd(&["GET", &keys.generation(0)]);
    let agg = keys.agg(0, &generation);
    let _: () = redis.cmd(&[
        "EVAL",
        "for i = 1, 1000000 do redis.call('HSET', KEYS[1], '[\"other-' .. i .. '\",\"s\",\"KB\"]', '1000000000000') end",
        "1",
        &agg,
    ]);
    let hlen: u64 = redis.cmd(&["HLEN", &agg]);
    assert!(hlen > 1_000_000);
    let crowded = cost(50).await;
    println!(
        "usage query: {alone:.1} µs of Redis alone, {crowded:.1} µs beside 1,000,000 other keys"
    );
    assert!(
        crowded < alone * 3.0 + 20.0,
        "{alone:.1} µs vs {crowded:.1} µs: the query scans other tenants"
    );
    app.stop().await.unwrap();
}

/// Nothing of the usage index stays once a window is delivered (it lived a week before), and
/// a dead-lettered window keeps it until its last dead letter is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_window_leaves_no_usage_index_behind() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults {
        reject_tenant: Some("bad".into()),
        ..Faults::default()
    })
    .await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("MAX_BATCH_ITEMS", "1000"),
            ("ADMIN_TOKEN", "t0k"),
        ],
    ))
    .await;
    let items: Vec<serde_json::Value> = (0..999)
        .map(|i| pulse(&format!("t{}", i % 100), &format!("s{i}"), "u", 1.0))
        .chain([pulse("bad", "s", "u", 1.0)])
        .collect();
    let (s, _, _) = app.post_batch(&serde_json::json!(items)).await;
    assert_eq!(s, 202);
    let idx = |r: &RedisServer| r.cmd::<Vec<String>>(&["KEYS", "*:x:idx*"]);
    assert!(!idx(&redis).is_empty(), "indexed while live");
    let c = http();
    let ok = eventually(Duration::from_secs(20), || async {
        c.post(format!("{}/admin/flush", app.base))
            .bearer_auth("t0k")
            .send()
            .await
            .unwrap();
        p.records().len() == 999
    })
    .await;
    assert!(ok);
    // Only the index of the shard-window holding a dead letter is left (kept whole until its
    // dead letters are gone); every other shard's goes with its delivery — once the drain has
    // finished the window, a moment after the Processor took its records.
    let shard = pulse_ingestor::store::keys::shard_of("bad", 8);
    let only_bad_shard = |left: &[String]| {
        left.iter().any(|k| k.ends_with(":bad"))
            && left
                .iter()
                .all(|k| k.starts_with(&pulse_ingestor::store::Keys::new("pulses").base(shard)))
    };
    let settled = eventually(Duration::from_secs(10), || async {
        only_bad_shard(&idx(&redis))
    })
    .await;
    assert!(settled, "{:?}", idx(&redis));
    // The tenant sees that window as refused by the Processor, with what was refused.
    let u = c
        .get(format!("{}/v1/usage?tenant_id=bad", app.base))
        .json_reply()
        .await;
    let refused: Vec<&serde_json::Value> = u["windows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] != "live")
        .collect();
    assert_eq!(refused.len(), 1, "{u}");
    assert_eq!(refused[0]["state"], "dead-lettered", "{u}");
    assert_eq!(refused[0]["usage"][0]["dead_lettered_text"], "1", "{u}");
    // Its dead letter set aside: the window is gone entirely, index and all.
    let d: serde_json::Value = c
        .get(format!("{}/admin/dead-letters", app.base))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = d["records"][0]["record_id"].as_str().unwrap();
    let r = c
        .post(format!("{}/admin/dead-letters/set-aside", app.base))
        .bearer_auth("t0k")
        .json(&serde_json::json!({"record_id": id, "operator": "ops", "reason": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(idx(&redis).is_empty(), "{:?}", idx(&redis));
    app.stop().await.unwrap();
}

/// Tenants whose JSON text is not their name (a quote, a backslash, both) and
/// non-ASCII ones: each reads exactly its own usage, never another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reads_tenants_with_escaped_names_exactly() {
    let app = TestApp::start(&[]).await;
    let c = http();
    let tenants = ["a\"b", "a\\b", "a\\\"", "åäö-租户", "ab"];
    for (i, t) in tenants.iter().enumerate() {
        let body = pulse_text(t, "sku", "unit", &format!("{}.25", i + 1));
        let (s, b) = post_raw(&c, &format!("{}/ingest", app.base), body).await;
        assert_eq!(s, 202, "{b}");
    }
    for (i, t) in tenants.iter().enumerate() {
        let q = format!("tenant_id={}", urlencode(t));
        let (s, u) = usage(&c, &app.base, &q, None).await;
        assert_eq!(s, 200, "{u}");
        let r = rows(&u);
        assert_eq!(r.len(), 1, "{t:?}: {u}");
        assert_eq!(
            r.values().next().unwrap(),
            &format!("{}.25", i + 1),
            "{t:?} reads its own usage"
        );
    }
    app.stop().await.unwrap();
}
