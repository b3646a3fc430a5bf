//! Real Redis: a `redis-server` on a free loopback port, and a real Redis Cluster; readers of
//! the aggregates for the books.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pulse_ingestor::store::Keys;
use pulse_ingestor::store::keys::{Aggregate, decode_field};

use super::{Dec, Key, money};

/// A free loopback port (bound then released; the race with another process is accepted).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server binary the tests run: `redis-server`, or the engine named by `REDIS_SERVER_BIN`
/// (e.g. a `valkey-server`; `scripts/test.sh` runs the core suite on Valkey 9 this way).
pub fn server_bin() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into())
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
        Command::new(server_bin())
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

    /// Every aggregate (current generations, sealed windows, amendments, pulses stamped ahead)
    /// with what it holds, as (kind, [(field, exact total)]).
    fn aggregates(&self, prefix: &str) -> Vec<(Aggregate, Vec<(String, Dec)>)> {
        let keys = Keys::new(prefix);
        let mut conn = self.conn();
        let all: Vec<String> = redis::cmd("KEYS")
            .arg(format!(
                "{{{}:*",
                pulse_ingestor::store::keys::glob_escape(prefix)
            ))
            .query(&mut conn)
            .unwrap();
        all.into_iter()
            .filter_map(|k| keys.aggregate_of(&k).map(|(_, kind)| (k, kind)))
            .map(|(k, kind)| {
                let kv: Vec<(String, String)> =
                    redis::cmd("HGETALL").arg(&k).query(&mut conn).unwrap();
                let his: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(format!("{k}:hi"))
                    .query(&mut conn)
                    .unwrap();
                let kv = kv
                    .into_iter()
                    .map(|(f, lo)| {
                        let hi = his.get(&f).map(String::as_str).unwrap_or("0");
                        let text = pulse_ingestor::store::exact_total(&lo, hi).expect("limbs read");
                        (f, money::parse(&text).expect("a decimal"))
                    })
                    .collect();
                (kind, kv)
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

    /// Sums per sealed window start ("current" for the generations being written; an
    /// amendment counts in its window, pulses stamped ahead in theirs).
    pub fn window_sums(&self, prefix: &str) -> BTreeMap<String, Dec> {
        let mut out: BTreeMap<String, Dec> = BTreeMap::new();
        for (kind, kv) in self.aggregates(prefix) {
            let label = match kind {
                Aggregate::Generation => "current".to_string(),
                Aggregate::Window(s) | Aggregate::Amendment(s, _) | Aggregate::Future(s) => {
                    s.to_string()
                }
            };
            for (_, v) in kv {
                *out.entry(label.clone()).or_default() += v;
            }
        }
        out
    }

    /// The keys of sealed windows and amendments still held (not yet delivered), any shard,
    /// their `:hi` and `:ts` twins included.
    pub fn undelivered(&self, prefix: &str) -> Vec<String> {
        let keys = Keys::new(prefix);
        let all: Vec<String> = redis::cmd("KEYS")
            .arg(format!(
                "{{{}:*",
                pulse_ingestor::store::keys::glob_escape(prefix)
            ))
            .query(&mut self.conn())
            .unwrap();
        all.into_iter()
            .filter(|k| {
                let hash = k
                    .strip_suffix(":hi")
                    .or_else(|| k.strip_suffix(":ts"))
                    .unwrap_or(k);
                matches!(
                    keys.aggregate_of(hash),
                    Some((_, Aggregate::Window(_) | Aggregate::Amendment(..)))
                )
            })
            .collect()
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
