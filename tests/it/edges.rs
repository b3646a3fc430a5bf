//! Event time and meters at their edges: a live `WINDOW` change with pulses stamped ahead, a
//! changed `LATE_MAX_AGE`, a backfill beside live traffic, a replayed `latest`, and
//! `LATE_PULSES=refuse` on a cluster and for a re-send. The books are read as a billing team
//! would: records upserted by `record_id`, combined per window, key and aggregation as the
//! Processor contract says — and no record id is ever delivered with two contents.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use pulse_ingestor::store::keys::shard_of;
use pulse_producer::processor::{Faults, Processor, Record};

fn redis_ms(r: &RedisServer) -> i64 {
    let (s, us): (i64, i64) = r.cmd(&["TIME"]);
    s * 1000 + us / 1000
}

async fn until_ms(r: &RedisServer, ms: i64) {
    while redis_ms(r) < ms {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until Redis time modulo `period` is in `[from, to)` ms.
async fn at_phase(r: &RedisServer, period: i64, from: i64, to: i64) {
    let ok = eventually(Duration::from_secs(30), || async {
        let p = redis_ms(r) % period;
        p >= from && p < to
    })
    .await;
    assert!(ok, "Redis time never reached the phase");
}

fn body(t: &str, sku: &str, amount: &str, ts_ms: Option<i64>, id: Option<&str>) -> String {
    let mut v = serde_json::json!({"tenant_id": t, "product_sku": sku, "use_unit": "u",
        "used_amount": serde_json::Value::Number(amount.parse().unwrap())});
    if let Some(ms) = ts_ms {
        v["timestamp"] = serde_json::json!(format!("{}.{:03}", ms / 1000, ms % 1000));
    }
    if let Some(id) = id {
        v["pulse_id"] = serde_json::json!(id);
    }
    v.to_string()
}

fn secs(t: &str) -> i64 {
    humantime::parse_rfc3339(t)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `n` tenant names that live in one shard of `shards`.
fn same_shard(n: usize, shards: u32) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let target = shard_of("edge-0", shards);
    for i in 0.. {
        let t = format!("edge-{i}");
        if shard_of(&t, shards) == target {
            out.push(t);
        }
        if out.len() == n {
            return out;
        }
    }
    unreachable!()
}

/// A window's records of one key and aggregation combined as the contract says: sums and
/// counts add, max and min take the extreme, latest the value with the greatest `latest_at`.
fn combine(records: &[&Record]) -> Dec {
    let agg = records[0]
        .aggregation
        .clone()
        .unwrap_or_else(|| "sum".into());
    let it = records.iter().map(|r| r.used_amount.clone());
    match agg.as_str() {
        "max" => it.reduce(|a, b| if b > a { b } else { a }).unwrap(),
        "min" => it.reduce(|a, b| if b < a { b } else { a }).unwrap(),
        "latest" => records
            .iter()
            .max_by_key(|r| (r.latest_at.clone(), r.amends))
            .unwrap()
            .used_amount
            .clone(),
        _ => it.fold(Dec::from(0), |a, b| a + b),
    }
}

/// The Processor's records (upserted by id) as (tenant, sku, aggregation) → [(window start,
/// end, combined value)]; asserts that no record id came with two contents and that the
/// windows of the records never overlap without being the same window.
/// (tenant, sku, aggregation) → [(window start, end, combined value)].
type Books = BTreeMap<(String, String, String), Vec<(i64, i64, Dec)>>;

fn books(p: &Processor) -> Books {
    let conflicts = p.conflicts();
    assert!(
        conflicts.is_empty(),
        "record ids delivered with two contents: {conflicts:?}"
    );
    let records = p.records();
    // A shard's windows (SHARDS=8 in these tests) never overlap: a record id names one window.
    let mut windows: Vec<(u32, i64, i64)> = records
        .iter()
        .map(|r| {
            (
                shard_of(&r.tenant_id, 8),
                secs(&r.window_start),
                secs(&r.window_end),
            )
        })
        .collect();
    windows.sort();
    windows.dedup();
    for w in windows.windows(2) {
        assert!(
            w[0].0 != w[1].0 || w[0].2 <= w[1].1,
            "windows of one shard overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    let mut groups: BTreeMap<(String, String, String, i64, i64), Vec<&Record>> = BTreeMap::new();
    for r in &records {
        let agg = r.aggregation.clone().unwrap_or_else(|| "sum".into());
        groups
            .entry((
                r.tenant_id.clone(),
                r.product_sku.clone(),
                agg,
                secs(&r.window_start),
                secs(&r.window_end),
            ))
            .or_default()
            .push(r);
    }
    let mut out: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for ((t, s, a, ws, we), rs) in groups {
        out.entry((t, s, a))
            .or_default()
            .push((ws, we, combine(&rs)));
    }
    out
}

/// The one window of `key` in the books, which must hold Redis second-in-ms `at`.
fn only_window(b: &Books, key: (&str, &str, &str), at: i64) -> Dec {
    let k = (key.0.to_string(), key.1.to_string(), key.2.to_string());
    let ws = b
        .get(&k)
        .unwrap_or_else(|| panic!("no record of {k:?}: {b:?}"));
    assert_eq!(ws.len(), 1, "{k:?} in one window: {ws:?}");
    let (s, e, v) = &ws[0];
    assert!(
        *s * 1000 <= at && at < *e * 1000,
        "{k:?}: its pulses' time {at} ms is not in its window [{s}, {e}) s"
    );
    v.clone()
}

async fn flush_until(bases: &[&str], p: &Processor, done: impl Fn(&[Record]) -> bool) {
    let ok = eventually(Duration::from_secs(40), || async {
        for b in bases {
            flush_now(b).await;
        }
        done(&p.records())
    })
    .await;
    assert!(ok, "not delivered: {:?}", p.records());
}

fn meters_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("meters.txt");
    std::fs::write(
        &path,
        "sku:gauge max\nsku:level latest\nsku:low min,count\n",
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// WINDOW 4s → 8s while a pulse waits stamped ahead: the window it was placed in is opened as
/// placed, the unstamped pulses that follow join it, and the `max` meter is a max — one record
/// per id, windows never overlapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_window_opens_the_window_a_pulse_stamped_ahead_was_placed_in() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let meters = meters_file(&dir);
    let url = format!("{purl}/batches");
    let vars = |w: &str| {
        settings(
            &redis,
            &[
                ("WINDOW", w),
                ("PROCESSOR_URL", &url),
                ("METERS_FILE", &meters),
                ("DRAIN_INTERVAL", "100ms"),
            ],
        )
    };
    let a = TestApp::spawn(vars("4s")).await;
    let c = http();
    // Early in a 4 s window whose successor starts on an 8 s boundary: B.
    at_phase(&redis, 8000, 4300, 5000).await;
    let big_b = redis_ms(&redis) / 8000 * 8000 + 8000;
    let one_a = format!("{}/ingest", a.base);
    for (sku, v) in [("S", "5"), ("gauge", "5")] {
        let (s, r) = post_raw(&c, &one_a, body("t", sku, v, Some(big_b + 2000), None)).await;
        assert_eq!((s, &r["ahead"]), (202, &serde_json::json!(1)), "{r}");
    }
    // A second replica brings WINDOW=8s (recorded: it applies from the next window).
    let b = TestApp::spawn(vars("8s")).await;
    until_ms(&redis, big_b + 300).await;
    let one_b = format!("{}/ingest", b.base);
    for (sku, v) in [("S", "7"), ("gauge", "7")] {
        let (s, r) = post_raw(&c, &one_b, body("t", sku, v, None, None)).await;
        assert_eq!(s, 202, "{r}");
    }
    // Stamped further ahead, in what follows.
    let (s, r) = post_raw(&c, &one_b, body("t2", "S", "1", Some(big_b + 6000), None)).await;
    assert_eq!(s, 202, "{r}");
    until_ms(&redis, big_b + 8500).await;
    flush_until(&[&a.base, &b.base], &p, |rs| {
        rs.iter().filter(|r| r.tenant_id == "t").count() == 2
            && rs.iter().any(|r| r.tenant_id == "t2")
    })
    .await;
    // Late, after that window's delivery: an amendment of it, from the replica still at 4 s.
    for (sku, v) in [("S", "2"), ("gauge", "9")] {
        let (s, r) = post_raw(&c, &one_a, body("t", sku, v, Some(big_b + 1000), None)).await;
        assert_eq!((s, &r["amended"]), (202, &serde_json::json!(1)), "{r}");
    }
    flush_until(&[&a.base, &b.base], &p, |rs| {
        rs.iter().filter(|r| r.amends == Some(1)).count() == 2
    })
    .await;
    let books = books(&p);
    // The window the pulse stamped B+2 s was placed in, [B, B+4 s), is the window opened at B:
    // the unstamped 7 joined it, the late 2 amended it.
    assert_eq!(
        only_window(&books, ("t", "S", "sum"), big_b + 2000),
        dec(14.0)
    );
    assert_eq!(
        only_window(&books, ("t", "gauge", "max"), big_b + 2000),
        dec(9.0),
        "a max is never added"
    );
    assert_eq!(
        only_window(&books, ("t2", "S", "sum"), big_b + 6000),
        dec(1.0)
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// WINDOW 8s → 4s while pulses wait stamped ahead in an 8 s window: that window opens whole
/// (its pulses' times are in it), and the shorter windows follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_window_keeps_a_pulse_stamped_ahead_in_a_window_holding_its_time() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let meters = meters_file(&dir);
    let url = format!("{purl}/batches");
    let vars = |w: &str| {
        settings(
            &redis,
            &[
                ("WINDOW", w),
                ("PROCESSOR_URL", &url),
                ("METERS_FILE", &meters),
                ("DRAIN_INTERVAL", "100ms"),
            ],
        )
    };
    let ts = same_shard(2, 8);
    let a = TestApp::spawn(vars("8s")).await;
    let c = http();
    at_phase(&redis, 8000, 300, 1500).await;
    let big_b = redis_ms(&redis) / 8000 * 8000 + 8000;
    let one_a = format!("{}/ingest", a.base);
    for (t, sku, v) in [(&ts[0], "S", "5"), (&ts[0], "gauge", "5")] {
        let (s, r) = post_raw(&c, &one_a, body(t, sku, v, Some(big_b + 6000), None)).await;
        assert_eq!((s, &r["ahead"]), (202, &serde_json::json!(1)), "{r}");
    }
    let b = TestApp::spawn(vars("4s")).await;
    until_ms(&redis, big_b + 300).await;
    let one_b = format!("{}/ingest", b.base);
    let (s, r) = post_raw(&c, &one_b, body(&ts[0], "gauge", "7", None, None)).await;
    assert_eq!(s, 202, "{r}");
    let (s, r) = post_raw(&c, &one_b, body(&ts[1], "S", "3", None, None)).await;
    assert_eq!(s, 202, "{r}");
    // After the 8 s window, 4 s windows.
    until_ms(&redis, big_b + 8300).await;
    let (s, r) = post_raw(&c, &one_b, body(&ts[1], "later", "2", None, None)).await;
    assert_eq!(s, 202, "{r}");
    let later = redis_ms(&redis);
    until_ms(&redis, big_b + 12_500).await;
    flush_until(&[&a.base, &b.base], &p, |rs| {
        rs.iter().any(|r| r.product_sku == "later")
            && rs.iter().filter(|r| r.tenant_id == ts[0]).count() == 2
    })
    .await;
    let books = books(&p);
    assert_eq!(
        only_window(&books, (&ts[0], "S", "sum"), big_b + 6000),
        dec(5.0)
    );
    assert_eq!(
        only_window(&books, (&ts[0], "gauge", "max"), big_b + 6000),
        dec(7.0),
        "one window, its max"
    );
    assert_eq!(
        only_window(&books, (&ts[1], "S", "sum"), big_b + 300),
        dec(3.0)
    );
    let windows = &books[&(ts[1].clone(), "later".into(), "sum".into())];
    assert_eq!(
        windows[0].1 - windows[0].0,
        4,
        "4 s windows after: {windows:?}"
    );
    assert_eq!(
        only_window(&books, (&ts[1], "later", "sum"), later),
        dec(2.0)
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// LATE_MAX_AGE is the deployment's: raised by a rolling restart, a window that ended before
/// keeps the age it was delivered with (its records' `final_at`), so a pulse older than that is
/// refused — never delivered again under the window's record id — while windows that end after
/// the change take late pulses up to the new age. A replica that leaves it unset adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_late_max_age_never_reopens_a_final_window() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let url = format!("{purl}/batches");
    let vars = |extra: &[(&str, &str)]| {
        let mut v = settings(
            &redis,
            &[
                ("WINDOW", "2s"),
                ("PROCESSOR_URL", &url),
                ("DRAIN_INTERVAL", "100ms"),
            ],
        );
        for (k, x) in extra {
            v.insert(k.to_string(), x.to_string());
        }
        v
    };
    let a = TestApp::spawn(vars(&[("LATE_MAX_AGE", "3s")])).await;
    let c = http();
    let w0 = redis_ms(&redis) / 2000 * 2000;
    let one = format!("{}/ingest", a.base);
    let (s, r) = post_raw(&c, &one, body("t", "S", "11", Some(w0 + 100), None)).await;
    assert_eq!(s, 202, "{r}");
    until_ms(&redis, w0 + 2300).await;
    flush_until(&[&a.base], &p, |rs| !rs.is_empty()).await;
    let first = p.records();
    assert_eq!(first.len(), 1);
    let final_at = first[0].final_at.clone().expect("records carry final_at");
    assert_eq!(
        secs(&final_at),
        w0 / 1000 + 2 + 3,
        "window end + LATE_MAX_AGE"
    );
    // What Redis does a day after LATE_MAX_AGE: the window's late-pulse state is gone.
    let shard = shard_of("t", 8);
    let late = format!("{{pulses:{shard}}}:x:late:{}", w0 / 1000);
    let _: i64 = redis.cmd(&["DEL", &late]);
    a.stop().await.unwrap();
    // The rolling restart raises LATE_MAX_AGE.
    let a = TestApp::spawn(vars(&[("LATE_MAX_AGE", "1h")])).await;
    let b = TestApp::spawn(vars(&[])).await;
    let recorded: Option<String> = redis.cmd(&["HGET", "{pulses}:meta", "late_max_age"]);
    assert_eq!(recorded.as_deref(), Some("3600"));
    until_ms(&redis, w0 + 4000).await;
    for base in [&a.base, &b.base] {
        let (s, r) = post_raw(
            &c,
            &format!("{base}/ingest"),
            body("t", "S", "1", Some(w0 + 200), None),
        )
        .await;
        assert_eq!(s, 422, "the window is final: {r}");
        assert!(r.to_string().contains("final"), "{r}");
    }
    // A window that ends after the change takes late pulses up to the new age.
    let w1 = redis_ms(&redis) / 2000 * 2000;
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", b.base),
        body("u", "S", "4", Some(w1 + 10), None),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    until_ms(&redis, w1 + 2300).await;
    flush_until(&[&a.base, &b.base], &p, |rs| {
        rs.iter().any(|r| r.tenant_id == "u")
    })
    .await;
    until_ms(&redis, w1 + 6500).await;
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", b.base),
        body("u", "S", "2", Some(w1 + 20), None),
    )
    .await;
    assert_eq!((s, &r["amended"]), (202, &serde_json::json!(1)), "{r}");
    flush_until(&[&a.base, &b.base], &p, |rs| {
        rs.iter().any(|r| r.amends == Some(1))
    })
    .await;
    let books = books(&p);
    assert_eq!(only_window(&books, ("t", "S", "sum"), w0 + 100), dec(11.0));
    assert_eq!(only_window(&books, ("u", "S", "sum"), w1 + 10), dec(6.0));
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A tenant backfilling stamped pulses beside live traffic: the amendments it opens never hold
/// back the live windows of its shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_never_holds_back_live_windows() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            // A window is due a second after its end; the amendment gathering meanwhile is due
            // a second after the next window's end.
            ("STABILISATION_DELAY", "1s"),
            ("DRAIN_INTERVAL", "100ms"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let ts = same_shard(2, 8);
    let (old, live) = (ts[0].clone(), ts[1].clone());
    let c = http();
    let one = format!("{}/ingest", app.base);
    // The backfill's windows are delivered first, so its pulses amend them.
    let start = redis_ms(&redis);
    let (s, r) = post_raw(&c, &one, body(&old, "S", "1", Some(start - 30_000), None)).await;
    assert_eq!(s, 202, "{r}");
    flush_until(&[&app.base], &p, |rs| !rs.is_empty()).await;
    let mut worst = 0i64;
    let mut sent = Dec::from(0);
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut waiting: BTreeMap<i64, i64> = BTreeMap::new();
    while Instant::now() < deadline {
        let now = redis_ms(&redis);
        let (s, r) = post_raw(&c, &one, body(&old, "S", "1", Some(now - 30_000), None)).await;
        assert_eq!(s, 202, "{r}");
        sent += dec(1.0);
        let (s, r) = post_raw(&c, &one, body(&live, "S", "1", None, None)).await;
        assert_eq!(s, 202, "{r}");
        waiting.insert(r["window_start"].as_i64().unwrap() * 1000 + 2000, 0);
        let delivered: Vec<i64> = p
            .records()
            .iter()
            .filter(|r| r.tenant_id == live)
            .map(|r| secs(&r.window_end) * 1000)
            .collect();
        let now = redis_ms(&redis);
        for (end, _) in waiting.iter().filter(|(e, _)| delivered.contains(e)) {
            worst = worst.max(now - end);
        }
        waiting.retain(|e, _| !delivered.contains(e));
        for end in waiting.keys() {
            worst = worst.max(now - end);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        worst < 3500,
        "a live window waited {worst} ms past its end behind the backfill's amendments"
    );
    app.stop().await.unwrap();
}

/// Dead letters keep each aggregation's meaning: a refused `latest` comes back from a replay
/// with its `latest_at`, a `max` as the max, and `min`, `count` and `sum` as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_meter_keeps_its_meaning() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults {
        reject_tenant: Some("refused".into()),
        ..Faults::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let meters = meters_file(&dir);
    let app = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
            ("METERS_FILE", &meters),
        ],
    ))
    .await;
    let c = http();
    let one = format!("{}/ingest", app.base);
    at_phase(&redis, 2000, 100, 600).await;
    let w = redis_ms(&redis) / 2000 * 2000;
    for (sku, v, at) in [
        ("level", "3", w + 50),
        ("level", "9", w + 20),
        ("gauge", "4", w + 30),
        ("gauge", "6", w + 40),
        ("low", "5", w + 30),
        ("low", "2", w + 40),
        ("S", "1.5", w + 30),
        ("S", "2", w + 40),
    ] {
        let (s, r) = post_raw(&c, &one, body("refused", sku, v, Some(at), None)).await;
        assert_eq!(s, 202, "{r}");
    }
    until_ms(&redis, w + 2300).await;
    let ok = eventually(Duration::from_secs(20), || async {
        flush_now(&app.base).await;
        let d: serde_json::Value = c
            .get(format!("{}/admin/dead-letters", app.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        d.to_string().matches("record_id").count() >= 5
    })
    .await;
    assert!(ok, "dead-lettered");
    p.set_faults(Faults::default());
    let r = c
        .post(format!("{}/admin/dead-letters/replay", app.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    flush_until(&[&app.base], &p, |rs| rs.len() == 5).await;
    let records = p.records();
    let latest = records.iter().find(|r| r.product_sku == "level").unwrap();
    assert_eq!(latest.used_amount, dec(3.0));
    let at = latest
        .latest_at
        .as_deref()
        .expect("a replayed latest keeps latest_at");
    assert_eq!(
        humantime::parse_rfc3339(at).unwrap(),
        std::time::UNIX_EPOCH + Duration::from_millis((w + 50) as u64)
    );
    let books = books(&p);
    assert_eq!(
        only_window(&books, ("refused", "gauge", "max"), w + 30),
        dec(6.0)
    );
    assert_eq!(
        only_window(&books, ("refused", "low", "min"), w + 30),
        dec(2.0)
    );
    assert_eq!(
        only_window(&books, ("refused", "low", "count"), w + 30),
        dec(2.0)
    );
    assert_eq!(
        only_window(&books, ("refused", "S", "sum"), w + 30),
        dec(3.5)
    );
    app.stop().await.unwrap();
}

/// LATE_PULSES=refuse: the re-send of a counted stamped pulse is a duplicate (2xx), not
/// "window closed", even after its window was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_pulse_is_a_duplicate_even_once_its_window_closed() {
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
    let w = redis_ms(&redis) / 2000 * 2000;
    let pulse = body("t", "S", "5", Some(w + 10), Some("p-1"));
    let (s, r) = post_raw(&c, &one, pulse.clone()).await;
    assert_eq!((s, &r["accepted"]), (202, &serde_json::json!(1)), "{r}");
    until_ms(&redis, w + 2300).await;
    flush_until(&[&app.base], &p, |rs| !rs.is_empty()).await;
    let (s, r) = post_raw(&c, &one, pulse).await;
    assert_eq!((s, &r["duplicates"]), (202, &serde_json::json!(1)), "{r}");
    let (s, r) = post_raw(&c, &one, body("t", "S", "5", Some(w + 10), Some("p-2"))).await;
    assert_eq!(s, 422, "a new pulse for the closed window is refused: {r}");
    assert_eq!(only_window(&books(&p), ("t", "S", "sum"), w + 10), dec(5.0));
    app.stop().await.unwrap();
}

/// LATE_PULSES=refuse on a cluster (one call per shard): a batch whose pulse for a closed
/// window is refused by one shard after another shard counted its other pulse is answered
/// with what was counted — never "nothing was counted".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_one_shard_answers_what_the_others_counted() {
    let cluster = RedisCluster::start(3, 0);
    let (p, purl) = processor(Faults::default()).await;
    let app = TestApp::spawn(cluster_settings(
        &cluster,
        &[
            ("WINDOW", "2s"),
            ("LATE_PULSES", "refuse"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let node = &cluster.nodes[0];
    let c = http();
    // Two tenants of different shards.
    let a = "edge-0".to_string();
    let b = (1..)
        .map(|i| format!("edge-{i}"))
        .find(|t| shard_of(t, 8) != shard_of(&a, 8))
        .unwrap();
    let w = redis_ms(node) / 2000 * 2000;
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        body(&b, "S", "1", Some(w + 10), None),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    until_ms(node, w + 2300).await;
    flush_until(&[&app.base], &p, |rs| !rs.is_empty()).await;
    let batch = format!(
        "[{},{}]",
        body(&a, "S", "5", None, None),
        body(&b, "S", "7", Some(w + 20), None)
    );
    let (s, r) = post_raw(&c, &format!("{}/ingest/batch", app.base), batch).await;
    assert_eq!(s, 202, "the batch was partly counted: {r}");
    assert_eq!(
        (&r["accepted"], &r["refused"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{r}"
    );
    assert_eq!(r["items"][0]["status"], "counted", "{r}");
    assert_eq!(r["items"][1]["status"], "refused", "{r}");
    assert!(
        r["items"][1]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("window closed"),
        "{r}"
    );
    let now = redis_ms(node);
    until_ms(node, now / 2000 * 2000 + 2300).await;
    flush_until(&[&app.base], &p, |rs| rs.iter().any(|r| r.tenant_id == a)).await;
    let books = books(&p);
    assert_eq!(books[&(a.clone(), "S".into(), "sum".into())][0].2, dec(5.0));
    assert_eq!(only_window(&books, (&b, "S", "sum"), w + 10), dec(1.0));
    app.stop().await.unwrap();
}

/// Every record carries its window's `final_at` (end + LATE_MAX_AGE), and `/v1/usage` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_usage_say_when_a_window_is_final() {
    let app = TestApp::start(&[("WINDOW", "1h"), ("LATE_MAX_AGE", "2d")]).await;
    let (s, _, _) = app.post_pulse(&pulse("t", "S", "u", 1.0)).await;
    assert_eq!(s, 202);
    let u: serde_json::Value = http()
        .get(format!("{}/v1/usage?tenant_id=t", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let w = &u["windows"][0];
    let end = w["window_end"].as_i64().unwrap();
    assert_eq!(
        secs(w["final_at"].as_str().unwrap()),
        end + 2 * 86_400,
        "{u}"
    );
    app.stop().await.unwrap();
}

/// Review finding: pulses stamped in a stretch no window was opened for (a backfill from before
/// the shard's first window) are placed in a window decided and recorded at the first such
/// pulse, so a later WINDOW or WINDOW_OFFSET never gives its start a second end: each record's
/// window holds its pulses' times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfilled_window_keeps_its_bounds_across_window_changes() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let url = format!("{purl}/batches");
    let vars = |w: &str, off: &str| {
        settings(
            &redis,
            &[
                ("WINDOW", w),
                ("WINDOW_OFFSET", off),
                ("PROCESSOR_URL", &url),
                ("DRAIN_INTERVAL", "100ms"),
            ],
        )
    };
    let c = http();
    let a = TestApp::spawn(vars("4s", "0s")).await;
    let x = (redis_ms(&redis) - 600_000) / 12_000 * 12_000;
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", a.base),
        body("t", "S", "1", Some(x + 1000), None),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let b = TestApp::spawn(vars("6s", "1s")).await;
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", b.base),
        body("t", "S", "10", Some(x + 5000), None),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", b.base),
        body("t", "S", "100", Some(x + 3000), None),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    flush_until(&[&a.base, &b.base], &p, |rs| {
        rs.iter()
            .map(|r| r.used_amount.clone())
            .fold(Dec::from(0), |a, b| a + b)
            == dec(111.0)
    })
    .await;
    let books = books(&p);
    let windows = &books[&("t".to_string(), "S".to_string(), "sum".to_string())];
    for (at, amount) in [(x + 1000, 101.0), (x + 5000, 10.0)] {
        let holding: Vec<_> = windows
            .iter()
            .filter(|(s, e, _)| *s * 1000 <= at && at < *e * 1000)
            .collect();
        assert_eq!(holding.len(), 1, "{at}: {windows:?}");
        assert_eq!(holding[0].2, dec(amount), "{at}: {windows:?}");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Review finding: DEDUPE_TTL raised by a rolling restart. A stamped pulse with an id counted
/// under the old TTL and re-sent once that TTL has passed is not counted again: the write
/// script checks the id's age by the deployment's TTL (the old, smaller one while its markers
/// are consulted) — refused if no longer recognisable, a duplicate if still recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_dedupe_ttl_never_counts_a_resent_stamped_pulse_twice() {
    let redis = RedisServer::start();
    let vars = |ttl: &str| {
        settings(
            &redis,
            &[
                ("DEDUPE_TTL", ttl),
                ("MAX_FUTURE_SKEW", "0s"),
                ("WINDOW", "1h"),
            ],
        )
    };
    let c = http();
    let a = TestApp::spawn(vars("2s")).await;
    // A second in the past: with MAX_FUTURE_SKEW 0s a pulse stamped at Redis' very now may be
    // ahead of the replica's estimate of Redis' clock by the time read's round trip (seen on a
    // loaded host: 422 "further ahead").
    let t = redis_ms(&redis) - 1000;
    let pulse = body("t", "S", "1", Some(t), Some("p-1"));
    let (s, r) = post_raw(&c, &format!("{}/ingest", a.base), pulse.clone()).await;
    assert_eq!((s, &r["accepted"]), (202, &serde_json::json!(1)), "{r}");
    a.stop().await.unwrap();
    let b = TestApp::spawn(vars("60s")).await;
    until_ms(&redis, t + 7000).await;
    let (s, r) = post_raw(&c, &format!("{}/ingest", b.base), pulse).await;
    assert_ne!(r["accepted"], serde_json::json!(1), "counted twice: {r}");
    assert_eq!(s, 422, "{r}");
    let totals = redis.totals("pulses");
    assert_eq!(totals[&("t".into(), "S".into(), "u".into())], dec(1.0));
    b.stop().await.unwrap();
}

/// Review finding: replicas that start while Redis is unreachable record their explicit
/// settings before anything is written — so the late-pulse settings are the deployment's
/// (never each writer's own) and a window never changes after its `final_at`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_without_redis_record_their_settings_before_writing() {
    let mut redis = RedisServer::start();
    redis.crash();
    let (p, purl) = processor(Faults::default()).await;
    let url = format!("{purl}/batches");
    let a = TestApp::spawn(settings(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("LATE_MAX_AGE", "3s"),
            ("PROCESSOR_URL", &url),
            ("DRAIN_INTERVAL", "100ms"),
        ],
    ))
    .await;
    let b = TestApp::spawn(settings(
        &redis,
        &[("WINDOW", "2s"), ("LATE_MAX_AGE", "3s")],
    ))
    .await;
    redis.restart();
    let c = http();
    let ok = eventually(Duration::from_secs(20), || async {
        post_raw(
            &c,
            &format!("{}/ingest", b.base),
            body("t", "S", "1", None, None),
        )
        .await
        .0 == 202
    })
    .await;
    assert!(ok, "ingest resumes once Redis answers");
    let shard = shard_of("t", 8);
    let late: Option<String> =
        redis.cmd(&["HGET", &format!("{{pulses:{shard}}}:x:conf"), "late_max"]);
    assert_eq!(
        late.as_deref(),
        Some("3"),
        "recorded before the first write"
    );
    let w = redis_ms(&redis) / 2000 * 2000;
    until_ms(&redis, w + 2300).await;
    flush_until(&[&a.base], &p, |rs| !rs.is_empty()).await;
    until_ms(&redis, w + 2000 + 3500).await;
    for base in [&a.base, &b.base] {
        let (s, r) = post_raw(
            &c,
            &format!("{base}/ingest"),
            body("t", "S", "1", Some(w + 1500), None),
        )
        .await;
        assert_eq!(s, 422, "the window is final on every replica: {r}");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Review finding: every delivery of a record carries the same `final_at`, fixed when its
/// window's delivery began — also when LATE_MAX_AGE changes before a re-delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_record_keeps_its_final_at() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let url = format!("{purl}/batches");
    let vars = |age: &str| {
        settings(
            &redis,
            &[
                ("WINDOW", "2s"),
                ("LATE_MAX_AGE", age),
                ("PROCESSOR_URL", &url),
                ("DRAIN_INTERVAL", "100ms"),
            ],
        )
    };
    let a = TestApp::spawn(vars("1h")).await;
    let c = http();
    let w = redis_ms(&redis) / 2000 * 2000;
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", a.base),
        body("t", "S", "1", None, None),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let w = r["window_start"].as_i64().map_or(w, |s| s * 1000);
    // Stored, then the connection dropped: it stays in Redis and is delivered again.
    flush_until(&[&a.base], &p, |rs| !rs.is_empty()).await;
    let first = p.records()[0].final_at.clone().unwrap();
    assert_eq!(secs(&first), w / 1000 + 2 + 3600);
    a.stop().await.unwrap();
    let b = TestApp::spawn(vars("30s")).await;
    p.set_faults(Faults::default());
    let ok = eventually(Duration::from_secs(20), || async {
        flush_now(&b.base).await;
        pending(&b.base).await["pending_windows"] == 0
    })
    .await;
    assert!(ok);
    assert!(p.conflicts().is_empty(), "{:?}", p.conflicts());
    assert_eq!(
        p.records()[0].final_at.as_deref(),
        Some(first.as_str()),
        "the same final_at"
    );
    b.stop().await.unwrap();
}

/// Review finding: MAX_FUTURE_SKEW lowered. A pulse with an id stamped ahead under the old skew
/// may have first arrived that far before its time, so its re-send is held to the largest skew
/// ever recorded: refused once its id could be forgotten, never counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_future_skew_never_counts_a_resent_pulse_twice() {
    let redis = RedisServer::start();
    let vars = |skew: &str| {
        settings(
            &redis,
            &[
                ("DEDUPE_TTL", "4s"),
                ("MAX_FUTURE_SKEW", skew),
                ("WINDOW", "1h"),
            ],
        )
    };
    let c = http();
    let a = TestApp::spawn(vars("4s")).await;
    // Just before a 4 s marker bucket ends, so the marker is surely gone 6 s later.
    at_phase(&redis, 4000, 3400, 3800).await;
    let arrived = redis_ms(&redis);
    let t = arrived / 1000 * 1000 + 4000;
    let pulse = body("t", "S", "1", Some(t), Some("ahead-1"));
    let (s, r) = post_raw(&c, &format!("{}/ingest", a.base), pulse.clone()).await;
    assert_eq!((s, &r["accepted"]), (202, &serde_json::json!(1)), "{r}");
    a.stop().await.unwrap();
    let b = TestApp::spawn(vars("0s")).await;
    until_ms(&redis, arrived + 6500).await;
    let (s, r) = post_raw(&c, &format!("{}/ingest", b.base), pulse).await;
    assert_ne!(r["accepted"], serde_json::json!(1), "counted twice: {r}");
    assert_eq!(s, 422, "{r}");
    b.stop().await.unwrap();
}

/// Where the write function cannot be loaded (an ACL user without FUNCTION), the same code runs
/// as a script: nothing refused, nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_functions_still_counts_exactly() {
    let redis = RedisServer::start();
    let _: String = redis.cmd(&[
        "ACL",
        "SETUSER",
        "limited",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@all",
        "-function",
    ]);
    let mut vars = settings(&redis, &[]);
    let url = redis.url().replacen("redis://", "redis://limited:pw@", 1);
    vars.insert("REDIS_URL".into(), url);
    let app = TestApp::spawn(vars).await;
    let c = http();
    for i in 0..20 {
        let (s, r) = post_raw(
            &c,
            &format!("{}/ingest", app.base),
            body("t", "S", "1", None, Some(&format!("p{i}"))),
        )
        .await;
        assert_eq!(s, 202, "{r}");
    }
    let (s, r) = post_raw(
        &c,
        &format!("{}/ingest", app.base),
        body("t", "S", "1", None, Some("p0")),
    )
    .await;
    assert_eq!((s, &r["duplicates"]), (202, &serde_json::json!(1)), "{r}");
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "S".into(), "u".into())],
        dec(20.0)
    );
    app.stop().await.unwrap();
}
