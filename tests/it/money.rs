//! Exact money (invariant 11), end to end: what a client sends as decimals is what the
//! Processor receives, to the last digit — through the worker's pre-aggregation, the scripts'
//! integer limbs, sealing, delivery, dead letters and replay, and from windows the float
//! release left behind.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use pulse_producer::processor::{Faults, Record};
use rand::{Rng, SeedableRng};

/// Every record the Processor holds for one key, summed exactly, as canonical text.
fn total_of(records: &[Record], tenant: &str) -> String {
    let sum: Dec = records
        .iter()
        .filter(|r| r.tenant_id == tenant)
        .map(|r| &r.used_amount)
        .sum();
    money::canonical(&sum)
}

/// Posts `n` pulses of `amount` (decimal text) for `tenant`, in batches of `per_batch`.
async fn send_many(
    c: &reqwest::Client,
    base: &str,
    tenant: &str,
    amount: &str,
    n: usize,
    per: usize,
) {
    let mut left = n;
    while left > 0 {
        let k = left.min(per);
        let items: Vec<String> = (0..k)
            .map(|_| pulse_text(tenant, "SKU", "KB", amount))
            .collect();
        let (s, body) = post_raw(
            c,
            &format!("{base}/ingest/batch"),
            format!("[{}]", items.join(",")),
        )
        .await;
        assert_eq!(s, 202, "{body}");
        left -= k;
    }
}

async fn flush_until_delivered(
    base: &str,
    p: &pulse_producer::processor::Processor,
    tenants: &[&str],
) {
    let ok = eventually(Duration::from_secs(30), || async {
        flush_now(base).await;
        let recs = p.records();
        tenants
            .iter()
            .all(|t| recs.iter().any(|r| r.tenant_id == *t))
            && pending(base).await["pending_records"] == 0
    })
    .await;
    assert!(ok, "not delivered");
}

/// The service on `redis` with 2-second windows, delivering to a reference Processor with
/// `faults`.
async fn delivering_app(
    redis: &RedisServer,
    faults: Faults,
) -> (
    TestApp,
    std::sync::Arc<pulse_producer::processor::Processor>,
) {
    let (p, purl) = processor(faults).await;
    let batches = format!("{purl}/batches");
    let app = TestApp::spawn(settings(
        redis,
        &[("WINDOW", "2s"), ("PROCESSOR_URL", &batches)],
    ))
    .await;
    (app, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processor_receives_exact_decimal_sums() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "5s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("MAX_AMOUNT", "1000000000000000000"),
            ("MAX_BATCH_ITEMS", "1000"),
        ],
    ))
    .await;
    let c = http();
    let base = app.base.clone();
    // 0.1 × 200,000 in batches of 1,000: HINCRBYFLOAT gave 19999.99999999972.
    send_many(&c, &base, "tenths", "0.1", 200_000, 1_000).await;
    // 0.07 × 2,000 + 0.000001 × 7.
    send_many(&c, &base, "mixed", "0.07", 2_000, 1_000).await;
    send_many(&c, &base, "mixed", "0.000001", 7, 7).await;
    // More digits than a double holds.
    send_many(&c, &base, "long", "123456789.123456789", 1, 1).await;
    // A carry across the whole integer part.
    send_many(&c, &base, "carry", "999999999999999.99", 1, 1).await;
    send_many(&c, &base, "carry", "0.01", 1, 1).await;
    // Every JSON form and a decimal string.
    for a in ["12", "12.50", "1.5e3", "1E-9", "\"0.25\""] {
        let (s, body) = post_raw(
            &c,
            &format!("{base}/ingest"),
            pulse_text("forms", "SKU", "KB", a),
        )
        .await;
        assert_eq!(s, 202, "{a}: {body}");
    }
    // Near the largest exact total: 4,611 × 10^18 + 10^-9, then one more 10^18 is refused whole.
    // All in one window (the limit is per key and window): start just after a boundary.
    let ok = eventually(Duration::from_secs(10), || async {
        let (now, _): (u64, u64) = redis.cmd(&["TIME"]);
        now % 5 == 0
    })
    .await;
    assert!(ok);
    send_many(&c, &base, "huge", "1000000000000000000", 4_611, 1_000).await;
    send_many(&c, &base, "huge", "0.000000001", 1, 1).await;
    let (s, body) = post_raw(
        &c,
        &format!("{base}/ingest"),
        pulse_text("huge", "SKU", "KB", "1000000000000000000"),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("largest exact total"),
        "{body}"
    );

    flush_until_delivered(
        &base,
        &p,
        &["tenths", "mixed", "long", "carry", "forms", "huge"],
    )
    .await;
    let recs = p.records();
    assert_eq!(total_of(&recs, "tenths"), "20000");
    assert_eq!(total_of(&recs, "mixed"), "140.000007");
    assert_eq!(total_of(&recs, "long"), "123456789.123456789");
    assert_eq!(total_of(&recs, "carry"), "1000000000000000");
    assert_eq!(total_of(&recs, "forms"), "1524.750000001");
    assert_eq!(total_of(&recs, "huge"), "4611000000000000000000.000000001");
    // The wire form: a canonical JSON number, and the same text beside it.
    for r in &recs {
        assert_eq!(
            r.used_amount_text.as_deref(),
            Some(money::canonical(&r.used_amount).as_str())
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_fractional_digits_than_allowed_are_refused_not_rounded() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("AMOUNT_DECIMALS", "2")])).await;
    let c = http();
    let (s, body) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        pulse_text("t", "s", "KB", "1.005"),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["fields"][0]["field"], "used_amount");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("more than 2 fractional digits"),
        "{body}"
    );
    // Trailing zeros do not count.
    let (s, _) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        pulse_text("t", "s", "KB", "1.5000"),
    )
    .await;
    assert_eq!(s, 202);
    // One such item rejects the whole batch, with its index.
    let batch = format!(
        "[{},{}]",
        pulse_text("t", "s", "KB", "1.25"),
        pulse_text("t", "s", "KB", "0.001")
    );
    let (s, body) = post_raw(&c, &format!("{}/ingest/batch", app.base), batch).await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["fields"][0]["index"], 1);
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        money::parse("1.5").unwrap(),
        "nothing of the refused batch was counted"
    );
    app.stop().await.unwrap();
}

/// Random decimal amounts (0–9 fractional digits, magnitudes up to MAX_AMOUNT) in random
/// groupings — single pulses, batches, with and without ids, so the worker pre-aggregates
/// some and not others — sum exactly in Redis. Seeded; the seed is printed on failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_amounts_in_random_groupings_sum_exactly() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("WINDOW", "1h")])).await;
    let c = http();
    for round in 0..6u64 {
        let seed = rand::random::<u64>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let prefix = format!("r{round}-");
        let mut expected: BTreeMap<Key, Dec> = BTreeMap::new();
        let mut sent = 0;
        while sent < 400 {
            let n = rng.random_range(1..=60usize);
            let mut items = Vec::new();
            for _ in 0..n {
                let digits = rng.random_range(0..=9u32);
                let magnitude = 10i128.pow(rng.random_range(0..=15u32) + digits);
                let units = rng.random_range(0..=magnitude.min(10i128.pow(15 + digits)));
                let amount = Dec::new(units.into(), i64::from(digits));
                let text = money::canonical(&amount);
                let tenant = format!("{prefix}{}", rng.random_range(0..5));
                let mut item = pulse_text(&tenant, "s", "KB", &text);
                if rng.random_bool(0.3) {
                    item.pop();
                    item.push_str(&format!(r#","pulse_id":"{seed}-{sent}"}}"#));
                }
                *expected
                    .entry((tenant, "s".into(), "KB".into()))
                    .or_default() += amount;
                items.push(item);
                sent += 1;
            }
            let (status, body) = if items.len() == 1 && rng.random_bool(0.5) {
                post_raw(&c, &format!("{}/ingest", app.base), items.pop().unwrap()).await
            } else {
                post_raw(
                    &c,
                    &format!("{}/ingest/batch", app.base),
                    format!("[{}]", items.join(",")),
                )
                .await
            };
            assert_eq!(status, 202, "seed {seed}: {body}");
        }
        let found: BTreeMap<Key, Dec> = redis
            .totals("pulses")
            .into_iter()
            .filter(|(k, _)| k.0.starts_with(&prefix))
            .collect();
        assert_eq!(expected.len(), 5, "every tenant of the round was sent to");
        assert_eq!(found, expected, "seed {seed}");
    }
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_their_replay_stay_exact() {
    let redis = RedisServer::start();
    let (app, p) = delivering_app(
        &redis,
        Faults {
            reject_tenant: Some("bad".into()),
            ..Faults::default()
        },
    )
    .await;
    let c = http();
    send_many(&c, &app.base, "bad", "0.1", 3_000, 1_000).await;
    let (s, _) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        pulse_text("bad", "long", "KB", "123456789.123456789"),
    )
    .await;
    assert_eq!(s, 202);
    let ok = eventually(Duration::from_secs(20), || async {
        app.flush_now().await;
        let dl: serde_json::Value = c
            .get(format!("{}/admin/dead-letters", app.base))
            .json_reply()
            .await;
        dl["records"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["product_sku"] == "long"))
    })
    .await;
    assert!(ok, "dead-lettered");
    // The listing is exact: the raw JSON number, not a float's rendering.
    let text = c
        .get(format!("{}/admin/dead-letters", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#""used_amount":123456789.123456789"#),
        "{text}"
    );
    assert!(
        text.contains(r#""used_amount_text":"123456789.123456789""#),
        "{text}"
    );
    p.set_faults(Faults::default());
    let r = c
        .post(format!("{}/admin/dead-letters/replay", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    flush_until_delivered(&app.base, &p, &["bad"]).await;
    assert_eq!(total_of(&p.records(), "bad"), "123457089.123456789");
    app.stop().await.unwrap();
}

/// A replica that started while Redis was unreachable checks the layout once Redis is back,
/// before it writes anything: finding the float layout's data, it stops (exit 1) with the
/// same message, and leaves that data as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_without_redis_checks_the_layout_before_it_writes() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let keys = pulse_ingestor::store::Keys::new("pulses");
    let field = pulse_ingestor::store::keys::encode_field("legacy", "SKU", "KB");
    let sealed = format!("{}:sealed:1000", keys.base(2));
    let _: String = redis.cmd(&["HINCRBYFLOAT", &sealed, &field, "0.1"]);
    let _: i64 = redis.cmd(&["ZADD", &keys.pending(2), "1000", "1000:4600"]);
    redis.crash();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Ingestor::spawn(&settings(&redis, &[]), dir.path(), "a").await;
    // Redis is down: nothing can be counted, and the client is told so.
    let (s, _, _) = post(
        &http(),
        &format!("{}/ingest", a.base),
        &pulse("t", "s", "KB", 1.0),
    )
    .await;
    assert_eq!(s, 503);
    redis.restart();
    let code = a.wait(Duration::from_secs(20)).await;
    let log = a.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("float layout") && log.contains("shard 2: 1 pending window"),
        "{log}"
    );
    let held: String = redis.cmd(&["HGET", &sealed, &field]);
    assert_eq!(held, "0.1", "nothing of it is touched");
    // And nothing was counted in this release's layout.
    assert!(redis.totals("pulses").is_empty());
}

/// The float layout (`HINCRBYFLOAT` totals, before exact sums) is no longer read: a deployment
/// that still holds any of it — a pending window, a window with dead letters, an unsealed
/// generation — is refused at start with what is left where and how to drain it, and nothing of
/// it is touched; once the previous release has drained it, this one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_the_float_layout_is_refused_at_start_and_left_as_it_is() {
    let redis = RedisServer::start();
    let keys = pulse_ingestor::store::Keys::new("pulses");
    let field = pulse_ingestor::store::keys::encode_field("legacy", "SKU", "KB");
    let sealed = format!("{}:sealed:1000", keys.base(0));
    let _: String = redis.cmd(&["HINCRBYFLOAT", &sealed, &field, "0.1"]);
    let _: i64 = redis.cmd(&["ZADD", &keys.pending(0), "1000", "1000:4600"]);
    let _: i64 = redis.cmd(&["ZADD", &keys.dead_index(5), "1000", "1000:4600"]);
    let generation = format!("{}:agg:B", keys.base(3));
    let _: String = redis.cmd(&["HINCRBYFLOAT", &generation, &field, "2.5"]);
    let cfg = pulse_ingestor::config::Config::from_map(&settings(&redis, &[])).unwrap();
    let refused = pulse_ingestor::app::App::build(cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    for part in [
        "float layout",
        "shard 0: 1 pending window(s), 0 window(s) with dead letters, 0 unsealed",
        "shard 3: 0 pending window(s), 0 window(s) with dead letters, 1 unsealed",
        "shard 5: 0 pending window(s), 1 window(s) with dead letters",
        "Run the previous release",
    ] {
        assert!(refused.contains(part), "{part:?} in {refused}");
    }
    let held: String = redis.cmd(&["HGET", &sealed, &field]);
    assert_eq!(held, "0.1", "nothing of it is touched");
    let pending: Vec<String> = redis.cmd(&["ZRANGE", &keys.pending(0), "0", "-1"]);
    assert_eq!(pending, ["1000:4600"]);
    // What the previous release does once it has delivered them: nothing of the layout left.
    let _: i64 = redis.cmd(&["DEL", &sealed, &generation]);
    let _: i64 = redis.cmd(&["ZREM", &keys.pending(0), "1000:4600"]);
    let _: i64 = redis.cmd(&["ZREM", &keys.dead_index(5), "1000:4600"]);
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let (s, _, _) = post(
        &http(),
        &format!("{}/ingest", app.base),
        &pulse("t", "s", "KB", 1.0),
    )
    .await;
    assert_eq!(s, 202);
    app.stop().await.unwrap();
}

/// The common write path (a plain pulse below 1,000 units, sent without its high limb) moves
/// 4,000,000 units of a key's low limb into its high one when the low limb reaches them: 9,300
/// single pulses of 999.999999999 to one key, one commit each — past what the low limb alone
/// could hold (2^63 units of 10^-12, ~9,223,372 units) — sum exactly, in Redis and in the live
/// usage, which lists the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_pulses_past_the_low_limbs_carry_sum_exactly() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(settings(&redis, &[("WINDOW", "1h")])).await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    for _ in 0..9_300 {
        let (s, body) = post_raw(&c, &url, pulse_text("t", "S", "KB", "999.999999999")).await;
        assert_eq!(s, 202, "{body}");
    }
    let want = "9299999.9999907";
    let totals = redis.totals("pulses");
    assert_eq!(
        totals[&("t".into(), "S".into(), "KB".into())].to_string(),
        want
    );
    let r: serde_json::Value = c
        .get(format!("{}/v1/usage?tenant_id=t", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r.to_string().contains(want), "{r}");
    app.stop().await.unwrap();
}

/// Review finding: Lua reads a key's low limb as a double, whose step near the carry threshold
/// (4 × 10^18) is 512. A total 200 units below it read as the threshold, was carried and left
/// `lo` = -200 — a record the drain could not read, so dead-lettered. The carry now starts where
/// every total read as past it is; the record is delivered exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_limb_just_below_the_carry_is_never_left_negative() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "8s"),
            ("SHARDS", "1"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    // Right after a boundary, so the three steps land in one window.
    let ok = eventually(Duration::from_secs(20), || async {
        let (now, _): (u64, u64) = redis.cmd(&["TIME"]);
        now % 8 == 1
    })
    .await;
    assert!(ok);
    let (s, body) = post_raw(&c, &url, pulse_text("t", "SKU", "KB", "0.000000001")).await;
    assert_eq!(s, 202, "{body}");
    // The key's total as if many pulses had brought it 1,200 units of 10^-12 below 4 × 10^18.
    let generation: String = redis.cmd(&["HGET", "{pulses:0}:x:conf", "gen"]);
    let field = serde_json::to_string(&["t", "SKU", "KB"]).unwrap();
    let _: i64 = redis.cmd(&[
        "HSET",
        &format!("{{pulses:0}}:x:agg:{generation}"),
        &field,
        "3999999999999998800",
    ]);
    let (s, body) = post_raw(&c, &url, pulse_text("t", "SKU", "KB", "0.000000001")).await;
    assert_eq!(s, 202, "{body}");
    let lo: String = redis.cmd(&["HGET", &format!("{{pulses:0}}:x:agg:{generation}"), &field]);
    assert_eq!(lo, "3999999999999999800", "no carry below the threshold");
    flush_until_delivered(&app.base, &p, &["t"]).await;
    assert_eq!(total_of(&p.records(), "t"), "3999999.9999999998");
    assert_eq!(pending(&app.base).await["dead_letter_records"], 0);
    app.stop().await.unwrap();
}
