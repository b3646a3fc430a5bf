//! The configuration's sections — Redis, delivery, request limits, security — each read from
//! its own settings.

use std::collections::HashMap;
use std::time::Duration;

use super::reader::Reader;
use super::{CommitMode, env};
use crate::amount::{Amount, SCALE};

/// How to reach Redis and how to use it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// The Redis to use (`REDIS_URL`).
    pub url: String,
    /// Seed nodes of a Redis Cluster (`REDIS_CLUSTER_URLS`, comma separated); when set, the
    /// cluster is used instead of `REDIS_URL`.
    pub cluster_urls: Option<Vec<String>>,
    /// Sentinels and the master's name (`REDIS_SENTINEL_URLS`, `REDIS_SENTINEL_MASTER`).
    pub sentinel: Option<(Vec<String>, String)>,
    /// Replicas a commit must reach before it is acknowledged (`REDIS_WAIT_REPLICAS`).
    pub wait_replicas: u32,
    /// How long a commit waits for them (`REDIS_WAIT_TIMEOUT`).
    pub wait_timeout: Duration,
    /// Pooled multiplexed connections (`REDIS_POOL_SIZE`).
    pub pool_size: usize,
    /// Per-command response timeout (`REDIS_TIMEOUT`).
    pub timeout: Duration,
    /// Become ready although Redis may evict keys (`REDIS_ALLOW_EVICTION=true`): evicted
    /// dedupe markers count re-sends twice, evicted aggregates lose pulses.
    pub allow_eviction: bool,
    /// A commit's shards in one script call (`REDIS_COMMIT=one-call`, the default on one Redis)
    /// or one call per shard (`per-shard`; always so on a cluster).
    pub commit: CommitMode,
}

/// `redis://` (or TLS / unix socket) URLs only.
fn redis_urls(r: &mut Reader<'_>, s: super::Setting, urls: &[String], none: &str) {
    if urls.is_empty() {
        r.fail(s.name, none);
    }
    for u in urls {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            r.fail(s.name, format!("expected redis:// URLs, got {u:?}"));
        }
    }
}

impl RedisConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let url = r.string_or_default(env::REDIS_URL);
        if !["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            r.fail(
                env::REDIS_URL.name,
                format!("expected a redis:// URL, got {url:?}"),
            );
        }
        let cluster_urls = r.list(env::REDIS_CLUSTER_URLS);
        if let Some(urls) = &cluster_urls {
            redis_urls(r, env::REDIS_CLUSTER_URLS, urls, "lists no node");
        }
        let sentinels = r.list(env::REDIS_SENTINEL_URLS);
        let sentinel = match (sentinels, r.string(env::REDIS_SENTINEL_MASTER)) {
            (None, None) => None,
            (Some(urls), Some(master)) => {
                redis_urls(r, env::REDIS_SENTINEL_URLS, &urls, "lists no sentinel");
                Some((urls, master))
            }
            (Some(_), None) => {
                let msg = "is required with REDIS_SENTINEL_URLS";
                r.fail(env::REDIS_SENTINEL_MASTER.name, msg);
                None
            }
            (None, Some(_)) => {
                let msg = "is required with REDIS_SENTINEL_MASTER";
                r.fail(env::REDIS_SENTINEL_URLS.name, msg);
                None
            }
        };
        // Exactly one way to reach Redis.
        let modes = [
            r.raw(env::REDIS_URL.name).is_some(),
            cluster_urls.is_some(),
            sentinel.is_some(),
        ];
        if modes.iter().filter(|m| **m).count() > 1 {
            r.fail(
                env::REDIS_URL.name,
                "set only one of REDIS_URL, REDIS_CLUSTER_URLS and REDIS_SENTINEL_URLS",
            );
        }
        RedisConfig {
            url,
            cluster_urls,
            sentinel,
            wait_replicas: r.count(env::REDIS_WAIT_REPLICAS, 0, 16) as u32,
            wait_timeout: r.duration(env::REDIS_WAIT_TIMEOUT, Duration::from_millis(1)),
            pool_size: r.count(env::REDIS_POOL_SIZE, 1, 1024),
            timeout: r.duration(env::REDIS_TIMEOUT, Duration::from_millis(10)),
            allow_eviction: r.parse(env::REDIS_ALLOW_EVICTION, "true or false"),
            commit: r.choice(env::REDIS_COMMIT),
        }
    }
}

/// Delivery to the Processor.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Downstream Processor (`PROCESSOR_URL`); unset keeps sealed windows pending.
    pub processor_url: Option<String>,
    /// Bearer token sent to the Processor (`PROCESSOR_TOKEN`).
    pub processor_token: Option<String>,
    /// Timeout of one Processor request (`PROCESSOR_TIMEOUT`).
    pub processor_timeout: Duration,
    /// Records per Processor request (`BATCH_SIZE`).
    pub batch_size: usize,
    /// Processor requests in flight per replica (`DELIVERY_CONCURRENCY`).
    pub concurrency: usize,
    /// Cap of the exponential retry backoff (`DELIVERY_MAX_BACKOFF`).
    pub max_backoff: Duration,
    /// Attempts per batch within one drain pass (`DELIVERY_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Pending windows are retried this often (`DRAIN_INTERVAL`).
    pub drain_interval: Duration,
    /// Drain lock lifetime, renewed while draining (`LOCK_TTL`).
    pub lock_ttl: Duration,
}

impl DeliveryConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let processor_url = r.string(env::PROCESSOR_URL);
        if let Some(u) = &processor_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            r.fail(
                env::PROCESSOR_URL.name,
                format!("expected an http:// or https:// URL, got {u:?}"),
            );
        }
        DeliveryConfig {
            processor_url,
            processor_token: {
                let t = r.string(env::PROCESSOR_TOKEN);
                refuse_placeholder(r, env::PROCESSOR_TOKEN.name, t.as_deref());
                t
            },
            processor_timeout: r.duration(env::PROCESSOR_TIMEOUT, Duration::from_millis(10)),
            batch_size: r.count(env::BATCH_SIZE, 1, 100_000),
            concurrency: r.count(env::DELIVERY_CONCURRENCY, 1, 256),
            max_backoff: r.duration(env::DELIVERY_MAX_BACKOFF, Duration::from_millis(1)),
            max_attempts: r.count(env::DELIVERY_MAX_ATTEMPTS, 1, 1_000) as u32,
            drain_interval: r.duration(env::DRAIN_INTERVAL, Duration::from_millis(50)),
            lock_ttl: r.duration(env::LOCK_TTL, Duration::from_millis(300)),
        }
    }
}

/// What one request may be: sizes, amounts, time.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Request body limit in bytes (`MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Pulses per batch request (`MAX_BATCH_ITEMS`).
    pub max_batch_items: usize,
    /// Longest tenant, SKU, unit or pulse id, in bytes (`MAX_FIELD_LEN`).
    pub max_field_len: usize,
    /// Largest `used_amount` accepted (`MAX_AMOUNT`), exact.
    pub max_amount: Amount,
    /// Fractional digits a `used_amount` may have (`AMOUNT_DECIMALS`, at most 12).
    pub amount_decimals: u32,
    /// Units accepted; `None` accepts any (`ALLOWED_UNITS`, comma separated).
    pub allowed_units: Option<Vec<String>>,
    /// Time allowed for a request's headers (`HEADER_READ_TIMEOUT`).
    pub header_read_timeout: Duration,
    /// Time allowed for a whole request, body and commit included (`REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Open connections, at most (`MAX_CONNECTIONS`).
    pub max_connections: usize,
}

impl LimitsConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let max_body_bytes = r.count(env::MAX_BODY_BYTES, 64, 1 << 30);
        let max_batch_items = r.count(env::MAX_BATCH_ITEMS, 1, 1_000_000);
        let max_field_len = r.count(env::MAX_FIELD_LEN, 1, 65_536);
        let amount_decimals = r.count(env::AMOUNT_DECIMALS, 0, SCALE as usize) as u32;
        let ceiling = Amount::from_units(10u128.pow(18 + SCALE));
        let text = r.string_or_default(env::MAX_AMOUNT);
        let max_amount = match Amount::parse_decimal(&text, SCALE, ceiling) {
            Ok(a) if a > Amount::ZERO => a,
            _ => {
                let msg = format!("must be a positive decimal no larger than 1e18, got {text:?}");
                r.fail(env::MAX_AMOUNT.name, msg);
                ceiling
            }
        };
        LimitsConfig {
            max_body_bytes,
            max_batch_items,
            max_field_len,
            max_amount,
            amount_decimals,
            allowed_units: r.list(env::ALLOWED_UNITS),
            header_read_timeout: r.duration(env::HEADER_READ_TIMEOUT, Duration::from_millis(100)),
            request_timeout: r.duration(env::REQUEST_TIMEOUT, Duration::from_millis(100)),
            max_connections: r.count(env::MAX_CONNECTIONS, 1, 1_000_000),
        }
    }
}

fn refuse_placeholder(r: &mut Reader<'_>, name: &str, secret: Option<&str>) {
    if secret.is_some_and(crate::tenancy::is_placeholder) {
        r.fail(
            name,
            "is the placeholder shipped in the manifests: set a secret of your own (e.g. `openssl rand -hex 32`), or leave it unset",
        );
    }
}

/// Who may do what: the admin token, API keys, per-tenant rate limits.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// Required bearer token for `/admin/*` (`ADMIN_TOKEN`); unset leaves them open.
    pub admin_token: Option<String>,
    /// File of SHA-256 key hashes bound to tenants (`API_KEYS_FILE`); unset: no keys needed.
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Default per-tenant limit (`RATE_LIMIT` pulses/s, `RATE_LIMIT_BURST`); unset: no limit.
    pub rate_limit: Option<crate::tenancy::Limit>,
    /// Per-tenant limits (`RATE_LIMIT_OVERRIDES`, `tenant=rate[:burst],...`).
    pub rate_limit_overrides: HashMap<String, crate::tenancy::Limit>,
    /// Replicas sharing the limits (`RATE_LIMIT_REPLICAS`); each enforces its share.
    pub rate_limit_replicas: u32,
}

impl SecurityConfig {
    pub(super) fn read(r: &mut Reader<'_>) -> Self {
        let admin_token = r.string(env::ADMIN_TOKEN);
        refuse_placeholder(r, env::ADMIN_TOKEN.name, admin_token.as_deref());
        let api_keys_file = r.string(env::API_KEYS_FILE).map(std::path::PathBuf::from);
        let rate = r.raw(env::RATE_LIMIT.name).map(str::to_string);
        let burst = r.count_or(env::RATE_LIMIT_BURST, 0, 0, 10_000_000) as u32;
        let rate_limit = match rate {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x > 0.0 && x.is_finite() => Some(crate::tenancy::Limit {
                    per_second: x,
                    // Default burst: one second's worth.
                    burst: if burst > 0 {
                        burst
                    } else {
                        x.ceil().max(1.0) as u32
                    },
                }),
                _ => {
                    let msg = format!("expected pulses per second (> 0), got {v:?}");
                    r.fail(env::RATE_LIMIT.name, msg);
                    None
                }
            },
        };
        let default_burst = rate_limit.map_or(burst.max(1), |l| l.burst);
        let rate_limit_overrides = match r.string(env::RATE_LIMIT_OVERRIDES) {
            None => HashMap::new(),
            Some(s) => crate::tenancy::parse_overrides(&s, default_burst).unwrap_or_else(|e| {
                r.fail(env::RATE_LIMIT_OVERRIDES.name, e);
                HashMap::new()
            }),
        };
        SecurityConfig {
            admin_token,
            api_keys_file,
            rate_limit,
            rate_limit_overrides,
            rate_limit_replicas: r.count(env::RATE_LIMIT_REPLICAS, 1, 10_000) as u32,
        }
    }
}
