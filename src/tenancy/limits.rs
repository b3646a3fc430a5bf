//! Per-tenant rate limits: a GCRA bucket per tenant, each replica enforcing its share.
//!
//! A request takes its pulses from the buckets of all its tenants at once or from none: a
//! batch refused because one tenant is over its limit leaves every other tenant's bucket as it
//! was, and a request refused later (queue full, storage unavailable, a full key) gives back
//! what it took. `governor` has neither a multi-key check nor a refund, so the GCRA is here:
//! one "theoretical arrival time" per tenant, in mutex-guarded maps sharded by tenant hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

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

/// One replica's share of a limit, as GCRA parameters.
#[derive(Debug, Clone, Copy)]
struct Quota {
    /// Nanoseconds per pulse.
    interval: u64,
    /// Pulses the bucket holds.
    burst: u32,
}

impl Quota {
    fn new(limit: Limit, replicas: u32) -> Self {
        let share = (limit.per_second / f64::from(replicas.max(1))).max(0.001);
        Quota {
            interval: ((1e9 / share) as u64).max(1),
            burst: (limit.burst / replicas.max(1)).max(1),
        }
    }

    fn tolerance(self) -> u64 {
        self.interval.saturating_mul(u64::from(self.burst))
    }
}

/// What a request took, to give back if it is refused after all.
#[derive(Debug, Default)]
pub struct Taken(Vec<(u64, u64)>);

const SHARDS: usize = 16;

/// Per-tenant rate limits of one replica.
pub struct RateLimits {
    /// `None`: only the overridden tenants are limited.
    default: Option<Quota>,
    overrides: HashMap<String, Quota>,
    /// Tenant hash → theoretical arrival time (ns since `epoch`). Keyed by a 64-bit hash of the
    /// tenant, so a check allocates nothing; two tenants sharing a bucket would need a collision.
    state: [Mutex<HashMap<u64, u64>>; SHARDS],
    epoch: Instant,
}

impl RateLimits {
    pub fn new(default: Option<Limit>, overrides: &HashMap<String, Limit>, replicas: u32) -> Self {
        RateLimits {
            default: default.map(|l| Quota::new(l, replicas)),
            overrides: overrides
                .iter()
                .map(|(t, l)| (t.clone(), Quota::new(*l, replicas)))
                .collect(),
            state: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Takes `n` pulses from the tenant's bucket; `Err` when over the limit.
    #[cfg(test)]
    pub fn check(&self, tenant: &str, n: u32) -> Result<(), LimitExceeded> {
        self.take_all(&[(tenant, n)])
            .map(|_| ())
            .map_err(|(_, e)| e)
    }

    /// Takes each tenant's pulses from its bucket — all of them, or, when any tenant is over
    /// its limit, none (the first such tenant's index and why).
    pub fn take_all(&self, demand: &[(&str, u32)]) -> Result<Taken, (usize, LimitExceeded)> {
        let mut wanted: Vec<(usize, u64, Quota, u64)> = Vec::with_capacity(demand.len());
        for (i, (tenant, n)) in demand.iter().enumerate() {
            let Some(q) = self.overrides.get(*tenant).copied().or(self.default) else {
                continue;
            };
            let n = u64::from((*n).max(1));
            if n > u64::from(q.burst) {
                return Err((i, LimitExceeded::TooLarge(q.burst)));
            }
            let h = xxhash_rust::xxh3::xxh3_64(tenant.as_bytes());
            wanted.push((i, h, q, n));
        }
        if wanted.is_empty() {
            return Ok(Taken::default());
        }
        // Lock every shard involved, in order (no deadlock between two batches).
        let mut shards: Vec<usize> = wanted.iter().map(|w| (w.1 as usize) % SHARDS).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut guards: Vec<(usize, std::sync::MutexGuard<'_, HashMap<u64, u64>>)> = shards
            .iter()
            .map(|&s| (s, self.state[s].lock().unwrap_or_else(|e| e.into_inner())))
            .collect();
        let now = self.now();
        let mut updates = Vec::with_capacity(wanted.len());
        for &(i, h, q, n) in &wanted {
            let g = &guards
                .iter()
                .find(|(s, _)| *s == (h as usize) % SHARDS)
                .expect("locked above")
                .1;
            let tat = g.get(&h).copied().unwrap_or(0).max(now);
            let new = tat + n * q.interval;
            if new - now > q.tolerance() {
                let wait = new - now - q.tolerance();
                return Err((i, LimitExceeded::Wait(Duration::from_nanos(wait))));
            }
            updates.push((h, new, n * q.interval));
        }
        let mut taken = Vec::with_capacity(updates.len());
        for (h, new, cost) in updates {
            let g = &mut guards
                .iter_mut()
                .find(|(s, _)| *s == (h as usize) % SHARDS)
                .expect("locked above")
                .1;
            g.insert(h, new);
            taken.push((h, cost));
        }
        Ok(Taken(taken))
    }

    /// Gives back what a refused request took.
    pub fn refund(&self, taken: Taken) {
        for (h, cost) in taken.0 {
            let mut g = self.state[(h as usize) % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(tat) = g.get_mut(&h) {
                *tat = tat.saturating_sub(cost);
            }
        }
    }

    /// Forgets tenants whose buckets are full again (called periodically, so memory follows
    /// active tenants).
    pub fn forget_idle(&self) {
        let now = self.now();
        for s in &self.state {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, tat| *tat > now);
        }
    }

    /// Forgets idle tenants every minute, until `shutdown`.
    pub async fn clean_up(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => self.forget_idle(),
                _ = shutdown.cancelled() => return,
            }
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
    fn a_refused_request_takes_from_no_tenant_and_a_refund_gives_back() {
        let o = parse_overrides("small=1:1", 1).unwrap();
        let l = RateLimits::new(
            Some(Limit {
                per_second: 1.0,
                burst: 60,
            }),
            &o,
            1,
        );
        assert!(l.check("small", 1).is_ok());
        // 30 of busy's 60 and one of small's, which has none left: refused, busy untouched.
        for _ in 0..3 {
            let Err((i, LimitExceeded::Wait(_))) = l.take_all(&[("busy", 30), ("small", 1)]) else {
                panic!("small is over its limit");
            };
            assert_eq!(i, 1);
        }
        let t = l
            .take_all(&[("busy", 60)])
            .expect("busy's whole burst is still there");
        assert!(l.check("busy", 1).is_err());
        l.refund(t);
        assert!(
            l.check("busy", 60).is_ok(),
            "a refund gives the tokens back"
        );
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
