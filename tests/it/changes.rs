//! Changes an operator makes — a reshard, a prefix, a fresh deployment, an upgrade — never
//! double or misplace money.

use crate::common::*;
use pulse_ingestor::config::Config;
use pulse_ingestor::store::Store;

fn with_id(t: &str, id: &str, a: f64) -> serde_json::Value {
    let mut p = pulse(t, "S", "u", a);
    p["pulse_id"] = serde_json::json!(id);
    p
}

/// Sends `n` pulses with ids `<tag>-0..n` for tenants t0..t9; returns how many were counted.
async fn send_ids(app: &TestApp, tag: &str, n: usize) -> (u64, u64) {
    let items: Vec<serde_json::Value> = (0..n)
        .map(|i| with_id(&format!("t{}", i % 10), &format!("{tag}-{i}"), 1.0))
        .collect();
    let (s, _, b) = app.post_batch(&serde_json::json!(items)).await;
    assert_eq!(s, 202, "{b}");
    (
        b["accepted"].as_u64().unwrap(),
        b["duplicates"].as_u64().unwrap(),
    )
}

/// A fresh deployment starts on the current marker layout: no lookup of the previous layout's
/// one-key-per-id markers (`EXISTS` per id) for its first `DEDUPE_TTL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_deployment_does_not_look_for_the_previous_marker_layout() {
    let app = TestApp::start(&[]).await;
    let _: () = app.redis().cmd(&["CONFIG", "RESETSTAT"]);
    assert_eq!(send_ids(&app, "a", 200).await, (200, 0));
    assert_eq!(
        send_ids(&app, "a", 200).await,
        (0, 200),
        "re-sends are recognised"
    );
    let stats: String = app.redis().cmd(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_exists"), "{stats}");
    assert!(
        !stats.contains("cmdstat_sismember"),
        "no lookup in the marker sets of the release before either: {stats}"
    );
    app.stop().await.unwrap();
}

/// `reshard` with a prefix holding glob characters moves every marker: re-sent ids are
/// recognised under the new count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_moves_the_markers_of_a_prefix_with_glob_characters() {
    let redis = RedisServer::start();
    let vars = settings(&redis, &[("KEY_PREFIX", "bill[eu]*?"), ("SHARDS", "4")]);
    let app = TestApp::spawn(vars.clone()).await;
    assert_eq!(send_ids(&app, "r", 100).await, (100, 0));
    app.stop().await.unwrap();
    let store = Store::new(&Config::from_map(&vars).unwrap()).unwrap();
    let report = store.reshard(8, true).await.unwrap();
    assert_eq!(report.markers_moved, 100, "{report:?}");
    let app = TestApp::spawn(settings(
        &redis,
        &[("KEY_PREFIX", "bill[eu]*?"), ("SHARDS", "8")],
    ))
    .await;
    assert_eq!(send_ids(&app, "r", 100).await, (0, 100));
    let total: Dec = redis.totals("bill[eu]*?").values().sum();
    assert_eq!(total, dec(100.0));
    app.stop().await.unwrap();
}

/// Finding 1: `DEDUPE_TTL` changed across a restart keeps every remembered id (the previous
/// bucketing is consulted until its markers expire); a replica still running with the old
/// value writes by the deployment's recorded one; one left unset adopts the recorded value;
/// a second change before the first has settled is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_dedupe_ttl_forgets_no_pulse_id() {
    let redis = RedisServer::start();
    let old = TestApp::spawn(settings(&redis, &[("DEDUPE_TTL", "1h")])).await;
    assert_eq!(send_ids(&old, "a", 10).await, (10, 0));
    // A second replica with another TTL starts while the first runs.
    let new = TestApp::spawn(settings(&redis, &[("DEDUPE_TTL", "2h")])).await;
    assert_eq!(
        send_ids(&new, "a", 10).await,
        (0, 10),
        "ids of the old bucketing"
    );
    assert_eq!(send_ids(&new, "b", 10).await, (10, 0));
    assert_eq!(
        send_ids(&old, "b", 10).await,
        (0, 10),
        "the old replica looks where the new one wrote"
    );
    old.stop().await.unwrap();
    new.stop().await.unwrap();
    // Unset: the recorded 2h applies, and every id is still known.
    let unset = TestApp::spawn(settings(&redis, &[])).await;
    assert_eq!(send_ids(&unset, "a", 10).await, (0, 10));
    assert_eq!(send_ids(&unset, "b", 10).await, (0, 10));
    unset.stop().await.unwrap();
    let conf: String = redis.cmd(&[
        "HGET",
        &pulse_ingestor::store::Keys::new("pulses").conf(0),
        "ttl",
    ]);
    assert_eq!(conf, "7200");
    // Changing again (to a third value) before the 1h markers have expired is refused.
    let cfg = pulse_ingestor::config::Config::from_map(&settings(&redis, &[("DEDUPE_TTL", "3h")]))
        .unwrap();
    let err = pulse_ingestor::app::App::build(cfg)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("DEDUPE_TTL changed"), "{err}");
    let total: Dec = redis.totals("pulses").values().sum();
    assert_eq!(total, dec(20.0));
}

/// Finding 4: `WINDOW` changed from 4 s to 8 s mid-window: every delivered record's window
/// contains the Redis time its pulses were counted at (the running window keeps its end; a
/// shorter window fills the gap to the new length's boundary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_window_mid_window_never_mislabels_a_record() {
    let redis = RedisServer::start();
    let (p, purl) = processor(pulse_producer::processor::Faults::default()).await;
    let url = format!("{purl}/batches");
    let now = |r: &RedisServer| {
        let (s, _): (u64, u64) = r.cmd(&["TIME"]);
        s
    };
    // Start right after a boundary of both lengths.
    let ok = eventually(std::time::Duration::from_secs(10), || async {
        now(&redis) % 8 == 0
    })
    .await;
    assert!(ok);
    let t0 = now(&redis);
    let app = TestApp::spawn(settings(
        &redis,
        &[("WINDOW", "4s"), ("PROCESSOR_URL", &url)],
    ))
    .await;
    let mut sent = Vec::new();
    let mut send = async |app: &TestApp, tenant: &str| {
        let before = now(&redis);
        let (s, _, _) = app.post_pulse(&pulse(tenant, "S", "u", 1.0)).await;
        assert_eq!(s, 202);
        sent.push((tenant.to_string(), before, now(&redis)));
    };
    send(&app, "early").await;
    app.stop().await.unwrap();
    let app = TestApp::spawn(settings(
        &redis,
        &[("WINDOW", "8s"), ("PROCESSOR_URL", &url)],
    ))
    .await;
    while now(&redis) < t0 + 5 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    send(&app, "late").await;
    while now(&redis) < t0 + 9 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    send(&app, "next").await;
    let ok = eventually(std::time::Duration::from_secs(30), || async {
        app.flush_now().await;
        p.records().len() == 3
    })
    .await;
    assert!(ok, "{:?}", p.records());
    let secs = |t: &str| {
        humantime::parse_rfc3339(t)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for (tenant, before, after) in &sent {
        let r = p
            .records()
            .into_iter()
            .find(|r| &r.tenant_id == tenant)
            .unwrap();
        let (start, end) = (secs(&r.window_start), secs(&r.window_end));
        assert!(
            start <= *before && *after < end,
            "{tenant} counted in [{before}, {after}] but billed to [{start}, {end})"
        );
    }
    app.stop().await.unwrap();
}

/// Finding 2: `reshard` refuses while a replica runs (whatever the window length: replicas
/// heartbeat on their own timer), and a replica paused across a forced reshard stops writing
/// when it wakes (its shards record the new count) — no pulse counted under the old count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_never_runs_beside_a_writing_replica() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut vars = settings(&redis, &[("SHARDS", "4")]);
    vars.remove("LISTEN_ADDR");
    let mut old = Ingestor::spawn(&vars, dir.path(), "old").await;
    let c = http();
    let items: Vec<serde_json::Value> = (0..20)
        .map(|i| with_id(&format!("t{i}"), &format!("x-{i}"), 1.0))
        .collect();
    let (s, _, _) = post(
        &c,
        &format!("{}/ingest/batch", old.base),
        &serde_json::json!(items),
    )
    .await;
    assert_eq!(s, 202);
    let store =
        Store::new(&Config::from_map(&settings(&redis, &[("SHARDS", "4")])).unwrap()).unwrap();
    // Past the live window of the first heartbeat: still seen, it beats on its own timer.
    tokio::time::sleep(std::time::Duration::from_secs(
        pulse_ingestor::store::reshard::LIVE_WITHIN_SECS + 2,
    ))
    .await;
    assert!(
        matches!(
            store.reshard(8, false).await,
            Err(pulse_ingestor::store::reshard::ReshardError::ReplicasRunning(_))
        ),
        "refused while a replica runs"
    );
    // Paused (a heartbeat can always be missed), resharded by force, resumed.
    old.signal("STOP");
    store.reshard(8, true).await.unwrap();
    old.signal("CONT");
    let fresh: Vec<serde_json::Value> = (0..20)
        .map(|i| with_id(&format!("t{i}"), &format!("y-{i}"), 1.0))
        .collect();
    let (s, _, _) = post(
        &c,
        &format!("{}/ingest/batch", old.base),
        &serde_json::json!(fresh),
    )
    .await;
    assert_ne!(s, 202, "a replica with the old SHARDS must not acknowledge");
    assert_eq!(
        old.wait(std::time::Duration::from_secs(15)).await,
        Some(1),
        "it stops"
    );
    let new = TestApp::spawn(settings(&redis, &[("SHARDS", "8")])).await;
    let (s, _, b) = new.post_batch(&serde_json::json!(fresh)).await;
    assert_eq!((s, &b["accepted"]), (202, &serde_json::json!(20)));
    let (s, _, b) = new.post_batch(&serde_json::json!(items)).await;
    assert_eq!(
        (s, &b["duplicates"]),
        (202, &serde_json::json!(20)),
        "markers moved"
    );
    let total: Dec = redis.totals("pulses").values().sum();
    assert_eq!(total, dec(40.0), "each id counted once");
    new.stop().await.unwrap();
}

/// The default SHARDS is 1 on one Redis (16 before): a deployment recorded with 16 keeps 16
/// when a replica of this release starts with SHARDS unset — every pulse id is still found, and
/// the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_deployment_keeps_its_shard_count_under_the_new_default() {
    let redis = RedisServer::start();
    let old = settings(&redis, &[("SHARDS", "16")]);
    let app = TestApp::spawn(old).await;
    assert_eq!(send_ids(&app, "u", 100).await, (100, 0));
    app.stop().await.unwrap();
    let mut unset = settings(&redis, &[]);
    unset.remove("SHARDS");
    let app = TestApp::spawn(unset.clone()).await;
    assert_eq!(
        send_ids(&app, "u", 100).await,
        (0, 100),
        "ids found in their 16 shards"
    );
    assert_eq!(send_ids(&app, "v", 50).await, (50, 0));
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..10 {
        expected.insert(
            (format!("t{i}"), "S".to_string(), "u".to_string()),
            dec(15.0),
        );
    }
    assert_books(&expected, &redis.totals("pulses"));
    app.stop().await.unwrap();
    // A fresh deployment (another prefix) takes the new default: one shard.
    unset.insert("KEY_PREFIX".into(), "fresh".into());
    let app = TestApp::spawn(unset).await;
    assert_eq!(send_ids(&app, "w", 10).await, (10, 0));
    let shards: Option<String> = redis.cmd(&["HGET", "{fresh}:meta", "shards"]);
    assert_eq!(shards.as_deref(), Some("1"));
    app.stop().await.unwrap();
}
