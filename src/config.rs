//! Typed configuration, read from environment variables (and `.env`, loaded by `main` only).
//!
//! Every variable name is a const and every default a const with its reason. Parsing collects
//! *all* problems and reports them together, so a bad `.env` is fixed in one go (exit code 64).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Names of the environment variables, one vocabulary across binaries, compose file and docs.
pub mod env {
    pub const LISTEN_ADDR: &str = "LISTEN_ADDR";
    pub const METRICS_ADDR: &str = "METRICS_ADDR";
    pub const REDIS_URL: &str = "REDIS_URL";
    pub const REDIS_CLUSTER_URLS: &str = "REDIS_CLUSTER_URLS";
    pub const REDIS_POOL_SIZE: &str = "REDIS_POOL_SIZE";
    pub const REDIS_TIMEOUT: &str = "REDIS_TIMEOUT";
    pub const KEY_PREFIX: &str = "KEY_PREFIX";
    pub const SHARDS: &str = "SHARDS";
    pub const WINDOW: &str = "WINDOW";
    pub const STABILISATION_DELAY: &str = "STABILISATION_DELAY";
    pub const PROCESSOR_URL: &str = "PROCESSOR_URL";
    pub const PROCESSOR_TOKEN: &str = "PROCESSOR_TOKEN";
    pub const PROCESSOR_TIMEOUT: &str = "PROCESSOR_TIMEOUT";
    pub const BATCH_SIZE: &str = "BATCH_SIZE";
    pub const DELIVERY_CONCURRENCY: &str = "DELIVERY_CONCURRENCY";
    pub const DELIVERY_MAX_BACKOFF: &str = "DELIVERY_MAX_BACKOFF";
    pub const DELIVERY_MAX_ATTEMPTS: &str = "DELIVERY_MAX_ATTEMPTS";
    pub const DRAIN_INTERVAL: &str = "DRAIN_INTERVAL";
    pub const LOCK_TTL: &str = "LOCK_TTL";
    pub const QUEUE_CAPACITY: &str = "QUEUE_CAPACITY";
    pub const WORKERS: &str = "WORKERS";
    pub const WORKER_BATCH: &str = "WORKER_BATCH";
    pub const COMMIT_LINGER: &str = "COMMIT_LINGER";
    pub const ACK_MODE: &str = "ACK_MODE";
    pub const MAX_BODY_BYTES: &str = "MAX_BODY_BYTES";
    pub const MAX_BATCH_ITEMS: &str = "MAX_BATCH_ITEMS";
    pub const MAX_FIELD_LEN: &str = "MAX_FIELD_LEN";
    pub const MAX_AMOUNT: &str = "MAX_AMOUNT";
    pub const AMOUNT_DECIMALS: &str = "AMOUNT_DECIMALS";
    pub const REDIS_COMMIT: &str = "REDIS_COMMIT";
    pub const REDIS_ALLOW_EVICTION: &str = "REDIS_ALLOW_EVICTION";
    pub const ALLOWED_UNITS: &str = "ALLOWED_UNITS";
    pub const DEDUPE_TTL: &str = "DEDUPE_TTL";
    pub const RETRY_AFTER: &str = "RETRY_AFTER";
    pub const SHUTDOWN_TIMEOUT: &str = "SHUTDOWN_TIMEOUT";
    pub const HEADER_READ_TIMEOUT: &str = "HEADER_READ_TIMEOUT";
    pub const REQUEST_TIMEOUT: &str = "REQUEST_TIMEOUT";
    pub const MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
    pub const ADMIN_TOKEN: &str = "ADMIN_TOKEN";
    pub const API_KEYS_FILE: &str = "API_KEYS_FILE";
    pub const RATE_LIMIT: &str = "RATE_LIMIT";
    pub const RATE_LIMIT_BURST: &str = "RATE_LIMIT_BURST";
    pub const RATE_LIMIT_OVERRIDES: &str = "RATE_LIMIT_OVERRIDES";
    pub const RATE_LIMIT_REPLICAS: &str = "RATE_LIMIT_REPLICAS";
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
}

/// One documented setting, as `--help` lists it.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    /// The default as users read it ("" when unset by default).
    pub default: &'static str,
    pub help: &'static str,
}

/// Every setting the service reads, in the order `--help` and `example.env` list them. Tests
/// check that `Config::from_map` reads exactly these names, that each shown default is the real
/// one, and that `example.env` lists exactly these.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: env::LISTEN_ADDR,
        default: "0.0.0.0:8070",
        help: "HTTP API address",
    },
    Setting {
        name: env::METRICS_ADDR,
        default: "",
        help: "Serve /metrics on this address instead of the API address",
    },
    Setting {
        name: env::REDIS_URL,
        default: "redis://127.0.0.1:6379",
        help: "The Redis to use",
    },
    Setting {
        name: env::REDIS_CLUSTER_URLS,
        default: "",
        help: "Comma-separated seed nodes of a Redis Cluster; replaces REDIS_URL",
    },
    Setting {
        name: env::REDIS_POOL_SIZE,
        default: "16",
        help: "Pooled multiplexed Redis connections",
    },
    Setting {
        name: env::REDIS_TIMEOUT,
        default: "2s",
        help: "Response timeout of one Redis command",
    },
    Setting {
        name: env::REDIS_ALLOW_EVICTION,
        default: "false",
        help: "Become ready although Redis' maxmemory-policy may evict keys (breaks exactly-once)",
    },
    Setting {
        name: env::REDIS_COMMIT,
        default: "one-call",
        help: "one-call: a commit's shards in one script call (one Redis); per-shard: one call per shard (always so on a cluster)",
    },
    Setting {
        name: env::KEY_PREFIX,
        default: "pulses",
        help: "Key namespace",
    },
    Setting {
        name: env::SHARDS,
        default: "16",
        help: "Shards (hash tags); must match the deployment's (see `reshard`)",
    },
    Setting {
        name: env::WINDOW,
        default: "1h",
        help: "Aggregation window",
    },
    Setting {
        name: env::STABILISATION_DELAY,
        default: "5s",
        help: "Wait after a window ends before delivering it",
    },
    Setting {
        name: env::PROCESSOR_URL,
        default: "",
        help: "Processor URL; unset keeps sealed windows in Redis",
    },
    Setting {
        name: env::PROCESSOR_TOKEN,
        default: "",
        help: "Bearer token sent to the Processor",
    },
    Setting {
        name: env::PROCESSOR_TIMEOUT,
        default: "10s",
        help: "Timeout of one Processor request",
    },
    Setting {
        name: env::BATCH_SIZE,
        default: "500",
        help: "Records per Processor request",
    },
    Setting {
        name: env::DELIVERY_CONCURRENCY,
        default: "4",
        help: "Processor requests in flight per replica",
    },
    Setting {
        name: env::DELIVERY_MAX_BACKOFF,
        default: "30s",
        help: "Cap of the delivery retry backoff",
    },
    Setting {
        name: env::DELIVERY_MAX_ATTEMPTS,
        default: "8",
        help: "Attempts per batch within one drain pass",
    },
    Setting {
        name: env::DRAIN_INTERVAL,
        default: "10s",
        help: "How often pending windows are retried",
    },
    Setting {
        name: env::LOCK_TTL,
        default: "15s",
        help: "Drain lock lifetime, renewed while draining",
    },
    Setting {
        name: env::QUEUE_CAPACITY,
        default: "50000",
        help: "Pulses queued or being committed; 503 when full",
    },
    Setting {
        name: env::WORKERS,
        default: "number of CPUs",
        help: "Commit workers",
    },
    Setting {
        name: env::COMMIT_LINGER,
        default: "200us",
        help: "Under load, a nearly empty commit waits up to this for more pulses (0s: never)",
    },
    Setting {
        name: env::WORKER_BATCH,
        default: "2048",
        help: "Most pulses one worker commits at once",
    },
    Setting {
        name: env::ACK_MODE,
        default: "durable",
        help: "durable: 202 after the commit; enqueued: 202 once queued",
    },
    Setting {
        name: env::MAX_BODY_BYTES,
        default: "4194304",
        help: "Largest request body in bytes (413)",
    },
    Setting {
        name: env::MAX_BATCH_ITEMS,
        default: "10000",
        help: "Most pulses in one batch request (413)",
    },
    Setting {
        name: env::MAX_FIELD_LEN,
        default: "256",
        help: "Longest tenant, SKU, unit or pulse id in characters (422)",
    },
    Setting {
        name: env::MAX_AMOUNT,
        default: "1000000000000000",
        help: "Largest used_amount, exact decimal (422)",
    },
    Setting {
        name: env::AMOUNT_DECIMALS,
        default: "9",
        help: "Fractional digits a used_amount may have, 0-12 (422 beyond; never rounded)",
    },
    Setting {
        name: env::ALLOWED_UNITS,
        default: "",
        help: "Comma-separated unit allow-list; unset accepts any",
    },
    Setting {
        name: env::DEDUPE_TTL,
        default: "1h",
        help: "How long a pulse_id or Idempotency-Key is remembered",
    },
    Setting {
        name: env::RETRY_AFTER,
        default: "1s",
        help: "Retry-After sent with 503",
    },
    Setting {
        name: env::SHUTDOWN_TIMEOUT,
        default: "30s",
        help: "Graceful shutdown finishes within this",
    },
    Setting {
        name: env::HEADER_READ_TIMEOUT,
        default: "10s",
        help: "Time allowed for a request's headers",
    },
    Setting {
        name: env::REQUEST_TIMEOUT,
        default: "30s",
        help: "Time allowed for a whole request, commit included",
    },
    Setting {
        name: env::MAX_CONNECTIONS,
        default: "10000",
        help: "Open connections per replica",
    },
    Setting {
        name: env::ADMIN_TOKEN,
        default: "",
        help: "Bearer token required by /admin/*; unset leaves them open",
    },
    Setting {
        name: env::API_KEYS_FILE,
        default: "",
        help: "File of SHA-256 API key hashes bound to tenants; unset: no keys",
    },
    Setting {
        name: env::RATE_LIMIT,
        default: "",
        help: "Default per-tenant limit, pulses/s; unset: none",
    },
    Setting {
        name: env::RATE_LIMIT_BURST,
        default: "one second's worth",
        help: "Burst of the default limit",
    },
    Setting {
        name: env::RATE_LIMIT_OVERRIDES,
        default: "",
        help: "Per-tenant limits: tenant=rate[:burst],...",
    },
    Setting {
        name: env::RATE_LIMIT_REPLICAS,
        default: "1",
        help: "Replicas sharing the limits; each enforces its share",
    },
    Setting {
        name: env::LOG_FORMAT,
        default: "text",
        help: "text or json",
    },
];

/// Defaults, each with the reason it was chosen.
pub mod defaults {
    use std::time::Duration;
    /// All interfaces, the port the earlier Go ingestor used.
    pub const LISTEN_ADDR: &str = "0.0.0.0:8070";
    /// A local Redis, as `scripts/run_ingestor.sh` starts one.
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
    /// Connections are multiplexed; a few per core keeps Redis busy without head-of-line waits.
    pub const REDIS_POOL_SIZE: usize = 16;
    /// Long enough for a loaded Redis, short enough that a client gets its 503 before it gives up.
    pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
    pub const KEY_PREFIX: &str = "pulses";
    /// 16 shards spread one Redis Cluster's masters evenly and keep each drain small.
    pub const SHARDS: u32 = 16;
    /// Billing is hourly.
    pub const WINDOW: Duration = Duration::from_secs(3600);
    /// The earlier sender's delay; correctness does not depend on it (writes are atomic).
    pub const STABILISATION_DELAY: Duration = Duration::from_secs(5);
    pub const PROCESSOR_TIMEOUT: Duration = Duration::from_secs(10);
    /// The earlier sender's batch size, which the Processor is known to accept.
    pub const BATCH_SIZE: usize = 500;
    pub const DELIVERY_CONCURRENCY: usize = 4;
    /// Backoff between delivery retries is capped so a recovered Processor is found quickly.
    pub const DELIVERY_MAX_BACKOFF: Duration = Duration::from_secs(30);
    /// Attempts for one batch within one drain pass; the window stays pending and the next pass
    /// tries again, so nothing is given up.
    pub const DELIVERY_MAX_ATTEMPTS: u32 = 8;
    /// How often pending windows are retried between boundaries.
    pub const DRAIN_INTERVAL: Duration = Duration::from_secs(10);
    /// A dead holder's lock frees within this time; renewed every third of it.
    pub const LOCK_TTL: Duration = Duration::from_secs(15);
    /// Pulses waiting for a worker; the earlier service's buffer size.
    pub const QUEUE_CAPACITY: usize = 50_000;
    /// Pulses per worker commit: large enough to amortise a round trip, small enough that one
    /// Redis script call stays well under a millisecond.
    pub const WORKER_BATCH: usize = 2_048;
    /// A few hundred µs doubles the pulses per Redis call under load (each call costs Redis
    /// ~10 µs whatever it carries) for a fraction of the durable commit's latency.
    pub const COMMIT_LINGER: Duration = Duration::from_micros(200);
    /// Fits a batch of `MAX_BATCH_ITEMS` pulses with long names.
    pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
    pub const MAX_BATCH_ITEMS: usize = 10_000;
    pub const MAX_FIELD_LEN: usize = 256;
    /// Far above any real usage figure; a key's window total stays exact up to
    /// `amount::MAX_TOTAL` (≈ 4.6e21), millions of maximal pulses away.
    pub const MAX_AMOUNT: &str = "1000000000000000";
    /// Nanounits: finer than any billing unit in use, and 10^18 × 10^9 stays exact.
    pub const AMOUNT_DECIMALS: u32 = 9;
    /// Client retries within an hour are recognised.
    pub const DEDUPE_TTL: Duration = Duration::from_secs(3600);
    pub const RETRY_AFTER: Duration = Duration::from_secs(1);
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    /// A client gets this long to send its request headers (slow-loris protection).
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Whole request, body included; well above a durable commit (`REDIS_TIMEOUT`).
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Open connections per replica; further clients wait in the listen backlog.
    pub const MAX_CONNECTIONS: usize = 10_000;
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

    fn parse<T: std::str::FromStr>(&mut self, name: &str, default: T, what: &str) -> T {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => {
                    self.fail(name, format!("expected {what}, got {v:?}"));
                    default
                }
            },
        }
    }

    fn count(&mut self, name: &str, default: usize, min: usize, max: usize) -> usize {
        let v = self.parse(name, default, "a whole number");
        if v < min || v > max {
            self.fail(name, format!("must be between {min} and {max}, got {v}"));
            return default;
        }
        v
    }

    fn duration(&mut self, name: &str, default: Duration, min: Duration) -> Duration {
        let Some(v) = self.raw(name) else {
            return default;
        };
        match humantime::parse_duration(v) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.fail(
                    name,
                    format!("must be at least {}", humantime::format_duration(min)),
                );
                default
            }
            Err(e) => {
                self.fail(
                    name,
                    format!(
                        "expected a duration with a unit such as 500ms, 5s or 1h, got {v:?} ({e})"
                    ),
                );
                default
            }
        }
    }

    fn string(&self, name: &str) -> Option<String> {
        self.raw(name).map(str::to_string)
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
        let listen_addr = r.parse(
            env::LISTEN_ADDR,
            defaults::LISTEN_ADDR
                .parse()
                .expect("default address parses"),
            "an address such as 0.0.0.0:8070",
        );
        let metrics_addr = match r.string(env::METRICS_ADDR) {
            None => None,
            Some(v) => match v.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.fail(
                        env::METRICS_ADDR,
                        format!("expected an address such as 127.0.0.1:9100, got {v:?}"),
                    );
                    None
                }
            },
        };
        let redis_url = r
            .string(env::REDIS_URL)
            .unwrap_or_else(|| defaults::REDIS_URL.into());
        if !(redis_url.starts_with("redis://")
            || redis_url.starts_with("rediss://")
            || redis_url.starts_with("redis+unix://")
            || redis_url.starts_with("unix://"))
        {
            r.fail(
                env::REDIS_URL,
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
                r.fail(env::REDIS_CLUSTER_URLS, "lists no node");
            }
            for u in urls {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    r.fail(
                        env::REDIS_CLUSTER_URLS,
                        format!("expected redis:// URLs, got {u:?}"),
                    );
                }
            }
        }
        let redis_pool_size = r.count(env::REDIS_POOL_SIZE, defaults::REDIS_POOL_SIZE, 1, 1024);
        let redis_timeout = r.duration(
            env::REDIS_TIMEOUT,
            defaults::REDIS_TIMEOUT,
            Duration::from_millis(10),
        );
        let key_prefix = r
            .string(env::KEY_PREFIX)
            .unwrap_or_else(|| defaults::KEY_PREFIX.into());
        if key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_control) {
            r.fail(
                env::KEY_PREFIX,
                "must not contain '{', '}' or control characters",
            );
        }
        let shards = r.count(env::SHARDS, defaults::SHARDS as usize, 1, 16_384) as u32;
        let window = r.duration(env::WINDOW, defaults::WINDOW, Duration::from_secs(1));
        if window.subsec_nanos() != 0 {
            r.fail(env::WINDOW, "must be a whole number of seconds");
        }
        let stabilisation_delay = r.duration(
            env::STABILISATION_DELAY,
            defaults::STABILISATION_DELAY,
            Duration::ZERO,
        );
        let processor_url = r.string(env::PROCESSOR_URL);
        if let Some(u) = &processor_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            r.fail(
                env::PROCESSOR_URL,
                format!("expected an http:// or https:// URL, got {u:?}"),
            );
        }
        let processor_token = r.string(env::PROCESSOR_TOKEN);
        let processor_timeout = r.duration(
            env::PROCESSOR_TIMEOUT,
            defaults::PROCESSOR_TIMEOUT,
            Duration::from_millis(10),
        );
        let batch_size = r.count(env::BATCH_SIZE, defaults::BATCH_SIZE, 1, 100_000);
        let delivery_concurrency = r.count(
            env::DELIVERY_CONCURRENCY,
            defaults::DELIVERY_CONCURRENCY,
            1,
            256,
        );
        let delivery_max_backoff = r.duration(
            env::DELIVERY_MAX_BACKOFF,
            defaults::DELIVERY_MAX_BACKOFF,
            Duration::from_millis(1),
        );
        let delivery_max_attempts = r.count(
            env::DELIVERY_MAX_ATTEMPTS,
            defaults::DELIVERY_MAX_ATTEMPTS as usize,
            1,
            1_000,
        ) as u32;
        let drain_interval = r.duration(
            env::DRAIN_INTERVAL,
            defaults::DRAIN_INTERVAL,
            Duration::from_millis(50),
        );
        let lock_ttl = r.duration(
            env::LOCK_TTL,
            defaults::LOCK_TTL,
            Duration::from_millis(300),
        );
        let queue_capacity = r.count(env::QUEUE_CAPACITY, defaults::QUEUE_CAPACITY, 1, 10_000_000);
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = r.count(env::WORKERS, cpus, 1, 1024);
        let worker_batch = r.count(env::WORKER_BATCH, defaults::WORKER_BATCH, 1, 100_000);
        let commit_linger = r.duration(env::COMMIT_LINGER, defaults::COMMIT_LINGER, Duration::ZERO);
        if commit_linger > Duration::from_millis(10) {
            r.fail(env::COMMIT_LINGER, "must be at most 10ms");
        }
        let ack_mode = match r.raw(env::ACK_MODE).map(str::to_ascii_lowercase).as_deref() {
            None | Some("durable") => AckMode::Durable,
            Some("enqueued") => AckMode::Enqueued,
            Some(other) => {
                r.fail(
                    env::ACK_MODE,
                    format!("expected durable or enqueued, got {other:?}"),
                );
                AckMode::Durable
            }
        };
        let max_body_bytes = r.count(env::MAX_BODY_BYTES, defaults::MAX_BODY_BYTES, 64, 1 << 30);
        let max_batch_items = r.count(
            env::MAX_BATCH_ITEMS,
            defaults::MAX_BATCH_ITEMS,
            1,
            1_000_000,
        );
        let max_field_len = r.count(env::MAX_FIELD_LEN, defaults::MAX_FIELD_LEN, 1, 65_536);
        let amount_decimals = r.count(
            env::AMOUNT_DECIMALS,
            defaults::AMOUNT_DECIMALS as usize,
            0,
            crate::amount::SCALE as usize,
        ) as u32;
        let ceiling = crate::amount::Amount::from_units(10u128.pow(18 + crate::amount::SCALE));
        let max_amount_text = r
            .string(env::MAX_AMOUNT)
            .unwrap_or_else(|| defaults::MAX_AMOUNT.into());
        let max_amount = match crate::amount::Amount::parse_decimal(
            &max_amount_text,
            crate::amount::SCALE,
            ceiling,
        ) {
            Ok(a) if a > crate::amount::Amount::ZERO => a,
            _ => {
                r.fail(
                    env::MAX_AMOUNT,
                    format!(
                        "must be a positive decimal no larger than 1e18, got {max_amount_text:?}"
                    ),
                );
                ceiling
            }
        };
        let redis_allow_eviction = r.parse(env::REDIS_ALLOW_EVICTION, false, "true or false");
        let redis_commit_per_shard = match r.raw(env::REDIS_COMMIT) {
            None | Some("one-call") => false,
            Some("per-shard") => true,
            Some(other) => {
                let msg = format!("expected one-call or per-shard, got {other:?}");
                r.fail(env::REDIS_COMMIT, msg);
                false
            }
        };
        let allowed_units = r.string(env::ALLOWED_UNITS).map(|s| {
            s.split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>()
        });
        let dedupe_ttl = r.duration(
            env::DEDUPE_TTL,
            defaults::DEDUPE_TTL,
            Duration::from_secs(1),
        );
        let retry_after = r.duration(
            env::RETRY_AFTER,
            defaults::RETRY_AFTER,
            Duration::from_secs(1),
        );
        let shutdown_timeout = r.duration(
            env::SHUTDOWN_TIMEOUT,
            defaults::SHUTDOWN_TIMEOUT,
            Duration::from_millis(100),
        );
        let header_read_timeout = r.duration(
            env::HEADER_READ_TIMEOUT,
            defaults::HEADER_READ_TIMEOUT,
            Duration::from_millis(100),
        );
        let request_timeout = r.duration(
            env::REQUEST_TIMEOUT,
            defaults::REQUEST_TIMEOUT,
            Duration::from_millis(100),
        );
        if request_timeout <= redis_timeout {
            r.fail(
                env::REQUEST_TIMEOUT,
                "must be longer than REDIS_TIMEOUT, or durable commits would time out",
            );
        }
        let max_connections = r.count(
            env::MAX_CONNECTIONS,
            defaults::MAX_CONNECTIONS,
            1,
            1_000_000,
        );
        let admin_token = r.string(env::ADMIN_TOKEN);
        let log_format = match r
            .raw(env::LOG_FORMAT)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                r.fail(
                    env::LOG_FORMAT,
                    format!("expected text or json, got {other:?}"),
                );
                LogFormat::Text
            }
        };
        let api_keys_file = r.string(env::API_KEYS_FILE).map(std::path::PathBuf::from);
        let rate = r.raw(env::RATE_LIMIT).map(str::to_string);
        let burst = r.count(env::RATE_LIMIT_BURST, 0, 0, 10_000_000) as u32;
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
                        env::RATE_LIMIT,
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
                        r.fail(env::RATE_LIMIT_OVERRIDES, e);
                        HashMap::new()
                    })
            }
        };
        let rate_limit_replicas = r.count(env::RATE_LIMIT_REPLICAS, 1, 1, 10_000) as u32;
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
    fn a_window_without_unit_is_refused() {
        let err = Config::from_map(&map(&[("WINDOW", "60")])).unwrap_err();
        assert!(err.to_string().contains("WINDOW"));
    }
}
