//! Meters: which aggregations a pulse's key is billed by. Everything is a `sum` unless the
//! meters file (`METERS_FILE`) says otherwise; storage held, seats or peak instances are gauges
//! (`max`, `min`, `latest`), request counts are `count`s.
//!
//! The file, one rule a line (`#` comments):
//!
//! ```text
//! sku:storage-*   max,latest
//! sku:vm-large    sum,max
//! unit:requests   count
//! ```
//!
//! A rule selects by SKU (exact, or a glob with `*` and `?`) or by unit. The first matching of:
//! an exact SKU rule, then SKU globs in file order, then a unit rule, wins; no match: `sum`.
//! Every aggregation of a pulse is applied in the same atomic write step as its dedupe and
//! placement; each is delivered as its own record (`aggregation`, and its own `record_id`).
//! `average` is `sum / count`: ask for both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// One aggregation of a key's pulses over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Aggregation {
    Sum,
    Count,
    Max,
    Min,
    /// The value of the pulse with the latest event time (ties: the later arrival).
    Latest,
}

impl Aggregation {
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Max => "max",
            Aggregation::Min => "min",
            Aggregation::Latest => "latest",
        }
    }

    /// The one-letter code the write script takes.
    pub fn code(self) -> char {
        match self {
            Aggregation::Sum => 's',
            Aggregation::Count => 'c',
            Aggregation::Max => 'x',
            Aggregation::Min => 'n',
            Aggregation::Latest => 'l',
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sum" => Aggregation::Sum,
            "count" => Aggregation::Count,
            "max" => Aggregation::Max,
            "min" => Aggregation::Min,
            "latest" => Aggregation::Latest,
            _ => return None,
        })
    }
}

/// The meters in force: rules by exact SKU, SKU glob and unit.
#[derive(Debug, Default)]
pub struct MeterSet {
    exact: HashMap<String, Vec<Aggregation>>,
    globs: Vec<(glob::Pattern, Vec<Aggregation>)>,
    units: HashMap<String, Vec<Aggregation>>,
    /// SHA-256 of the file text (as hex), recorded in the log at load.
    pub digest: String,
}

const SUM: &[Aggregation] = &[Aggregation::Sum];

impl MeterSet {
    /// Parses the file text; every problem is listed with its line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut set = MeterSet {
            digest: hex::encode(Sha256::digest(text.as_bytes())),
            ..Default::default()
        };
        let mut errors = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(selector), Some(aggs), None) = (parts.next(), parts.next(), parts.next())
            else {
                errors.push(format!(
                    "line {}: expected `sku:<name or glob>` or `unit:<name>`, then aggregations",
                    n + 1
                ));
                continue;
            };
            let mut list = Vec::new();
            for a in aggs.split(',') {
                match Aggregation::parse(a) {
                    Some(a) if !list.contains(&a) => list.push(a),
                    Some(_) => errors.push(format!("line {}: {a} twice", n + 1)),
                    None => errors.push(format!(
                        "line {}: unknown aggregation {a:?} (sum, count, max, min, latest)",
                        n + 1
                    )),
                }
            }
            list.sort();
            match selector.split_once(':') {
                Some(("sku", s)) if !s.is_empty() && (s.contains('*') || s.contains('?')) => {
                    match glob::Pattern::new(s) {
                        Ok(p) => set.globs.push((p, list)),
                        Err(e) => errors.push(format!("line {}: bad glob {s:?}: {e}", n + 1)),
                    }
                }
                Some(("sku", s)) if !s.is_empty() => {
                    if set.exact.insert(s.to_string(), list).is_some() {
                        errors.push(format!("line {}: sku {s:?} has two rules", n + 1));
                    }
                }
                Some(("unit", u)) if !u.is_empty() => {
                    if set.units.insert(u.to_string(), list).is_some() {
                        errors.push(format!("line {}: unit {u:?} has two rules", n + 1));
                    }
                }
                _ => errors.push(format!(
                    "line {}: selector {selector:?} is not sku:<name or glob> or unit:<name>",
                    n + 1
                )),
            }
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors.join("; "))
        }
    }

    /// The aggregations of a key: exact SKU, then SKU globs in file order, then unit; `sum`.
    pub fn of(&self, sku: &str, unit: &str) -> &[Aggregation] {
        if let Some(a) = self.exact.get(sku) {
            return a;
        }
        if let Some((_, a)) = self.globs.iter().find(|(p, _)| p.matches(sku)) {
            return a;
        }
        self.units.get(unit).map_or(SUM, Vec::as_slice)
    }
}

/// The meters of a running service, reloaded when the file changes (a change applies when two
/// polls, 2 s apart, read the same content, so a file being rewritten is never applied half).
pub struct Meters {
    path: Option<PathBuf>,
    current: ArcSwap<MeterSet>,
    seen: crate::settle::Settle,
}

impl Meters {
    /// No file: every key is a sum.
    pub fn none() -> Arc<Self> {
        Arc::new(Meters {
            path: None,
            current: ArcSwap::from_pointee(MeterSet::default()),
            seen: Default::default(),
        })
    }

    /// Loads the file; an unreadable or invalid one at start-up is an error listing every problem.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let set = MeterSet::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        info!(digest = %set.digest, path = %path.display(), "meters loaded");
        Ok(Arc::new(Meters {
            path: Some(path.to_path_buf()),
            current: ArcSwap::from_pointee(set),
            seen: Default::default(),
        }))
    }

    pub fn get(&self) -> Arc<MeterSet> {
        self.current.load_full()
    }

    fn reload(&self) {
        let Some(path) = &self.path else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            warn!("meters file not readable; keeping the meters in force");
            return;
        };
        let digest = crate::settle::Settle::digest(&text);
        if hex::encode(digest) == self.current.load().digest || !self.seen.agreed(digest) {
            return;
        }
        match MeterSet::parse(&text) {
            Ok(set) => {
                info!(digest = %set.digest, "meters reloaded");
                self.current.store(Arc::new(set));
            }
            Err(e) => warn!(error = %e, "meters file not reloaded; keeping the meters in force"),
        }
    }

    /// Polls the file every 2 s until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => self.reload(),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Aggregation::*;

    #[test]
    fn rules_match_exact_sku_then_globs_then_unit() {
        let m = MeterSet::parse(
            "# gauges\nsku:storage-* max,latest\nsku:storage-cold min\nsku:s?? count\nunit:requests count\n",
        )
        .unwrap();
        assert_eq!(m.of("storage-hot", "GB"), &[Max, Latest]);
        assert_eq!(m.of("storage-cold", "GB"), &[Min], "exact beats glob");
        assert_eq!(m.of("sku", "requests"), &[Count], "glob beats unit");
        assert_eq!(m.of("api", "requests"), &[Count]);
        assert_eq!(m.of("api", "KB"), &[Sum], "the default");
    }

    #[test]
    fn every_problem_is_listed_with_its_line() {
        let e = MeterSet::parse("sku:a avg\nunit: sum\nsku:b sum,sum\nnonsense\nsku:[* max\n")
            .unwrap_err();
        for want in ["line 1", "line 2", "line 3", "line 4", "line 5"] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }
}
