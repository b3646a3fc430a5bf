//! The key layout (for Rust; the scripts' copy is `scripts/keys_lib.lua`, and a test holds the
//! two equal) and the storage identity of a pulse: which hash field names its key
//! (invariant 8: a JSON array, so any UTF-8 — `:`, `|`, `"`, spaces, emoji — round-trips and no
//! two keys share a field), which shard holds its tenant, how its id is remembered, and the
//! stable id of the record it ends up in (invariant 6). Every key of shard `s` starts with the
//! hash tag `{<prefix>:<s>}` (invariant 10). Pure; unit- and property-tested.

use sha2::{Digest, Sha256};

/// The Redis hash field of a `(tenant, sku, unit)` triple: a JSON array of the three strings.
pub fn encode_field(tenant: &str, sku: &str, unit: &str) -> String {
    serde_json::to_string(&(tenant, sku, unit)).expect("strings always serialise")
}

/// The key a record aggregates: what a field of an aggregate hash names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldKey {
    pub tenant: String,
    pub sku: String,
    pub unit: String,
    /// `sum` for a three-element field; a meter's other aggregations add a fourth element.
    pub aggregation: String,
}

/// The inverse of [`encode_field`] (and of a meter's field, which adds the aggregation's name
/// as a fourth element); `None` for a field this service did not write.
pub fn decode_field(field: &[u8]) -> Option<FieldKey> {
    let v: Vec<String> = serde_json::from_slice(field).ok()?;
    let mut it = v.into_iter();
    let (Some(tenant), Some(sku), Some(unit)) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    let aggregation = match it.next() {
        None => "sum".to_string(),
        Some(a) if matches!(a.as_str(), "count" | "max" | "min" | "latest") => a,
        Some(_) => return None,
    };
    if it.next().is_some() {
        return None;
    }
    Some(FieldKey {
        tenant,
        sku,
        unit,
        aggregation,
    })
}

/// The shard of a tenant: a stable hash, identical on every replica and release.
pub fn shard_of(tenant: &str, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(tenant.as_bytes()) % u64::from(shards)) as u32
}

/// The tenant's placement hash: the value its shard is derived from (`shard_of` is this, as
/// `u64`, modulo `SHARDS`). Dedupe markers keep it so `reshard` can move them.
pub fn placement_of(tenant: &str) -> i64 {
    xxhash_rust::xxh3::xxh3_64(tenant.as_bytes()) as i64
}

/// The dedupe digest of a pulse id, scoped by tenant: 128 bits of SHA-256 (markers keep the
/// first 96). A cryptographic hash so that one tenant cannot craft ids that collide with
/// another's.
pub fn dedupe_digest(tenant: &str, pulse_id: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update((tenant.len() as u64).to_be_bytes());
    h.update(tenant.as_bytes());
    h.update(pulse_id.as_bytes());
    h.finalize()[..16].try_into().expect("16 of 32 bytes")
}

/// The stable identity of a delivered record: `(window_start, shard, tenant, sku, unit)`
/// hashed. The shard is part of it so that, in the one window during which `SHARDS` changed,
/// a key counted in two shards arrives as two records the Processor adds up — never as two
/// records with one id, where an upsert would drop one.
///
/// A format byte follows (it marked the exact layout's windows apart from the float layout's,
/// which is retired; kept so that record ids stay what they were).
///
/// Amendment n ≥ 1 of a window (late pulses counted after its delivery began) adds its number,
/// so that each amendment of a key is a record of its own (invariant 6): a Processor that
/// upserts by `record_id` adds them to the window's record instead of replacing it.
pub fn record_id(window_start: u64, shard: u32, field: &str, amendment: u32) -> String {
    let mut h = Sha256::new();
    h.update(window_start.to_be_bytes());
    h.update(shard.to_be_bytes());
    h.update(field.as_bytes());
    h.update([1u8]);
    if amendment > 0 {
        h.update(b"a");
        h.update(amendment.to_be_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// A pulse id's dedupe marker as a set member: 96 bits of its digest and the tenant's placement
/// modulo 65,536 (big-endian), 14 bytes — short enough for Redis' smallest string allocation,
/// and enough for `reshard` to place it under any shard count that divides 65,536.
pub fn marker_member(digest: &[u8; 16], placement: i64) -> [u8; 14] {
    let mut m = [0u8; 14];
    m[..12].copy_from_slice(&digest[..12]);
    m[12..].copy_from_slice(&((placement as u64 % 65_536) as u16).to_be_bytes());
    m
}

/// The slot of a marker among a bucket's `slots` hashes: its first two bytes modulo `slots`
/// (as `slot` in `scripts/write.lua`).
pub fn marker_slot(marker: &[u8], slots: u32) -> u32 {
    let head = u32::from(marker[0]) * 256 + u32::from(marker[1]);
    head % slots.max(1)
}

/// `text` as a Redis glob (`SCAN MATCH`) that matches it literally: `*`, `?`, `[`, `]` and `\`
/// escaped.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The key layout of one deployment.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    /// `{prefix:shard}` — the hash tag every key of the shard starts with.
    pub fn base(&self, shard: u32) -> String {
        format!("{{{}:{shard}}}", self.prefix)
    }
    /// The shard's namespace of windows and settings: `{prefix:shard}:x` ("x" for exact, the
    /// fixed-point layout that replaced the float one; see `scripts/seal_lib.lua`).
    pub(crate) fn ns(&self, shard: u32) -> String {
        format!("{}:x", self.base(shard))
    }
    /// The shard's recorded settings (window length, dedupe TTL, SHARDS; see `conf` in
    /// `scripts/seal_lib.lua`).
    pub fn conf(&self, shard: u32) -> String {
        format!("{}:conf", self.ns(shard))
    }
    /// The current generation, "A" or "B" (exact layout).
    pub fn generation(&self, shard: u32) -> String {
        format!("{}:gen", self.ns(shard))
    }
    /// The current window's start (mirrors the shard's settings hash, for readers).
    pub fn window(&self, shard: u32) -> String {
        format!("{}:window", self.ns(shard))
    }
    /// The aggregate hash of `generation` ("A" or "B"); its `:hi` twin holds high limbs.
    pub fn agg(&self, shard: u32, generation: &str) -> String {
        format!("{}:agg:{generation}", self.ns(shard))
    }
    /// The keys the write and seal scripts may touch that are known before they run: they are
    /// declared in `KEYS` so that a cluster routes, redirects and migrates them correctly.
    pub fn generation_keys(&self, shard: u32) -> [String; 11] {
        let ns = self.ns(shard);
        [
            self.conf(shard),
            format!("{ns}:wins"),
            format!("{ns}:futures"),
            self.generation(shard),
            self.window(shard),
            format!("{ns}:window_len"),
            self.agg(shard, "A"),
            format!("{}:hi", self.agg(shard, "A")),
            self.agg(shard, "B"),
            format!("{}:hi", self.agg(shard, "B")),
            self.pending(shard),
        ]
    }
    /// The sealed hash of a window (its `:hi` twin holds the high limbs).
    pub fn sealed(&self, shard: u32, w: &PendingWindow) -> String {
        if w.amendment > 0 {
            format!("{}:amend:{}:{}", self.ns(shard), w.start, w.amendment)
        } else {
            format!("{}:sealed:{}", self.ns(shard), w.start)
        }
    }
    /// A window's late-pulse state: `drain` (the last of the window (0) and its amendments
    /// whose delivery began), `open` (the amendment gathering late pulses).
    pub fn late(&self, shard: u32, start: u64) -> String {
        format!("{}:late:{start}", self.ns(shard))
    }
    pub fn pending(&self, shard: u32) -> String {
        format!("{}:pending", self.base(shard))
    }
    pub fn dead(&self, shard: u32, w: &PendingWindow) -> String {
        if w.amendment > 0 {
            format!("{}:dead:{}:a{}", self.ns(shard), w.start, w.amendment)
        } else {
            format!("{}:dead:{}", self.ns(shard), w.start)
        }
    }
    /// The tenants holding a usage index in a window (see `index` in `scripts/seal_lib.lua`).
    pub fn index_tenants(&self, shard: u32, start: u64) -> String {
        format!("{}:x:idxt:{start}", self.base(shard))
    }
    /// The audit list of dead letters an operator set aside (newest first), kept for good.
    pub fn set_aside(&self, shard: u32) -> String {
        format!("{}:x:set_aside", self.base(shard))
    }
    pub fn dead_index(&self, shard: u32) -> String {
        format!("{}:dead_windows", self.base(shard))
    }
    /// A shard's dedupe markers: `<ttl>:<bucket>:<slot>`, a slot hash of a `DEDUPE_TTL`
    /// bucket (see `scripts/write.lua`); from the release before, `<bucket>`, a set per bucket.
    pub fn seen(&self, shard: u32, suffix: &str) -> String {
        format!("{}:seen:{suffix}", self.base(shard))
    }
    /// Each marker bucket's slot count (`<ttl>:<bucket>`) and id count (`c<ttl>:<bucket>`).
    pub fn marks(&self, shard: u32) -> String {
        format!("{}:x:marks", self.base(shard))
    }
    /// A commit's token: makes a write script call that a client library re-sends count once.
    pub fn commit(&self, shard: u32, token: &str) -> String {
        format!("{}:commit:{token}", self.base(shard))
    }
    /// Live replicas (sorted set of instance ids by last heartbeat, Redis seconds).
    pub fn replicas(&self) -> String {
        format!("{{{}}}:replicas", self.prefix)
    }
    /// The capped stream of recently rejected requests.
    pub fn rejections(&self) -> String {
        format!("{{{}}}:rejections", self.prefix)
    }
    /// Deployment-wide facts (the largest shard count used), under its own hash tag.
    pub fn meta(&self) -> String {
        format!("{{{}}}:meta", self.prefix)
    }
    /// The shard and kind of an aggregate hash from its key (the inverse of [`Keys::agg`],
    /// [`Keys::sealed`] and the `future` hashes); `None` for any other key, a `:hi` or `:ts`
    /// twin included. For readers of a whole deployment (the test harness, operators' tools).
    pub fn aggregate_of(&self, key: &str) -> Option<(u32, Aggregate)> {
        let rest = key.strip_prefix('{')?.strip_prefix(self.prefix.as_str())?;
        let (shard, rest) = rest.strip_prefix(':')?.split_once("}:x:")?;
        let shard: u32 = shard.parse().ok()?;
        let parts: Vec<&str> = rest.split(':').collect();
        let kind = match parts.as_slice() {
            ["agg", "A" | "B"] => Aggregate::Generation,
            ["sealed", start] => Aggregate::Window(start.parse().ok()?),
            ["amend", start, n] => Aggregate::Amendment(start.parse().ok()?, n.parse().ok()?),
            ["future", start] => Aggregate::Future(start.parse().ok()?),
            _ => return None,
        };
        Some((shard, kind))
    }
    pub fn lock(&self, shard: u32) -> String {
        format!("{}:lock", self.base(shard))
    }
}

/// What an aggregate hash holds, read back from its key (see [`Keys::aggregate_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// Generation `A` or `B`: the window being written.
    Generation,
    /// A sealed window, by its start.
    Window(u64),
    /// Amendment `n` of the window starting at the first value.
    Amendment(u64, u32),
    /// Pulses stamped ahead, for the window starting at this value.
    Future(u64),
}

/// A sealed window (or an amendment of one) awaiting delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingWindow {
    /// The member in the pending set: `"<start>:<end>:x"`; `"<start>:<end>:x:a<n>:<due>"` for
    /// amendment n of that window, deliverable from `due`.
    pub member: String,
    pub start: u64,
    pub end: u64,
    /// 0: the window itself; n ≥ 1: its n-th amendment (late pulses after its delivery began).
    pub amendment: u32,
    /// When it may be delivered (plus `STABILISATION_DELAY`): the window's end, or for an
    /// amendment the end of the window during which it gathered.
    pub due: u64,
}

impl PendingWindow {
    pub fn parse(member: &str) -> Option<Self> {
        let mut parts = member.split(':');
        let start = parts.next()?.parse().ok()?;
        let end = parts.next()?.parse().ok()?;
        let (amendment, due) = match (parts.next(), parts.next(), parts.next()) {
            (Some("x"), None, None) => (0, end),
            (Some("x"), Some(a), Some(due)) => {
                let n: u32 = a.strip_prefix('a')?.parse().ok()?;
                if n == 0 {
                    return None;
                }
                (n, due.parse().ok()?)
            }
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(PendingWindow {
            member: member.to_string(),
            start,
            end,
            amendment,
            due,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn naive_joins_do_not_collide() {
        assert_ne!(encode_field("a:b", "c", "d"), encode_field("a", "b:c", "d"));
        assert_ne!(encode_field("a|b", "c", "d"), encode_field("a", "b|c", "d"));
        assert_ne!(dedupe_digest("ab", "c"), dedupe_digest("a", "bc"));
    }

    #[test]
    fn globs_match_a_prefix_literally() {
        assert_eq!(glob_escape("{bill[eu]:3}"), "{bill\\[eu\\]:3}");
        assert_eq!(glob_escape("a*b?c\\"), "a\\*b\\?c\\\\");
    }

    #[test]
    fn pending_members_parse_windows_and_amendments() {
        let w = PendingWindow::parse("3600:7200:x").unwrap();
        assert_eq!((w.start, w.end, w.amendment, w.due), (3600, 7200, 0, 7200));
        // The float layout's member is not a window of this layout.
        assert!(PendingWindow::parse("3600:7200").is_none());
        let w = PendingWindow::parse("3600:7200:x:a2:14400").unwrap();
        assert_eq!((w.start, w.end, w.amendment, w.due), (3600, 7200, 2, 14400));
        for bad in [
            "3600:7200:y",
            "x:7200:x",
            "3600:7200:x:a0:1",
            "3600:7200:x:b1:1",
            "3600:7200:x:a1",
        ] {
            assert!(PendingWindow::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn aggregate_keys_read_back_to_what_they_hold() {
        let keys = Keys::new("bill[eu]");
        let w = PendingWindow::parse("3600:7200:x").unwrap();
        let a = PendingWindow::parse("3600:7200:x:a2:10800").unwrap();
        assert_eq!(
            keys.aggregate_of(&keys.agg(3, "B")),
            Some((3, Aggregate::Generation))
        );
        assert_eq!(
            keys.aggregate_of(&keys.sealed(3, &w)),
            Some((3, Aggregate::Window(3600)))
        );
        assert_eq!(
            keys.aggregate_of(&keys.sealed(3, &a)),
            Some((3, Aggregate::Amendment(3600, 2)))
        );
        let hi = format!("{}:hi", keys.sealed(3, &w));
        for other in [
            hi.as_str(),
            &keys.pending(3),
            &keys.conf(3),
            "{bill[eu]:3}:x:sealed:x",
        ] {
            assert_eq!(keys.aggregate_of(other), None, "{other}");
        }
        assert_eq!(Keys::new("other").aggregate_of(&keys.agg(3, "A")), None);
    }

    #[test]
    fn amendments_have_their_own_record_ids() {
        let f = encode_field("t", "s", "u");
        let ids: std::collections::HashSet<String> =
            (0..4).map(|n| record_id(3600, 1, &f, n)).collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            record_id(3600, 1, &f, 0),
            record_id(3600, 1, &f, 0),
            "stable"
        );
    }

    /// Record ids never change across releases: a new id for a record a Processor may hold is
    /// a double charge. These are the ids every release since the exact layout has delivered.
    #[test]
    fn record_ids_are_what_earlier_releases_delivered() {
        let f = encode_field("tenant-7", "SKU-1", "KB");
        assert_eq!(
            record_id(1_796_079_600, 3, &f, 0),
            "a847a21501521fa997bc0df485c42109"
        );
        assert_eq!(
            record_id(1_796_079_600, 3, &f, 2),
            "a126177494f52748628eb9d0e426e9d8"
        );
    }

    proptest! {
        #[test]
        fn fields_round_trip(t in "\\PC*", s in "\\PC*", u in "\\PC*") {
            let f = encode_field(&t, &s, &u);
            prop_assert_eq!(
                decode_field(f.as_bytes()),
                Some(FieldKey { tenant: t, sku: s, unit: u, aggregation: "sum".into() })
            );
        }

        #[test]
        fn shards_stay_in_range(t in "\\PC*", n in 1u32..1000) {
            prop_assert!(shard_of(&t, n) < n);
        }
    }
}
