//! Changing `SHARDS` without forgetting pulse ids (invariant 12).
//!
//! A pulse id's dedupe marker lives in its tenant's shard, because the write script must set it
//! in the same slot as the aggregate. A new shard count moves tenants to other shards, where
//! their markers are not, so a re-sent id would count again. The deployment's count is
//! therefore recorded in Redis (`{prefix}:meta`, field `shards`): a replica started with another
//! `SHARDS` refuses to start (exit 64) and a running one that sees it change stops. The count is
//! changed offline with `pulse-ingestor reshard --shards N`, while no replica runs: every live
//! marker is copied, with its expiry, into the tenant's shard under the new count (a marker
//! carries the tenant's placement hash modulo 65,536 after its digest, which places it exactly
//! for any count that divides 65,536 — use a power of two); for another count, and for a marker
//! from the previous release (no placement), it is copied into every new shard (its digest is
//! tenant-scoped, so that cannot match another tenant's id; the memory returns when its bucket
//! expires). Then the new count is recorded. Windows left in the old shards
//! are sealed and delivered as before (the largest count ever used is drained).

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

use super::{Conn, Store, StoreError};

/// Replicas seen within this many seconds count as running (each heartbeats every
/// [`HEARTBEAT_SECS`]).
pub const LIVE_WITHIN_SECS: u64 = 15;

/// How often a replica records that it is alive, on its own timer (not the window's).
pub const HEARTBEAT_SECS: u64 = 3;

/// What `reshard` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReshardReport {
    pub from: u32,
    pub to: u32,
    /// Markers copied into their tenant's new shard.
    pub markers_moved: u64,
    /// Markers without a placement (written before this layout), copied into every shard.
    pub markers_copied_everywhere: u64,
}

/// Why `reshard` refused.
#[derive(Debug, thiserror::Error)]
pub enum ReshardError {
    #[error(
        "replicas are running ({0:?} seen in the last {LIVE_WITHIN_SECS} s): stop every replica first (or pass --force if they are gone)"
    )]
    ReplicasRunning(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Copies every live dedupe marker to its shard under `to` shards and records `to` as the
    /// deployment's count. Refuses while replicas are running, unless `force`.
    pub async fn reshard(&self, to: u32, force: bool) -> Result<ReshardReport, ReshardError> {
        let mut conn = self.conn().await?;
        let (from, max): (Option<u32>, Option<u32>) = redis::cmd("HMGET")
            .arg(self.keys.meta())
            .arg("shards")
            .arg("shards_max")
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        let (now, _): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.replicas())
            .arg(now.saturating_sub(LIVE_WITHIN_SECS))
            .arg("+inf")
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        if !live.is_empty() && !force {
            return Err(ReshardError::ReplicasRunning(live));
        }
        let from = from.unwrap_or(to);
        // Fence first: every shard records the new count, so a replica that was paused across
        // the heartbeat check and wakes up with the old one has its writes refused
        // (SHARDSCHANGED) — before any marker is moved, so none is written behind the move.
        for shard in 0..from.max(to).max(max.unwrap_or(0)) {
            redis::cmd("HSET")
                .arg(self.keys.conf(shard))
                .arg("shards")
                .arg(to)
                .query_async::<()>(&mut conn)
                .await
                .map_err(StoreError::from)?;
        }
        let mut mover = Mover {
            store: self,
            conn: &mut conn,
            to,
            report: ReshardReport {
                from,
                to,
                ..Default::default()
            },
        };
        if from != to {
            // Markers may sit in any shard ever used (an earlier reshard copied, not moved).
            for shard in 0..from.max(max.unwrap_or(0)) {
                mover.shard(shard).await?;
            }
        }
        let report = mover.report;
        redis::pipe()
            .cmd("HSET")
            .arg(self.keys.meta())
            .arg("shards")
            .arg(to)
            .cmd("HSET")
            .arg(self.keys.meta())
            .arg("shards_max")
            .arg(max.unwrap_or(0).max(from).max(to))
            .query_async::<()>(&mut conn)
            .await
            .map_err(StoreError::from)?;
        Ok(report)
    }
}

/// A hash field and its value, as `HSCAN` returns them.
type Field = (Vec<u8>, Vec<u8>);

/// One reshard's work: markers copied to their shards under `to` shards, counted in `report`.
struct Mover<'a> {
    store: &'a Store,
    conn: &'a mut Conn,
    to: u32,
    report: ReshardReport,
}

impl Mover<'_> {
    /// Copies one bucket set's members into the same bucket of each member's new shard, with
    /// the same expiry.
    async fn marker_set(&mut self, shard: u32, key: &str) -> Result<(), StoreError> {
        let (to, conn) = (self.to, &mut *self.conn);
        let report = &mut self.report;
        let bucket = key.rsplit(':').next().unwrap_or_default();
        let expire_at: i64 = redis::cmd("PEXPIRETIME").arg(key).query_async(conn).await?;
        let mut cursor = 0u64;
        loop {
            let (next, members): (u64, Vec<Vec<u8>>) = redis::cmd("SSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            cursor = next;
            for (target, members) in by_target(report, shard, to, members) {
                let dest = self.store.keys.seen(target, bucket);
                let mut p = redis::pipe();
                p.cmd("SADD").arg(&dest).arg(members).ignore();
                if expire_at > 0 {
                    p.cmd("PEXPIREAT")
                        .arg(&dest)
                        .arg(expire_at)
                        .arg("NX")
                        .ignore();
                }
                p.query_async::<()>(conn).await?;
            }
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// Copies one slot hash's markers (`<base>:seen:<ttl>:<bucket>:<slot>`) into the same
    /// bucket of each marker's new shard — its slot there by that shard's slot count for the
    /// bucket, recorded from this one's if it has none — with the same expiry.
    async fn marker_hash(&mut self, shard: u32, key: &str) -> Result<(), StoreError> {
        let to = self.to;
        let mut parts = key.rsplitn(4, ':');
        let (Some(_slot), Some(bucket), Some(ttl)) = (parts.next(), parts.next(), parts.next())
        else {
            return Ok(());
        };
        let bucket_field = format!("{ttl}:{bucket}");
        let (slots, expire_at): (Option<u32>, i64) = redis::pipe()
            .cmd("HGET")
            .arg(self.store.keys.marks(shard))
            .arg(&bucket_field)
            .cmd("PEXPIRETIME")
            .arg(key)
            .query_async(&mut *self.conn)
            .await?;
        let Some(slots) = slots else {
            return Ok(()); // the bucket's record is gone: its markers have expired
        };
        let mut dest_slots: std::collections::HashMap<u32, u32> = Default::default();
        let mut cursor = 0u64;
        loop {
            let (next, pairs): (u64, Vec<Field>) = redis::cmd("HSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut *self.conn)
                .await?;
            cursor = next;
            let members = pairs.into_iter().map(|(m, _)| m).collect();
            for (target, members) in by_target(&mut self.report, shard, to, members) {
                let n = match dest_slots.get(&target) {
                    Some(n) => *n,
                    None => {
                        let n = self.slot_count(target, &bucket_field, slots).await?;
                        dest_slots.insert(target, n);
                        n
                    }
                };
                let mut p = redis::pipe();
                let mut dests = std::collections::BTreeSet::new();
                for m in members {
                    let dest = self.store.keys.seen(
                        target,
                        &format!("{bucket_field}:{}", super::keys::marker_slot(&m, n)),
                    );
                    p.cmd("HSET").arg(&dest).arg(m).arg(1).ignore();
                    dests.insert(dest);
                }
                if expire_at > 0 {
                    for dest in dests {
                        p.cmd("PEXPIREAT")
                            .arg(dest)
                            .arg(expire_at)
                            .arg("NX")
                            .ignore();
                    }
                }
                p.query_async::<()>(&mut *self.conn).await?;
            }
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// The destination shard's slot count for a marker bucket, recorded as `slots` (the
    /// source's) if it has none yet.
    async fn slot_count(
        &mut self,
        target: u32,
        bucket_field: &str,
        slots: u32,
    ) -> Result<u32, StoreError> {
        let marks = self.store.keys.marks(target);
        let (n,): (u32,) = redis::pipe()
            .cmd("HSETNX")
            .arg(&marks)
            .arg(bucket_field)
            .arg(slots)
            .ignore()
            .cmd("HGET")
            .arg(&marks)
            .arg(bucket_field)
            .query_async(&mut *self.conn)
            .await?;
        Ok(n)
    }

    /// Every marker of one shard.
    async fn shard(&mut self, shard: u32) -> Result<(), StoreError> {
        // The prefix may hold glob characters (`bill[eu]`): matched literally.
        let pattern = format!(
            "{}:seen:*",
            super::keys::glob_escape(&self.store.keys.base(shard))
        );
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = match &mut *self.conn {
                Conn::Single(c) => scan.query_async(c).await?,
                // Every key of a shard shares its slot: ask the master that owns it.
                Conn::Cluster(c) => {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::with_key(self.store.keys.base(shard), SlotAddr::Master),
                    ));
                    redis::from_redis_value(c.route_command(scan, route).await?)
                        .map_err(redis::RedisError::from)?
                }
            };
            cursor = next;
            for key in keys {
                let kind: String = redis::cmd("TYPE")
                    .arg(&key)
                    .query_async(&mut *self.conn)
                    .await?;
                match kind.as_str() {
                    "hash" => self.marker_hash(shard, &key).await?,
                    "set" => self.marker_set(shard, &key).await?,
                    _ => {} // expired meanwhile
                }
            }
            if cursor == 0 {
                return Ok(());
            }
        }
    }
}

/// Markers (14 bytes: digest, then placement) grouped by the shards, other than `shard`, they
/// go to under `to` shards.
fn by_target(
    report: &mut ReshardReport,
    shard: u32,
    to: u32,
    markers: Vec<Vec<u8>>,
) -> std::collections::HashMap<u32, Vec<Vec<u8>>> {
    let mut out: std::collections::HashMap<u32, Vec<Vec<u8>>> = Default::default();
    for m in markers {
        let Some(placement) = m.get(12..14) else {
            continue;
        };
        let placement = u16::from_be_bytes(placement.try_into().expect("2 bytes"));
        for target in targets(report, shard, to, placement) {
            out.entry(target).or_default().push(m.clone());
        }
    }
    out
}

/// The shards, other than `shard`, that a marker of this placement goes to under `to` shards.
fn targets(report: &mut ReshardReport, shard: u32, to: u32, placement: u16) -> Vec<u32> {
    if 65_536 % to == 0 {
        // The placement modulo 65,536 determines the shard for such counts.
        report.markers_moved += 1;
        let target = u32::from(placement) % to;
        if target == shard {
            vec![]
        } else {
            vec![target]
        }
    } else {
        // Any other count: the marker goes to every shard (tenant-scoped digests cannot match
        // another tenant's id); memory grows until the bucket expires.
        report.markers_copied_everywhere += 1;
        (0..to).filter(|&t| t != shard).collect()
    }
}
