//! Every setting, declared once: its variable, the default users see (parsed from that same
//! text by the reader) and its meaning, with the reason for the default. `--help`, `example.env`
//! and the tests all read this list.

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
    /// One Redis: one shard, so a commit is one script section whatever tenants it carries,
    /// and a window's hash is large enough to be a hash table, where HINCRBY is cheapest (a
    /// mid-size listpack costs twice as much). A cluster: 16, which spread its masters evenly.
    /// Only a new deployment takes the default: an existing one keeps its recorded count.
    SHARDS = "1 (16 on a cluster)", "Shards (hash tags); must match the deployment's (see `reshard`)";
    /// Billing is hourly.
    WINDOW = "1h", "Aggregation window (at most 1d)";
    /// UTC-aligned windows, as billing periods usually are.
    WINDOW_OFFSET = "0s", "Windows start at this offset from UTC boundaries (30m: hours begin at :30, for a +5:30 zone); less than WINDOW";
    /// Stripe's meter events accept 35 days back: a month's invoice can still be amended.
    LATE_MAX_AGE = "35d", "Oldest pulse timestamp accepted (422 beyond); at most 60d";
    /// Stripe's 5 minutes: clock skew, not scheduling.
    MAX_FUTURE_SKEW = "5m", "Furthest ahead a pulse timestamp may be (422 beyond)";
    /// Additive records are the safe default; a Processor that cannot take them says refuse.
    LATE_PULSES = "amend", "A stamped pulse whose window is delivered: amend (an amendment record) or refuse (422 window closed)";
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
    METERS_FILE = "", "Meters: per SKU (or glob) or unit, which aggregations (sum, count, max, min, latest); unset: every key a sum (README: Meters)";
    DEDUPE_TTL = "24h", "How long a pulse_id or Idempotency-Key is remembered";
    RETRY_AFTER = "1s", "Retry-After sent with 503";
    SHUTDOWN_TIMEOUT = "30s", "Graceful shutdown finishes within this";
    /// A client gets this long to send its request headers (slow-loris protection).
    HEADER_READ_TIMEOUT = "10s", "Time allowed for a request's headers";
    /// Whole request, body included; well above a durable commit (`REDIS_TIMEOUT`).
    REQUEST_TIMEOUT = "30s", "Time allowed for a whole request, commit included";
    /// Open connections per replica; further clients wait in the listen backlog.
    MAX_CONNECTIONS = "10000", "Open connections per replica";
    ADMIN_TOKEN = "", "Bearer token required by /admin/*; unset, they answer loopback clients only (setting a dead letter aside always needs it)";
    API_KEYS_FILE = "", "File of SHA-256 API key hashes bound to tenants; unset: no keys";
    RATE_LIMIT = "", "Default per-tenant limit, pulses/s; unset: none";
    RATE_LIMIT_BURST = "one second's worth", "Burst of the default limit";
    RATE_LIMIT_OVERRIDES = "", "Per-tenant limits: tenant=rate[:burst],...";
    RATE_LIMIT_REPLICAS = "1", "Replicas sharing the limits; each enforces its share";
    LOG_FORMAT = "text", "text or json";
}
