//! Per-tenant rate limits: a GCRA bucket per tenant, each replica enforcing its share.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
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
