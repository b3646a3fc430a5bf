//! Redis: the connection, the key layout and the Lua scripts — one job per file.
//!
//! - [`conn`]: one Redis, a Sentinel-discovered master or a Cluster behind one [`Conn`].
//! - [`keys`]: the key layout and a pulse's storage identity (field, shard, digest, record id).
//! - [`scripts`]: the Lua scripts (`scripts/*.lua`).
//! - [`write`]: counting a commit exactly once, and sealing at the boundary.
//! - [`window`], [`dead_letter`], [`lock`]: draining sealed windows.
//! - [`deployment`]: the shard count in use, live replicas, eviction policy, rejections.
//! - [`usage`], [`reshard`]: live usage of one tenant; changing `SHARDS`.
//! - [`in_force`]: the window the scripts are writing into, and the recorded one after it.
//!
//! Every key of shard `s` starts with the hash tag `{<prefix>:<s>}` (invariant 10), so each
//! script touches one slot and the same code runs on Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{PoolConfig, Runtime, Timeouts};

use crate::config::Config;

pub mod conn;
pub mod dead_letter;
pub mod deployment;
pub mod error;
pub mod in_force;
pub mod keys;
pub mod lock;
pub mod reshard;
mod scripts;
pub mod usage;
pub mod window;
pub mod write;

pub use conn::Conn;
use conn::{ClusterPool, Pools, SentinelPool};
pub use dead_letter::{DeadLetter, dead_letter_total};
pub use error::{LateRefusal, StoreError};
pub use in_force::WindowInForce;
pub use keys::{Keys, PendingWindow};
pub use window::{LateLimits, exact_total};
pub use write::{Placement, SealReply, WriteItem, WriteReply, commit_token_ttl};

/// The Redis store of one deployment.
#[derive(Clone)]
pub struct Store {
    pool: Pools,
    pub keys: Keys,
    pub shards: u32,
    pub window_secs: u64,
    /// `WINDOW_OFFSET`, seconds.
    pub window_offset_secs: u64,
    dedupe_ttl_secs: u64,
    late_max_age_secs: u64,
    late_pulses: crate::config::LatePulses,
    max_future_skew_secs: u64,
    /// Redis time minus local time (ms), as last seen: where the edge checks timestamps.
    clock_offset_ms: Arc<std::sync::atomic::AtomicI64>,
    timeout: Duration,
    /// Bumped whenever a connection failure is seen anywhere, so that every holder of a
    /// long-lived connection (the commit workers) replaces it before its next use instead of
    /// finding out with a failed write.
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// This process' id among the live replicas.
    instance: Arc<str>,
    /// See [`Store::marker_sets_until`].
    marker_sets_until: Arc<std::sync::atomic::AtomicU64>,
    /// Set once [`Store::check_layout`] found nothing of the float layout: until then nothing
    /// is written (a replica that started while Redis was unreachable checks when it returns).
    layout_checked: Arc<std::sync::atomic::AtomicBool>,
    /// Dedupe markers per slot hash (`scripts/write.lua`, MARKS_PER_SLOT).
    marks_per_slot: Arc<std::sync::atomic::AtomicU32>,
    commit_per_shard: bool,
    /// The settings this replica was started with explicitly: applied at start, or — when Redis
    /// was unreachable then — by the scheduler before anything is written.
    explicit: Arc<deployment::Recorded>,
    /// One Redis: its client, for connections of their own ([`Store::dedicated_conn`]).
    direct: Option<redis::Client>,
}

impl Store {
    /// The window length and offset as the scripts take them: `"<len>:<offset>"`.
    pub(crate) fn window_arg(&self) -> String {
        format!("{}:{}", self.window_secs, self.window_offset_secs)
    }

    /// Redis time (Unix ms) as estimated from the local clock and the offset last seen.
    pub fn redis_now_ms(&self) -> i64 {
        let local = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        local
            + self
                .clock_offset_ms
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records Redis' time (µs) as just read, for [`Store::redis_now_ms`].
    pub fn saw_redis_time(&self, redis_micros: u64) {
        let local = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.clock_offset_ms.store(
            (redis_micros / 1000) as i64 - local,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Builds the pool; connections are made lazily, so this succeeds while Redis is down.
    pub fn new(cfg: &Config) -> Result<Self, StoreError> {
        let mut pc = PoolConfig::new(cfg.redis.pool_size);
        pc.timeouts = Timeouts {
            wait: Some(cfg.redis.timeout),
            create: Some(cfg.redis.timeout),
            recycle: Some(cfg.redis.timeout),
        };
        let pool = match (&cfg.redis.cluster_urls, &cfg.redis.sentinel) {
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
                    url: Some(cfg.redis.url.clone()),
                    connection: None,
                    pool: Some(pc),
                }
                .create_pool(Some(Runtime::Tokio1))
                .map_err(|e| StoreError::Pool(e.to_string()))?,
            ),
            (Some(urls), _) => {
                let client = redis::cluster::ClusterClient::builder(urls.clone())
                    .connection_timeout(cfg.redis.timeout)
                    .response_timeout(cfg.redis.timeout)
                    .build()?;
                Pools::Cluster(Arc::new(ClusterPool {
                    client,
                    conn: tokio::sync::Mutex::new(None),
                }))
            }
        };
        Ok(Store {
            direct: match &pool {
                Pools::Single(_) => Some(redis::Client::open(cfg.redis.url.as_str())?),
                _ => None,
            },
            pool,
            keys: Keys::new(&cfg.key_prefix),
            shards: cfg.shards,
            window_secs: cfg.window_secs(),
            dedupe_ttl_secs: cfg.dedupe_ttl.as_secs().max(1),
            window_offset_secs: cfg.window_offset.as_secs(),
            late_max_age_secs: cfg.late_max_age.as_secs(),
            late_pulses: cfg.late_pulses,
            max_future_skew_secs: cfg.max_future_skew.as_secs(),
            clock_offset_ms: Default::default(),
            timeout: cfg.redis.timeout,
            epoch: Default::default(),
            instance: hex::encode(rand::random::<[u8; 8]>()).into(),
            // Until `init_markers` says otherwise, consult the previous release's marker sets too.
            marker_sets_until: Arc::new(u64::MAX.into()),
            layout_checked: Default::default(),
            marks_per_slot: Arc::new(64.into()),
            commit_per_shard: cfg.redis.commit == crate::config::CommitMode::PerShard,
            explicit: Arc::new(deployment::Recorded::explicit_in(cfg)),
        })
    }
}
