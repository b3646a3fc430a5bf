//! What the simulator sends: tenants, SKUs and units drawn from a distribution, amounts with
//! decimals, optional pulse ids, re-sends of earlier pulses and malformed bodies.

use rand::Rng;
use rand::seq::IndexedRandom;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;

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
    pub used_amount: f64,
    pub use_unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulse_id: Option<String>,
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
            // Cents, like real usage figures; 0.01 to 1000.00.
            used_amount: f64::from(rng.random_range(1u32..=100_000)) / 100.0,
            use_unit: UNITS[sku % UNITS.len()].to_string(),
            pulse_id: self.ids.then(|| format!("{}-{seq}", self.run_id)),
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
        assert!(p.used_amount >= 0.01 && p.used_amount <= 1000.0);
        assert_eq!((p.used_amount * 100.0).round() / 100.0, p.used_amount);
        let sku: usize = p.product_sku[4..].parse().unwrap();
        assert_eq!(p.use_unit, UNITS[sku % UNITS.len()]);
    }
}
