//! What the simulator sends: tenants, SKUs and units drawn from a distribution, amounts with
//! decimals, optional pulse ids, re-sends of earlier pulses and malformed bodies.

use rand::Rng;
use rand::seq::IndexedRandom;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

use crate::money::Dec;

/// How amounts are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Amounts {
    /// Cents, like real usage figures: 0.01 to 1000.00.
    #[default]
    Cents,
    /// Up to 9 fractional digits and magnitudes up to 10^12: what exactness is tested with.
    Fine,
}

/// How tenants are drawn.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Skew {
    /// Every tenant equally often.
    Uniform,
    /// A few big tenants send most pulses (Zipf, exponent 1.1).
    Zipf,
}

/// One pulse as sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pulse {
    pub tenant_id: String,
    pub product_sku: String,
    /// Sent as a JSON number written from the exact decimal.
    #[serde(with = "crate::money::number")]
    pub used_amount: Dec,
    pub use_unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulse_id: Option<String>,
    /// When the usage happened (Unix ms), sent as `timestamp` in Unix seconds to the ms.
    #[serde(
        rename = "timestamp",
        skip_serializing_if = "Option::is_none",
        serialize_with = "unix_seconds"
    )]
    pub timestamp_ms: Option<i64>,
}

fn unix_seconds<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    let ms = ms.unwrap_or(0);
    s.serialize_str(&format!("{}.{:03}", ms / 1000, ms % 1000))
}

/// Which time pulses carry (`--event-time`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum EventTime {
    /// No timestamp: counted when it reaches Redis (the default).
    #[default]
    Off,
    /// Stamped now, shifted by this many ms (negative: behind).
    Skew(i64),
    /// Stamped now, except this fraction, stamped up to `max_ms` in the past (sent late).
    Late { fraction: f64, max_ms: i64 },
}

impl std::str::FromStr for EventTime {
    type Err = String;
    /// `off`, `now`, `skew=<±duration>`, `late=<fraction>:<max delay>`.
    fn from_str(s: &str) -> Result<Self, String> {
        let dur = |d: &str| {
            humantime::parse_duration(d)
                .map(|d| d.as_millis() as i64)
                .map_err(|e| format!("{d:?}: {e}"))
        };
        match s.split_once('=') {
            None if s == "off" => Ok(EventTime::Off),
            None if s == "now" => Ok(EventTime::Skew(0)),
            Some(("skew", v)) => match v.strip_prefix('-') {
                Some(v) => Ok(EventTime::Skew(-dur(v)?)),
                None => Ok(EventTime::Skew(dur(v.trim_start_matches('+'))?)),
            },
            Some(("late", v)) => {
                let (f, d) = v.split_once(':').ok_or("late=<fraction>:<max delay>")?;
                let fraction: f64 = f.parse().map_err(|_| format!("{f:?}: not a fraction"))?;
                if !(0.0..=1.0).contains(&fraction) {
                    return Err("the fraction is from 0 to 1".into());
                }
                Ok(EventTime::Late {
                    fraction,
                    max_ms: dur(d)?,
                })
            }
            _ => Err(format!(
                "{s:?}: expected off, now, skew=<±duration> or late=<fraction>:<max delay>"
            )),
        }
    }
}

impl EventTime {
    /// A timestamp for a pulse sent now.
    pub fn stamp(self, rng: &mut impl Rng) -> Option<i64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        match self {
            EventTime::Off => None,
            EventTime::Skew(ms) => Some(now + ms),
            EventTime::Late { fraction, max_ms } => Some(
                if fraction > 0.0 && rng.random_bool(fraction) && max_ms > 0 {
                    now - rng.random_range(0..=max_ms)
                } else {
                    now
                },
            ),
        }
    }
}

/// The earlier producer's units, one per SKU in turn.
pub const UNITS: [&str; 6] = ["KB", "MB", "GB", "KB/sec", "MB/sec", "GB/sec"];

/// The shape of generated traffic.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub tenants: usize,
    pub skus: usize,
    pub skew: Skew,
    /// Give every pulse an id (needed for exact books when requests can fail).
    pub ids: bool,
    /// Prefix of ids, unique per run so separate runs never dedupe each other.
    pub run_id: String,
    pub amounts: Amounts,
    pub event_time: EventTime,
    zipf: Option<Zipf<f64>>,
}

impl Traffic {
    pub fn new(tenants: usize, skus: usize, skew: Skew, ids: bool, run_id: String) -> Self {
        let tenants = tenants.max(1);
        let zipf = match skew {
            Skew::Zipf => Some(Zipf::new(tenants as f64, 1.1).expect("valid zipf parameters")),
            Skew::Uniform => None,
        };
        Traffic {
            tenants,
            skus: skus.max(1),
            skew,
            ids,
            run_id,
            amounts: Amounts::Cents,
            event_time: EventTime::Off,
            zipf,
        }
    }

    /// Tenant index drawn from the distribution.
    pub fn tenant_index(&self, rng: &mut impl Rng) -> usize {
        match &self.zipf {
            Some(z) => (z.sample(rng) as usize)
                .saturating_sub(1)
                .min(self.tenants - 1),
            None => rng.random_range(0..self.tenants),
        }
    }

    /// A pulse for a given tenant; `seq` makes its id unique.
    pub fn pulse_for(&self, tenant: usize, seq: u64, rng: &mut impl Rng) -> Pulse {
        let sku = rng.random_range(0..self.skus);
        Pulse {
            tenant_id: format!("tenant-{tenant}"),
            product_sku: format!("SKU-{sku}"),
            used_amount: self.amount(rng),
            use_unit: UNITS[sku % UNITS.len()].to_string(),
            pulse_id: self.ids.then(|| format!("{}-{seq}", self.run_id)),
            timestamp_ms: self.event_time.stamp(rng),
        }
    }

    pub fn with_event_time(mut self, event_time: EventTime) -> Self {
        self.event_time = event_time;
        self
    }

    pub fn with_amounts(mut self, amounts: Amounts) -> Self {
        self.amounts = amounts;
        self
    }

    /// An amount drawn as `--amounts` says, built from integers (never a float).
    pub fn amount(&self, rng: &mut impl Rng) -> Dec {
        match self.amounts {
            Amounts::Cents => Dec::new(rng.random_range(1i64..=100_000).into(), 2),
            Amounts::Fine => {
                let digits = rng.random_range(0i64..=9);
                let magnitude = 10i128.pow(rng.random_range(0u32..=12) + digits as u32);
                Dec::new(rng.random_range(0..=magnitude).into(), digits)
            }
        }
    }

    pub fn pulse(&self, seq: u64, rng: &mut impl Rng) -> Pulse {
        let t = self.tenant_index(rng);
        self.pulse_for(t, seq, rng)
    }

    /// The `seq`-th distinct key, walking every (tenant, sku) pair in turn: `tenants * skus`
    /// pulses touch as many distinct keys (used to build a large hour for drain benchmarks).
    pub fn distinct(&self, seq: u64, rng: &mut impl Rng) -> Pulse {
        let skus = self.skus as u64;
        let tenant = ((seq / skus) % self.tenants as u64) as usize;
        let sku = (seq % skus) as usize;
        let mut p = self.pulse_for(tenant, seq, rng);
        p.product_sku = format!("SKU-{sku}");
        p.use_unit = UNITS[sku % UNITS.len()].to_string();
        p
    }
}

/// A body the service must refuse with a 4xx, and the status it should get.
pub fn malformed(rng: &mut impl Rng) -> (&'static str, u16) {
    const BAD: [(&str, u16); 6] = [
        (r#"{"tenant_id": "t-1", "product_sku": "#, 400),
        (
            r#"{"product_sku":"SKU-1","used_amount":1.5,"use_unit":"KB"}"#,
            422,
        ),
        (
            r#"{"tenant_id":"t-1","product_sku":"SKU-1","used_amount":-3,"use_unit":"KB"}"#,
            422,
        ),
        (
            r#"{"tenant_id":"t-1","product_sku":"SKU-1","used_amount":"NaN","use_unit":"KB"}"#,
            422,
        ),
        (
            r#"{"tenant_id":"t-1","product_sku":"SKU-1","used_amount":1e999,"use_unit":"KB"}"#,
            422,
        ),
        (
            r#"{"tenant_id":"","product_sku":"SKU-1","used_amount":1,"use_unit":"KB"}"#,
            422,
        ),
    ];
    *BAD.choose(rng).expect("not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_options_parse_and_stamp() {
        use std::str::FromStr;
        assert_eq!(EventTime::from_str("now"), Ok(EventTime::Skew(0)));
        assert_eq!(
            EventTime::from_str("skew=-30s"),
            Ok(EventTime::Skew(-30_000))
        );
        assert_eq!(EventTime::from_str("skew=+2s"), Ok(EventTime::Skew(2_000)));
        assert_eq!(
            EventTime::from_str("late=0.05:30m"),
            Ok(EventTime::Late {
                fraction: 0.05,
                max_ms: 1_800_000
            })
        );
        assert!(EventTime::from_str("late=2:1s").is_err());
        assert!(EventTime::from_str("sometimes").is_err());
        let all_late = EventTime::Late {
            fraction: 1.0,
            max_ms: 60_000,
        };
        let now = EventTime::Skew(0).stamp(&mut rand::rng()).unwrap();
        for _ in 0..100 {
            let t = all_late.stamp(&mut rand::rng()).unwrap();
            assert!(t <= now + 1_000 && t >= now - 61_000);
        }
        assert_eq!(EventTime::Off.stamp(&mut rand::rng()), None);
    }

    #[test]
    fn zipf_favours_the_first_tenants() {
        let t = Traffic::new(1000, 10, Skew::Zipf, false, "r".into());
        let mut rng = rand::rng();
        let mut hits = vec![0u32; 1000];
        for _ in 0..50_000 {
            hits[t.tenant_index(&mut rng)] += 1;
        }
        let top10: u32 = hits[..10].iter().sum();
        let bottom500: u32 = hits[500..].iter().sum();
        assert!(
            top10 > bottom500,
            "top 10 tenants {top10} vs bottom 500 {bottom500}"
        );
    }

    #[test]
    fn uniform_touches_every_tenant() {
        let t = Traffic::new(50, 10, Skew::Uniform, false, "r".into());
        let mut rng = rand::rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5_000 {
            seen.insert(t.tenant_index(&mut rng));
        }
        assert_eq!(seen.len(), 50);
    }

    #[test]
    fn distinct_walks_every_key_once() {
        let t = Traffic::new(100, 10, Skew::Uniform, false, "r".into());
        let mut rng = rand::rng();
        let keys: std::collections::HashSet<_> = (0..1000)
            .map(|i| {
                let p = t.distinct(i, &mut rng);
                (p.tenant_id, p.product_sku)
            })
            .collect();
        assert_eq!(keys.len(), 1000);
    }

    #[test]
    fn pulses_have_cents_and_ids_when_asked() {
        let t = Traffic::new(5, 10, Skew::Uniform, true, "run".into());
        let p = t.pulse(7, &mut rand::rng());
        assert_eq!(p.pulse_id.as_deref(), Some("run-7"));
        let cent = crate::money::parse("0.01").unwrap();
        assert!(p.used_amount >= cent && p.used_amount <= crate::money::parse("1000").unwrap());
        assert!(p.used_amount.fractional_digit_count() <= 2);
        let mut fine = t.clone();
        fine.amounts = Amounts::Fine;
        for _ in 0..100 {
            let a = fine.amount(&mut rand::rng());
            assert!(a.normalized().fractional_digit_count() <= 9);
        }
        let sku: usize = p.product_sku[4..].parse().unwrap();
        assert_eq!(p.use_unit, UNITS[sku % UNITS.len()]);
    }
}
