//! The fault suite: real processes, real failures, and the books checked after each.
//!
//! Every scenario sends load with the producer (ledger on, pulse ids on, retries on) to
//! ingestor replicas sharing a real Redis, delivers to the reference Processor with short
//! windows, and ends with `pulse-producer verify`: nothing missing, nothing extra, nothing
//! counted twice. The 10-minute soak is `#[ignore]`d: run it on its own (README: Development).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use pulse_producer::processor::Faults;

const WINDOW: u64 = 2;
const SHARDS: u32 = 4;

/// The settings of a fault scenario: 2 s windows over 4 shards, quick locks and retries,
/// delivering to `processor`.
fn vars(backend: &Backend<'_>, processor: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut base = vec![
        ("WINDOW", "2s"),
        ("SHARDS", "4"),
        ("LOCK_TTL", "1s"),
        ("DRAIN_INTERVAL", "300ms"),
        ("PROCESSOR_TIMEOUT", "1s"),
        ("DELIVERY_MAX_ATTEMPTS", "3"),
    ];
    base.extend_from_slice(extra);
    let mut m = backend.settings(&base);
    m.insert("PROCESSOR_URL".into(), format!("{processor}/batches"));
    m
}

/// Waits until the window that is current now has ended and been sealed on every shard, and
/// nothing is pending any more, asking `base` (a live replica).
async fn delivered(backend: &Backend<'_>, base: &str, timeout: Duration) {
    let now = backend.now();
    wait_all_delivered(now, WINDOW, SHARDS, |s| backend.window_of(s), base, timeout).await;
}

/// Starts the producer in the background against the given replicas; it retries a request
/// answered 503 or lost in transport `retries` times (same pulse ids), one second apart at most.
fn start_producer(
    urls: &[&str],
    ledger: &std::path::Path,
    retries: u32,
    extra: &[&str],
) -> tokio::task::JoinHandle<(i32, String)> {
    let mut args: Vec<String> = vec![
        "--retries".into(),
        retries.to_string(),
        "--url".into(),
        urls.join(","),
        "--ids".into(),
        "--tenants".into(),
        "300".into(),
        "--timeout".into(),
        "5s".into(),
        "--ledger".into(),
        ledger.display().to_string(),
        "--report-json".into(),
        report_of(ledger).display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    producer_in_background(args)
}

/// Where `start_producer` has the producer write its `--report-json`.
fn report_of(ledger: &std::path::Path) -> std::path::PathBuf {
    ledger.with_extension("report.json")
}

/// The producer's report (`--report-json`) of the run that kept `ledger`.
fn report(ledger: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(report_of(ledger)).unwrap()).unwrap()
}

/// Requests the producer retried (same pulse ids), from its report.
fn retries(ledger: &std::path::Path) -> u64 {
    report(ledger)["retries"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_replica_during_ingest_counts_every_2xx_once() {
    kill9_of_a_replica(Backend::Single(&RedisServer::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_kill9_of_a_replica_during_ingest_counts_every_2xx_once() {
    kill9_of_a_replica(Backend::Cluster(&RedisCluster::start(3, 0))).await;
}

async fn kill9_of_a_replica(backend: Backend<'_>) {
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let v = vars(&backend, &purl, &[]);
    let mut a = Ingestor::spawn(&v, dir.path(), "a").await;
    let b = Ingestor::spawn(&v, dir.path(), "b").await;
    let ledger = dir.path().join("ledger.json");
    let load = start_producer(
        &[&a.base, &b.base],
        &ledger,
        20,
        &[
            "--mode",
            "rate",
            "--rate",
            "600",
            "--duration",
            "6s",
            "--concurrency",
            "32",
            "--duplicate-ratio",
            "0.05",
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("KILL");
    assert_eq!(a.wait(Duration::from_secs(5)).await, None, "killed");
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        retries(&ledger) > 0,
        "requests to the killed replica were retried on the other: {out}"
    );
    delivered(&backend, &b.base, Duration::from_secs(30)).await;
    assert_verified(&ledger, &purl, "after the fault").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_the_stabilisation_delay_loses_nothing() {
    let redis = RedisServer::start();
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let v = vars(
        &Backend::Single(&redis),
        &purl,
        &[("STABILISATION_DELAY", "3s")],
    );
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let b = Ingestor::spawn(&v, dir.path(), "b").await;
    let ledger = dir.path().join("ledger.json");
    let (code, out) = producer(&[
        "--url",
        &format!("{},{}", a.base, b.base),
        "--ids",
        "--mode",
        "max",
        "--concurrency",
        "8",
        "--duration",
        "1500ms",
        "--tenants",
        "300",
        "--ledger",
        ledger.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    // Wait for a boundary: the window is sealed and waits out its stabilisation delay.
    let (now, _): (u64, u64) = redis.cmd(&["TIME"]);
    let boundary = now - now % WINDOW + WINDOW;
    while {
        let (t, _): (u64, u64) = redis.cmd(&["TIME"]);
        t < boundary
    } {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending = pending(&b.base).await;
    assert!(
        pending["pending_windows"].as_u64().unwrap() > 0,
        "killed while windows wait: {pending}"
    );
    a.signal("KILL");
    delivered(&Backend::Single(&redis), &b.base, Duration::from_secs(30)).await;
    assert_verified(&ledger, &purl, "after the fault").await;
}

async fn redis_restart(fsync: &str, crash: bool) {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", fsync]);
    // The default 2 s timeout: fsync=always on a disk shared with parallel tests can take
    // hundreds of milliseconds, and an acknowledged write is what this test is about.
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..200 {
        let mut p = pulse(&format!("t-{}", i % 20), "s", "KB", 1.5);
        p["pulse_id"] = serde_json::json!(format!("before-{i}"));
        assert_eq!(post(&c, &url, &p).await.0, 202);
        *expected
            .entry((format!("t-{}", i % 20), "s".to_string(), "KB".to_string()))
            .or_insert_with(Dec::default) += dec(1.5);
    }
    if fsync == "everysec" && crash {
        // everysec: what was acknowledged more than a second before the crash survives.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if crash {
        redis.crash();
    } else {
        let _ = redis::cmd("SHUTDOWN").query::<()>(&mut redis.conn());
        redis.kill();
    }
    // While Redis is down: readiness says so, ingest answers 503 with Retry-After, quickly.
    let ready = c.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let started = Instant::now();
    let (status, headers, _) = post(&c, &url, &pulse("t-x", "s", "KB", 1.0)).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no hang: {:?}",
        started.elapsed()
    );
    redis.restart();
    // The service reconnects by itself.
    let ok = eventually(Duration::from_secs(10), || async {
        c.get(format!("{}/readyz", app.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ok, "readyz recovers");
    let mut p = pulse("t-after", "s", "KB", 2.0);
    p["pulse_id"] = serde_json::json!("after-1");
    let after = post(&c, &url, &p).await;
    assert_eq!(after.0, 202, "{}", after.2);
    expected.insert(("t-after".into(), "s".into(), "KB".into()), dec(2.0));
    assert_books(&expected, &redis.totals("pulses"));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_with_aof_always_keeps_every_acknowledged_pulse() {
    redis_restart("always", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_with_aof_everysec_keeps_what_is_older_than_a_second() {
    redis_restart("everysec", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_with_aof_everysec_keeps_everything() {
    redis_restart("everysec", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_during_load_sheds_boundedly_and_recovers() {
    let outage: u64 = std::env::var("FAULT_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let v = vars(
        &Backend::Single(&redis),
        &purl,
        &[("REDIS_TIMEOUT", "500ms"), ("QUEUE_CAPACITY", "2000")],
    );
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let ledger = dir.path().join("ledger.json");
    let load = start_producer(
        &[&a.base],
        &ledger,
        60,
        &[
            "--mode",
            "rate",
            "--rate",
            "500",
            "--duration",
            &format!("{}s", outage + 6),
            "--concurrency",
            "64",
        ],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.crash();
    // During the outage: 503 + Retry-After promptly, and the queue stays within its bound.
    let c = http();
    let mut max_depth = 0i64;
    let until = Instant::now() + Duration::from_secs(outage);
    while Instant::now() < until {
        let t = Instant::now();
        let (status, headers, _) = post(
            &c,
            &format!("{}/ingest", a.base),
            &pulse("probe", "s", "KB", 1.0),
        )
        .await;
        assert_eq!(status, 503);
        assert!(headers.contains_key("retry-after"));
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "answered without hanging"
        );
        let depth = metric(&c, &a.base, "ingestor_queue_depth_pulses")
            .await
            .unwrap() as i64;
        max_depth = max_depth.max(depth);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(max_depth <= 2000, "queue bounded: {max_depth}");
    redis.restart();
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    // Clients were told to come back (503 + Retry-After) and did, with the same pulse ids.
    assert!(
        retries(&ledger) > 0,
        "clients saw 503s during the outage and retried: {out}"
    );
    delivered(&Backend::Single(&redis), &a.base, Duration::from_secs(30)).await;
    assert_verified(&ledger, &purl, "after the fault").await;
}

async fn processor_fault(faults: Faults, extra: &[(&str, &str)], reason: &str) {
    let redis = RedisServer::start();
    let (p, purl) = processor(faults).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Ingestor::spawn(
        &vars(&Backend::Single(&redis), &purl, extra),
        dir.path(),
        "a",
    )
    .await;
    let ledger = dir.path().join("ledger.json");
    let (code, out) = producer(&[
        "--url",
        &a.base,
        "--ids",
        "--mode",
        "rate",
        "--rate",
        "400",
        "--duration",
        "4s",
        "--tenants",
        "300",
        "--ledger",
        ledger.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Then the Processor heals; everything still arrives, once.
    p.set_faults(Faults::default());
    delivered(&Backend::Single(&redis), &a.base, Duration::from_secs(40)).await;
    assert_verified(&ledger, &purl, "after the fault").await;
    let series = format!("ingestor_delivery_failures_total{{reason=\"{reason}\"}}");
    let failures = metric(&http(), &a.base, &series).await.unwrap_or(0.0);
    assert!(failures > 0.0, "the fault was seen as {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_processor_times_out_and_is_retried() {
    processor_fault(
        Faults {
            latency: Some(Duration::from_millis(1500)),
            ..Faults::default()
        },
        &[],
        "timeout",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_accepts_then_drops_the_connection_is_not_double_counted() {
    processor_fault(
        Faults {
            drop_rate: 0.5,
            ..Faults::default()
        },
        &[],
        "transport",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_answering_429_with_retry_after_is_honoured() {
    processor_fault(
        Faults {
            fail_first: 6,
            fail_status: 429,
            retry_after: Some(1),
            ..Faults::default()
        },
        &[("DELIVERY_MAX_ATTEMPTS", "10")],
        "status_429",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_clocks_minutes_apart_agree_on_windows() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let v = vars(&Backend::Single(&redis), &purl, &[]);
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    // Replica b believes it is seven minutes later.
    let b =
        Ingestor::spawn_with(&v, dir.path(), "b", free_port(), &["faketime", "-f", "+7m"]).await;
    // faketime really shifted b's clock: its log lines are stamped minutes ahead.
    let first = b
        .log_text()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    let stamped =
        humantime::parse_rfc3339_weak(first.trim_end_matches('Z').split('.').next().unwrap())
            .unwrap();
    let ahead = stamped
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        ahead > Duration::from_secs(360),
        "b runs {ahead:?} ahead ({first})"
    );
    let c = http();
    let mut windows: HashMap<u64, Dec> = HashMap::new();
    let mut ledger = std::collections::BTreeMap::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let mut pair = Vec::new();
        for base in [&a.base, &b.base] {
            let t = format!("t-{}", i % 30);
            let (s, _, body) =
                post(&c, &format!("{base}/ingest"), &pulse(&t, "s", "KB", 0.5)).await;
            assert_eq!(s, 202);
            pair.push(body["window_start"].as_u64().unwrap());
            *windows
                .entry(body["window_start"].as_u64().unwrap())
                .or_default() += dec(0.5);
            *ledger
                .entry((t, "s".to_string(), "KB".to_string()))
                .or_insert_with(Dec::default) += dec(0.5);
            i += 1;
        }
        // Back-to-back requests to the two replicas land in the same window, or in adjacent
        // ones when a boundary falls between them — never seven minutes apart.
        assert!(
            pair[1] == pair[0] || pair[1] == pair[0] + WINDOW,
            "{pair:?}"
        );
    }
    delivered(&Backend::Single(&redis), &a.base, Duration::from_secs(20)).await;
    let records = p.records();
    let mut found = HashMap::new();
    for r in &records {
        let t = humantime::parse_rfc3339(&r.window_start)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        *found.entry(t).or_insert_with(Dec::default) += &r.used_amount;
    }
    assert_eq!(found.len(), windows.len(), "{found:?} vs {windows:?}");
    for (w, v) in &windows {
        assert_eq!(found[w], *v, "window {w}");
    }
    let by_key = records
        .iter()
        .fold(std::collections::BTreeMap::new(), |mut m, r| {
            *m.entry((
                r.tenant_id.clone(),
                r.product_sku.clone(),
                r.use_unit.clone(),
            ))
            .or_insert_with(Dec::default) += &r.used_amount;
            m
        });
    assert_books(&ledger, &by_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing() {
    rolling_restart(Backend::Single(&RedisServer::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_rolling_restart_under_load_loses_nothing() {
    rolling_restart(Backend::Cluster(&RedisCluster::start(3, 0))).await;
}

async fn rolling_restart(backend: Backend<'_>) {
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let v = vars(&backend, &purl, &[]);
    let mut a = Ingestor::spawn(&v, dir.path(), "a").await;
    let mut b = Ingestor::spawn(&v, dir.path(), "b").await;
    let (a_base, b_base) = (a.base.clone(), b.base.clone());
    let ledger = dir.path().join("ledger.json");
    let load = start_producer(
        &[&a_base, &b_base],
        &ledger,
        20,
        &[
            "--mode",
            "rate",
            "--rate",
            "500",
            "--duration",
            "9s",
            "--concurrency",
            "32",
        ],
    );
    for (r, name) in [(&mut a, "a"), (&mut b, "b")] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.signal("TERM");
        assert_eq!(
            r.wait(Duration::from_secs(15)).await,
            Some(0),
            "graceful exit of {name}:\n{}",
            r.log_text()
        );
        let port = port_of(&r.base);
        *r = Ingestor::spawn_with(&v, dir.path(), name, port, &[]).await;
    }
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    let rep = report(&ledger);
    assert_eq!(
        rep["status_5xx"],
        serde_json::json!({}),
        "no 5xx reached the client: {out}"
    );
    assert_eq!(
        rep["transport_errors"], 0,
        "requests refused by a restarting replica were retried: {out}"
    );
    delivered(&backend, &a.base, Duration::from_secs(30)).await;
    assert_verified(&ledger, &purl, "after the fault").await;
}

/// Ten minutes (`SOAK_MINUTES`) at a steady rate with 30-second windows. Prints the slopes of
/// RSS, queue depth and Redis memory (they must be flat) and checks every window was delivered.
/// Not part of the suite (it takes ten minutes): `cargo nextest run --run-ignored only -E
/// 'test(soak)'` (README: Development).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes: run with --run-ignored only (README: Development)"]
async fn soak() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let redis = RedisServer::start();
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = vars(
        &Backend::Single(&redis),
        &purl,
        &[("WINDOW", "30s"), ("DEDUPE_TTL", "60s")],
    );
    v.insert("WINDOW".into(), "30s".into());
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let ledger = dir.path().join("ledger.json");
    let load = start_producer(
        &[&a.base],
        &ledger,
        20,
        &[
            "--mode",
            "rate",
            "--rate",
            "2000",
            "--duration",
            &format!("{}s", minutes * 60),
        ],
    );
    let c = http();
    let mut samples: Vec<(f64, f64, f64, f64)> = Vec::new();
    let started = Instant::now();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss = std::fs::read_to_string(format!("/proc/{}/status", a.child.id()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap()
            / 1024.0;
        let depth = metric(&c, &a.base, "ingestor_queue_depth_pulses")
            .await
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut redis.conn())
            .unwrap();
        let mem: f64 = info
            .lines()
            .find(|l| l.starts_with("used_memory:"))
            .and_then(|l| l[12..].trim().parse().ok())
            .unwrap();
        samples.push((
            started.elapsed().as_secs_f64(),
            rss,
            depth,
            mem / 1_048_576.0,
        ));
    }
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    delivered(&Backend::Single(&redis), &a.base, Duration::from_secs(90)).await;
    assert_verified(&ledger, &purl, "after the fault").await;
    // Slopes over the second half (after warm-up and the dedupe TTL's fill), per minute.
    let half: Vec<_> = samples[samples.len() / 2..].to_vec();
    let slope = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        let n = half.len() as f64;
        let mx = half.iter().map(|s| s.0).sum::<f64>() / n;
        let my = half.iter().map(f).sum::<f64>() / n;
        let num: f64 = half.iter().map(|s| (s.0 - mx) * (f(s) - my)).sum();
        let den: f64 = half.iter().map(|s| (s.0 - mx).powi(2)).sum();
        num / den * 60.0
    };
    let last = samples.last().unwrap();
    println!(
        "SOAK {minutes} min at 2000 pulses/s, 30 s windows: RSS {:.1} MB (slope {:+.3} MB/min), queue depth {:.0} (slope {:+.2}/min), Redis {:.1} MB (slope {:+.3} MB/min)\n{out}",
        last.1,
        slope(|s| s.1),
        last.2,
        slope(|s| s.2),
        last.3,
        slope(|s| s.3)
    );
    assert!(slope(|s| s.1).abs() < 1.0, "RSS is flat");
    assert!(slope(|s| s.3).abs() < 2.0, "Redis memory is flat");
}
