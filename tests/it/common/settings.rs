//! The settings a test starts the service with: one Redis, a 3-master cluster, or either
//! ([`Backend`]).

use std::collections::HashMap;

use super::{RedisCluster, RedisServer};

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

/// [`settings`] for a Redis Cluster instead of one Redis.
pub fn cluster_settings(cluster: &RedisCluster, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m = settings(&cluster.nodes[0], extra);
    m.remove("REDIS_URL");
    m.insert("REDIS_CLUSTER_URLS".into(), cluster.urls());
    m
}

/// The Redis a scenario runs against: one server, or a 3-master cluster.
pub enum Backend<'a> {
    Single(&'a RedisServer),
    Cluster(&'a RedisCluster),
}

impl Backend<'_> {
    /// [`settings`] (or [`cluster_settings`]) for this Redis.
    pub fn settings(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        match self {
            Backend::Single(r) => settings(r, extra),
            Backend::Cluster(c) => cluster_settings(c, extra),
        }
    }

    /// Redis time, seconds.
    pub fn now(&self) -> u64 {
        let node = match self {
            Backend::Single(r) => r,
            Backend::Cluster(c) => &c.nodes[0],
        };
        let (now, _): (u64, u64) = node.cmd(&["TIME"]);
        now
    }

    /// The start of shard `s`'s current window (default key prefix).
    pub fn window_of(&self, s: u32) -> Option<u64> {
        let key = pulse_ingestor::store::Keys::new("pulses").window(s);
        match self {
            Backend::Single(r) => r.cmd(&["GET", &key]),
            Backend::Cluster(c) => c.get_u64(&key),
        }
    }
}
