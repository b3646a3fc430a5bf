//! Meters: a gauge is billed by its max or latest value, a count by the number of pulses,
//! beside sums — each exact, each its own record, in the same atomic step as dedupe.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use pulse_producer::processor::{Faults, Record};

fn body(t: &str, sku: &str, unit: &str, amount: &str, extra: &str) -> String {
    format!(
        r#"{{"tenant_id":"{t}","product_sku":"{sku}","use_unit":"{unit}","used_amount":{amount}{extra}}}"#
    )
}

/// (sku, aggregation) → value, over every record of the tenant.
fn values(records: &[Record], tenant: &str) -> BTreeMap<(String, String), String> {
    records
        .iter()
        .filter(|r| r.tenant_id == tenant)
        .map(|r| {
            (
                (
                    r.product_sku.clone(),
                    r.aggregation.clone().unwrap_or_default(),
                ),
                money::canonical(&r.used_amount),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_counts_and_sums_are_each_billed_right() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let meters = dir.path().join("meters.txt");
    std::fs::write(
        &meters,
        "# storage is held, not summed\nsku:storage-* max,latest,min\nunit:requests count,sum\n",
    )
    .unwrap();
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("METERS_FILE", meters.to_str().unwrap()),
            ("MAX_AMOUNT", "1000000000000000000"),
            ("WINDOW", "4s"),
            ("STABILISATION_DELAY", "2s"),
        ],
    ))
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    // Everything in one window: start right after a boundary.
    let now_ms = || {
        let (s, us): (i64, i64) = redis.cmd(&["TIME"]);
        s * 1000 + us / 1000
    };
    let ok = eventually(Duration::from_secs(10), || async { now_ms() % 4000 < 200 }).await;
    assert!(ok);
    let base_ms = now_ms() / 4000 * 4000;
    // A gauge sampled 60 times: 1..60 GB, the last sample (by event time) 30, sent in a
    // shuffled order so that arrival order is not event order.
    let mut order: Vec<i64> = (0..60).collect();
    order.reverse();
    order.swap(3, 40);
    for i in order {
        let v = if i == 59 { 30 } else { i + 1 };
        let at = base_ms + i * 10;
        let ts = format!(r#","timestamp":"{}.{:03}""#, at / 1000, at % 1000);
        let (s, r) = post_raw(
            &c,
            &one,
            body("t", "storage-hot", "GB", &v.to_string(), &ts),
        )
        .await;
        assert_eq!(s, 202, "{r}");
    }
    // Extremes: the top of the range and a value differing only in its last digit.
    for a in [
        "999999999999999999.999999999",
        "999999999999999999.999999998",
        "0.000000001",
    ] {
        let (s, _) = post_raw(&c, &one, body("x", "storage-big", "GB", a, "")).await;
        assert_eq!(s, 202);
    }
    // A count and a sum of requests, with an id re-sent: counted once in both.
    for (i, a) in ["1.5", "2.5", "4"].iter().enumerate() {
        let id = format!(r#","pulse_id":"r{i}""#);
        let (s, _) = post_raw(&c, &one, body("t", "api", "requests", a, &id)).await;
        assert_eq!(s, 202);
    }
    let (s, r) = post_raw(
        &c,
        &one,
        body("t", "api", "requests", "1.5", r#","pulse_id":"r0""#),
    )
    .await;
    assert_eq!((s, &r["duplicates"]), (202, &serde_json::json!(1)));
    // An unmatched key is a plain sum, as before.
    let (s, _) = post_raw(&c, &one, body("t", "egress", "GB", "7", "")).await;
    assert_eq!(s, 202);
    // Live usage shows each aggregation.
    let u: serde_json::Value = c
        .get(format!("{}/v1/usage?tenant_id=t", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let aggs: Vec<&str> = u["windows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["usage"].as_array().unwrap().iter())
        .map(|k| k["aggregation"].as_str().unwrap())
        .collect();
    for a in ["max", "latest", "min", "count", "sum"] {
        assert!(aggs.contains(&a), "{a} in {u}");
    }
    let ok = eventually(Duration::from_secs(30), || async {
        app.flush_now().await;
        p.records().len() == 3 + 3 + 2 + 1
    })
    .await;
    assert!(
        ok,
        "{:?} {} {:?}",
        p.records(),
        app.flush_now().await,
        p.totals().batches_seen
    );
    let recs = p.records();
    let t = values(&recs, "t");
    let get = |sku: &str, a: &str| t[&(sku.to_string(), a.to_string())].clone();
    assert_eq!(
        get("storage-hot", "max"),
        "59",
        "the max, not the sum of 60 samples"
    );
    assert_eq!(
        get("storage-hot", "latest"),
        "30",
        "the value with the latest event time"
    );
    assert_eq!(get("storage-hot", "min"), "1");
    assert!(!t.contains_key(&("storage-hot".to_string(), "sum".to_string())));
    assert_eq!(get("api", "count"), "3");
    assert_eq!(get("api", "sum"), "8");
    assert_eq!(get("egress", "sum"), "7");
    let x = values(&recs, "x");
    assert_eq!(
        x[&("storage-big".into(), "max".into())],
        "999999999999999999.999999999"
    );
    assert_eq!(x[&("storage-big".into(), "min".into())], "0.000000001");
    // `/totals` combines per key and aggregation by the same rules, never adding a max to a sum.
    let totals = p.totals();
    let total = |sku: &str, a: Option<&str>| {
        let k = totals
            .totals
            .iter()
            .find(|k| k.tenant_id == "t" && k.product_sku == sku && k.aggregation.as_deref() == a);
        k.map(|k| money::canonical(&k.used_amount))
    };
    assert_eq!(total("storage-hot", Some("max")).as_deref(), Some("59"));
    assert_eq!(total("storage-hot", Some("latest")).as_deref(), Some("30"));
    assert_eq!(total("storage-hot", Some("min")).as_deref(), Some("1"));
    assert_eq!(total("storage-hot", None), None, "no sum of a gauge");
    assert_eq!(total("api", Some("count")).as_deref(), Some("3"));
    assert_eq!(
        total("api", None).as_deref(),
        Some("8"),
        "a sum is carried as before"
    );
    let ids: std::collections::HashSet<&str> = recs.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        recs.len(),
        "a key's sum and max never share an id"
    );
    app.stop().await.unwrap();
}

/// A meters file with mistakes stops the service at start, naming every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_meters_file_is_refused_at_start_with_every_problem() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let meters = dir.path().join("meters.txt");
    std::fs::write(&meters, "sku:a average\nbogus line here\n").unwrap();
    let cfg = pulse_ingestor::config::Config::from_map(&settings(
        &redis,
        &[("METERS_FILE", meters.to_str().unwrap())],
    ))
    .unwrap();
    let err = pulse_ingestor::app::App::build(cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("line 1") && err.contains("line 2"), "{err}");
}
