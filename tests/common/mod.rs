//! The one test harness every test file uses: real `redis-server` processes on free loopback
//! ports, the service in-process or as its real binary, and the reference Processor.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pulse_ingestor::app::App;
use pulse_ingestor::config::Config;
use pulse_ingestor::store::keys::decode_field;
pub use pulse_producer::money::{self, Dec};
use pulse_producer::processor::{Faults, Processor};
use tokio::sync::oneshot;

pub type Key = (String, String, String);

/// A free loopback port (bound then released; the race with another process is accepted).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real redis-server on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, &dir, extra);
        let r = RedisServer {
            port,
            child,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.wait_ready();
        r
    }

    /// Starts the server again on the same port and data directory (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(self.port, &self.dir, &extra);
        self.wait_ready();
    }

    /// `kill -9`: no chance to flush anything.
    pub fn crash(&mut self) {
        self.kill();
    }

    /// Sends a signal (`STOP`, `CONT`…) to the server process.
    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    /// `ROLE` of this node, or `None` when it does not answer.
    pub fn role(&self) -> Option<String> {
        let mut c = redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(300))
            .ok()?;
        let _ = c.set_read_timeout(Some(Duration::from_millis(300)));
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).ok()?;
        match role.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn spawn(port: u16, dir: &tempfile::TempDir, extra: &[&str]) -> Child {
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)")
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection())
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Runs a command and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.conn()).unwrap()
    }

    /// Every aggregate (current generations and sealed windows, both layouts) as
    /// (key, [(field, exact total)]).
    fn aggregates(&self, prefix: &str) -> Vec<(String, Vec<(String, Dec)>)> {
        let mut conn = self.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}:*"))
            .query(&mut conn)
            .unwrap();
        keys.into_iter()
            .filter(|k| (k.contains(":agg:") || k.contains(":sealed:")) && !k.ends_with(":hi"))
            .map(|k| {
                let kv: Vec<(String, String)> =
                    redis::cmd("HGETALL").arg(&k).query(&mut conn).unwrap();
                let exact = k.contains(":x:");
                let his: HashMap<String, String> = if exact {
                    redis::cmd("HGETALL")
                        .arg(format!("{k}:hi"))
                        .query(&mut conn)
                        .unwrap()
                } else {
                    HashMap::new()
                };
                let kv = kv
                    .into_iter()
                    .map(|(f, lo)| {
                        let text = if exact {
                            let hi = his.get(&f).map(String::as_str).unwrap_or("0");
                            pulse_ingestor::store::exact_total(&lo, hi).expect("limbs read")
                        } else {
                            lo
                        };
                        (f, money::parse(&text).expect("a decimal"))
                    })
                    .collect();
                (k, kv)
            })
            .collect()
    }

    /// Every aggregate in Redis (current generations and sealed windows), summed per key.
    pub fn totals(&self, prefix: &str) -> BTreeMap<Key, Dec> {
        let mut out: BTreeMap<Key, Dec> = BTreeMap::new();
        for (_, kv) in self.aggregates(prefix) {
            for (f, v) in kv {
                let k = decode_field(f.as_bytes()).expect("fields decode");
                *out.entry((k.tenant, k.sku, k.unit)).or_default() += v;
            }
        }
        out
    }

    /// Sums per sealed window start ("current" for the generations being written).
    pub fn window_sums(&self, prefix: &str) -> BTreeMap<String, Dec> {
        let mut out: BTreeMap<String, Dec> = BTreeMap::new();
        for (k, kv) in self.aggregates(prefix) {
            let label = if k.contains(":agg:") {
                "current".to_string()
            } else {
                k.rsplit(':').next().unwrap().to_string()
            };
            for (_, v) in kv {
                *out.entry(label.clone()).or_default() += v;
            }
        }
        out
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Base settings for a test instance: small, fast, local.
pub fn settings(redis: &RedisServer, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = [
        ("LISTEN_ADDR", "127.0.0.1:0".to_string()),
        ("REDIS_URL", redis.url()),
        ("SHARDS", "8".into()),
        ("WORKERS", "2".into()),
        ("STABILISATION_DELAY", "0s".into()),
        ("DRAIN_INTERVAL", "200ms".into()),
        ("SHUTDOWN_TIMEOUT", "10s".into()),
        ("DELIVERY_MAX_BACKOFF", "200ms".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    m
}

/// The service running in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The metrics listener, when `METRICS_ADDR` is set (port 0 picks a free one).
    pub metrics_addr: Option<SocketAddr>,
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<Result<(), pulse_ingestor::app::AppError>>,
}

impl TestApp {
    pub async fn spawn(vars: HashMap<String, String>) -> Self {
        let cfg = Config::from_map(&vars).expect("test config is valid");
        let app = App::build(cfg).await.expect("app builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            metrics_addr,
            base: format!("http://{addr}"),
            stop: Some(tx),
            handle,
        }
    }

    /// Graceful shutdown, as SIGTERM does it.
    pub async fn stop(mut self) -> Result<(), pulse_ingestor::app::AppError> {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap()
    }
}

/// The reference Processor, in-process.
pub async fn processor(faults: Faults) -> (Arc<Processor>, String) {
    let p = Processor::new(faults, None).unwrap();
    let addr = pulse_producer::processor::spawn(p.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (p, format!("http://{addr}"))
}

/// Runs `pulse-producer` with these arguments and returns its exit code and output.
pub async fn producer(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(bin("pulse-producer"))
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The port of a base URL such as `http://127.0.0.1:1234`.
pub fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A pulse body. The amount goes on the wire as serde_json writes an `f64` — its shortest
/// decimal text — and [`dec`] gives exactly that decimal for the books.
pub fn pulse(t: &str, s: &str, u: &str, a: f64) -> serde_json::Value {
    serde_json::json!({"tenant_id": t, "product_sku": s, "use_unit": u, "used_amount": a})
}

/// The exact decimal a test amount is sent as (the JSON text of the `f64`).
pub fn dec(a: f64) -> Dec {
    money::parse(&serde_json::to_string(&a).unwrap()).unwrap()
}

/// A pulse whose amount is given as decimal text, sent verbatim as a JSON number.
pub fn pulse_text(t: &str, s: &str, u: &str, amount: &str) -> String {
    format!(
        r#"{{"tenant_id":{},"product_sku":{},"use_unit":{},"used_amount":{amount}}}"#,
        serde_json::to_string(t).unwrap(),
        serde_json::to_string(s).unwrap(),
        serde_json::to_string(u).unwrap()
    )
}

/// POSTs a JSON body to the service and returns status, headers and body.
pub async fn post(
    c: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

/// Polls `f` until it returns true or the timeout passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The books balance exactly: every key's total equal to the last digit, no tolerance.
pub fn assert_books(expected: &BTreeMap<Key, Dec>, found: &BTreeMap<Key, Dec>) {
    let mut problems = Vec::new();
    for (k, v) in expected {
        match found.get(k) {
            None => problems.push(format!("missing {k:?} ({v})")),
            Some(f) if f != v => problems.push(format!("off {k:?}: sent {v}, found {f}")),
            _ => {}
        }
    }
    for k in found.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("extra {k:?}"));
    }
    assert!(
        problems.is_empty(),
        "books do not balance ({} problems): {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
}

/// A real binary of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_pulse-ingestor"))
        .parent()
        .unwrap()
        .to_path_buf();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A real `pulse-ingestor` process.
pub struct Ingestor {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Ingestor {
    pub async fn spawn(
        vars: &HashMap<String, String>,
        log_dir: &std::path::Path,
        name: &str,
    ) -> Self {
        Self::spawn_with(vars, log_dir, name, free_port(), &[]).await
    }

    /// Starts the binary on `port`, optionally under a wrapper command (e.g. `faketime`).
    pub async fn spawn_with(
        vars: &HashMap<String, String>,
        log_dir: &std::path::Path,
        name: &str,
        port: u16,
        wrapper: &[&str],
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin("pulse-ingestor"));
                c
            }
            None => Command::new(bin("pulse-ingestor")),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info");
        // Its own process group, so that whatever it starts (or a preloaded library forks)
        // goes with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let c = http();
        let ok = eventually(Duration::from_secs(20), || {
            let c = c.clone();
            let u = format!("{base}/healthz");
            async move { c.get(u).send().await.is_ok() }
        })
        .await;
        assert!(
            ok,
            "{name} did not start; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Ingestor { child, base, log }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ingestor {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Redis Cluster: `masters` masters with `replicas` replicas each, every node a
/// `redis-server --cluster-enabled yes` on a free loopback port, joined by
/// `redis-cli --cluster create`. Killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        let n = masters * (1 + replicas);
        let mut nodes = Vec::new();
        while nodes.len() < n {
            // The cluster bus listens on port + 10000: both must be free.
            let port = free_port();
            if port > 55_000 || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                // Replicas sync at once (a replica that never synced may not be promoted).
                "--repl-diskless-sync-delay",
                "0",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ];
            let child = RedisServer::spawn(port, &dir, &extra);
            let node = RedisServer {
                port,
                child,
                dir,
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            node.wait_ready();
            nodes.push(node);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes };
        c.wait_ok();
        c
    }

    /// Waits until every node reports `cluster_state:ok` and knows every node.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|n| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut n.conn())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `REDIS_CLUSTER_URLS` for the service.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes that are masters right now.
    pub fn masters(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| {
                let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.conn()).unwrap();
                matches!(&role[0], redis::Value::BulkString(b) if b == b"master")
            })
            .collect()
    }

    /// Every aggregate in the cluster, summed per key (each master asked for its own keys).
    pub fn totals(&self, prefix: &str) -> BTreeMap<Key, Dec> {
        let mut out: BTreeMap<Key, Dec> = BTreeMap::new();
        for m in self.masters() {
            for (k, v) in m.totals(prefix) {
                *out.entry(k).or_default() += v;
            }
        }
        out
    }

    /// `GET key` as a number, asked of the master that owns the key (the others answer MOVED).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.masters()
            .into_iter()
            .find_map(|m| {
                redis::cmd("GET")
                    .arg(key)
                    .query::<Option<u64>>(&mut m.conn())
                    .ok()
            })
            .flatten()
    }
}

/// A metric's value from a replica's `/metrics`: the first sample line starting with `series`
/// (a name, or a name with labels).
pub async fn metric(c: &reqwest::Client, base: &str, series: &str) -> Option<f64> {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until the window current at Redis time `now` has been sealed on every shard
/// (`window_of(shard)` reads a shard's `:window`) and `base` reports nothing pending.
pub async fn wait_all_delivered(
    now: u64,
    window: u64,
    shards: u32,
    window_of: impl Fn(u32) -> Option<u64>,
    base: &str,
    timeout: Duration,
) {
    let current = now - now % window;
    let c = http();
    let ok = eventually(timeout, || async {
        (0..shards).all(|s| window_of(s).is_some_and(|w| w > current))
            && match c.get(format!("{base}/admin/pending")).send().await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|p| p["pending_windows"] == 0),
                Err(_) => false,
            }
    })
    .await;
    assert!(ok, "windows were not all delivered within {timeout:?}");
}
