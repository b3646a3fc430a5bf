//! Redis: the connection pool, the key layout and the Lua scripts.
//!
//! Every key of shard `s` starts with the hash tag `{<prefix>:<s>}` (invariant 10), so each
//! script touches one slot and the same code runs on Redis Cluster. The scripts live in
//! `scripts/*.lua`; the ones that may toggle a generation are prefixed with `seal_lib.lua`, which
//! is the only place the toggle is written (invariants 2, 3, 4).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use deadpool_redis::{PoolConfig, Runtime, Timeouts};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

/// A pulse id's dedupe marker as a set member: 96 bits of its digest and the tenant's placement
/// modulo 65,536 (big-endian), 14 bytes — short enough for Redis' smallest string allocation,
/// and enough for `reshard` to place it under any shard count that divides 65,536.
pub fn marker_member(digest: &[u8; 16], placement: i64) -> [u8; 14] {
    let mut m = [0u8; 14];
    m[..12].copy_from_slice(&digest[..12]);
    m[12..].copy_from_slice(&((placement as u64 % 65_536) as u16).to_be_bytes());
    m
}

/// The exact total of a record from its two limbs, as canonical decimal text.
pub fn exact_total(lo: &str, hi: &str) -> Option<String> {
    let lo: u128 = lo.parse().ok()?;
    let hi: u128 = hi.parse().ok()?;
    crate::amount::Amount::from_limbs(hi, lo).map(|a| a.to_string())
}

/// The exact total of a dead-lettered record's stored value (either layout).
pub fn dead_letter_total(value: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    match (v.get("lo"), v.get("hi"), v.get("amount")) {
        (Some(lo), Some(hi), _) => exact_total(lo.as_str()?, hi.as_str()?),
        (_, _, Some(a)) => crate::amount::canonical(a.as_str()?),
        _ => None,
    }
}

/// A connection to one Redis or to a Redis Cluster. Both multiplex: clones share sockets and
/// pipeline their commands; the cluster one routes each command by its key's slot (following
/// `MOVED`/`ASK`), so every script lands on the master that owns its shard.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The pool of one Redis, or of a Redis Cluster (`REDIS_CLUSTER_URLS`).
#[derive(Clone)]
enum Pools {
    Single(deadpool_redis::Pool),
    Cluster(Arc<ClusterPool>),
    Sentinel(Arc<SentinelPool>),
}

/// The master found through Redis Sentinel (redis-rs' `SentinelClient` asks the sentinels and
/// checks the role). One multiplexed connection, replaced whenever a connection failure — or a
/// `READONLY`/`MASTERDOWN` answer: the master changed — is seen, so that after a failover the
/// next commit asks the sentinels again.
struct SentinelPool {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// The connection and the store epoch it was made in.
    conn: tokio::sync::Mutex<Option<(MultiplexedConnection, u64)>>,
}

/// One multiplexed cluster connection, made on first use. Built with redis-rs' own client so
/// that `REDIS_TIMEOUT` applies to every node (deadpool's cluster config cannot set it). The
/// client follows `MOVED`/`ASK` and may re-send a command after an I/O error; the write script
/// is made idempotent for that with a per-commit token (see `scripts/write.lua`).
struct ClusterPool {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

use crate::config::Config;

pub mod reshard;
pub mod usage;

/// A script that may toggle a generation or add exact amounts: prefixed with the shared library.
macro_rules! with_lib {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("scripts/seal_lib.lua"),
                include_str!($file)
            ))
        })
    };
}

static WRITE: LazyLock<Script> = with_lib!("scripts/write.lua");
static SEAL: LazyLock<Script> = with_lib!("scripts/seal.lua");
static REPLAY: LazyLock<Script> = with_lib!("scripts/replay.lua");
static DEAD_LETTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/dead_letter.lua")));
static FINISH_WINDOW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/finish_window.lua")));
static DELIVERED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/delivered.lua")));
static REGISTER_SHARDS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/register_shards.lua")));
static LOCK_RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lock_renew.lua")));
static LOCK_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lock_release.lua")));

/// A Redis failure, as the rest of the service sees it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    Pool(String),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// This replica's `SHARDS` is not the deployment's: it must not write (see `reshard`).
    #[error(
        "SHARDS={configured}, but this deployment's Redis uses SHARDS={deployment}; change it with `pulse-ingestor reshard --shards <n>` (README: Changing SHARDS)"
    )]
    ShardsChanged { configured: u32, deployment: u32 },
    /// A key's window total would leave the exact range; nothing of the commit was written.
    #[error("a key's total for this window would exceed the exact range")]
    Overflow,
    /// One failure of a call that carried several shards, as each shard sees it.
    #[error("{message}")]
    Shared {
        message: String,
        ambiguous: bool,
        suspect: bool,
    },
}

impl StoreError {
    /// True when the command may have run although we saw an error (a timeout or a dropped
    /// connection after sending). Such a write is never retried by the service itself.
    /// True unless Redis itself answered with an error reply (OOM, NOSCRIPT...): the
    /// connection may be dead and should be replaced.
    pub fn connection_suspect(&self) -> bool {
        match self {
            // A server error means the connection works — unless the server is no longer the
            // master (a failover): then a new connection must find the new one.
            StoreError::Redis(e) => {
                !matches!(e.kind(), redis::ErrorKind::Server(_))
                    || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
            }
            StoreError::Overflow | StoreError::ShardsChanged { .. } => false,
            StoreError::Shared { suspect, .. } => *suspect,
            _ => true,
        }
    }

    pub fn is_ambiguous(&self) -> bool {
        match self {
            StoreError::Redis(e) => e.is_timeout() || e.is_connection_dropped(),
            StoreError::Shared { ambiguous, .. } => *ambiguous,
            _ => false,
        }
    }

    /// This failure as each shard of a multi-shard call reports it.
    pub fn fan_out(&self) -> StoreError {
        match self {
            StoreError::Overflow => StoreError::Overflow,
            e => StoreError::Shared {
                message: e.to_string(),
                ambiguous: e.is_ambiguous(),
                suspect: e.connection_suspect(),
            },
        }
    }
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        match e {
            deadpool_redis::PoolError::Backend(e) => StoreError::Redis(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

/// The key layout of one deployment.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// `{prefix:shard}` — the hash tag every key of the shard starts with.
    pub fn base(&self, shard: u32) -> String {
        format!("{{{}:{shard}}}", self.prefix)
    }
    /// The exact layout's namespace inside the shard (see `scripts/seal_lib.lua`).
    fn ns(&self, shard: u32, exact: bool) -> String {
        if exact {
            format!("{}:x", self.base(shard))
        } else {
            self.base(shard)
        }
    }
    /// The current generation, "A" or "B" (exact layout).
    pub fn generation(&self, shard: u32) -> String {
        format!("{}:gen", self.ns(shard, true))
    }
    /// The keys the write and seal scripts may touch that are known before they run: they are
    /// declared in `KEYS` so that a cluster routes, redirects and migrates them correctly.
    fn generation_keys(&self, shard: u32) -> [String; 8] {
        let ns = self.ns(shard, true);
        [
            format!("{ns}:gen"),
            format!("{ns}:window"),
            format!("{ns}:window_len"),
            format!("{ns}:agg:A"),
            format!("{ns}:agg:A:hi"),
            format!("{ns}:agg:B"),
            format!("{ns}:agg:B:hi"),
            self.pending(shard),
        ]
    }
    /// The sealed hash of a window (its `:hi` twin holds the high limbs in the exact layout).
    pub fn sealed(&self, shard: u32, w: &PendingWindow) -> String {
        format!("{}:sealed:{}", self.ns(shard, w.exact), w.start)
    }
    pub fn pending(&self, shard: u32) -> String {
        format!("{}:pending", self.base(shard))
    }
    pub fn dead(&self, shard: u32, w: &PendingWindow) -> String {
        format!("{}:dead:{}", self.ns(shard, w.exact), w.start)
    }
    pub fn dead_index(&self, shard: u32) -> String {
        format!("{}:dead_windows", self.base(shard))
    }
    /// A shard's dedupe markers: a set per `DEDUPE_TTL` bucket (see `scripts/write.lua`), or,
    /// from the previous release, a string key per id (`suffix` = its hex digest).
    pub fn seen(&self, shard: u32, suffix: &str) -> String {
        format!("{}:seen:{suffix}", self.base(shard))
    }
    /// A commit's token: makes a write script call that a client library re-sends count once.
    pub fn commit(&self, shard: u32, token: &str) -> String {
        format!("{}:commit:{token}", self.base(shard))
    }
    /// Live replicas (sorted set of instance ids by last heartbeat, Redis seconds).
    pub fn replicas(&self) -> String {
        format!("{{{}}}:replicas", self.prefix)
    }
    /// The capped stream of recently rejected requests.
    pub fn rejections(&self) -> String {
        format!("{{{}}}:rejections", self.prefix)
    }
    /// Deployment-wide facts (the largest shard count used), under its own hash tag.
    pub fn meta(&self) -> String {
        format!("{{{}}}:meta", self.prefix)
    }
    pub fn lock(&self, shard: u32) -> String {
        format!("{}:lock", self.base(shard))
    }
}

/// One pulse (or a pre-aggregated group of pulses without ids) for the write script.
#[derive(Debug, Clone)]
pub struct WriteItem {
    pub field: String,
    pub amount: crate::amount::Amount,
    /// Dedupe digest of the pulse id, if it has one.
    pub digest: Option<[u8; 16]>,
    /// The tenant's placement hash, kept as the marker's value so `reshard` can move it.
    pub placement: i64,
}

/// What the write script reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReply {
    /// Start of the window the items were counted in.
    pub window_start: u64,
    /// Per item: counted (true) or a duplicate (false).
    pub counted: Vec<bool>,
}

/// What the seal script reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SealReply {
    pub generation: String,
    pub window_start: u64,
    pub toggled: bool,
    /// Redis time, seconds.
    pub redis_now: u64,
    /// Redis time, microseconds, for timing the next boundary precisely.
    pub redis_now_micros: u64,
}

/// A sealed window awaiting delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingWindow {
    /// The member in the pending set: `"<start>:<end>:x"`, or `"<start>:<end>"` for a window
    /// the float release sealed.
    pub member: String,
    pub start: u64,
    pub end: u64,
    /// Exact (fixed-point limbs) layout; false for a legacy `HINCRBYFLOAT` window.
    pub exact: bool,
}

impl PendingWindow {
    pub fn parse(member: &str) -> Option<Self> {
        let (s, rest) = member.split_once(':')?;
        let (e, exact) = match rest.split_once(':') {
            Some((e, "x")) => (e, true),
            Some(_) => return None,
            None => (rest, false),
        };
        Some(PendingWindow {
            member: member.to_string(),
            start: s.parse().ok()?,
            end: e.parse().ok()?,
            exact,
        })
    }
}

/// The Redis store of one deployment.
#[derive(Clone)]
pub struct Store {
    pool: Pools,
    pub keys: Keys,
    pub shards: u32,
    pub window_secs: u64,
    dedupe_ttl_secs: u64,
    timeout: Duration,
    /// Bumped whenever a connection failure is seen anywhere, so that every holder of a
    /// long-lived connection (the commit workers) replaces it before its next use instead of
    /// finding out with a failed write.
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// This process' id among the live replicas.
    instance: Arc<str>,
    /// See [`Store::legacy_markers_until`].
    legacy_markers_until: Arc<std::sync::atomic::AtomicU64>,
    commit_per_shard: bool,
}

impl Store {
    /// Builds the pool; connections are made lazily, so this succeeds while Redis is down.
    pub fn new(cfg: &Config) -> Result<Self, StoreError> {
        let mut pc = PoolConfig::new(cfg.redis_pool_size);
        pc.timeouts = Timeouts {
            wait: Some(cfg.redis_timeout),
            create: Some(cfg.redis_timeout),
            recycle: Some(cfg.redis_timeout),
        };
        let pool = match (&cfg.redis_cluster_urls, &cfg.redis_sentinel) {
            (None, Some((sentinels, master))) => {
                let client = redis::sentinel::SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    None,
                    redis::sentinel::SentinelServerType::Master,
                )?;
                Pools::Sentinel(Arc::new(SentinelPool {
                    client: tokio::sync::Mutex::new(client),
                    conn: tokio::sync::Mutex::new(None),
                }))
            }
            (None, None) => Pools::Single(
                deadpool_redis::Config {
                    url: Some(cfg.redis_url.clone()),
                    connection: None,
                    pool: Some(pc),
                }
                .create_pool(Some(Runtime::Tokio1))
                .map_err(|e| StoreError::Pool(e.to_string()))?,
            ),
            (Some(urls), _) => {
                let client = redis::cluster::ClusterClient::builder(urls.clone())
                    .connection_timeout(cfg.redis_timeout)
                    .response_timeout(cfg.redis_timeout)
                    .build()?;
                Pools::Cluster(Arc::new(ClusterPool {
                    client,
                    conn: tokio::sync::Mutex::new(None),
                }))
            }
        };
        Ok(Store {
            pool,
            keys: Keys::new(&cfg.key_prefix),
            shards: cfg.shards,
            window_secs: cfg.window_secs(),
            dedupe_ttl_secs: cfg.dedupe_ttl.as_secs().max(1),
            timeout: cfg.redis_timeout,
            epoch: Default::default(),
            instance: hex::encode(rand::random::<[u8; 8]>()).into(),
            // Until `init_markers` says otherwise, consult the previous layout's markers too.
            legacy_markers_until: Arc::new(u64::MAX.into()),
            commit_per_shard: cfg.redis_commit_per_shard,
        })
    }

    /// A pooled multiplexed connection with the configured response timeout.
    ///
    /// The pooled object goes back to the pool at once; the returned clone shares its socket,
    /// which is how multiplexed connections are meant to be used.
    pub async fn conn(&self) -> Result<Conn, StoreError> {
        let c = self.pooled().await;
        if c.is_err() {
            self.invalidate();
        }
        c
    }

    /// The connection epoch: it changes when a connection failure was seen.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks every connection taken before now as suspect.
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    async fn pooled(&self) -> Result<Conn, StoreError> {
        match &self.pool {
            Pools::Single(p) => {
                let mut c = p.get().await?;
                c.set_response_timeout(self.timeout);
                Ok(Conn::Single((*c).clone()))
            }
            Pools::Sentinel(p) => {
                let epoch = self.epoch();
                let mut slot = p.conn.lock().await;
                if let Some((c, e)) = slot.as_ref()
                    && *e == epoch
                {
                    return Ok(Conn::Single(c.clone()));
                }
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                let c = tokio::time::timeout(self.timeout * 2, async {
                    p.client
                        .lock()
                        .await
                        .get_async_connection_with_config(&config)
                        .await
                })
                .await
                .map_err(|_| {
                    StoreError::Pool("timed out asking the sentinels for the master".into())
                })??;
                *slot = Some((c.clone(), epoch));
                Ok(Conn::Single(c))
            }
            Pools::Cluster(p) => {
                let mut slot = p.conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = tokio::time::timeout(self.timeout * 2, p.client.get_async_connection())
                    .await
                    .map_err(|_| {
                        StoreError::Pool("timed out connecting to the cluster".into())
                    })??;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    /// Records this deployment's shard count and returns the largest one ever used, so that
    /// windows left in shards of an earlier, larger `SHARDS` are still drained.
    pub async fn shards_to_drain(&self) -> Result<u32, StoreError> {
        Ok(self.register_shards().await?.0.max(self.shards))
    }

    /// Records this replica's `SHARDS`; returns (largest count ever used, the deployment's
    /// count). A replica whose count differs from the deployment's must not write: its pulse
    /// ids would be looked up in other shards (see `reshard`).
    pub async fn register_shards(&self) -> Result<(u32, u32), StoreError> {
        let mut c = self.conn().await?;
        Ok(REGISTER_SHARDS
            .key(self.keys.meta())
            .arg(self.shards)
            .invoke_async(&mut c)
            .await?)
    }

    /// Appends a rejected request (status, reason, tenant — never a key) to a stream capped at
    /// about 1,000 entries.
    pub async fn record_rejection(
        &self,
        status: u16,
        reason: &str,
        tenant: &str,
    ) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("XADD")
            .arg(self.keys.rejections())
            .arg("MAXLEN")
            .arg("~")
            .arg(1000)
            .arg("*")
            .arg("status")
            .arg(status)
            .arg("reason")
            .arg(reason)
            .arg("tenant")
            .arg(tenant)
            .query_async::<String>(&mut c)
            .await?;
        Ok(())
    }

    /// The most recent rejections, newest first, as (id, fields).
    pub async fn recent_rejections(
        &self,
        count: usize,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("XREVRANGE")
            .arg(self.keys.rejections())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?)
    }

    /// Records that this process is alive (Redis seconds); `reshard` refuses to run while any
    /// replica was seen recently.
    pub async fn heartbeat(&self, conn: &mut Conn, now: u64) -> Result<(), StoreError> {
        redis::cmd("ZADD")
            .arg(self.keys.replicas())
            .arg(now)
            .arg(&*self.instance)
            .query_async::<i64>(conn)
            .await?;
        Ok(())
    }

    /// Removes this process from the live replicas (clean shutdown).
    pub async fn leave(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("ZREM")
            .arg(self.keys.replicas())
            .arg(&*self.instance)
            .query_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// Waits until `replicas` replicas have this connection's writes (Redis `WAIT`), at most
    /// `timeout`; returns how many have them. On a cluster, asks the master of `shard`.
    pub async fn wait_replicas(
        &self,
        conn: &mut Conn,
        shard: u32,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, StoreError> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        match conn {
            Conn::Single(c) => Ok(cmd.query_async(c).await?),
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(self.keys.base(shard), SlotAddr::Master),
                ));
                let v = c.route_command(cmd, route).await?;
                Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
            }
        }
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.pool, Pools::Cluster(_))
    }

    /// Whether a commit is one script call per shard (always on a cluster) rather than one.
    pub fn commit_per_shard(&self) -> bool {
        self.commit_per_shard || self.is_cluster()
    }

    /// Redis' `maxmemory-policy` (from `INFO memory`, which managed Redis services allow).
    pub async fn eviction_policy(&self) -> Result<String, StoreError> {
        let mut c = self.conn().await?;
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(|p| p.trim().to_string())
            .ok_or_else(|| StoreError::Reply("INFO memory has no maxmemory_policy".into()))
    }

    /// Round trip to Redis (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok(())
    }

    /// Redis' clock, in seconds — the one clock every replica agrees on.
    pub async fn time(&self, conn: &mut Conn) -> Result<u64, StoreError> {
        let (secs, _micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
        Ok(secs)
    }

    /// Counts items into the shard's current generation in one script call. `token` is unique
    /// to this commit: a re-sent call (a client library's retry after a lost reply) returns the
    /// first call's answer instead of counting again.
    pub async fn write(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
        items: &[WriteItem],
    ) -> Result<WriteReply, StoreError> {
        let mut replies = self.write_many(conn, token, &[(shard, items)]).await?;
        Ok(replies.pop().expect("one section, one reply"))
    }

    /// Counts a whole commit — several shards' items — in one script call. Only for one Redis:
    /// a cluster node takes one slot per call, so there each shard is its own call, and only
    /// there are the generation keys declared (one Redis routes nothing; each declared key
    /// costs the call about 0.1 µs of Redis CPU).
    pub async fn write_many(
        &self,
        conn: &mut Conn,
        token: &str,
        sections: &[(u32, &[WriteItem])],
    ) -> Result<Vec<WriteReply>, StoreError> {
        let first = sections.first().map_or(0, |s| s.0);
        let mut inv = WRITE.prepare_invoke();
        inv.key(self.keys.commit(first, token));
        let legacy_until = self.legacy_markers_until();
        let legacy = legacy_until > 0;
        inv.arg(self.window_secs)
            .arg(self.dedupe_ttl_secs)
            .arg(legacy_until)
            .arg(sections.len());
        let declare = self.is_cluster();
        let mut with_id: Vec<Vec<usize>> = Vec::with_capacity(sections.len());
        for (shard, items) in sections {
            if declare {
                for k in self.keys.generation_keys(*shard) {
                    inv.key(k);
                }
            }
            let ids: Vec<usize> = (0..items.len())
                .filter(|&i| items[i].digest.is_some())
                .collect();
            inv.arg(self.keys.base(*shard))
                .arg(items.len() - ids.len())
                .arg(ids.len());
            // Items without id first (three values each), then those with an id.
            for it in items.iter().filter(|it| it.digest.is_none()) {
                let (hi, lo) = it.amount.limbs();
                inv.arg(&it.field).arg(lo).arg(hi.to_string());
            }
            for &i in &ids {
                let it = &items[i];
                let d = it.digest.as_ref().expect("filtered on digest");
                let (hi, lo) = it.amount.limbs();
                inv.arg(&it.field)
                    .arg(lo)
                    .arg(hi.to_string())
                    .arg(&marker_member(d, it.placement)[..]);
                if legacy {
                    inv.arg(hex::encode(d));
                }
            }
            with_id.push(ids);
        }
        let reply: String = inv.invoke_async(conn).await.map_err(|e| {
            if e.code() == Some("OVERFLOW") {
                StoreError::Overflow
            } else {
                StoreError::Redis(e)
            }
        })?;
        let parts: Vec<&str> = reply.split(';').collect();
        if parts.len() != sections.len() {
            return Err(StoreError::Reply(reply.clone()));
        }
        parts
            .iter()
            .zip(sections)
            .zip(with_id)
            .map(|((part, (_, items)), ids)| {
                let (start, flags) = part
                    .split_once(':')
                    .ok_or_else(|| StoreError::Reply(reply.clone()))?;
                let window_start = start
                    .parse()
                    .map_err(|_| StoreError::Reply(reply.clone()))?;
                if flags.len() != ids.len() {
                    return Err(StoreError::Reply(reply.clone()));
                }
                let mut counted = vec![true; items.len()];
                for (flag, i) in flags.bytes().zip(ids) {
                    counted[i] = flag == b'1';
                }
                Ok(WriteReply {
                    window_start,
                    counted,
                })
            })
            .collect()
    }

    /// Until when (Redis seconds) markers of the previous layout — one string key per id —
    /// may still matter; 0 when none can exist.
    pub fn legacy_markers_until(&self) -> u64 {
        self.legacy_markers_until
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Learns (and on the first start of this layout records) since when dedupe markers are
    /// sets, so that markers the previous release left are consulted until they expire.
    pub async fn init_markers(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let (now, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await?;
        // A deployment the previous release used has `shards_max`; a new one has nothing to
        // consult.
        let old: bool = redis::cmd("HEXISTS")
            .arg(self.keys.meta())
            .arg("shards_max")
            .query_async(&mut c)
            .await?;
        let _: bool = redis::cmd("HSETNX")
            .arg(self.keys.meta())
            .arg("marker_sets_since")
            .arg(if old { now } else { 0 })
            .query_async(&mut c)
            .await?;
        let since: u64 = redis::cmd("HGET")
            .arg(self.keys.meta())
            .arg("marker_sets_since")
            .query_async(&mut c)
            .await?;
        let until = if since == 0 || since + self.dedupe_ttl_secs <= now {
            0
        } else {
            since + self.dedupe_ttl_secs
        };
        self.legacy_markers_until
            .store(until, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Seals the shard if its window has ended (idempotent).
    pub async fn seal(&self, conn: &mut Conn, shard: u32) -> Result<SealReply, StoreError> {
        let mut inv = SEAL.prepare_invoke();
        for k in self.keys.generation_keys(shard) {
            inv.key(k);
        }
        let (generation, window_start, toggled, redis_now, micros): (String, u64, u8, u64, u64) =
            inv.arg(self.keys.base(shard))
                .arg(self.window_secs)
                .invoke_async(conn)
                .await?;
        Ok(SealReply {
            generation,
            window_start,
            toggled: toggled == 1,
            redis_now,
            redis_now_micros: redis_now * 1_000_000 + micros,
        })
    }

    /// Sealed windows of a shard awaiting delivery, oldest first.
    pub async fn pending(
        &self,
        conn: &mut Conn,
        shard: u32,
    ) -> Result<Vec<PendingWindow>, StoreError> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.pending(shard))
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| PendingWindow::parse(m))
            .collect())
    }

    /// One `HSCAN` step: the next cursor and the (field, value) pairs.
    pub async fn hscan(
        &self,
        conn: &mut Conn,
        key: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(String, String)>), StoreError> {
        let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?;
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            pairs.push((f, v));
        }
        Ok((next, pairs))
    }

    /// One step through a sealed window: the next cursor and each record's field with its exact
    /// total as canonical decimal text (`None` when the stored value cannot be read).
    pub async fn scan_window(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(String, Option<String>)>), StoreError> {
        let key = self.keys.sealed(shard, w);
        let (next, pairs) = self.hscan(conn, &key, cursor, count).await?;
        if !w.exact {
            let out = pairs
                .into_iter()
                .map(|(f, v)| {
                    let a = crate::amount::canonical(&v);
                    (f, a)
                })
                .collect();
            return Ok((next, out));
        }
        let his: Vec<Option<String>> = if pairs.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET")
                .arg(format!("{key}:hi"))
                .arg(pairs.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>())
                .query_async(conn)
                .await?
        };
        let out = pairs
            .into_iter()
            .zip(his)
            .map(|((f, lo), hi)| {
                let a = exact_total(&lo, hi.as_deref().unwrap_or("0"));
                (f, a)
            })
            .collect();
        Ok((next, out))
    }

    /// Deletes delivered records, both limbs in one step.
    pub async fn delivered(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        fields: &[&str],
    ) -> Result<(), StoreError> {
        if fields.is_empty() {
            return Ok(());
        }
        let key = self.keys.sealed(shard, w);
        DELIVERED
            .key(&key)
            .key(format!("{key}:hi"))
            .arg(fields)
            .invoke_async::<i64>(conn)
            .await?;
        Ok(())
    }

    /// Removes a window from the pending set once its hashes are gone, checked and removed in
    /// one script. Returns false if records are still there (a batch failed, or a replay put
    /// records back).
    pub async fn finish_window(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
    ) -> Result<bool, StoreError> {
        let key = self.keys.sealed(shard, w);
        let done: i64 = FINISH_WINDOW
            .key(&key)
            .key(format!("{key}:hi"))
            .key(self.keys.pending(shard))
            .arg(&w.member)
            .invoke_async(conn)
            .await?;
        Ok(done == 1)
    }

    /// Moves rejected records to the window's dead-letter hash.
    pub async fn dead_letter(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        reason_json: &str,
        fields: &[&str],
    ) -> Result<u64, StoreError> {
        let sealed = self.keys.sealed(shard, w);
        let mut inv = DEAD_LETTER.key(&sealed);
        inv.key(format!("{sealed}:hi"))
            .key(self.keys.dead(shard, w))
            .key(self.keys.dead_index(shard))
            .arg(reason_json)
            .arg(&w.member)
            .arg(w.start)
            .arg(if w.exact { "1" } else { "0" });
        for f in fields {
            inv.arg(*f);
        }
        Ok(inv.invoke_async(conn).await?)
    }

    /// Windows of a shard holding dead-lettered records.
    pub async fn dead_windows(
        &self,
        conn: &mut Conn,
        shard: u32,
    ) -> Result<Vec<PendingWindow>, StoreError> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.dead_index(shard))
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| PendingWindow::parse(m))
            .collect())
    }

    /// Moves a window's dead letters back to its sealed hash and marks it pending again.
    pub async fn replay_dead(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
    ) -> Result<u64, StoreError> {
        let sealed = self.keys.sealed(shard, w);
        Ok(REPLAY
            .key(self.keys.dead(shard, w))
            .key(&sealed)
            .key(format!("{sealed}:hi"))
            .key(self.keys.pending(shard))
            .key(self.keys.dead_index(shard))
            .arg(&w.member)
            .arg(w.start)
            .arg(if w.exact { "1" } else { "0" })
            .invoke_async(conn)
            .await?)
    }

    /// Length of a hash.
    pub async fn hlen(&self, conn: &mut Conn, key: &str) -> Result<u64, StoreError> {
        Ok(redis::cmd("HLEN").arg(key).query_async(conn).await?)
    }

    /// Takes the shard's drain lock if it is free.
    pub async fn try_lock(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let r: Option<String> = redis::cmd("SET")
            .arg(self.keys.lock(shard))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(conn)
            .await?;
        Ok(r.is_some())
    }

    /// Extends the lock if we still hold it; false means it was lost.
    pub async fn renew_lock(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let r: i64 = LOCK_RENEW
            .key(self.keys.lock(shard))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(conn)
            .await?;
        Ok(r == 1)
    }

    /// Releases the lock if we still hold it.
    pub async fn release_lock(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
    ) -> Result<(), StoreError> {
        LOCK_RELEASE
            .key(self.keys.lock(shard))
            .arg(token)
            .invoke_async::<i64>(conn)
            .await?;
        Ok(())
    }
}
