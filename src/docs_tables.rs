//! The operator's manual's tables against the code: `docs/configuration.md` names every
//! setting of `settings!` (and nothing else), and `docs/operations.md` names every metric the
//! service exports with every label value it pre-initialises (outcomes, reasons, placements).

use std::collections::{BTreeMap, BTreeSet};

use crate::config::SETTINGS;

/// The rows of the first markdown table under `heading` (cells split, header and rule dropped).
fn table_rows(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let after = doc
        .split_once(heading)
        .unwrap_or_else(|| panic!("{heading} missing"))
        .1;
    after
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

/// Every `code` span of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_configuration_table_names_every_setting_and_only_settings() {
    let doc = include_str!("../docs/configuration.md");
    let documented: BTreeSet<String> = table_rows(doc, "## Configuration")
        .iter()
        .flat_map(|r| code_spans(&r[1]))
        .collect();
    let settings: BTreeSet<String> = SETTINGS
        .iter()
        .map(|s| s.name.to_string())
        .chain(["RUST_LOG".to_string()])
        .collect();
    let missing: Vec<_> = settings.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&settings).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/configuration.md's table: missing {missing:?}, not settings {unknown:?}"
    );
}

/// Metric families and the values of their low-cardinality labels, from the exposition.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let text = crate::metrics::Metrics::new().render();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            out.entry(name.to_string()).or_default();
        } else if !line.starts_with('#') {
            let Some((name, labels)) = line.split_once('{') else {
                continue;
            };
            for l in labels.split(',') {
                let Some((k, v)) = l.split_once('=') else {
                    continue;
                };
                if ["outcome", "reason", "placement", "op"].contains(&k) {
                    let v = v.trim_end_matches(|c| c != '"').trim_matches('"');
                    out.entry(name.to_string())
                        .or_default()
                        .insert(v.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn the_metrics_table_names_every_metric_and_label_value() {
    let doc = include_str!("../docs/operations.md");
    let rows = table_rows(doc, "## Metrics");
    for (metric, values) in exported() {
        let row = rows
            .iter()
            .find(|r| {
                code_spans(&r[1])
                    .iter()
                    .any(|c| c.split('{').next() == Some(metric.as_str()))
            })
            .unwrap_or_else(|| panic!("docs/operations.md's metrics table lacks {metric}"));
        let what = code_spans(&row[3]);
        for v in values {
            assert!(
                what.contains(&v),
                "docs/operations.md: {metric}'s row does not explain `{v}`"
            );
        }
    }
}
