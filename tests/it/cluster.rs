//! The same service on a real 3-master Redis Cluster: ingest, seal, drain and the books, shards
//! spread over the masters, and a failover during ingest.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::common::*;
use futures::StreamExt;
use pulse_producer::processor::Faults;

const SHARDS: u32 = 12;
const WINDOW: u64 = 2;

/// The cluster scenarios' settings: 12 shards over 3 masters, 2 s windows, quick locks.
fn cluster_vars(cluster: &RedisCluster, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut base = vec![
        ("SHARDS", "12"),
        ("WINDOW", "2s"),
        ("LOCK_TTL", "1s"),
        ("DRAIN_INTERVAL", "300ms"),
    ];
    base.extend_from_slice(extra);
    cluster_settings(cluster, &base)
}

/// Waits until the current window is sealed on every shard and nothing is pending.
async fn delivered(cluster: &RedisCluster, base: &str) {
    let (now, _): (u64, u64) = cluster.nodes[0].cmd(&["TIME"]);
    let keys = pulse_ingestor::store::Keys::new("pulses");
    let window_of = |s: u32| cluster.get_u64(&keys.window(s));
    wait_all_delivered(
        now,
        WINDOW,
        SHARDS,
        window_of,
        base,
        Duration::from_secs(40),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_on_a_cluster_sums_exactly_and_spreads_shards_over_every_master() {
    let cluster = RedisCluster::start(3, 0);
    let app = TestApp::spawn(cluster_vars(&cluster, &[("WINDOW", "1h")])).await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    let pulses: Vec<(String, f64)> = (0..3000)
        .map(|i| (format!("tenant-{}", i % 300), f64::from(i % 97 + 1) / 4.0))
        .collect();
    let statuses: Vec<u16> = futures::stream::iter(pulses.clone())
        .map(|(t, a)| {
            let (c, url) = (c.clone(), url.clone());
            async move { post(&c, &url, &pulse(&t, "SKU", "KB", a)).await.0 }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 202));
    let mut expected: BTreeMap<Key, Dec> = BTreeMap::new();
    for (t, a) in &pulses {
        *expected
            .entry((t.clone(), "SKU".into(), "KB".into()))
            .or_default() += dec(*a);
    }
    assert_books(&expected, &cluster.totals("pulses"));
    // Every master holds some shards' data.
    for m in cluster.masters() {
        assert!(
            !m.totals("pulses").is_empty(),
            "master on port {} holds no shard",
            m.port
        );
    }
    // Pulse ids dedupe on the cluster too.
    let mut p = pulse("dup", "SKU", "KB", 5.0);
    p["pulse_id"] = serde_json::json!("same");
    let replies = futures::future::join_all((0..4).map(|_| post(&c, &url, &p))).await;
    assert_eq!(
        replies
            .iter()
            .map(|r| r.2["accepted"].as_u64().unwrap())
            .sum::<u64>(),
        1
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_seal_and_deliver_from_a_cluster_and_the_books_balance() {
    let cluster = RedisCluster::start(3, 0);
    let (p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = cluster_vars(&cluster, &[]);
    v.insert("PROCESSOR_URL".into(), format!("{purl}/batches"));
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let b = Ingestor::spawn(&v, dir.path(), "b").await;
    let ledger = dir.path().join("ledger.json");
    let (code, out) = producer(&[
        "--url",
        &format!("{},{}", a.base, b.base),
        "--ids",
        "--mode",
        "rate",
        "--rate",
        "500",
        "--duration",
        "5s",
        "--tenants",
        "400",
        "--duplicate-ratio",
        "0.05",
        "--ledger",
        ledger.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    delivered(&cluster, &a.base).await;
    let (code, out) = verify(&ledger, &purl).await;
    assert_eq!(code, 0, "{out}");
    let t = p.totals();
    assert!(
        t.windows.len() >= 2,
        "several windows: {:?}",
        t.windows.keys()
    );
    assert_eq!(t.redelivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_during_ingest_keeps_acknowledged_pulses_without_a_restart() {
    // 3 masters with one replica each; AOF always on every node.
    let cluster = RedisCluster::start(3, 1);
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = cluster_vars(&cluster, &[]);
    v.insert("PROCESSOR_URL".into(), format!("{purl}/batches"));
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let ledger = dir.path().join("ledger.json");
    let urls = a.base.clone();
    let ledger_arg = ledger.display().to_string();
    let load = tokio::spawn(async move {
        producer(&[
            "--url",
            &urls,
            "--ids",
            "--retries",
            "30",
            "--mode",
            "rate",
            "--rate",
            "400",
            "--duration",
            "8s",
            "--tenants",
            "300",
            "--ledger",
            &ledger_arg,
        ])
        .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Promote a replica: CLUSTER FAILOVER on it (the coordinated, lossless kind).
    let replica = cluster
        .nodes
        .iter()
        .find(|n| !cluster.masters().iter().any(|m| m.port == n.port))
        .expect("a replica");
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut replica.conn())
        .unwrap();
    let ok = eventually(Duration::from_secs(15), || async {
        cluster.masters().iter().any(|m| m.port == replica.port)
    })
    .await;
    assert!(ok, "the replica became a master");
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    delivered(&cluster, &a.base).await;
    let (code, out) = verify(&ledger, &purl).await;
    assert_eq!(code, 0, "acknowledged pulses survive the failover:\n{out}");
}

/// A live resharding during ingest with pulse ids: `redis-cli --cluster reshard` moves most of
/// one master's slots — shards being written among them — to another, so writes meet `ASK`,
/// `TRYAGAIN` and `MOVED` inside commits. The scripts declare the keys they touch, so none runs
/// against half-migrated data; the reshard completes (no `BUSYKEY`), no restart, and the books
/// balance exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reshard_during_ingest_keeps_the_books_exact() {
    let cluster = RedisCluster::start(3, 0);
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = cluster_vars(&cluster, &[]);
    v.insert("PROCESSOR_URL".into(), format!("{purl}/batches"));
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let ledger = dir.path().join("ledger.json");
    let (urls, ledger_arg) = (a.base.clone(), ledger.display().to_string());
    let load = tokio::spawn(async move {
        producer(&[
            "--url",
            &urls,
            "--ids",
            "--retries",
            "30",
            "--mode",
            "rate",
            "--rate",
            "300",
            "--duration",
            "10s",
            "--tenants",
            "300",
            "--batch",
            "4",
            "--duplicate-ratio",
            "0.05",
            "--ledger",
            &ledger_arg,
        ])
        .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let masters = cluster.masters();
    let id = |n: &RedisServer| -> String { n.cmd(&["CLUSTER", "MYID"]) };
    let (from, to) = (id(masters[0]), id(masters[1]));
    // The shards that live on the source master now (so the move hits written slots).
    let busy: usize = (0..SHARDS)
        .filter(|s| {
            // Keys of other masters' slots answer MOVED: not here.
            redis::cmd("EXISTS")
                .arg(pulse_ingestor::store::Keys::new("pulses").generation(*s))
                .query::<i64>(&mut masters[0].conn())
                .unwrap_or(0)
                == 1
        })
        .count();
    assert!(
        busy > 0,
        "some shards are on the master that gives its slots away"
    );
    let out = tokio::process::Command::new("redis-cli")
        .args([
            "--cluster",
            "reshard",
            &format!("127.0.0.1:{}", masters[0].port),
            "--cluster-from",
            &from,
            "--cluster-to",
            &to,
            "--cluster-slots",
            "5000",
            "--cluster-yes",
            "--cluster-pipeline",
            "10",
        ])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("ERR"),
        "reshard: {text}"
    );
    cluster.wait_ok();
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    delivered(&cluster, &a.base).await;
    let (code, out) = verify(&ledger, &purl).await;
    assert_eq!(code, 0, "books after a live reshard:\n{out}");
    // The service rode through it: the same process, still healthy.
    let h = http()
        .get(format!("{}/healthz", a.base))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
}

/// Real failures, not the polite `CLUSTER FAILOVER`: under load with pulse ids and
/// `REDIS_WAIT_REPLICAS=1`, one master is killed (`kill -9`) and later another is frozen
/// (`SIGSTOP`) past `cluster-node-timeout`. Their replicas are promoted by the cluster; the killed
/// node comes back and the frozen one resumes, both rejoining as replicas. Windows are 2 s, so
/// drains run throughout. The service is never restarted and the books balance exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_killed_and_frozen_under_load_lose_nothing_with_wait() {
    let mut cluster = RedisCluster::start(3, 1);
    let synced = eventually(Duration::from_secs(20), || async {
        cluster.nodes.iter().all(|n| {
            n.role().as_deref() != Some("slave") || {
                let info: String = n.cmd(&["INFO", "replication"]);
                info.contains("master_link_status:up")
            }
        })
    })
    .await;
    assert!(
        synced,
        "every replica has synced (only a synced replica can be promoted)"
    );
    let (_p, purl) = processor(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut v = cluster_vars(
        &cluster,
        &[
            ("REDIS_WAIT_REPLICAS", "1"),
            ("REDIS_WAIT_TIMEOUT", "500ms"),
        ],
    );
    v.insert("PROCESSOR_URL".into(), format!("{purl}/batches"));
    let a = Ingestor::spawn(&v, dir.path(), "a").await;
    let ledger = dir.path().join("ledger.json");
    let (urls, ledger_arg) = (a.base.clone(), ledger.display().to_string());
    let load = tokio::spawn(async move {
        producer(&[
            "--url",
            &urls,
            "--ids",
            "--retries",
            "80",
            "--mode",
            "rate",
            "--rate",
            "200",
            "--duration",
            "18s",
            "--tenants",
            "300",
            "--ledger",
            &ledger_arg,
        ])
        .await
    });
    let masters: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| cluster.nodes[i].role().as_deref() == Some("master"))
        .collect();
    assert_eq!(masters.len(), 3);
    let promoted = |cluster: &RedisCluster, gone: usize| {
        (0..cluster.nodes.len())
            .filter(|&i| i != gone && cluster.nodes[i].role().as_deref() == Some("master"))
            .count()
            == 3
    };
    // kill -9 of a master.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = masters[0];
    cluster.nodes[killed].crash();
    let killed_at = std::time::Instant::now();
    let ok = eventually(Duration::from_secs(20), || async {
        promoted(&cluster, killed)
    })
    .await;
    let roles: Vec<Option<String>> = cluster.nodes.iter().map(|n| n.role()).collect();
    assert!(
        ok,
        "the killed master's replica is promoted: {roles:?} (killed {killed})"
    );
    cluster.nodes[killed].restart();
    let ok = eventually(Duration::from_secs(20), || async {
        cluster.nodes[killed].role().as_deref() == Some("slave")
    })
    .await;
    assert!(ok, "the killed master rejoins as a replica");
    // SIGSTOP of another master past the node timeout (2 s), then SIGCONT.
    println!(
        "cluster: replica promoted {:?} after a kill -9",
        killed_at.elapsed()
    );
    let frozen = masters[1];
    cluster.nodes[frozen].signal("STOP");
    let frozen_at = std::time::Instant::now();
    let ok = eventually(Duration::from_secs(20), || async {
        promoted(&cluster, frozen)
    })
    .await;
    println!(
        "cluster: replica promoted {:?} after a SIGSTOP",
        frozen_at.elapsed()
    );
    cluster.nodes[frozen].signal("CONT");
    assert!(ok, "the frozen master's replica is promoted");
    let ok = eventually(Duration::from_secs(20), || async {
        cluster.nodes[frozen].role().as_deref() == Some("slave")
    })
    .await;
    assert!(
        ok,
        "the frozen master resumes as a replica, not a second master"
    );
    cluster.wait_ok();
    let (code, out) = load.await.unwrap();
    assert_eq!(code, 0, "{out}");
    delivered(&cluster, &a.base).await;
    let (code, out) = verify(&ledger, &purl).await;
    assert_eq!(
        code, 0,
        "books after a kill -9 and a SIGSTOP of masters:\n{out}"
    );
    assert_eq!(
        http()
            .get(format!("{}/healthz", a.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
