//! No half-alive process (invariant 13), with the real binary: logging that cannot kill tasks, a
//! dead task that stops the process, a command line, and hostile surroundings (a Redis that
//! refuses writes, too few file descriptors).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use pulse_producer::processor::Faults;

fn vars(redis: &RedisServer, extra: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    let mut v = settings(redis, extra);
    v.remove("LISTEN_ADDR");
    v
}

/// Starts the binary with its stdout and stderr on pipes whose readers are gone at once (a log
/// shipper restarting, `| head`, a closed terminal).
async fn spawn_with_broken_pipes(vars: &std::collections::HashMap<String, String>) -> Ingestor {
    let port = free_port();
    let mut cmd = Command::new(bin("pulse-ingestor"));
    cmd.env_clear()
        .envs(vars)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "debug");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let base = format!("http://127.0.0.1:{port}");
    let c = http();
    let ok = eventually(Duration::from_secs(20), || async {
        c.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;
    assert!(ok, "did not start");
    Ingestor {
        child,
        base,
        log: std::path::PathBuf::from("/dev/null"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_log_pipe_neither_stops_delivery_nor_shutdown() {
    let redis = RedisServer::start();
    let (p, purl) = processor(Faults::default()).await;
    let mut ing = spawn_with_broken_pipes(&vars(
        &redis,
        &[
            ("WINDOW", "2s"),
            ("PROCESSOR_URL", &format!("{purl}/batches")),
        ],
    ))
    .await;
    let c = http();
    let mut expected: BTreeMap<Key, Dec> = BTreeMap::new();
    for i in 0..1000 {
        let t = format!("t-{}", i % 50);
        let mut body = pulse(&t, "s", "KB", 0.25);
        body["pulse_id"] = serde_json::json!(format!("id-{i}"));
        let (s, _, b) = post(&c, &format!("{}/ingest", ing.base), &body).await;
        assert_eq!(s, 202, "{b}");
        *expected.entry((t, "s".into(), "KB".into())).or_default() += dec(0.25);
    }
    let ok = eventually(Duration::from_secs(30), || async {
        let found = by_key(&p.records());
        found == expected
    })
    .await;
    assert!(
        ok,
        "every acknowledged pulse is delivered: {} of {} keys",
        by_key(&p.records()).len(),
        expected.len()
    );
    assert!(
        metric(&c, &ing.base, "ingestor_log_write_errors_total")
            .await
            .unwrap()
            > 0.0
    );
    ing.signal("TERM");
    let started = Instant::now();
    assert_eq!(
        ing.wait(Duration::from_secs(15)).await,
        Some(0),
        "SIGTERM stops it cleanly"
    );
    assert!(started.elapsed() < Duration::from_secs(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_stops_the_process_and_acknowledges_nothing_it_did_not_commit() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut v = vars(&redis, &[]);
    v.insert("PULSE_INGESTOR_FAULT".into(), "worker".into());
    let mut ing = Ingestor::spawn(&v, dir.path(), "faulty").await;
    let c = http();
    assert_eq!(
        post(
            &c,
            &format!("{}/ingest", ing.base),
            &pulse("ok", "s", "KB", 1.0)
        )
        .await
        .0,
        202
    );
    let (s, _, body) = post(
        &c,
        &format!("{}/ingest", ing.base),
        &pulse("fault-panic", "s", "KB", 1.0),
    )
    .await;
    assert_eq!(
        s, 503,
        "the pulse whose worker died is not acknowledged: {body}"
    );
    // Failing health until it is gone; then gone with a non-zero code.
    let h = c.get(format!("{}/healthz", ing.base)).send().await;
    assert!(h.map(|r| r.status() == 503).unwrap_or(true));
    let code = ing.wait(Duration::from_secs(15)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit code {code:?}; log: {}",
        ing.log_text()
    );
    assert!(
        ing.log_text().contains("commit_worker"),
        "{}",
        ing.log_text()
    );
    let totals = redis.totals("pulses");
    assert!(!totals.contains_key(&("fault-panic".into(), "s".into(), "KB".into())));
    assert_eq!(totals[&("ok".into(), "s".into(), "KB".into())], dec(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_that_dies_stops_the_process() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut v = vars(&redis, &[]);
    v.insert("PULSE_INGESTOR_FAULT".into(), "scheduler".into());
    v.insert("LISTEN_ADDR".into(), format!("127.0.0.1:{port}"));
    let log = dir.path().join("s.log");
    let mut child = Command::new(bin("pulse-ingestor"))
        .env_clear()
        .envs(&v)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("task scheduler panicked"), "{text}");
}

#[test]
fn the_command_line_answers_help_version_and_refuses_typos() {
    let run = |args: &[&str]| {
        Command::new(bin("pulse-ingestor"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for s in pulse_ingestor::config::SETTINGS {
        assert!(text.contains(s.name), "--help lists {}", s.name);
    }
    assert!(
        text.contains("[default: 16]") && text.contains("reshard"),
        "{text}"
    );
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    let v = String::from_utf8_lossy(&version.stdout);
    assert!(
        v.starts_with(&format!("pulse-ingestor {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(
        v.contains('(') && !v.contains("(unknown)"),
        "the commit is built in: {v}"
    );
    let typo = run(&["--listen", "0.0.0.0:1"]);
    assert_eq!(
        typo.status.code(),
        Some(64),
        "a usage error, not a running service"
    );
    assert!(String::from_utf8_lossy(&typo.stderr).contains("unexpected argument"));
    let bad_env = Command::new(bin("pulse-ingestor"))
        .env_clear()
        .env("WINDOW", "60")
        .env("SHARDS", "x")
        .output()
        .unwrap();
    assert_eq!(bad_env.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad_env.stderr);
    assert!(
        err.contains("WINDOW") && err.contains("SHARDS"),
        "every bad variable at once: {err}"
    );
}

/// Redis refusing writes (disk full: `MISCONF`; a replica after a failover: `READONLY`): 503
/// with Retry-After, nothing counted, and recovery without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_gets_503_and_recovers() {
    let redis = RedisServer::start_with(&["--save", "3600 1", "--enable-protected-configs", "yes"]);
    let app = TestApp::spawn(settings(&redis, &[])).await;
    let c = http();
    let url = format!("{}/ingest", app.base);
    assert_eq!(post(&c, &url, &pulse("t", "s", "KB", 1.0)).await.0, 202);
    // Disk "full": the snapshot cannot be written, Redis stops taking writes.
    let _: () = redis.cmd(&["CONFIG", "SET", "dir", "/proc"]);
    let _: String = redis.cmd(&["BGSAVE"]);
    let ok = eventually(Duration::from_secs(5), || async {
        let info: String = redis.cmd(&["INFO", "persistence"]);
        info.contains("rdb_last_bgsave_status:err")
    })
    .await;
    assert!(ok);
    let (s, h, body) = post(&c, &url, &pulse("t", "s", "KB", 2.0)).await;
    assert_eq!(s, 503, "{body}");
    assert!(h.get("retry-after").is_some());
    let dir = redis.dir.path().display().to_string();
    let _: () = redis.cmd(&["CONFIG", "SET", "dir", &dir]);
    let _: String = redis.cmd(&["BGSAVE"]);
    let ok = eventually(Duration::from_secs(5), || async {
        post(&c, &url, &pulse("t", "s", "KB", 4.0)).await.0 == 202
    })
    .await;
    assert!(ok, "recovers without a restart");
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(5.0),
        "the refused pulse was not counted"
    );
    app.stop().await.unwrap();

    // Pointed at a replica.
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let app = TestApp::spawn(settings(&replica, &[])).await;
    let (s, _, body) = post(
        &c,
        &format!("{}/ingest", app.base),
        &pulse("r", "s", "KB", 1.0),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    let _: () = replica.cmd(&["REPLICAOF", "NO", "ONE"]);
    let ok = eventually(Duration::from_secs(5), || async {
        post(
            &c,
            &format!("{}/ingest", app.base),
            &pulse("r", "s", "KB", 2.0),
        )
        .await
        .0 == 202
    })
    .await;
    assert!(ok, "recovers once the replica is promoted");
    assert_eq!(
        replica.totals("pulses")[&("r".into(), "s".into(), "KB".into())],
        dec(2.0)
    );
    app.stop().await.unwrap();
}

/// Fewer file descriptors than MAX_CONNECTIONS: clients beyond them wait or fail, the
/// connections already open keep working, and the accept loop does not spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_keeps_open_connections_working() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let v = vars(&redis, &[("MAX_CONNECTIONS", "10000")]);
    let mut ing = Ingestor::spawn_with(
        &v,
        dir.path(),
        "fd",
        free_port(),
        &["prlimit", "--nofile=64:64", "--"],
    )
    .await;
    // One keep-alive client that is already connected.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = format!("{}/ingest", ing.base);
    assert_eq!(post(&c, &url, &pulse("t", "s", "KB", 1.0)).await.0, 202);
    // Exhaust the descriptors with idle connections.
    let mut hogs = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect(ing.base.trim_start_matches("http://")).await
        {
            hogs.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let pid = ing.child.id();
    // prlimit execs the ingestor in the same process.
    let before = cpu(pid);
    for _ in 0..20 {
        assert_eq!(
            post(&c, &url, &pulse("t", "s", "KB", 1.0)).await.0,
            202,
            "the open connection keeps working"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ticks = cpu(pid) - before;
    assert!(ticks < 100, "no busy loop: {ticks} CPU ticks in 2 s");
    drop(hogs);
    let fresh = http();
    let ok = eventually(Duration::from_secs(10), || async {
        fresh
            .get(format!("{}/healthz", ing.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ok, "new connections are served once descriptors are free");
    assert_eq!(
        redis.totals("pulses")[&("t".into(), "s".into(), "KB".into())],
        dec(21.0)
    );
    ing.signal("TERM");
    assert_eq!(ing.wait(Duration::from_secs(15)).await, Some(0));
}
