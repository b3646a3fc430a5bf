//! Tenant protection: API keys bound to tenants, and per-tenant rate limits.
//!
//! **Keys.** `API_KEYS_FILE` lists SHA-256 hashes of keys, never keys: one per line,
//! `<hex sha256 of the key> <tenant id | *> [label]`, `#` for comments. `*` marks a trusted
//! service allowed any tenant. The file is re-read when its modification time changes (checked
//! every 2 s) and on SIGHUP; a file that fails to parse keeps the previous set and is logged.
//! A presented key is hashed and compared with every known hash in constant time, so neither the
//! key nor its hash leaks through timing. Keys never reach logs or metrics — only labels do.
//!
//! **Limits.** A token bucket per tenant (GCRA, the `governor` crate): `RATE_LIMIT` pulses/s
//! with `RATE_LIMIT_BURST`, per-tenant overrides in `RATE_LIMIT_OVERRIDES`. Each replica
//! enforces `1 / RATE_LIMIT_REPLICAS` of the limit locally — no Redis round trip on the ingest
//! path. Behind a balancer that spreads a tenant's requests evenly, the fleet admits about the
//! configured rate; if one replica receives all of a tenant's traffic, that tenant gets only its
//! share (the error is conservative, never above the limit by more than the burst per replica).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Send pulses for this tenant only.
    Tenant(String),
    /// A trusted service: any tenant.
    Trusted,
}

#[derive(Debug, Clone)]
struct Entry {
    hash: [u8; 32],
    grant: Grant,
    label: String,
}

/// The loaded key set.
#[derive(Debug, Default)]
pub struct KeySet {
    entries: Vec<Entry>,
}

impl KeySet {
    /// Parses a keys file; every bad line is reported.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(h), Some(who)) = (parts.next(), parts.next()) else {
                errors.push(format!(
                    "line {}: expected `<sha256 hex> <tenant|*> [label]`",
                    n + 1
                ));
                continue;
            };
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(h, &mut hash).is_err() {
                errors.push(format!("line {}: not a 64-hex-digit SHA-256", n + 1));
                continue;
            }
            let grant = if who == "*" {
                Grant::Trusted
            } else {
                Grant::Tenant(who.to_string())
            };
            let label = parts.next().unwrap_or(who).to_string();
            entries.push(Entry { hash, grant, label });
        }
        if errors.is_empty() {
            Ok(KeySet { entries })
        } else {
            Err(errors.join("; "))
        }
    }

    /// The grant of a presented key, and its label, if the key is known.
    pub fn lookup(&self, key: &str) -> Option<(&Grant, &str)> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        // Compare with every entry, always: the time taken does not depend on which one matches.
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&digest)) {
                found = Some((&e.grant, e.label.as_str()));
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The key set of a running service, reloadable.
pub struct ApiKeys {
    path: PathBuf,
    /// The keys and the SHA-256 of the file text they came from.
    current: RwLock<(Arc<KeySet>, [u8; 32])>,
}

impl ApiKeys {
    /// Loads the file; an unreadable or invalid file at start-up is an error.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let set = KeySet::parse(&text)?;
        info!(keys = set.len(), path = %path.display(), "API keys loaded");
        Ok(Arc::new(ApiKeys {
            path: path.to_path_buf(),
            current: RwLock::new((Arc::new(set), Sha256::digest(&text).into())),
        }))
    }

    pub fn get(&self) -> Arc<KeySet> {
        self.current.read().expect("not poisoned").0.clone()
    }

    /// Re-reads the file and applies it if its content changed (or always, when `force`).
    /// Content, not modification time, decides: a rewrite within the clock's granularity, or
    /// between reading a file and reading its mtime, is never missed.
    pub fn reload(&self, force: bool) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "API keys file not readable; keeping the previous keys");
                return;
            }
        };
        let digest: [u8; 32] = Sha256::digest(&text).into();
        if !force && digest == self.current.read().expect("not poisoned").1 {
            return;
        }
        match KeySet::parse(&text) {
            Ok(set) => {
                info!(keys = set.len(), "API keys reloaded");
                *self.current.write().expect("not poisoned") = (Arc::new(set), digest);
            }
            Err(e) => warn!(error = %e, "API keys file not reloaded; keeping the previous keys"),
        }
    }

    /// Reloads on change (polled every 2 s) and on SIGHUP, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<()>();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => self.reload(false),
                _ = sighup => self.reload(true),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// A limit: pulses per second and burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: u32,
}

/// Why a tenant's request is over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// Over the rate now: come back after this (429 + `Retry-After`).
    Wait(Duration),
    /// More pulses in one request than this replica's share of the burst: never admitted,
    /// whatever the wait; the largest request the limit allows (413).
    TooLarge(u32),
}

/// Per-tenant rate limits of one replica.
pub struct RateLimits {
    /// Keyed by a 64-bit hash of the tenant, so a check allocates nothing; two tenants sharing
    /// a bucket would need a hash collision. `None`: only the overridden tenants are limited.
    default: Option<DefaultKeyedRateLimiter<u64>>,
    overrides: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

fn quota(limit: Limit, replicas: u32) -> Quota {
    let share = (limit.per_second / f64::from(replicas.max(1))).max(0.001);
    let period = Duration::from_secs_f64(1.0 / share);
    let burst = NonZeroU32::new((limit.burst / replicas.max(1)).max(1)).expect("at least 1");
    Quota::with_period(period)
        .expect("non-zero period")
        .allow_burst(burst)
}

impl RateLimits {
    pub fn new(default: Option<Limit>, overrides: &HashMap<String, Limit>, replicas: u32) -> Self {
        RateLimits {
            default: default.map(|l| RateLimiter::keyed(quota(l, replicas))),
            overrides: overrides
                .iter()
                .map(|(t, l)| (t.clone(), RateLimiter::direct(quota(*l, replicas))))
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// Takes `n` pulses from the tenant's bucket; `Err` when over the limit.
    pub fn check(&self, tenant: &str, n: u32) -> Result<(), LimitExceeded> {
        let n = NonZeroU32::new(n.max(1)).expect("at least 1");
        let outcome = match self.overrides.get(tenant) {
            Some(l) => l.check_n(n),
            None => match &self.default {
                Some(d) => d.check_key_n(&xxhash_rust::xxh3::xxh3_64(tenant.as_bytes()), n),
                None => return Ok(()),
            },
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(LimitExceeded::Wait(
                not_until.wait_time_from(self.clock.now()),
            )),
            // More pulses in one request than the bucket can ever hold: waiting never helps.
            Err(governor::InsufficientCapacity(max)) => Err(LimitExceeded::TooLarge(max)),
        }
    }

    /// Forgets idle tenants (called periodically, so memory follows active tenants).
    pub fn forget_idle(&self) {
        if let Some(d) = &self.default {
            d.retain_recent();
        }
    }
}

/// Parses `tenant=rate[:burst],...`.
pub fn parse_overrides(s: &str, default_burst: u32) -> Result<HashMap<String, Limit>, String> {
    let mut out = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (tenant, spec) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected tenant=rate[:burst]"))?;
        let (rate, burst) = match spec.split_once(':') {
            Some((r, b)) => (
                r,
                b.parse::<u32>()
                    .map_err(|_| format!("{part:?}: bad burst"))?,
            ),
            None => (spec, default_burst),
        };
        let per_second: f64 = rate.parse().map_err(|_| format!("{part:?}: bad rate"))?;
        if !(per_second > 0.0 && per_second.is_finite()) || burst == 0 {
            return Err(format!("{part:?}: rate and burst must be positive"));
        }
        out.insert(tenant.trim().to_string(), Limit { per_second, burst });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(k: &str) -> String {
        hex::encode(Sha256::digest(k.as_bytes()))
    }

    #[test]
    fn keys_map_to_tenants_or_trust() {
        let text = format!(
            "# comment\n{} t-1 team-a\n{} *\n",
            hash("secret-a"),
            hash("secret-svc")
        );
        let set = KeySet::parse(&text).unwrap();
        assert_eq!(
            set.lookup("secret-a"),
            Some((&Grant::Tenant("t-1".into()), "team-a"))
        );
        assert_eq!(set.lookup("secret-svc").map(|g| g.0), Some(&Grant::Trusted));
        assert_eq!(set.lookup("nope"), None);
        assert!(KeySet::parse("zz t-1\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn limits_count_pulses_and_say_when_to_come_back() {
        let l = RateLimits::new(
            Some(Limit {
                per_second: 10.0,
                burst: 10,
            }),
            &HashMap::new(),
            1,
        );
        assert!(l.check("t", 10).is_ok());
        let LimitExceeded::Wait(wait) = l.check("t", 1).unwrap_err() else {
            panic!("a single pulse over the rate must wait");
        };
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(110),
            "{wait:?}"
        );
        assert!(
            l.check("other", 5).is_ok(),
            "tenants have their own buckets"
        );
    }

    #[test]
    fn a_batch_larger_than_the_burst_is_told_so_not_to_wait() {
        // RATE_LIMIT=100, burst 100, 4 replicas: each admits at most 25 pulses at once.
        let l = RateLimits::new(
            Some(Limit {
                per_second: 100.0,
                burst: 100,
            }),
            &HashMap::new(),
            4,
        );
        for _ in 0..3 {
            assert_eq!(l.check("t", 60), Err(LimitExceeded::TooLarge(25)));
        }
        assert!(l.check("t", 25).is_ok());
    }

    #[test]
    fn a_rewrite_is_seen_even_when_the_mtime_does_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{} t-1\n", hash("old-key"))).unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        // The key is revoked and replaced; the file keeps its modification time (a rewrite
        // within the clock's granularity, or read between the file and its mtime).
        std::fs::write(&path, format!("{} t-1\n", hash("new-key"))).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        keys.reload(false);
        assert!(
            keys.get().lookup("old-key").is_none(),
            "revoked key still works"
        );
        assert!(keys.get().lookup("new-key").is_some());
    }

    #[test]
    fn overrides_and_replica_shares_apply() {
        let o = parse_overrides("big=100:200, small=1", 5).unwrap();
        assert_eq!(
            o["big"],
            Limit {
                per_second: 100.0,
                burst: 200
            }
        );
        assert_eq!(o["small"].burst, 5);
        let l = RateLimits::new(
            Some(Limit {
                per_second: 10.0,
                burst: 10,
            }),
            &o,
            2,
        );
        let only = RateLimits::new(None, &o, 1);
        assert!(
            only.check("anyone", 1_000_000).is_ok(),
            "no default: only overrides limit"
        );
        assert!(only.check("small", 6).is_err());
        assert!(l.check("big", 100).is_ok(), "half of a 200 burst");
        assert!(l.check("big", 1).is_err());
        assert!(
            l.check("t", 5).is_ok() && l.check("t", 1).is_err(),
            "half of the default burst"
        );
        assert!(parse_overrides("x", 1).is_err());
    }
}
