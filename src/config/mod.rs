//! Typed configuration, read from environment variables (and `.env`, loaded by `main` only).
//!
//! Every setting is declared once (`settings.rs`): its variable, the default users see (parsed
//! from that same text) and its meaning, with the reason for the default. Parsing collects *all*
//! problems and reports them together, so a bad `.env` is fixed in one go (exit code 64). The
//! settings are grouped as users think of them: the service itself here, then [`RedisConfig`],
//! [`DeliveryConfig`], [`LimitsConfig`] and [`SecurityConfig`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

mod reader;
mod sections;
mod settings;

pub use reader::ConfigError;
use reader::Reader;
pub use sections::{DeliveryConfig, LimitsConfig, RedisConfig, SecurityConfig};
pub use settings::{SETTINGS, Setting, env};

/// When a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// 202 after the pulse is committed to Redis.
    Durable,
    /// 202 once queued, as the earlier Go ingestor did; the queue is lost on a crash.
    Enqueued,
}

impl FromStr for AckMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "durable" => Ok(AckMode::Durable),
            "enqueued" => Ok(AckMode::Enqueued),
            other => Err(format!("expected durable or enqueued, got {other:?}")),
        }
    }
}

/// What a stamped pulse for a window already delivered (or being delivered) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatePulses {
    /// Counted in an amendment of its window: an additive record with its own id.
    Amend,
    /// Refused, 422 "window closed", with the whole request.
    Refuse,
}

impl FromStr for LatePulses {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "amend" => Ok(LatePulses::Amend),
            "refuse" => Ok(LatePulses::Refuse),
            other => Err(format!("expected amend or refuse, got {other:?}")),
        }
    }
}

impl LatePulses {
    /// As the write script reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            LatePulses::Amend => "amend",
            LatePulses::Refuse => "refuse",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected text or json, got {other:?}")),
        }
    }
}

/// How a commit's shards reach Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Every shard of a commit in one script call (one Redis allows keys of several slots).
    OneCall,
    /// One script call per shard (what a cluster node requires; always so on a cluster).
    PerShard,
}

impl FromStr for CommitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "one-call" => Ok(CommitMode::OneCall),
            "per-shard" => Ok(CommitMode::PerShard),
            other => Err(format!("expected one-call or per-shard, got {other:?}")),
        }
    }
}

/// The service's whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP API address (`LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// Serve `/metrics` here instead of on the API address (`METRICS_ADDR`).
    pub metrics_addr: Option<SocketAddr>,
    /// Key namespace (`KEY_PREFIX`); keys are `{<prefix>:<shard>}:...`.
    pub key_prefix: String,
    /// Number of shards (`SHARDS`).
    pub shards: u32,
    /// Aggregation window (`WINDOW`), whole seconds.
    pub window: Duration,
    /// Wait after a window ends before its drain (`STABILISATION_DELAY`).
    pub stabilisation_delay: Duration,
    /// Windows start this far after the UTC boundaries (`WINDOW_OFFSET`), whole seconds.
    pub window_offset: Duration,
    /// Oldest pulse timestamp accepted (`LATE_MAX_AGE`).
    pub late_max_age: Duration,
    /// Furthest ahead a pulse timestamp may be (`MAX_FUTURE_SKEW`).
    pub max_future_skew: Duration,
    /// What a pulse for a delivered window does (`LATE_PULSES`).
    pub late_pulses: LatePulses,
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
    /// How long a pulse id is remembered (`DEDUPE_TTL`).
    pub dedupe_ttl: Duration,
    /// The meters file (`METERS_FILE`).
    pub meters_file: Option<std::path::PathBuf>,
    /// `Retry-After` sent with 503 (`RETRY_AFTER`).
    pub retry_after: Duration,
    /// Shutdown finishes within this (`SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: Duration,
    /// `text` or `json` (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// How to reach Redis and use it.
    pub redis: RedisConfig,
    /// Delivery to the Processor.
    pub delivery: DeliveryConfig,
    /// What one request may be.
    pub limits: LimitsConfig,
    /// The admin token, API keys and rate limits.
    pub security: SecurityConfig,
    /// Which of the settings the deployment records were set explicitly; an unset one adopts
    /// the deployment's recorded value (see `App::build`).
    pub explicit: Explicit,
}

/// Which deployment-wide settings were set explicitly (not left to their defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Explicit {
    pub shards: bool,
    pub window: bool,
    pub window_offset: bool,
    pub dedupe_ttl: bool,
    pub late_max_age: bool,
    pub late_pulses: bool,
    pub max_future_skew: bool,
}

impl Explicit {
    fn read(r: &Reader<'_>) -> Self {
        Explicit {
            shards: r.raw(env::SHARDS.name).is_some(),
            window: r.raw(env::WINDOW.name).is_some(),
            window_offset: r.raw(env::WINDOW_OFFSET.name).is_some(),
            dedupe_ttl: r.raw(env::DEDUPE_TTL.name).is_some(),
            late_max_age: r.raw(env::LATE_MAX_AGE.name).is_some(),
            late_pulses: r.raw(env::LATE_PULSES.name).is_some(),
            max_future_skew: r.raw(env::MAX_FUTURE_SKEW.name).is_some(),
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Builds a configuration from a map of variables (tests use this, never the environment).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::read(&mut Reader::new(vars))
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, ConfigError> {
        let listen_addr = r.parse(env::LISTEN_ADDR, "an address such as 0.0.0.0:8070");
        let metrics_addr = read_metrics_addr(r);
        let redis = RedisConfig::read(r);
        let key_prefix = read_key_prefix(r);
        let shards_default = if redis.cluster_urls.is_some() { 16 } else { 1 };
        let shards = r.count_or(env::SHARDS, shards_default, 1, 16_384) as u32;
        let (window, window_offset) = read_window(r);
        let late_max_age = r.duration_within(
            env::LATE_MAX_AGE,
            Duration::from_secs(1),
            (Duration::from_secs(60 * 86_400), "60d"),
        );
        let max_future_skew = r.duration_within(
            env::MAX_FUTURE_SKEW,
            Duration::ZERO,
            (Duration::from_secs(86_400), "1d"),
        );
        let late_pulses = r.choice(env::LATE_PULSES);
        let stabilisation_delay = r.duration(env::STABILISATION_DELAY, Duration::ZERO);
        let delivery = DeliveryConfig::read(r);
        let queue_capacity = r.count(env::QUEUE_CAPACITY, 1, 10_000_000);
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = r.count_or(env::WORKERS, cpus, 1, 1024);
        let worker_batch = r.count(env::WORKER_BATCH, 1, 100_000);
        let commit_linger = r.duration_within(
            env::COMMIT_LINGER,
            Duration::ZERO,
            (Duration::from_millis(10), "10ms"),
        );
        let ack_mode = r.choice(env::ACK_MODE);
        let limits = LimitsConfig::read(r);
        let dedupe_ttl = r.duration(env::DEDUPE_TTL, Duration::from_secs(1));
        let meters_file = r.string(env::METERS_FILE).map(std::path::PathBuf::from);
        let retry_after = r.duration(env::RETRY_AFTER, Duration::from_secs(1));
        let shutdown_timeout = r.duration(env::SHUTDOWN_TIMEOUT, Duration::from_millis(100));
        if limits.request_timeout <= redis.timeout {
            r.fail(
                env::REQUEST_TIMEOUT.name,
                "must be longer than REDIS_TIMEOUT, or durable commits would time out",
            );
        }
        let log_format = r.choice(env::LOG_FORMAT);
        let security = SecurityConfig::read(r);
        let explicit = Explicit::read(r);
        if !r.problems.is_empty() {
            return Err(ConfigError {
                problems: std::mem::take(&mut r.problems),
            });
        }
        Ok(Config {
            listen_addr,
            metrics_addr,
            key_prefix,
            shards,
            window,
            stabilisation_delay,
            window_offset,
            late_max_age,
            max_future_skew,
            late_pulses,
            queue_capacity,
            workers,
            worker_batch,
            commit_linger,
            ack_mode,
            dedupe_ttl,
            meters_file,
            retry_after,
            shutdown_timeout,
            log_format,
            redis,
            delivery,
            limits,
            security,
            explicit,
        })
    }

    /// The window length in whole seconds, as the scripts use it.
    pub fn window_secs(&self) -> u64 {
        self.window.as_secs()
    }
}

/// `METRICS_ADDR`: unset, or an address.
fn read_metrics_addr(r: &mut Reader<'_>) -> Option<std::net::SocketAddr> {
    let v = r.string(env::METRICS_ADDR)?;
    v.parse().map(Some).unwrap_or_else(|_| {
        let msg = format!("expected an address such as 127.0.0.1:9100, got {v:?}");
        r.fail(env::METRICS_ADDR.name, msg);
        None
    })
}

/// `KEY_PREFIX`: no braces (it goes inside every key's hash tag), no control characters.
fn read_key_prefix(r: &mut Reader<'_>) -> String {
    let key_prefix = r.string_or_default(env::KEY_PREFIX);
    if key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_control) {
        r.fail(
            env::KEY_PREFIX.name,
            "must not contain '{', '}' or control characters",
        );
    }
    key_prefix
}

/// `WINDOW` and `WINDOW_OFFSET`: whole seconds, the offset less than the window.
fn read_window(r: &mut Reader<'_>) -> (Duration, Duration) {
    // At most a day: the window history is kept 61 days by window start, LATE_MAX_AGE is at most
    // 60 days, so every window a late pulse may reach is still in the history.
    let window = r.duration_within(
        env::WINDOW,
        Duration::from_secs(1),
        (Duration::from_secs(86_400), "1d"),
    );
    if window.subsec_nanos() != 0 {
        r.fail(env::WINDOW.name, "must be a whole number of seconds");
    }
    let window_offset = r.duration(env::WINDOW_OFFSET, Duration::ZERO);
    if window_offset.subsec_nanos() != 0 || window_offset >= window {
        r.fail(
            env::WINDOW_OFFSET.name,
            "must be a whole number of seconds less than WINDOW",
        );
    }
    (window, window_offset)
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
        assert_eq!(c.shards, 1, "one Redis: one shard");
        let cluster = Config::from_map(&map(&[("REDIS_CLUSTER_URLS", "redis://127.0.0.1:7000")]));
        assert_eq!(
            cluster.unwrap().shards,
            16,
            "a cluster: spread over its masters"
        );
        assert_eq!(c.delivery.batch_size, 500);
        assert_eq!(c.ack_mode, AckMode::Durable);
        assert_eq!(c.listen_addr.port(), 8070);
    }

    #[test]
    fn a_window_is_at_most_a_day() {
        assert!(Config::from_map(&map(&[("WINDOW", "1d")])).is_ok());
        let e = Config::from_map(&map(&[("WINDOW", "2d")])).unwrap_err();
        assert!(e.to_string().contains("WINDOW"), "{e}");
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
        let vars = HashMap::new();
        let mut r = Reader::new(&vars);
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
        let mut explicit = Config::from_map(&shown).unwrap();
        let implicit = Config::from_map(&HashMap::new()).unwrap();
        // Only which were set differs (unset ones adopt the deployment's recorded values).
        assert_eq!(
            explicit.explicit,
            Explicit {
                shards: false,
                window: true,
                window_offset: true,
                dedupe_ttl: true,
                late_max_age: true,
                late_pulses: true,
                max_future_skew: true,
            }
        );
        assert_eq!(implicit.explicit, Explicit::default());
        explicit.explicit = Explicit::default();
        assert_eq!(format!("{explicit:?}"), format!("{implicit:?}"));
    }

    #[test]
    fn example_env_lists_every_setting() {
        let text = include_str!("../../example.env");
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
    fn choices_parse_case_insensitively_and_name_the_options() {
        let c = Config::from_map(&map(&[
            ("ACK_MODE", "Enqueued"),
            ("LOG_FORMAT", "JSON"),
            ("REDIS_COMMIT", "per-shard"),
        ]))
        .unwrap();
        assert_eq!(c.ack_mode, AckMode::Enqueued);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.redis.commit, CommitMode::PerShard);
        let err = Config::from_map(&map(&[("REDIS_COMMIT", "sometimes")])).unwrap_err();
        assert!(err.to_string().contains("one-call or per-shard"), "{err}");
    }

    #[test]
    fn a_window_without_unit_is_refused() {
        let err = Config::from_map(&map(&[("WINDOW", "60")])).unwrap_err();
        assert!(err.to_string().contains("WINDOW"));
    }
}
