//! The books: what got a 2xx against what Redis or the Processor holds, exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Dec, JsonReply, eventually, http};

pub type Key = (String, String, String);

/// The books balance exactly: every key's total equal to the last digit, no tolerance.
pub fn assert_books(expected: &BTreeMap<Key, Dec>, found: &BTreeMap<Key, Dec>) {
    let mut problems = Vec::new();
    for (k, v) in expected {
        match found.get(k) {
            None => problems.push(format!("missing {k:?} ({v})")),
            Some(f) if f != v => problems.push(format!("off {k:?}: sent {v}, found {f}")),
            _ => {}
        }
    }
    for k in found.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("extra {k:?}"));
    }
    assert!(
        problems.is_empty(),
        "books do not balance ({} problems): {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
}

/// Waits until the window current at Redis time `now` has been sealed on every shard
/// (`window_of(shard)` reads a shard's `:window`) and `base` reports nothing pending.
pub async fn wait_all_delivered(
    now: u64,
    window: u64,
    shards: u32,
    window_of: impl Fn(u32) -> Option<u64>,
    base: &str,
    timeout: Duration,
) {
    let current = now - now % window;
    let c = http();
    let ok = eventually(timeout, || async {
        (0..shards).all(|s| window_of(s).is_some_and(|w| w > current))
            && match c.get(format!("{base}/admin/pending")).send().await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|p| p["pending_windows"] == 0),
                Err(_) => false,
            }
    })
    .await;
    assert!(ok, "windows were not all delivered within {timeout:?}");
}

/// The Processor's records summed per key.
pub fn by_key(records: &[pulse_producer::processor::Record]) -> BTreeMap<Key, Dec> {
    let mut m: BTreeMap<Key, Dec> = BTreeMap::new();
    for r in records {
        *m.entry((
            r.tenant_id.clone(),
            r.product_sku.clone(),
            r.use_unit.clone(),
        ))
        .or_default() += &r.used_amount;
    }
    m
}

/// `GET /admin/pending` of a replica.
pub async fn pending(base: &str) -> serde_json::Value {
    http()
        .get(format!("{base}/admin/pending"))
        .json_reply()
        .await
}

/// `POST /admin/flush`: seals what has ended and tries to deliver it now.
pub async fn flush_now(base: &str) -> serde_json::Value {
    http()
        .post(format!("{base}/admin/flush"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or_default()
}

/// Waits until `base` reports no window pending (every window delivered or dead-lettered).
pub async fn wait_delivered(base: &str, timeout: Duration) {
    let ok = eventually(timeout, || async {
        pending(base).await["pending_windows"] == 0
    })
    .await;
    assert!(ok, "windows still pending: {}", pending(base).await);
}

/// `pulse-producer verify` of a ledger against the Processor: its exit code and report.
pub async fn verify(ledger: &std::path::Path, processor: &str) -> (i32, String) {
    let ledger = ledger.to_str().unwrap();
    super::producer(&["verify", "--ledger", ledger, "--processor", processor]).await
}

/// The books balance at the Processor, as `pulse-producer verify` says (`what`: the scenario).
pub async fn assert_verified(ledger: &std::path::Path, processor: &str, what: &str) {
    let (code, out) = verify(ledger, processor).await;
    assert_eq!(code, 0, "books must balance ({what}):\n{out}");
    assert!(out.contains("books balance"), "{out}");
}
