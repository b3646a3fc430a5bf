//! Typed configuration, read from environment variables (and `.env`, loaded by `main` only).
//!
//! Every setting is declared once (`settings!`): its variable, the default users see (parsed
//! from that same text) and its meaning, with the reason for the default. Parsing collects *all*
//! problems and reports them together, so a bad `.env` is fixed in one go (exit code 64).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// One documented setting, as `--help` lists it.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    /// The default as users read it ("" when unset by default).
    pub default: &'static str,
    pub help: &'static str,
}

/// Declares every setting once — its variable (the identifier), the default users see and
/// its meaning — as a const in [`env`], and lists them all in [`SETTINGS`] in this order, which
/// is the order of `--help` and `example.env`. `Config::from_map` reads each by its const and
/// parses the default from the same text.
macro_rules! settings {
    ($($(#[doc = $doc:literal])* $id:ident = $default:literal, $help:literal;)*) => {
        /// Every setting: one vocabulary across binaries, compose file, manifests and docs.
        pub mod env {
            use super::Setting;
            $(
                $(#[doc = $doc])*
                pub const $id: Setting = Setting {
                    name: stringify!($id),
                    default: $default,
                    help: $help,
                };
            )*
        }

        /// Every setting the service reads, in the order `--help` and `example.env` list them.
        /// Tests check that `Config::from_map` reads exactly these names, that each shown
        /// default is the real one, and that `example.env` lists exactly these.
        pub const SETTINGS: &[Setting] = &[$(env::$id),*];
    };
}

settings! {
    /// All interfaces, the port the earlier Go ingestor used.
    LISTEN_ADDR = "0.0.0.0:8070", "HTTP API address";
    METRICS_ADDR = "", "Serve /metrics on this address instead of the API address";
    /// A local Redis, as `scripts/run_ingestor.sh` starts one.
    REDIS_URL = "redis://127.0.0.1:6379", "The Redis to use";
    REDIS_CLUSTER_URLS = "", "Comma-separated seed nodes of a Redis Cluster; replaces REDIS_URL";
    /// Sentinel mode: the master is found through these sentinels, and again after a failover.
    REDIS_SENTINEL_URLS = "", "Comma-separated Redis Sentinels (redis://host:26379); replaces REDIS_URL";
    REDIS_SENTINEL_MASTER = "", "The master's name the sentinels monitor (with REDIS_SENTINEL_URLS)";
    /// Off by default: replication is asynchronous, and waiting costs a round trip per commit.
    REDIS_WAIT_REPLICAS = "0", "Acknowledge a commit only once this many replicas have it (Redis WAIT); 0: do not wait";
    REDIS_WAIT_TIMEOUT = "200ms", "How long a commit waits for its replicas; short of them it is answered 503 (may have been counted)";
    /// Connections are multiplexed; a few per core keeps Redis busy without head-of-line waits.
    REDIS_POOL_SIZE = "16", "Pooled multiplexed Redis connections";
    /// Long enough for a loaded Redis, short enough that a client gets its 503 before it gives up.
    REDIS_TIMEOUT = "2s", "Response timeout of one Redis command";
    REDIS_ALLOW_EVICTION = "false", "Become ready although Redis' maxmemory-policy may evict keys (breaks exactly-once)";
    REDIS_COMMIT = "one-call", "one-call: a commit's shards in one script call (one Redis); per-shard: one call per shard (always so on a cluster)";
    KEY_PREFIX = "pulses", "Key namespace";
    /// 16 shards spread one Redis Cluster's masters evenly and keep each drain small.
    SHARDS = "16", "Shards (hash tags); must match the deployment's (see `reshard`)";
    /// Billing is hourly.
    WINDOW = "1h", "Aggregation window";
    /// The earlier sender's delay; correctness does not depend on it (writes are atomic).
    STABILISATION_DELAY = "5s", "Wait after a window ends before delivering it";
    PROCESSOR_URL = "", "Processor URL; unset keeps sealed windows in Redis";
    PROCESSOR_TOKEN = "", "Bearer token sent to the Processor";
    PROCESSOR_TIMEOUT = "10s", "Timeout of one Processor request";
    /// The earlier sender's batch size, which the Processor is known to accept.
    BATCH_SIZE = "500", "Records per Processor request";
    DELIVERY_CONCURRENCY = "4", "Processor requests in flight per replica";
    /// Backoff between delivery retries is capped so a recovered Processor is found quickly.
    DELIVERY_MAX_BACKOFF = "30s", "Cap of the delivery retry backoff";
    /// Attempts for one batch within one drain pass; the window stays pending and the next pass
    /// tries again, so nothing is given up.
    DELIVERY_MAX_ATTEMPTS = "8", "Attempts per batch within one drain pass";
    /// How often pending windows are retried between boundaries.
    DRAIN_INTERVAL = "10s", "How often pending windows are retried";
    /// A dead holder's lock frees within this time; renewed every third of it.
    LOCK_TTL = "15s", "Drain lock lifetime, renewed while draining";
    /// Pulses waiting for a worker; the earlier service's buffer size.
    QUEUE_CAPACITY = "50000", "Pulses queued or being committed; 503 when full";
    WORKERS = "number of CPUs", "Commit workers";
    /// A few hundred µs doubles the pulses per Redis call under load (each call costs Redis
    /// ~10 µs whatever it carries) for a fraction of the durable commit's latency.
    COMMIT_LINGER = "200us", "Under load, a nearly empty commit waits up to this for more pulses (0s: never)";
    /// Pulses per worker commit: large enough to amortise a round trip, small enough that one
    /// Redis script call stays well under a millisecond.
    WORKER_BATCH = "2048", "Most pulses one worker commits at once";
    ACK_MODE = "durable", "durable: 202 after the commit; enqueued: 202 once queued";
    /// Fits a batch of `MAX_BATCH_ITEMS` pulses with long names.
    MAX_BODY_BYTES = "4194304", "Largest request body in bytes (413)";
    MAX_BATCH_ITEMS = "10000", "Most pulses in one batch request (413)";
    MAX_FIELD_LEN = "256", "Longest tenant, SKU, unit or pulse id in characters (422)";
    /// Far above any real usage figure; a key's window total stays exact up to
    /// `amount::MAX_TOTAL` (≈ 4.6e21), millions of maximal pulses away.
    MAX_AMOUNT = "1000000000000000", "Largest used_amount, exact decimal (422)";
    /// Nanounits: finer than any billing unit in use, and 10^18 × 10^9 stays exact.
    AMOUNT_DECIMALS = "9", "Fractional digits a used_amount may have, 0-12 (422 beyond; never rounded)";
    ALLOWED_UNITS = "", "Comma-separated unit allow-list; unset accepts any";
    /// Client retries within an hour are recognised.
    DEDUPE_TTL = "1h", "How long a pulse_id or Idempotency-Key is remembered";
    RETRY_AFTER = "1s", "Retry-After sent with 503";
    SHUTDOWN_TIMEOUT = "30s", "Graceful shutdown finishes within this";
    /// A client gets this long to send its request headers (slow-loris protection).
    HEADER_READ_TIMEOUT = "10s", "Time allowed for a request's headers";
    /// Whole request, body included; well above a durable commit (`REDIS_TIMEOUT`).
    REQUEST_TIMEOUT = "30s", "Time allowed for a whole request, commit included";
    /// Open connections per replica; further clients wait in the listen backlog.
    MAX_CONNECTIONS = "10000", "Open connections per replica";
    ADMIN_TOKEN = "", "Bearer token required by /admin/*; unset leaves them open";
    API_KEYS_FILE = "", "File of SHA-256 API key hashes bound to tenants; unset: no keys";
    RATE_LIMIT = "", "Default per-tenant limit, pulses/s; unset: none";
    RATE_LIMIT_BURST = "one second's worth", "Burst of the default limit";
    RATE_LIMIT_OVERRIDES = "", "Per-tenant limits: tenant=rate[:burst],...";
    RATE_LIMIT_REPLICAS = "1", "Replicas sharing the limits; each enforces its share";
    LOG_FORMAT = "text", "text or json";
}

/// When a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// 202 after the pulse is committed to Redis.
    Durable,
    /// 202 once queued, as the earlier Go ingestor did; the queue is lost on a crash.
    Enqueued,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The service's whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP API address (`LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// Serve `/metrics` here instead of on the API address (`METRICS_ADDR`).
    pub metrics_addr: Option<SocketAddr>,
    /// The Redis to use (`REDIS_URL`).
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster (`REDIS_CLUSTER_URLS`, comma separated); when set, the
    /// cluster is used instead of `REDIS_URL`.
    pub redis_cluster_urls: Option<Vec<String>>,
    /// Sentinels and the master's name (`REDIS_SENTINEL_URLS`, `REDIS_SENTINEL_MASTER`).
    pub redis_sentinel: Option<(Vec<String>, String)>,
    /// Replicas a commit must reach before it is acknowledged (`REDIS_WAIT_REPLICAS`).
    pub redis_wait_replicas: u32,
    /// How long a commit waits for them (`REDIS_WAIT_TIMEOUT`).
    pub redis_wait_timeout: Duration,
    /// Pooled multiplexed connections (`REDIS_POOL_SIZE`).
    pub redis_pool_size: usize,
    /// Per-command response timeout (`REDIS_TIMEOUT`).
    pub redis_timeout: Duration,
    /// Key namespace (`KEY_PREFIX`); keys are `{<prefix>:<shard>}:...`.
    pub key_prefix: String,
    /// Number of shards (`SHARDS`).
    pub shards: u32,
    /// Aggregation window (`WINDOW`), whole seconds.
    pub window: Duration,
    /// Wait after a window ends before its drain (`STABILISATION_DELAY`).
    pub stabilisation_delay: Duration,
    /// Downstream Processor (`PROCESSOR_URL`); unset keeps sealed windows pending.
    pub processor_url: Option<String>,
    /// Bearer token sent to the Processor (`PROCESSOR_TOKEN`).
    pub processor_token: Option<String>,
    /// Timeout of one Processor request (`PROCESSOR_TIMEOUT`).
    pub processor_timeout: Duration,
    /// Records per Processor request (`BATCH_SIZE`).
    pub batch_size: usize,
    /// Processor requests in flight per replica (`DELIVERY_CONCURRENCY`).
    pub delivery_concurrency: usize,
    /// Cap of the exponential retry backoff (`DELIVERY_MAX_BACKOFF`).
    pub delivery_max_backoff: Duration,
    /// Attempts per batch within one drain pass (`DELIVERY_MAX_ATTEMPTS`).
    pub delivery_max_attempts: u32,
    /// Pending windows are retried this often (`DRAIN_INTERVAL`).
    pub drain_interval: Duration,
    /// Drain lock lifetime, renewed while draining (`LOCK_TTL`).
    pub lock_ttl: Duration,
    /// Pulses queued or being committed, at most (`QUEUE_CAPACITY`).
    pub queue_capacity: usize,
    /// Commit workers (`WORKERS`).
    pub workers: usize,
    /// Pulses per worker commit, at most (`WORKER_BATCH`).
    pub worker_batch: usize,
    /// How long a nearly empty commit may wait for more pulses under load (`COMMIT_LINGER`).
    pub commit_linger: Duration,
    /// When requests are answered (`ACK_MODE`).
    pub ack_mode: AckMode,
    /// Request body limit in bytes (`MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Pulses per batch request (`MAX_BATCH_ITEMS`).
    pub max_batch_items: usize,
    /// Longest tenant, SKU, unit or pulse id, in bytes (`MAX_FIELD_LEN`).
    pub max_field_len: usize,
    /// Largest `used_amount` accepted (`MAX_AMOUNT`), exact.
    pub max_amount: crate::amount::Amount,
    /// Fractional digits a `used_amount` may have (`AMOUNT_DECIMALS`, at most 12).
    pub amount_decimals: u32,
    /// A commit's shards in one script call (`REDIS_COMMIT=one-call`, the default on one Redis)
    /// or one call per shard (`per-shard`; always so on a cluster).
    pub redis_commit_per_shard: bool,
    /// Become ready although Redis may evict keys (`REDIS_ALLOW_EVICTION=true`): evicted
    /// dedupe markers count re-sends twice, evicted aggregates lose pulses.
    pub redis_allow_eviction: bool,
    /// Units accepted; `None` accepts any (`ALLOWED_UNITS`, comma separated).
    pub allowed_units: Option<Vec<String>>,
    /// How long a pulse id is remembered (`DEDUPE_TTL`).
    pub dedupe_ttl: Duration,
    /// `Retry-After` sent with 503 (`RETRY_AFTER`).
    pub retry_after: Duration,
    /// Shutdown finishes within this (`SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: Duration,
    /// Time allowed for a request's headers (`HEADER_READ_TIMEOUT`).
    pub header_read_timeout: Duration,
    /// Time allowed for a whole request, body and commit included (`REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Open connections, at most (`MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Required bearer token for `/admin/*` (`ADMIN_TOKEN`); unset leaves them open.
    pub admin_token: Option<String>,
    /// `text` or `json` (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// File of SHA-256 key hashes bound to tenants (`API_KEYS_FILE`); unset: no keys needed.
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Default per-tenant limit (`RATE_LIMIT` pulses/s, `RATE_LIMIT_BURST`); unset: no limit.
    pub rate_limit: Option<crate::tenancy::Limit>,
    /// Per-tenant limits (`RATE_LIMIT_OVERRIDES`, `tenant=rate[:burst],...`).
    pub rate_limit_overrides: HashMap<String, crate::tenancy::Limit>,
    /// Replicas sharing the limits (`RATE_LIMIT_REPLICAS`); each enforces its share.
    pub rate_limit_replicas: u32,
}

/// Every problem found in the configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for (var, msg) in &self.problems {
            writeln!(f, "  {var}: {msg}")?;
        }
        Ok(())
    }
}

struct Reader<'a> {
    vars: &'a HashMap<String, String>,
    problems: Vec<(String, String)>,
    /// Every name looked up (tests compare it with [`SETTINGS`]).
    read: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Reader<'_> {
    fn raw(&self, name: &str) -> Option<&str> {
        self.read.borrow_mut().insert(name.to_string());
        self.vars
            .get(name)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    fn fail(&mut self, name: &str, msg: impl Into<String>) {
        self.problems.push((name.to_string(), msg.into()));
    }

    /// The setting's default, parsed from the text users see.
    fn default_of<T: std::str::FromStr>(s: Setting) -> T {
        s.default
            .parse()
            .unwrap_or_else(|_| panic!("the default of {} parses", s.name))
    }

    fn parse<T: std::str::FromStr>(&mut self, s: Setting, what: &str) -> T {
        match self.raw(s.name) {
            None => Self::default_of(s),
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => {
                    self.fail(s.name, format!("expected {what}, got {v:?}"));
                    Self::default_of(s)
                }
            },
        }
    }

    /// A count whose default is computed (`default` stands for the setting's text).
    fn count_or(&mut self, s: Setting, default: usize, min: usize, max: usize) -> usize {
        let Some(v) = self.raw(s.name) else {
            return default;
        };
        match v.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => n,
            Ok(n) => {
                self.fail(s.name, format!("must be between {min} and {max}, got {n}"));
                default
            }
            Err(_) => {
                let msg = format!("expected a whole number, got {v:?}");
                self.fail(s.name, msg);
                default
            }
        }
    }

    fn count(&mut self, s: Setting, min: usize, max: usize) -> usize {
        let v: usize = self.parse(s, "a whole number");
        if v < min || v > max {
            self.fail(s.name, format!("must be between {min} and {max}, got {v}"));
            return Self::default_of(s);
        }
        v
    }

    fn duration(&mut self, s: Setting, min: Duration) -> Duration {
        let default = humantime::parse_duration(s.default)
            .unwrap_or_else(|_| panic!("the default of {} parses", s.name));
        let Some(v) = self.raw(s.name) else {
            return default;
        };
        match humantime::parse_duration(v) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.fail(
                    s.name,
                    format!("must be at least {}", humantime::format_duration(min)),
                );
                default
            }
            Err(e) => {
                self.fail(
                    s.name,
                    format!(
                        "expected a duration with a unit such as 500ms, 5s or 1h, got {v:?} ({e})"
                    ),
                );
                default
            }
        }
    }

    /// The value, or the setting's default text.
    fn string_or_default(&self, s: Setting) -> String {
        self.string(s).unwrap_or_else(|| s.default.to_string())
    }

    fn string(&self, s: Setting) -> Option<String> {
        self.raw(s.name).map(str::to_string)
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Builds a configuration from a map of variables (tests use this, never the environment).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut r = Reader {
            vars,
            problems: Vec::new(),
            read: Default::default(),
        };
        Self::read(&mut r)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ConfigError> {
        let listen_addr = r.parse(env::LISTEN_ADDR, "an address such as 0.0.0.0:8070");
        let metrics_addr = match r.string(env::METRICS_ADDR) {
            None => None,
            Some(v) => match v.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.fail(
                        env::METRICS_ADDR.name,
                        format!("expected an address such as 127.0.0.1:9100, got {v:?}"),
                    );
                    None
                }
            },
        };
        let redis_url = r.string_or_default(env::REDIS_URL);
        if !(redis_url.starts_with("redis://")
            || redis_url.starts_with("rediss://")
            || redis_url.starts_with("redis+unix://")
            || redis_url.starts_with("unix://"))
        {
            r.fail(
                env::REDIS_URL.name,
                format!("expected a redis:// URL, got {redis_url:?}"),
            );
        }
        let redis_cluster_urls = r.string(env::REDIS_CLUSTER_URLS).map(|s| {
            s.split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>()
        });
        if let Some(urls) = &redis_cluster_urls {
            if urls.is_empty() {
                r.fail(env::REDIS_CLUSTER_URLS.name, "lists no node");
            }
            for u in urls {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    r.fail(
                        env::REDIS_CLUSTER_URLS.name,
                        format!("expected redis:// URLs, got {u:?}"),
                    );
                }
            }
        }
        let split = |v: String| {
            v.split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>()
        };
        let sentinels = r.string(env::REDIS_SENTINEL_URLS).map(split);
        let sentinel_master = r.string(env::REDIS_SENTINEL_MASTER);
        let redis_sentinel = match (sentinels, sentinel_master) {
            (None, None) => None,
            (Some(urls), Some(master)) => {
                if urls.is_empty() {
                    r.fail(env::REDIS_SENTINEL_URLS.name, "lists no sentinel");
                }
                for u in &urls {
                    if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                        let msg = format!("expected redis:// URLs, got {u:?}");
                        r.fail(env::REDIS_SENTINEL_URLS.name, msg);
                    }
                }
                Some((urls, master))
            }
            (Some(_), None) => {
                r.fail(
                    env::REDIS_SENTINEL_MASTER.name,
                    "is required with REDIS_SENTINEL_URLS",
                );
                None
            }
            (None, Some(_)) => {
                r.fail(
                    env::REDIS_SENTINEL_URLS.name,
                    "is required with REDIS_SENTINEL_MASTER",
                );
                None
            }
        };
        // Exactly one way to reach Redis.
        let modes = [
            r.raw(env::REDIS_URL.name).is_some(),
            redis_cluster_urls.is_some(),
            redis_sentinel.is_some(),
        ];
        if modes.iter().filter(|m| **m).count() > 1 {
            r.fail(
                env::REDIS_URL.name,
                "set only one of REDIS_URL, REDIS_CLUSTER_URLS and REDIS_SENTINEL_URLS",
            );
        }
        let redis_wait_replicas = r.count(env::REDIS_WAIT_REPLICAS, 0, 16) as u32;
        let redis_wait_timeout = r.duration(env::REDIS_WAIT_TIMEOUT, Duration::from_millis(1));
        let redis_pool_size = r.count(env::REDIS_POOL_SIZE, 1, 1024);
        let redis_timeout = r.duration(env::REDIS_TIMEOUT, Duration::from_millis(10));
        let key_prefix = r.string_or_default(env::KEY_PREFIX);
        if key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_control) {
            r.fail(
                env::KEY_PREFIX.name,
                "must not contain '{', '}' or control characters",
            );
        }
        let shards = r.count(env::SHARDS, 1, 16_384) as u32;
        let window = r.duration(env::WINDOW, Duration::from_secs(1));
        if window.subsec_nanos() != 0 {
            r.fail(env::WINDOW.name, "must be a whole number of seconds");
        }
        let stabilisation_delay = r.duration(env::STABILISATION_DELAY, Duration::ZERO);
        let processor_url = r.string(env::PROCESSOR_URL);
        if let Some(u) = &processor_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            r.fail(
                env::PROCESSOR_URL.name,
                format!("expected an http:// or https:// URL, got {u:?}"),
            );
        }
        let processor_token = r.string(env::PROCESSOR_TOKEN);
        let processor_timeout = r.duration(env::PROCESSOR_TIMEOUT, Duration::from_millis(10));
        let batch_size = r.count(env::BATCH_SIZE, 1, 100_000);
        let delivery_concurrency = r.count(env::DELIVERY_CONCURRENCY, 1, 256);
        let delivery_max_backoff = r.duration(env::DELIVERY_MAX_BACKOFF, Duration::from_millis(1));
        let delivery_max_attempts = r.count(env::DELIVERY_MAX_ATTEMPTS, 1, 1_000) as u32;
        let drain_interval = r.duration(env::DRAIN_INTERVAL, Duration::from_millis(50));
        let lock_ttl = r.duration(env::LOCK_TTL, Duration::from_millis(300));
        let queue_capacity = r.count(env::QUEUE_CAPACITY, 1, 10_000_000);
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = r.count_or(env::WORKERS, cpus, 1, 1024);
        let worker_batch = r.count(env::WORKER_BATCH, 1, 100_000);
        let commit_linger = r.duration(env::COMMIT_LINGER, Duration::ZERO);
        if commit_linger > Duration::from_millis(10) {
            r.fail(env::COMMIT_LINGER.name, "must be at most 10ms");
        }
        let ack_mode = match r
            .raw(env::ACK_MODE.name)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("durable") => AckMode::Durable,
            Some("enqueued") => AckMode::Enqueued,
            Some(other) => {
                r.fail(
                    env::ACK_MODE.name,
                    format!("expected durable or enqueued, got {other:?}"),
                );
                AckMode::Durable
            }
        };
        let max_body_bytes = r.count(env::MAX_BODY_BYTES, 64, 1 << 30);
        let max_batch_items = r.count(env::MAX_BATCH_ITEMS, 1, 1_000_000);
        let max_field_len = r.count(env::MAX_FIELD_LEN, 1, 65_536);
        let amount_decimals =
            r.count(env::AMOUNT_DECIMALS, 0, crate::amount::SCALE as usize) as u32;
        let ceiling = crate::amount::Amount::from_units(10u128.pow(18 + crate::amount::SCALE));
        let max_amount_text = r.string_or_default(env::MAX_AMOUNT);
        let max_amount = match crate::amount::Amount::parse_decimal(
            &max_amount_text,
            crate::amount::SCALE,
            ceiling,
        ) {
            Ok(a) if a > crate::amount::Amount::ZERO => a,
            _ => {
                r.fail(
                    env::MAX_AMOUNT.name,
                    format!(
                        "must be a positive decimal no larger than 1e18, got {max_amount_text:?}"
                    ),
                );
                ceiling
            }
        };
        let redis_allow_eviction = r.parse(env::REDIS_ALLOW_EVICTION, "true or false");
        let redis_commit_per_shard = match r.raw(env::REDIS_COMMIT.name) {
            None | Some("one-call") => false,
            Some("per-shard") => true,
            Some(other) => {
                let msg = format!("expected one-call or per-shard, got {other:?}");
                r.fail(env::REDIS_COMMIT.name, msg);
                false
            }
        };
        let allowed_units = r.string(env::ALLOWED_UNITS).map(|s| {
            s.split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>()
        });
        let dedupe_ttl = r.duration(env::DEDUPE_TTL, Duration::from_secs(1));
        let retry_after = r.duration(env::RETRY_AFTER, Duration::from_secs(1));
        let shutdown_timeout = r.duration(env::SHUTDOWN_TIMEOUT, Duration::from_millis(100));
        let header_read_timeout = r.duration(env::HEADER_READ_TIMEOUT, Duration::from_millis(100));
        let request_timeout = r.duration(env::REQUEST_TIMEOUT, Duration::from_millis(100));
        if request_timeout <= redis_timeout {
            r.fail(
                env::REQUEST_TIMEOUT.name,
                "must be longer than REDIS_TIMEOUT, or durable commits would time out",
            );
        }
        let max_connections = r.count(env::MAX_CONNECTIONS, 1, 1_000_000);
        let admin_token = r.string(env::ADMIN_TOKEN);
        let log_format = match r
            .raw(env::LOG_FORMAT.name)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                r.fail(
                    env::LOG_FORMAT.name,
                    format!("expected text or json, got {other:?}"),
                );
                LogFormat::Text
            }
        };
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
                    r.fail(
                        env::RATE_LIMIT.name,
                        format!("expected pulses per second (> 0), got {v:?}"),
                    );
                    None
                }
            },
        };
        let rate_limit_overrides = match r.string(env::RATE_LIMIT_OVERRIDES) {
            None => HashMap::new(),
            Some(s) => {
                crate::tenancy::parse_overrides(&s, rate_limit.map_or(burst.max(1), |l| l.burst))
                    .unwrap_or_else(|e| {
                        r.fail(env::RATE_LIMIT_OVERRIDES.name, e);
                        HashMap::new()
                    })
            }
        };
        let rate_limit_replicas = r.count(env::RATE_LIMIT_REPLICAS, 1, 10_000) as u32;
        if !r.problems.is_empty() {
            return Err(ConfigError {
                problems: std::mem::take(&mut r.problems),
            });
        }
        Ok(Config {
            listen_addr,
            metrics_addr,
            redis_url,
            redis_cluster_urls,
            redis_sentinel,
            redis_wait_replicas,
            redis_wait_timeout,
            redis_pool_size,
            redis_timeout,
            key_prefix,
            shards,
            window,
            stabilisation_delay,
            processor_url,
            processor_token,
            processor_timeout,
            batch_size,
            delivery_concurrency,
            delivery_max_backoff,
            delivery_max_attempts,
            drain_interval,
            lock_ttl,
            queue_capacity,
            workers,
            worker_batch,
            commit_linger,
            ack_mode,
            max_body_bytes,
            max_batch_items,
            max_field_len,
            max_amount,
            amount_decimals,
            redis_allow_eviction,
            redis_commit_per_shard,
            allowed_units,
            dedupe_ttl,
            retry_after,
            shutdown_timeout,
            header_read_timeout,
            request_timeout,
            max_connections,
            admin_token,
            log_format,
            api_keys_file,
            rate_limit,
            rate_limit_overrides,
            rate_limit_replicas,
        })
    }

    /// The window length in whole seconds, as the scripts use it.
    pub fn window_secs(&self) -> u64 {
        self.window.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::from_map(&HashMap::new()).unwrap();
        assert_eq!(c.window, Duration::from_secs(3600));
        assert_eq!(c.shards, 16);
        assert_eq!(c.batch_size, 500);
        assert_eq!(c.ack_mode, AckMode::Durable);
        assert_eq!(c.listen_addr.port(), 8070);
    }

    #[test]
    fn durations_take_units() {
        let c =
            Config::from_map(&map(&[("WINDOW", "2s"), ("STABILISATION_DELAY", "500ms")])).unwrap();
        assert_eq!(c.window, Duration::from_secs(2));
        assert_eq!(c.stabilisation_delay, Duration::from_millis(500));
    }

    #[test]
    fn every_bad_variable_is_reported_at_once() {
        let err = Config::from_map(&map(&[
            ("WINDOW", "60"),
            ("SHARDS", "zero"),
            ("ACK_MODE", "sometimes"),
            ("PROCESSOR_URL", "ftp://x"),
            ("WINDOW", "1500ms"),
        ]))
        .unwrap_err();
        let vars: Vec<_> = err.problems.iter().map(|(v, _)| v.as_str()).collect();
        assert!(vars.contains(&"WINDOW"), "{err}");
        assert!(vars.contains(&"SHARDS"), "{err}");
        assert!(vars.contains(&"ACK_MODE"), "{err}");
        assert!(vars.contains(&"PROCESSOR_URL"), "{err}");
    }

    #[test]
    fn settings_list_exactly_what_is_read_with_the_real_defaults() {
        let mut r = Reader {
            vars: &HashMap::new(),
            problems: Vec::new(),
            read: Default::default(),
        };
        let _ = Config::read(&mut r);
        let read: Vec<String> = r.read.into_inner().into_iter().collect();
        let mut listed: Vec<String> = SETTINGS.iter().map(|s| s.name.to_string()).collect();
        listed.sort();
        assert_eq!(read, listed);
        // Setting every shown default explicitly changes nothing.
        let shown: HashMap<String, String> = SETTINGS
            .iter()
            .filter(|s| !s.default.is_empty() && !s.default.contains(' '))
            .map(|s| (s.name.to_string(), s.default.to_string()))
            .collect();
        let explicit = Config::from_map(&shown).unwrap();
        let implicit = Config::from_map(&HashMap::new()).unwrap();
        assert_eq!(format!("{explicit:?}"), format!("{implicit:?}"));
    }

    #[test]
    fn example_env_lists_every_setting() {
        let text = include_str!("../example.env");
        let mut names: Vec<&str> = text
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .filter_map(|l| l.split_once('=').map(|(n, _)| n))
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .filter(|n| *n != "RUST_LOG")
            .collect();
        names.sort();
        names.dedup();
        let mut listed: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        listed.sort();
        assert_eq!(names, listed);
    }

    #[test]
    fn computed_defaults_report_bad_values_instead_of_panicking() {
        let err =
            Config::from_map(&map(&[("WORKERS", "many"), ("RATE_LIMIT_BURST", "x")])).unwrap_err();
        let vars: Vec<_> = err.problems.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(vars, ["WORKERS", "RATE_LIMIT_BURST"]);
    }

    #[test]
    fn a_window_without_unit_is_refused() {
        let err = Config::from_map(&map(&[("WINDOW", "60")])).unwrap_err();
        assert!(err.to_string().contains("WINDOW"));
    }
}
