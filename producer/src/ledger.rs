//! The ledger: totals of every pulse that got a 2xx, counted once per pulse id; and the check
//! of those totals against the Processor's.
//!
//! Exact: amounts are decimals here, in the ingestor and at the reference Processor, so a total
//! matches only when it is equal to the last digit — there is no tolerance.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::money::{Dec, canonical};
use crate::processor::KeyTotal;
use crate::traffic::Pulse;

type Key = (String, String, String);

/// What the producer got acknowledged.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Ledger {
    /// Pulses counted (duplicates of an id already counted excluded).
    pub pulses: u64,
    pub totals: Vec<KeyTotal>,
    /// Per event window and key, for pulses sent with a timestamp (`--event-time`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub window_totals: Vec<KeyTotal>,
    /// The window length the producer placed stamped pulses with (`--window`).
    #[serde(default)]
    pub window_secs: u64,
    /// Per key: the count, max and min of its pulses — what a meter of the key bills (the
    /// ledger does not know which keys are metered, nor the ingestor's order for `latest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meters: Vec<KeyTotal>,
    #[serde(skip)]
    map: BTreeMap<Key, Dec>,
    #[serde(skip)]
    stats: BTreeMap<Key, Stats>,
    #[serde(skip)]
    windows: BTreeMap<(u64, String, String, String), Dec>,
    #[serde(skip)]
    ids: HashSet<String>,
}

impl Ledger {
    /// Records a pulse whose request got a 2xx. A pulse id already recorded is not counted again.
    pub fn acknowledged(&mut self, p: &Pulse) {
        if let Some(id) = &p.pulse_id
            && !self.ids.insert(format!("{}\u{0}{id}", p.tenant_id))
        {
            return;
        }
        self.pulses += 1;
        if let (Some(ts), true) = (p.timestamp_ms, self.window_secs > 0) {
            let w = (ts.max(0) as u64 / 1000) / self.window_secs * self.window_secs;
            *self
                .windows
                .entry((
                    w,
                    p.tenant_id.clone(),
                    p.product_sku.clone(),
                    p.use_unit.clone(),
                ))
                .or_default() += &p.used_amount;
        }
        let key = (
            p.tenant_id.clone(),
            p.product_sku.clone(),
            p.use_unit.clone(),
        );
        let one = Stats::of(&p.used_amount);
        match self.stats.get_mut(&key) {
            Some(s) => s.add(&one),
            None => {
                self.stats.insert(key.clone(), one);
            }
        }
        *self.map.entry(key).or_default() += &p.used_amount;
    }

    /// Per key, its pulses' count, max and min (`KeyTotal::aggregation` says which).
    pub fn meters(&self) -> Vec<KeyTotal> {
        if self.stats.is_empty() {
            return self.meters.clone();
        }
        let mut out = Vec::new();
        for (k, s) in &self.stats {
            for (agg, v) in [
                ("count", Dec::from(s.count)),
                ("max", s.max.clone()),
                ("min", s.min.clone()),
            ] {
                out.push(KeyTotal::new(k.clone(), agg, v));
            }
        }
        out
    }

    /// The per-key totals.
    pub fn totals(&self) -> Vec<KeyTotal> {
        if self.map.is_empty() {
            return self.totals.clone();
        }
        self.map
            .iter()
            .map(|((t, s, u), a)| KeyTotal {
                tenant_id: t.clone(),
                product_sku: s.clone(),
                use_unit: u.clone(),
                used_amount: a.clone(),
                window_start: None,
                aggregation: None,
            })
            .collect()
    }

    /// A ledger that also keeps totals per event window of `window_secs` (UTC-aligned).
    pub fn with_windows(window_secs: u64) -> Self {
        Ledger {
            window_secs,
            ..Default::default()
        }
    }

    /// The per-window totals of stamped pulses.
    pub fn window_totals(&self) -> Vec<KeyTotal> {
        if self.windows.is_empty() {
            return self.window_totals.clone();
        }
        self.windows
            .iter()
            .map(|((w, t, s, u), a)| KeyTotal {
                tenant_id: t.clone(),
                product_sku: s.clone(),
                use_unit: u.clone(),
                used_amount: a.clone(),
                window_start: Some(*w),
                aggregation: None,
            })
            .collect()
    }

    pub fn total_amount(&self) -> Dec {
        self.totals().iter().map(|k| &k.used_amount).sum()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let out = Ledger {
            pulses: self.pulses,
            totals: self.totals(),
            window_totals: self.window_totals(),
            window_secs: self.window_secs,
            meters: self.meters(),
            ..Default::default()
        };
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let l: Ledger = serde_json::from_slice(&std::fs::read(path)?)?;
        Ok(l)
    }

    /// Merges another ledger (several producer runs into one check).
    pub fn merge(&mut self, other: &Ledger) {
        if self.map.is_empty() {
            for k in self.totals.drain(..) {
                self.map
                    .insert((k.tenant_id, k.product_sku, k.use_unit), k.used_amount);
            }
        }
        self.pulses += other.pulses;
        if self.windows.is_empty() {
            for k in self.window_totals.drain(..) {
                self.windows.insert(
                    (
                        k.window_start.unwrap_or(0),
                        k.tenant_id,
                        k.product_sku,
                        k.use_unit,
                    ),
                    k.used_amount,
                );
            }
        }
        if self.stats.is_empty() {
            self.stats = Stats::read(&std::mem::take(&mut self.meters));
        }
        for (k, s) in Stats::read(&other.meters()) {
            match self.stats.get_mut(&k) {
                Some(held) => held.add(&s),
                None => {
                    self.stats.insert(k, s);
                }
            }
        }
        self.window_secs = self.window_secs.max(other.window_secs);
        for k in other.window_totals() {
            *self
                .windows
                .entry((
                    k.window_start.unwrap_or(0),
                    k.tenant_id,
                    k.product_sku,
                    k.use_unit,
                ))
                .or_default() += &k.used_amount;
        }
        for k in other.totals() {
            *self
                .map
                .entry((k.tenant_id, k.product_sku, k.use_unit))
                .or_default() += &k.used_amount;
        }
    }
}

/// A key's pulses: how many, the largest, the smallest.
#[derive(Debug, Clone)]
struct Stats {
    count: u64,
    max: Dec,
    min: Dec,
}

impl Stats {
    fn of(amount: &Dec) -> Self {
        Stats {
            count: 1,
            max: amount.clone(),
            min: amount.clone(),
        }
    }

    fn add(&mut self, o: &Stats) {
        self.count += o.count;
        if o.max > self.max {
            self.max = o.max.clone();
        }
        if o.min < self.min {
            self.min = o.min.clone();
        }
    }

    /// Back from [`Ledger::meters`] (a saved ledger).
    fn read(meters: &[KeyTotal]) -> BTreeMap<Key, Stats> {
        let mut out: BTreeMap<Key, Stats> = BTreeMap::new();
        for m in meters {
            let key = (
                m.tenant_id.clone(),
                m.product_sku.clone(),
                m.use_unit.clone(),
            );
            let s = out.entry(key).or_insert_with(|| Stats::of(&m.used_amount));
            match m.aggregation() {
                "count" => s.count = canonical(&m.used_amount).parse().unwrap_or(0),
                "max" => s.max = m.used_amount.clone(),
                "min" => s.min = m.used_amount.clone(),
                _ => {}
            }
        }
        out
    }
}

/// Differences between what was acknowledged and what the Processor holds.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Diff {
    pub matched: usize,
    /// Acknowledged but absent at the Processor.
    pub missing: Vec<KeyTotal>,
    /// At the Processor but never acknowledged.
    pub extra: Vec<KeyTotal>,
    /// Present on both sides with different totals: (expected, found).
    pub off: Vec<(KeyTotal, KeyTotal)>,
    /// Who holds the found side, as the report names it: the Processor (`verify`) or the
    /// ingestor (`verify --ingestor`, what the service still holds).
    #[serde(skip)]
    pub holder: Holder,
}

/// The side a ledger is compared with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    #[default]
    Processor,
    Ingestor,
    Database,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Holder::Processor => "Processor has",
            Holder::Ingestor => "ingestor holds",
            Holder::Database => "database holds",
        })
    }
}

impl Diff {
    pub fn balanced(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.off.is_empty()
    }
}

/// Compares expected totals with the Processor's, per (window, key, aggregation). A key's
/// total for an aggregation appears once on either side (the Processor combines them).
pub fn compare(expected: &[KeyTotal], found: &[KeyTotal]) -> Diff {
    type Slot = (Option<u64>, String, String, String, Option<String>);
    let key = |k: &KeyTotal| {
        (
            k.window_start,
            k.tenant_id.clone(),
            k.product_sku.clone(),
            k.use_unit.clone(),
            k.aggregation.clone(),
        )
    };
    let mut found_map: BTreeMap<Slot, Dec> = BTreeMap::new();
    for k in found {
        *found_map.entry(key(k)).or_default() += &k.used_amount;
    }
    let mut d = Diff::default();
    for k in expected {
        match found_map.remove(&key(k)) {
            None => d.missing.push(k.clone()),
            Some(v) if v == k.used_amount => d.matched += 1,
            Some(v) => d.off.push((
                k.clone(),
                KeyTotal {
                    used_amount: v,
                    ..k.clone()
                },
            )),
        }
    }
    for ((window_start, tenant_id, product_sku, use_unit, aggregation), used_amount) in found_map {
        d.extra.push(KeyTotal {
            tenant_id,
            product_sku,
            use_unit,
            used_amount,
            window_start,
            aggregation,
        });
    }
    d
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |k: &KeyTotal| {
            let key = match &k.aggregation {
                Some(a) => format!(
                    "({:?}, {:?}, {:?}) {a}",
                    k.tenant_id, k.product_sku, k.use_unit
                ),
                None => format!("({:?}, {:?}, {:?})", k.tenant_id, k.product_sku, k.use_unit),
            };
            match k.window_start {
                Some(w) => format!("window {w} {key}"),
                None => key,
            }
        };
        if self.balanced() {
            return writeln!(f, "books balance: {} keys match", self.matched);
        }
        writeln!(
            f,
            "books do NOT balance: {} match, {} missing, {} extra, {} off",
            self.matched,
            self.missing.len(),
            self.extra.len(),
            self.off.len()
        )?;
        for k in self.missing.iter().take(20) {
            writeln!(
                f,
                "  missing {}: acknowledged {}, {} nothing",
                name(k),
                canonical(&k.used_amount),
                self.holder
            )?;
        }
        for k in self.extra.iter().take(20) {
            writeln!(
                f,
                "  extra   {}: {} {}, never acknowledged",
                name(k),
                self.holder,
                canonical(&k.used_amount)
            )?;
        }
        for (k, v) in self.off.iter().take(20) {
            writeln!(
                f,
                "  off     {}: acknowledged {}, {} {} (diff {})",
                name(k),
                canonical(&k.used_amount),
                self.holder,
                canonical(&v.used_amount),
                canonical(&(&v.used_amount - &k.used_amount))
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: &str, a: &str, id: Option<&str>) -> Pulse {
        Pulse {
            tenant_id: t.into(),
            product_sku: "S".into(),
            used_amount: crate::money::parse(a).unwrap(),
            use_unit: "KB".into(),
            pulse_id: id.map(str::to_string),
            timestamp_ms: None,
        }
    }

    fn kt(t: &str, a: &str) -> KeyTotal {
        KeyTotal {
            window_start: None,
            aggregation: None,
            tenant_id: t.into(),
            product_sku: "S".into(),
            use_unit: "KB".into(),
            used_amount: crate::money::parse(a).unwrap(),
        }
    }

    #[test]
    fn duplicates_count_once_per_tenant_and_id() {
        let mut l = Ledger::default();
        l.acknowledged(&p("a", "1.5", Some("1")));
        l.acknowledged(&p("a", "1.5", Some("1")));
        l.acknowledged(&p("b", "2.0", Some("1")));
        l.acknowledged(&p("a", "0.25", None));
        l.acknowledged(&p("a", "0.25", None));
        assert_eq!(l.pulses, 4);
        assert_eq!(l.totals(), vec![kt("a", "2.0"), kt("b", "2.0")]);
    }

    #[test]
    fn a_saved_ledger_loads_and_merges() {
        let dir = std::env::temp_dir().join(format!("ledger-{}", std::process::id()));
        let mut l = Ledger::default();
        l.acknowledged(&p("a", "1.0", None));
        l.save(&dir).unwrap();
        let mut back = Ledger::load(&dir).unwrap();
        assert_eq!(back.totals(), vec![kt("a", "1.0")]);
        back.merge(&l);
        assert_eq!(back.totals(), vec![kt("a", "2.0")]);
        std::fs::remove_file(dir).unwrap();
    }

    #[test]
    fn compare_names_missing_extra_and_off() {
        let d = compare(
            &[kt("a", "1.0"), kt("b", "2.0"), kt("c", "3.0")],
            &[kt("a", "1.0"), kt("c", "3.5"), kt("d", "4.0")],
        );
        assert_eq!(d.matched, 1);
        assert_eq!(d.missing, vec![kt("b", "2.0")]);
        assert_eq!(d.extra, vec![kt("d", "4.0")]);
        assert_eq!(d.off.len(), 1);
        let text = d.to_string();
        assert!(
            text.contains("missing (\"b\"")
                && text.contains("extra   (\"d\"")
                && text.contains("off     (\"c\""),
            "{text}"
        );
        assert!(text.contains("Processor has nothing"), "{text}");
        let of_ingestor = Diff {
            holder: Holder::Ingestor,
            ..d
        }
        .to_string();
        assert!(
            of_ingestor.contains("ingestor holds nothing") && !of_ingestor.contains("Processor"),
            "{of_ingestor}"
        );
        // Exact: equal values in any notation balance; one unit in the 18th digit does not.
        assert!(compare(&[kt("a", "0.30")], &[kt("a", "0.3")]).balanced());
        assert!(!compare(&[kt("a", "0.3")], &[kt("a", "0.300000000000000001")]).balanced());
    }
}
