//! What a tenant owes for one key and aggregation, from its records: the contract's rules, and
//! the same as the PostgreSQL view `window_usage` (`migrations/V1__usage_records.sql`).
//!
//! `sum` and `count`: the records (a window's and its amendments') add up. `max` / `min`: the
//! largest / smallest of them. `latest`: the value of the record with the greatest `latest_at`;
//! on a tie, the higher amendment number (it was counted later). Over several windows the same
//! rules apply, a tie on `latest_at` going to the later window.

use crate::money::Dec;

/// The aggregation a record names; absent means `sum`.
pub fn aggregation_of(name: Option<&str>) -> &str {
    name.unwrap_or("sum")
}

/// How `KeyTotal::aggregation` carries it: `None` for `sum` (as the ledger and older callers
/// have it), the name otherwise.
pub fn label(aggregation: &str) -> Option<String> {
    (aggregation != "sum").then(|| aggregation.to_string())
}

/// The event time of a `latest` value in nanoseconds, for ordering (`None` sorts first).
fn instant(rfc3339: Option<&str>) -> Option<i128> {
    let t = time::OffsetDateTime::parse(rfc3339?, &time::format_description::well_known::Rfc3339)
        .ok()?;
    Some(t.unix_timestamp_nanos())
}

/// A running combination of the records of one key and aggregation.
#[derive(Debug, Clone, Default)]
pub struct Combined {
    value: Option<Dec>,
    /// For `latest`: (latest_at, window start, amendment) of the value held.
    rank: (Option<i128>, u64, u32),
}

impl Combined {
    /// Adds one record of `aggregation` (its window start in Unix seconds).
    pub fn add(
        &mut self,
        aggregation: &str,
        amount: &Dec,
        latest_at: Option<&str>,
        window: u64,
        amends: u32,
    ) {
        let Some(held) = &mut self.value else {
            self.value = Some(amount.clone());
            self.rank = (instant(latest_at), window, amends);
            return;
        };
        match aggregation {
            "max" if *amount > *held => *held = amount.clone(),
            "min" if *amount < *held => *held = amount.clone(),
            "max" | "min" => {}
            "latest" => {
                let rank = (instant(latest_at), window, amends);
                if rank >= self.rank {
                    *held = amount.clone();
                    self.rank = rank;
                }
            }
            _ => *held += amount,
        }
    }

    /// The combined value (zero when nothing was added).
    pub fn value(&self) -> Dec {
        self.value.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::parse;

    fn of(agg: &str, recs: &[(&str, Option<&str>, u32)]) -> String {
        let mut c = Combined::default();
        for (a, at, n) in recs {
            c.add(agg, &parse(a).unwrap(), *at, 0, *n);
        }
        crate::money::canonical(&c.value())
    }

    #[test]
    fn each_aggregation_combines_by_its_rule() {
        let r = [("2", None, 0), ("5", None, 1), ("1.5", None, 2)];
        assert_eq!(of("sum", &r), "8.5");
        assert_eq!(of("count", &r), "8.5");
        assert_eq!(of("max", &r), "5");
        assert_eq!(of("min", &r), "1.5");
        let t = |s| Some(s);
        let latest = [
            ("7", t("2026-01-01T10:00:00.500Z"), 0),
            ("3", t("2026-01-01T10:00:00.900Z"), 1),
            ("4", t("2026-01-01T10:00:00.200Z"), 2),
        ];
        assert_eq!(of("latest", &latest), "3", "the greatest latest_at wins");
        let tie = [
            ("9", t("2026-01-01T10:00:00.900Z"), 2),
            ("3", t("2026-01-01T10:00:00.900Z"), 1),
        ];
        assert_eq!(
            of("latest", &tie),
            "9",
            "a tie goes to the higher amendment"
        );
    }
}
