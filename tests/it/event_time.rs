//! Event time: a pulse with a `timestamp` is billed to the window it happened in — on time,
//! late (joining its sealed window before delivery, or as an amendment after), or slightly
//! early — and the books balance per window and key, exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use pulse_producer::processor::{Faults, Processor, Record};

fn stamped(t: &str, a: &str, ts_ms: i64) -> String {
    format!(
        r#"{{"tenant_id":{},"product_sku":"S","use_unit":"u","used_amount":{a},"timestamp":{}.{:03}}}"#,
        serde_json::to_string(t).unwrap(),
        ts_ms / 1000,
        ts_ms % 1000
    )
}

fn with_id(body: &str, id: &str) -> String {
    format!(r#"{},"pulse_id":"{id}"}}"#, &body[..body.len() - 1])
}

fn redis_ms(r: &RedisServer) -> i64 {
    let (s, us): (i64, i64) = r.cmd(&["TIME"]);
    s * 1000 + us / 1000
}

fn secs(t: &str) -> u64 {
    humantime::parse_rfc3339(t)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// (window start, tenant) → sum of every record of that window (amendments included).
fn per_window(records: &[Record]) -> BTreeMap<(u64, String), Dec> {
    let mut out = BTreeMap::new();
    for r in records {
        *out.entry((secs(&r.window_start), r.tenant_id.clone()))
            .or_insert_with(|| Dec::from(0)) += &r.used_amount;
    }
    out
}

trait Flush {
    async fn flush_now(&self) -> serde_json::Value;
}

impl Flush for Ingestor {
    async fn flush_now(&self) -> serde_json::Value {
        flush_now(&self.base).await
    }
}

async fn flush_until(app: &TestApp, p: &Processor, f: impl Fn(&[Record]) -> bool) -> bool {
    eventually(Duration::from_secs(30), || async {
        app.flush_now().await;
        f(&p.records())
    })
    .await
}

/// On time, just late (sealed, not yet delivered), late after delivery (amendments 1 and 2,
/// each its own record id), slightly ahead: each billed to the window its timestamp falls in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pulse_is_billed_to_the_window_it_happened_in() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "4s"),
            ("STABILISATION_DELAY", "2s"),
            ("DRAIN_INTERVAL", "100ms"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    let ok = eventually(Duration::from_secs(10), || async {
        redis_ms(&redis) % 4000 < 300
    })
    .await;
    assert!(ok);
    let b = redis_ms(&redis) / 4000 * 4000; // the window [b, b + 4 s)
    let w0 = (b / 1000) as u64;
    // On time, stamped at the window's last millisecond.
    let (s, r) = post_raw(&c, &one, stamped("t", "1", b + 3999)).await;
    assert_eq!((s, &r["windows"]), (202, &serde_json::json!([w0])), "{r}");
    // The window ends; it waits STABILISATION_DELAY before delivery: a pulse stamped in it
    // joins it.
    while redis_ms(&redis) < b + 4300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, r) = post_raw(&c, &one, stamped("t", "2", b + 3999)).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(
        (&r["windows"], &r["late"]),
        (&serde_json::json!([w0]), &serde_json::json!(1)),
        "{r}"
    );
    // Delivered (with the pulse that joined it): one record, 3.
    let ok = eventually(Duration::from_secs(20), || async {
        per_window(&p.records()).get(&(w0, "t".into())) == Some(&dec(3.0))
    })
    .await;
    assert!(ok, "{:?}", p.records());
    // Late after delivery: amendment 1.
    let (s, r) = post_raw(&c, &one, stamped("t", "4", b + 2000)).await;
    assert_eq!((s, &r["amended"]), (202, &serde_json::json!(1)), "{r}");
    // Slightly ahead: counted in the window its timestamp falls in.
    let ahead = redis_ms(&redis) + 2500;
    let (s, r) = post_raw(&c, &one, stamped("f", "8", ahead)).await;
    assert_eq!(s, 202, "{r}");
    let wf = (ahead / 4000 * 4) as u64;
    assert_eq!(r["windows"], serde_json::json!([wf]), "{r}");
    assert!(flush_until(&app, &p, |rs| rs.iter().any(|r| r.amends == Some(1))).await);
    // After amendment 1 was delivered, another late pulse is amendment 2.
    let (s, r) = post_raw(&c, &one, stamped("t", "16", b + 1)).await;
    assert_eq!((s, &r["amended"]), (202, &serde_json::json!(1)), "{r}");
    assert!(
        flush_until(&app, &p, |rs| {
            rs.iter().any(|r| r.amends == Some(2)) && rs.iter().any(|r| r.tenant_id == "f")
        })
        .await,
        "{:?}",
        p.records()
    );
    let recs = p.records();
    let of_t: Vec<&Record> = recs.iter().filter(|r| r.tenant_id == "t").collect();
    assert_eq!(of_t.len(), 3, "the window and two amendments: {of_t:?}");
    let ids: std::collections::HashSet<&str> = of_t.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "no record id reused");
    for r in &of_t {
        assert_eq!(
            secs(&r.window_start),
            w0,
            "every record of t is billed to its window"
        );
    }
    let by: BTreeMap<Option<u32>, Dec> = of_t
        .iter()
        .map(|r| (r.amends, r.used_amount.clone()))
        .collect();
    assert_eq!(by[&None], dec(3.0));
    assert_eq!(by[&Some(1)], dec(4.0));
    assert_eq!(by[&Some(2)], dec(16.0));
    let pw = per_window(&recs);
    assert_eq!(pw[&(w0, "t".into())], dec(23.0));
    assert_eq!(pw[&(wf, "f".into())], dec(8.0));
    app.stop().await.unwrap();
}

/// A retried late pulse counts once; too old, too far ahead, or (with an id) older than the
/// dedupe window: 422 naming `timestamp`, nothing of the request counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_outside_the_accepted_range_are_refused_and_retries_count_once() {
    let app = TestApp::start(&[
        ("WINDOW", "2s"),
        ("LATE_MAX_AGE", "1h"),
        ("MAX_FUTURE_SKEW", "1m"),
        ("DEDUPE_TTL", "10m"),
    ])
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    let batch = format!("{}/ingest/batch", app.base);
    let now = redis_ms(app.redis());
    let late = with_id(&stamped("t", "5", now - 5 * 60_000), "late-1");
    for _ in 0..3 {
        let (s, _) = post_raw(&c, &one, late.clone()).await;
        assert_eq!(s, 202);
    }
    let (s, r) = post_raw(&c, &one, late.clone()).await;
    assert_eq!((s, &r["duplicates"]), (202, &serde_json::json!(1)));
    for (body, says) in [
        (stamped("t", "1", now - 2 * 3_600_000), "LATE_MAX_AGE"),
        (stamped("t", "1", now + 5 * 60_000), "MAX_FUTURE_SKEW"),
        (with_id(&stamped("t", "1", now - 20 * 60_000), "old-id"), "DEDUPE_TTL"),
        (r#"{"tenant_id":"t","product_sku":"S","use_unit":"u","used_amount":1,"timestamp":"last tuesday"}"#.into(), "RFC 3339"),
    ] {
        let (s, r) = post_raw(&c, &one, body).await;
        assert_eq!(s, 422, "{r}");
        assert_eq!(r["fields"][0]["field"], "timestamp", "{r}");
        assert!(r["error"].as_str().unwrap().contains(says), "{r}");
    }
    // A batch with one bad stamp counts nothing; one mixing windows says which.
    let (s, r) = post_raw(
        &c,
        &batch,
        format!(
            "[{},{}]",
            stamped("t", "1", now),
            stamped("t", "1", now - 2 * 3_600_000)
        ),
    )
    .await;
    assert_eq!(
        (s, &r["fields"][0]["index"]),
        (422, &serde_json::json!(1)),
        "{r}"
    );
    let (s, r) = post_raw(
        &c,
        &batch,
        format!(
            "[{},{}]",
            stamped("m", "1", now - 10_000),
            stamped("m", "2", now - 20_000)
        ),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["windows"].as_array().unwrap().len(), 2, "{r}");
    let totals = app.redis().totals("pulses");
    assert_eq!(totals[&("t".into(), "S".into(), "u".into())], dec(5.0));
    assert_eq!(totals[&("m".into(), "S".into(), "u".into())], dec(3.0));
    app.stop().await.unwrap();
}

/// `LATE_PULSES=refuse`: a pulse for a delivered window is refused with its request ("window
/// closed"), and the other requests committed beside it count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_late_pulses_refused_a_closed_window_refuses_only_its_request() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("LATE_PULSES", "refuse"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    let batch = format!("{}/ingest/batch", app.base);
    let t0 = redis_ms(&redis);
    let (s, _) = post_raw(&c, &one, stamped("a", "1", t0)).await;
    assert_eq!(s, 202);
    assert!(flush_until(&app, &p, |rs| rs.iter().any(|r| r.tenant_id == "a")).await);
    let (s, r) = post_raw(
        &c,
        &batch,
        format!(
            "[{},{}]",
            stamped("b", "1", redis_ms(&redis)),
            stamped("a", "1", t0)
        ),
    )
    .await;
    assert_eq!(s, 422, "{r}");
    assert_eq!(r["fields"][0]["index"], 1, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("window closed"),
        "{r}"
    );
    let (s, _) = post_raw(&c, &one, stamped("b", "2", redis_ms(&redis))).await;
    assert_eq!(s, 202);
    assert!(flush_until(&app, &p, |rs| rs.iter().any(|r| r.tenant_id == "b")).await);
    let pw: Dec = p
        .records()
        .iter()
        .filter(|r| r.tenant_id == "b")
        .map(|r| &r.used_amount)
        .sum();
    assert_eq!(pw, dec(2.0), "nothing of the refused batch was counted");
    assert!(p.records().iter().all(|r| r.amends.is_none()));
    app.stop().await.unwrap();
}

/// A client that buffered its pulses over several windows sends them late, mixed with live
/// traffic, through two replicas: every window's delivered total equals the ledger's for it,
/// per key, exactly.
async fn buffered_client_scenario(backend: Backend<'_>) {
    let (p, purl) = processor(Faults::default()).await;
    let processor_url = format!("{purl}/batches");
    let mut apps = Vec::new();
    for _ in 0..2 {
        let vars = backend.settings(&[
            ("WINDOW", "2s"),
            ("SHARDS", "4"),
            ("PROCESSOR_URL", &processor_url),
        ]);
        apps.push(TestApp::spawn(vars).await);
    }
    let c = http();
    let mut ledger: BTreeMap<(u64, String), Dec> = BTreeMap::new();
    let mut rng = rand::rng();
    use rand::Rng;
    // Twelve seconds of buffered usage (six windows), sent late in shuffled batches, with
    // live pulses between them.
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut buffered = Vec::new();
    for i in 0..600 {
        let ts = start - 12_000 + (i * 20) as i64;
        let tenant = format!("b{}", i % 7);
        let cents = rng.random_range(1..10_000);
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        *ledger
            .entry(((ts / 2000 * 2) as u64, tenant.clone()))
            .or_insert_with(|| Dec::from(0)) += money::parse(&amount).unwrap();
        buffered.push(with_id(&stamped(&tenant, &amount, ts), &format!("buf-{i}")));
    }
    // Even chunks first, then (after a delivery) the odd ones: each window's second half
    // arrives after the window was delivered, as an amendment.
    let chunks: Vec<&[String]> = buffered.chunks(50).collect();
    let order: Vec<usize> = (0..chunks.len())
        .step_by(2)
        .chain((1..chunks.len()).step_by(2))
        .collect();
    for (k, &ci) in order.iter().enumerate() {
        let chunk = chunks[ci];
        if k == chunks.len().div_ceil(2) {
            apps[0].flush_now().await;
        }
        let app = &apps[k % 2];
        let (s, r) = post_raw(
            &c,
            &format!("{}/ingest/batch", app.base),
            format!("[{}]", chunk.join(",")),
        )
        .await;
        assert_eq!(s, 202, "{r}");
        // A retry of the same batch counts nothing again.
        if k % 3 == 0 {
            let (s, r) = post_raw(
                &c,
                &format!("{}/ingest/batch", apps[(k + 1) % 2].base),
                format!("[{}]", chunk.join(",")),
            )
            .await;
            assert_eq!((s, &r["accepted"]), (202, &serde_json::json!(0)), "{r}");
        }
        // Live pulses (no timestamp): the answer says their window.
        let (s, r) = post(
            &c,
            &format!("{}/ingest", app.base),
            &pulse("live", "S", "u", 0.5),
        )
        .await
        .into_two();
        assert_eq!(s, 202);
        *ledger
            .entry((r["window_start"].as_u64().unwrap(), "live".into()))
            .or_insert_with(|| Dec::from(0)) += dec(0.5);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let ok = eventually(Duration::from_secs(40), || async {
        for a in &apps {
            a.flush_now().await;
        }
        per_window(&p.records()) == ledger
    })
    .await;
    let found = per_window(&p.records());
    assert!(
        p.records().iter().any(|r| r.amends.is_some()),
        "late halves arrived as amendments"
    );
    assert!(
        ok,
        "per window and key: missing or different {:?}",
        ledger
            .iter()
            .filter(|(k, v)| found.get(*k) != Some(*v))
            .map(|(k, v)| (
                k.clone(),
                v.to_string(),
                found.get(k).map(|d| d.to_string())
            ))
            .collect::<Vec<_>>()
    );
    for a in apps {
        a.stop().await.unwrap();
    }
}

trait IntoTwo {
    fn into_two(self) -> (u16, serde_json::Value);
}

impl IntoTwo for (u16, reqwest::header::HeaderMap, serde_json::Value) {
    fn into_two(self) -> (u16, serde_json::Value) {
        (self.0, self.2)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_client_sending_late_through_two_replicas_balances_per_window() {
    let redis = RedisServer::start();
    buffered_client_scenario(Backend::Single(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_late_pulses_balance_per_window_too() {
    let cluster = RedisCluster::start(3, 0);
    buffered_client_scenario(Backend::Cluster(&cluster)).await;
}

/// The producer stamps pulses (a third of them up to 6 s late, i.e. up to three 2 s windows)
/// through two real replicas; `verify` checks every event window's records against its ledger,
/// key by key — and notices a window that is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_sends_late_pulses_and_verify_checks_each_window() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = settings(&redis, &[("WINDOW", "2s"), ("SHARDS", "4")]);
    v.insert("PROCESSOR_URL".into(), format!("{purl}/batches"));
    v.remove("LISTEN_ADDR");
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let b = Ingestor::spawn(&v, dir.path(), "b").await;
    let ledger = dir.path().join("ledger.json");
    let (code, out) = producer(&[
        "--url",
        &format!("{},{}", a.base, b.base),
        "--mode",
        "rate",
        "--rate",
        "400",
        "--duration",
        "7s",
        "--batch",
        "5",
        "--tenants",
        "50",
        "--ids",
        "--event-time",
        "late=0.33:6s",
        "--window",
        "2s",
        "--ledger",
        ledger.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let l: serde_json::Value = serde_json::from_slice(&std::fs::read(&ledger).unwrap()).unwrap();
    assert!(
        l["window_totals"].as_array().unwrap().len() > 4 * 10,
        "windows x keys in the ledger"
    );
    let ok = eventually(Duration::from_secs(30), || async {
        a.flush_now().await;
        verify(&ledger, &purl).await.0 == 0
    })
    .await;
    let (code, out) = verify(&ledger, &purl).await;
    assert!(ok && code == 0, "{out}");
    assert!(out.contains("per event window: books balance"), "{out}");
    assert!(
        p.records().iter().any(|r| r.amends.is_some()),
        "some pulses arrived after their window was delivered"
    );
    // A record moved to the wrong window is caught even though the key's total is unchanged.
    let mut l2 = l.clone();
    let w = l2["window_totals"][0]["window_start"].as_u64().unwrap();
    l2["window_totals"][0]["window_start"] = serde_json::json!(w + 2);
    let moved = dir.path().join("moved.json");
    std::fs::write(&moved, serde_json::to_vec(&l2).unwrap()).unwrap();
    let (code, out) = verify(&moved, &purl).await;
    assert_eq!(code, 1, "{out}");
}

/// `WINDOW_OFFSET`: windows begin that far after the UTC boundaries (a day starting at :30, as
/// in India), for pulses on time and stamped ones alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_start_at_the_configured_offset() {
    let app = TestApp::start(&[("WINDOW", "4s"), ("WINDOW_OFFSET", "1s")]).await;
    let c = http();
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        r#"{"tenant_id":"t","product_sku":"S","use_unit":"u","used_amount":1}"#.into(),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(r["window_start"].as_u64().unwrap() % 4, 1, "{r}");
    let now = redis_ms(app.redis());
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        stamped("t", "1", now - 9_000),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let w = r["windows"][0].as_u64().unwrap();
    assert_eq!(w % 4, 1, "{r}");
    let t = (now - 9_000) as u64;
    assert!(w * 1000 <= t && t < (w + 4) * 1000, "{r}");
    app.stop().await.unwrap();
}
