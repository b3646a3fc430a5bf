//! The last mile: the Processor on a real PostgreSQL (never mocked). What the ingestor got a
//! 2xx for equals what SQL says is owed — per window, key and aggregation, decimal for decimal —
//! through re-deliveries, conflicting record ids, a Processor killed mid-transaction, a database
//! restart, two Processor replicas, and a billing period across a daylight-saving change.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;

/// (window start, tenant, sku, unit, aggregation).
type Slot = (u64, String, String, String, String);

/// What the database says is owed, per window, key and aggregation (`window_usage`).
fn owed(pg: &PgServer) -> BTreeMap<Slot, Dec> {
    pg.sql(
        "SELECT extract(epoch FROM window_start)::bigint, tenant_id, product_sku, use_unit, \
         aggregation, trim_scale(used_amount)::text FROM window_usage",
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(|l| {
        let f: Vec<&str> = l.split('|').collect();
        let slot = (
            f[0].parse().unwrap(),
            f[1].into(),
            f[2].into(),
            f[3].into(),
            f[4].into(),
        );
        (slot, money::parse(f[5]).unwrap())
    })
    .collect()
}

fn count(pg: &PgServer, query: &str) -> u64 {
    pg.sql(query).parse().unwrap()
}

fn redis_ms(r: &RedisServer) -> i64 {
    let (s, us): (i64, i64) = r.cmd(&["TIME"]);
    s * 1000 + us / 1000
}

/// A pulse stamped with its event time (ms).
fn stamped(t: &str, sku: &str, unit: &str, amount: &str, ts_ms: i64) -> String {
    format!(
        r#"{{"tenant_id":"{t}","product_sku":"{sku}","use_unit":"{unit}","used_amount":{amount},"timestamp":{}.{:03}}}"#,
        ts_ms / 1000,
        ts_ms % 1000
    )
}

/// The contract's rules, applied to the pulses the ingestor acknowledged: per aggregation of a
/// key, over one window.
fn expected_of(
    pulses: &[(&str, &str, &str, &str, i64)],
    aggs_of: impl Fn(&str) -> Vec<&'static str>,
    window: u64,
) -> BTreeMap<Slot, Dec> {
    let mut out: BTreeMap<Slot, Dec> = BTreeMap::new();
    let mut latest: BTreeMap<Slot, i64> = BTreeMap::new();
    for &(t, sku, unit, amount, ts) in pulses {
        let a = money::parse(amount).unwrap();
        for agg in aggs_of(sku) {
            let slot = (window, t.into(), sku.into(), unit.into(), agg.into());
            let held = out.get(&slot).cloned();
            let v = match (agg, held) {
                ("count", h) => h.unwrap_or_default() + Dec::from(1),
                ("max", Some(h)) => h.max(a.clone()),
                ("min", Some(h)) => h.min(a.clone()),
                ("latest", Some(h)) if latest[&slot] > ts => h,
                ("sum", Some(h)) => h + &a,
                _ => a.clone(),
            };
            if agg == "latest" {
                let at = latest.entry(slot.clone()).or_insert(ts);
                *at = (*at).max(ts);
            }
            out.insert(slot, v);
        }
    }
    out
}

/// Real ingestor → Processor on PostgreSQL → SQL: sums and meters (count, max, min, latest),
/// on time and as amendments (late stamped pulses), each exactly as the view combines them; and
/// the billing-period endpoint agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_sums_meters_and_amendments_land_in_postgres_exactly() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let proc_ = ProcessorProcess::spawn(&pg.url(), dir.path(), "processor", &[]).await;
    let meters = dir.path().join("meters.txt");
    std::fs::write(
        &meters,
        "unit:requests count,sum,max,min\nsku:gauge-* latest,max\n",
    )
    .unwrap();
    let app = TestApp::start(&[
        ("WINDOW", "4s"),
        ("STABILISATION_DELAY", "1s"),
        ("DRAIN_INTERVAL", "100ms"),
        ("METERS_FILE", meters.to_str().unwrap()),
        ("PROCESSOR_URL", &proc_.url()),
    ])
    .await;
    let redis = app.redis();
    let c = http();
    let one = format!("{}/ingest", app.base);
    let ok = eventually(Duration::from_secs(10), || async {
        redis_ms(redis) % 4000 < 300
    })
    .await;
    assert!(ok);
    let b = redis_ms(redis) / 4000 * 4000;
    let w0 = (b / 1000) as u64;
    let aggs = |sku: &str| match sku {
        "api" => vec!["count", "sum", "max", "min"],
        s if s.starts_with("gauge-") => vec!["latest", "max"],
        _ => vec!["sum"],
    };
    let on_time = [
        ("t", "api", "requests", "1.5", b + 10),
        ("t", "api", "requests", "2.25", b + 20),
        ("t", "api", "requests", "4", b + 30),
        ("t", "api", "requests", "0.000000001", b + 40),
        ("t", "gauge-a", "GB", "10", b + 100),
        ("t", "gauge-a", "GB", "30", b + 300),
        ("t", "gauge-a", "GB", "20", b + 200),
        ("t", "gauge-b", "GB", "5", b + 500),
        ("t", "gauge-b", "GB", "4", b + 400),
        ("u", "plain", "KB", "123456789.123456789", b + 50),
        ("u", "plain", "KB", "0.1", b + 60),
    ];
    for &(t, sku, unit, a, ts) in &on_time {
        let (s, r) = post_raw(&c, &one, stamped(t, sku, unit, a, ts)).await;
        assert_eq!(s, 202, "{r}");
    }
    let ok = eventually(Duration::from_secs(30), || async {
        app.flush_now().await;
        count(&pg, "SELECT count(*) FROM usage_records") == 9
    })
    .await;
    assert!(ok, "the window's 9 records: {:?}", owed(&pg));
    assert_eq!(owed(&pg), expected_of(&on_time, aggs, w0), "on time");
    // Late: after the window's delivery, each key gets an amendment. gauge-a's late sample is
    // its latest measurement; gauge-b's is older than what the window holds, and larger.
    let late = [
        ("t", "api", "requests", "10", b + 50),
        ("t", "gauge-a", "GB", "7", b + 3000),
        ("t", "gauge-b", "GB", "99", b + 1),
        ("u", "plain", "KB", "0.9", b + 70),
    ];
    for &(t, sku, unit, a, ts) in &late {
        let (s, r) = post_raw(&c, &one, stamped(t, sku, unit, a, ts)).await;
        assert_eq!((s, &r["amended"]), (202, &serde_json::json!(1)), "{r}");
    }
    let ok = eventually(Duration::from_secs(30), || async {
        app.flush_now().await;
        count(&pg, "SELECT count(*) FROM usage_records WHERE amends = 1") == 9
    })
    .await;
    assert!(
        ok,
        "9 amendment records: {}",
        pg.sql("SELECT record_id, amends FROM usage_records")
    );
    let all: Vec<_> = on_time.iter().chain(&late).copied().collect();
    let expected = expected_of(&all, aggs, w0);
    assert_eq!(owed(&pg), expected, "window and amendments combined");
    let slot = |t: &str, sku: &str, unit: &str, agg: &str| {
        money::canonical(&expected[&(w0, t.into(), sku.into(), unit.into(), agg.into())])
    };
    assert_eq!(slot("t", "gauge-a", "GB", "latest"), "7");
    assert_eq!(slot("t", "gauge-b", "GB", "latest"), "5");
    assert_eq!(slot("t", "gauge-b", "GB", "max"), "99");
    assert_eq!(slot("t", "api", "requests", "count"), "5");
    // The billing period holding the window (its UTC day) says the same.
    let day = time::OffsetDateTime::from_unix_timestamp(w0 as i64)
        .unwrap()
        .date();
    let usage = c
        .get(format!(
            "{}/usage?tenant_id=t&from={day}&to={}&tz=UTC",
            proc_.base,
            day.next_day().unwrap()
        ))
        .json_reply()
        .await;
    let lines = usage["usage"].as_array().unwrap();
    assert_eq!(lines.len(), 8, "{usage}");
    for l in lines {
        let (sku, unit, agg) = (
            l["product_sku"].as_str().unwrap(),
            l["use_unit"].as_str().unwrap(),
            l["aggregation"].as_str().unwrap(),
        );
        assert_eq!(l["used_amount"], slot("t", sku, unit, agg).as_str(), "{l}");
    }
    app.stop().await.unwrap();
}

/// A record as the ingestor posts it (amount as its number and its text).
fn record(
    id: &str,
    sku: &str,
    agg: &str,
    amount: &str,
    start: &str,
    amends: u32,
) -> serde_json::Value {
    let end = time::OffsetDateTime::parse(start, &time::format_description::well_known::Rfc3339)
        .unwrap()
        + time::Duration::hours(1);
    let mut r: serde_json::Value = serde_json::from_str(&format!(
        r#"{{"record_id":"{id}","tenant_id":"ny","product_sku":"{sku}","use_unit":"h",
            "used_amount":{amount},"used_amount_text":"{amount}","window_start":"{start}",
            "window_end":"{}","aggregation":"{agg}"}}"#,
        end.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    ))
    .unwrap();
    if amends > 0 {
        r["amends"] = amends.into();
    }
    r
}

/// POSTs a batch to the Processor as the ingestor does: status and body.
async fn deliver(base: &str, batch: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = http()
        .post(format!("{base}/batches"))
        .header("idempotency-key", "test")
        .json(batch)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

/// The same batch twice is a no-op 2xx; a record id sent again with another amount, window or
/// aggregation is refused by name (the body the ingestor parses), counted and logged, and the
/// stored record is kept; the rest of that batch is stored. And through the ingestor: answers
/// lost after COMMIT make it re-deliver, and nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_no_ops_and_a_conflicting_record_id_is_refused_by_name() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let p = ProcessorProcess::spawn(&pg.url(), dir.path(), "processor", &[]).await;
    let start = "2026-03-01T10:00:00Z";
    let batch = serde_json::json!([
        record("r1", "S", "sum", "1.5", start, 0),
        record("r2", "G", "max", "3", start, 0),
        record("r3", "S", "sum", "2", start, 1),
    ]);
    assert_eq!(deliver(&p.base, &batch).await.0, 200);
    assert_eq!(
        deliver(&p.base, &batch).await.0,
        200,
        "a re-delivery is a 2xx"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM usage_records"), 3);
    let c = http();
    let dup = metric(
        &c,
        &p.base,
        r#"processor_records_total{outcome="duplicate"}"#,
    )
    .await;
    assert_eq!(dup, Some(3.0));
    let mut other_window = record("r2", "G", "max", "3", start, 0);
    other_window["window_end"] = "2026-03-01T10:30:00Z".into();
    let conflicting = serde_json::json!([
        record("r1", "S", "sum", "1.6", start, 0),
        record("r4", "S", "sum", "7", start, 0),
        other_window,
        record("r3", "S", "max", "2", start, 1),
    ]);
    let (s, body) = deliver(&p.base, &conflicting).await;
    assert_eq!(s, 422, "{body}");
    let named: BTreeMap<String, String> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let id = r["record_id"].as_str().unwrap().to_string();
            (id, r["reason"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        named.keys().collect::<Vec<_>>(),
        ["r1", "r2", "r3"],
        "{body}"
    );
    assert!(
        named["r1"].contains("used_amount 1.6, stored 1.5"),
        "{named:?}"
    );
    assert!(named["r2"].contains("window"), "{named:?}");
    assert!(
        named["r3"].contains("aggregation max, stored sum"),
        "{named:?}"
    );
    assert_eq!(
        pg.sql("SELECT used_amount FROM usage_records WHERE record_id = 'r1'"),
        "1.5"
    );
    assert_eq!(
        pg.sql("SELECT aggregation FROM usage_records WHERE record_id = 'r3'"),
        "sum"
    );
    assert_eq!(
        pg.sql("SELECT used_amount FROM usage_records WHERE record_id = 'r4'"),
        "7"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM refused_records"), 3);
    let refused = metric(
        &c,
        &p.base,
        r#"processor_refused_records_total{reason="conflict"}"#,
    )
    .await;
    assert_eq!(refused, Some(3.0));
    assert!(p.log_text().contains("record refused"), "logged loudly");
    // The re-send of the rest (what the ingestor does after a named refusal) is a no-op 2xx.
    let rest = serde_json::json!([record("r4", "S", "sum", "7", start, 0)]);
    assert_eq!(deliver(&p.base, &rest).await.0, 200);

    // Through the ingestor: half the answers are lost after COMMIT.
    let lossy =
        ProcessorProcess::spawn(&pg.url(), dir.path(), "lossy", &["--drop-rate", "0.5"]).await;
    let (app, expected) = ingest_keys(&lossy.url(), "e2e", "5").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ok = eventually(Duration::from_secs(60), || async {
        app.flush_now().await;
        pending(&app.base).await["pending_windows"] == 0
    })
    .await;
    assert!(ok, "delivered despite lost answers");
    assert_eq!(owed_to(&pg, "e2e"), expected, "per window and key, exactly");
    let dup = metric(
        &c,
        &lossy.base,
        r#"processor_records_total{outcome="duplicate"}"#,
    )
    .await;
    assert!(
        dup.unwrap_or(0.0) > 0.0,
        "some batches were re-delivered: {dup:?}"
    );
    app.stop().await.unwrap();
}

/// Waits until a Processor transaction is open (held before COMMIT).
async fn wait_for_open_transaction(pg: &PgServer, p: &ProcessorProcess) {
    let ok = eventually(Duration::from_secs(30), || async {
        count(
            pg,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pulse-processor' \
             AND state = 'idle in transaction'",
        ) > 0
    })
    .await;
    assert!(ok, "no batch reached its transaction: {}", p.log_text());
}

/// 40 keys through a real ingestor, each pulse stamped with Redis time; returns the app and
/// what it acknowledged per window and key.
async fn ingest_keys(
    processor_url: &str,
    prefix: &str,
    batch: &str,
) -> (TestApp, BTreeMap<Slot, Dec>) {
    let app = TestApp::start(&[
        ("WINDOW", "2s"),
        ("BATCH_SIZE", batch),
        ("PROCESSOR_URL", processor_url),
    ])
    .await;
    let mut expected: BTreeMap<Slot, Dec> = BTreeMap::new();
    for i in 0..40 {
        let t = format!("{prefix}-{i}");
        let amount = format!("{i}.{i:03}000001");
        // Stamped with Redis time: the window it is billed to is known here.
        let ts = redis_ms(app.redis());
        let (s, r) = post_raw(
            &app.client,
            &format!("{}/ingest", app.base),
            stamped(&t, "S", "u", &amount, ts),
        )
        .await;
        assert_eq!(s, 202, "{r}");
        let window = (ts / 2000 * 2) as u64;
        let slot = (window, t, "S".into(), "u".into(), "sum".into());
        *expected.entry(slot).or_default() += money::parse(&amount).unwrap();
    }
    (app, expected)
}

/// What the database owes the tenants whose id starts with `prefix`.
fn owed_to(pg: &PgServer, prefix: &str) -> BTreeMap<Slot, Dec> {
    let mut owed = owed(pg);
    owed.retain(|(_, t, ..), _| t.starts_with(&format!("{prefix}-")));
    owed
}

/// `kill -9` of the Processor while a batch's transaction is open: nothing of it is stored
/// (the transaction dies with the connection); the ingestor re-delivers to the restarted
/// Processor and the books balance, every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_killed_mid_transaction_stores_nothing_partial_and_redelivery_completes() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = ProcessorProcess::spawn_on(
        port,
        &pg.url(),
        dir.path(),
        "held",
        &["--hold-commit", "5s"],
    )
    .await;
    let (app, expected) = ingest_keys(&p.url(), "k", "10").await;
    // The scheduler seals the window and starts delivering (a flush would wait for it).
    wait_for_open_transaction(&pg, &p).await;
    p.kill();
    assert_eq!(
        count(&pg, "SELECT count(*) FROM usage_records"),
        0,
        "no partial batch"
    );
    let gone = eventually(Duration::from_secs(10), || async {
        count(
            &pg,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pulse-processor'",
        ) == 0
    })
    .await;
    assert!(gone, "the killed Processor's transactions were rolled back");
    let p2 = ProcessorProcess::spawn_on(port, &pg.url(), dir.path(), "restarted", &[]).await;
    let ok = eventually(Duration::from_secs(60), || async {
        app.flush_now().await;
        pending(&app.base).await["pending_windows"] == 0
    })
    .await;
    assert!(ok, "re-delivered; log: {}", p2.log_text());
    assert_eq!(owed_to(&pg, "k"), expected, "per window and key, exactly");
    app.stop().await.unwrap();
}

/// PostgreSQL crashes (immediate shutdown) while a batch's transaction is open and comes back:
/// the Processor answers 503 meanwhile (not ready), the ingestor retries, nothing is lost or
/// doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_delivery_loses_nothing_and_doubles_nothing() {
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let p =
        ProcessorProcess::spawn(&pg.url(), dir.path(), "processor", &["--hold-commit", "2s"]).await;
    let (app, expected) = ingest_keys(&p.url(), "r", "10").await;
    // The scheduler seals the window and starts delivering (a flush would wait for it).
    wait_for_open_transaction(&pg, &p).await;
    pg.stop();
    let c = http();
    let not_ready = eventually(Duration::from_secs(10), || async {
        c.get(format!("{}/readyz", p.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    assert!(not_ready, "/readyz says the database does not answer");
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.run();
    let ok = eventually(Duration::from_secs(60), || async {
        app.flush_now().await;
        pending(&app.base).await["pending_windows"] == 0
    })
    .await;
    assert!(ok, "delivered after the restart; log: {}", p.log_text());
    assert_eq!(owed_to(&pg, "r"), expected, "per window and key, exactly");
    let failed = metric(&c, &p.base, r#"processor_batches_total{outcome="failed"}"#).await;
    assert!(
        failed.unwrap_or(0.0) > 0.0,
        "some batches failed and were retried"
    );
    app.stop().await.unwrap();
}

/// Two Processor replicas on one database: they migrate at the same time, take the same batch
/// at the same time (each record stored once, no deadlock, every answer 2xx), and deliveries
/// from two ingestor replicas under the producer's load balance with its ledger
/// (`pulse-producer verify --database-url`: sums, and a metered unit's count, max and min),
/// which also notices a meter that is off and a missing record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processor_replicas_share_one_database() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let (a, b) = tokio::join!(
        ProcessorProcess::spawn(&url, dir.path(), "a", &[]),
        ProcessorProcess::spawn(&url, dir.path(), "b", &[]),
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM refinery_schema_history"),
        1
    );
    let batch: Vec<_> = (0..300)
        .map(|i| {
            record(
                &format!("same-{i}"),
                &format!("S{i}"),
                "sum",
                &format!("{i}.25"),
                "2026-03-01T10:00:00Z",
                0,
            )
        })
        .collect();
    let batch = serde_json::Value::from(batch);
    let sends = (0..10).map(|i| deliver(if i % 2 == 0 { &a.base } else { &b.base }, &batch));
    for (s, body) in futures::future::join_all(sends).await {
        assert_eq!(s, 200, "{body}");
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM usage_records"), 300);
    assert_eq!(
        pg.sql("SELECT sum(used_amount) FROM usage_records"),
        "44925.00"
    );
    pg.sql("DELETE FROM usage_records");

    let redis = RedisServer::start();
    // Gigabytes are metered too: verify checks their count, max and min against the ledger.
    let meters = dir.path().join("meters.txt");
    std::fs::write(&meters, "unit:GB sum,count,max,min,latest\n").unwrap();
    let meters = meters.to_str().unwrap();
    let one = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("METERS_FILE", meters),
            ("PROCESSOR_URL", &a.url()),
        ],
    ))
    .await;
    let two = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("METERS_FILE", meters),
            ("PROCESSOR_URL", &b.url()),
        ],
    ))
    .await;
    let ledger = dir.path().join("ledger.json");
    let (code, out) = producer(&[
        "--url",
        &format!("{},{}", one.base, two.base),
        "--mode",
        "rate",
        "--rate",
        "300",
        "--duration",
        "3s",
        "--batch",
        "5",
        "--tenants",
        "40",
        "--ids",
        "--amounts",
        "fine",
        "--ledger",
        ledger.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let verify_db = || {
        let args = [
            "verify",
            "--ledger",
            ledger.to_str().unwrap(),
            "--database-url",
            &pg.url(),
        ]
        .map(String::from);
        async move { producer(&args).await }
    };
    let ok = eventually(Duration::from_secs(60), || async {
        one.flush_now().await;
        two.flush_now().await;
        verify_db().await.0 == 0
    })
    .await;
    let (code, out) = verify_db().await;
    assert!(ok && code == 0, "{out}");
    assert!(
        out.contains("meters (count, max, min): books balance"),
        "{out}"
    );
    assert!(out.contains("latest-value totals not checked"), "{out}");
    // A meter that is off is noticed, and so is a missing record.
    pg.sql(
        "UPDATE usage_records SET used_amount = used_amount + 1e20 WHERE record_id = \
         (SELECT min(record_id) FROM usage_records WHERE aggregation = 'max')",
    );
    let (code, out) = verify_db().await;
    assert_eq!(code, 1, "a max that is off is noticed: {out}");
    assert!(
        out.contains("meters (count, max, min): books do NOT balance"),
        "{out}"
    );
    pg.sql(
        "UPDATE usage_records SET used_amount = used_amount - 1e20 WHERE record_id = \
         (SELECT min(record_id) FROM usage_records WHERE aggregation = 'max')",
    );
    assert_eq!(verify_db().await.0, 0);
    pg.sql(
        "DELETE FROM usage_records WHERE record_id = \
         (SELECT min(record_id) FROM usage_records WHERE aggregation = 'sum')",
    );
    let (code, out) = verify_db().await;
    assert_eq!(code, 1, "a missing record is noticed: {out}");
    one.stop().await.unwrap();
    two.stop().await.unwrap();
}

/// A billing period is local time: March 2021 in New York began at 05:00 UTC (EST) and ended at
/// 04:00 UTC (EDT, after the change on 14 March), so its windows are not the UTC month's.
/// Meters combine over the period too: the max of the maxima, the latest measurement (a tie in a
/// window going to the higher amendment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_period_follows_the_time_zone_across_a_daylight_saving_change() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let p = ProcessorProcess::spawn(&pg.url(), dir.path(), "processor", &[]).await;
    let latest = |id: &str, amount: &str, start: &str, amends: u32, at: &str| {
        let mut r = record(id, "L", "latest", amount, start, amends);
        r["latest_at"] = at.into();
        r
    };
    let batch = serde_json::json!([
        record("feb", "S", "sum", "1", "2021-03-01T04:00:00Z", 0),
        record("mar-first", "S", "sum", "10", "2021-03-01T05:00:00Z", 0),
        record("mar-first-a1", "S", "sum", "0.5", "2021-03-01T05:00:00Z", 1),
        record("before-dst", "S", "sum", "100", "2021-03-14T06:00:00Z", 0),
        record("after-dst", "S", "sum", "1000", "2021-03-14T07:00:00Z", 0),
        record("mar-last", "S", "sum", "10000", "2021-04-01T03:00:00Z", 0),
        record("apr-first", "S", "sum", "100000", "2021-04-01T04:00:00Z", 0),
        record("g-mar", "G", "max", "7", "2021-03-01T05:00:00Z", 0),
        record("g-apr", "G", "max", "99", "2021-04-01T04:00:00Z", 0),
        latest("l1", "3", "2021-03-10T00:00:00Z", 0, "2021-03-10T00:30:00Z"),
        latest(
            "l1-a1",
            "4",
            "2021-03-10T00:00:00Z",
            1,
            "2021-03-10T00:10:00Z"
        ),
        latest(
            "l2",
            "8",
            "2021-03-25T00:00:00Z",
            0,
            "2021-03-25T00:20:00.500Z"
        ),
        latest(
            "l2-a1",
            "9",
            "2021-03-25T00:00:00Z",
            1,
            "2021-03-25T00:20:00.500Z"
        ),
        latest("l3", "5", "2021-03-20T00:00:00Z", 0, "2021-03-20T00:05:00Z"),
    ]);
    assert_eq!(deliver(&p.base, &batch).await.0, 200);
    let period = |from: &str, to: &str, tz: &str| {
        let url = format!("{}/usage?tenant_id=ny&from={from}&to={to}&tz={tz}", p.base);
        async move {
            let u = http().get(url).json_reply().await;
            u["usage"]
                .as_array()
                .unwrap_or_else(|| panic!("{u}"))
                .iter()
                .map(|l| {
                    let key = format!(
                        "{}/{}",
                        l["product_sku"].as_str().unwrap(),
                        l["aggregation"].as_str().unwrap()
                    );
                    (key, l["used_amount"].as_str().unwrap().to_string())
                })
                .collect::<BTreeMap<String, String>>()
        }
    };
    let ny = "America/New_York";
    let march = period("2021-03-01", "2021-04-01", ny).await;
    assert_eq!(march["S/sum"], "11110.5", "{march:?}");
    assert_eq!(march["G/max"], "7");
    assert_eq!(
        march["L/latest"], "9",
        "the latest measurement; its tie to the amendment"
    );
    assert_eq!(period("2021-02-01", "2021-03-01", ny).await["S/sum"], "1");
    assert_eq!(
        period("2021-04-01", "2021-05-01", ny).await["S/sum"],
        "100000"
    );
    let utc = period("2021-03-01", "2021-04-01", "UTC").await;
    assert_eq!(utc["S/sum"], "1111.5", "a UTC month is another period");
    // The same as SQL, for finance.
    let sql = pg.sql(
        "SELECT trim_scale(used_amount) FROM billing_usage('ny', '2021-03-01', '2021-04-01', \
         'America/New_York') WHERE product_sku = 'S'",
    );
    assert_eq!(sql, "11110.5");
    // Per window: the view's latest for 10 March is the later measurement (3), not the
    // amendment's older one.
    assert_eq!(
        pg.sql("SELECT used_amount FROM window_usage WHERE product_sku = 'L' AND window_start = '2021-03-10T00:00:00Z'"),
        "3"
    );
    let r = http()
        .get(format!(
            "{}/usage?tenant_id=ny&from=2021-03-01&to=2021-04-01&tz=Mars/Olympus",
            p.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        400,
        "an unknown time zone is the caller's mistake"
    );
}

/// The deploy manifests' placeholder password is refused at start.
#[tokio::test]
async fn the_placeholder_password_is_refused_at_start() {
    let out = tokio::process::Command::new(bin("pulse-processor"))
        .env_clear()
        .env(
            "DATABASE_URL",
            "postgres://processor:REPLACE_ME@127.0.0.1:1/usage",
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("REPLACE_ME"));
}
