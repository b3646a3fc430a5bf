//! Changing `SHARDS` without forgetting pulse ids (invariant 12).
//!
//! A pulse id's dedupe marker lives in its tenant's shard, because the write script must set it
//! in the same slot as the aggregate. A new shard count moves tenants to other shards, where
//! their markers are not, so a re-sent id would count again. The deployment's count is
//! therefore recorded in Redis (`{prefix}:meta`, field `shards`): a replica started with another
//! `SHARDS` refuses to start (exit 64) and a running one that sees it change stops. The count is
//! changed offline with `pulse-ingestor reshard --shards N`, while no replica runs: every live
//! marker is copied, with its remaining TTL, into the tenant's shard under the new count (the
//! marker's value is the tenant's placement hash); a marker from before this layout, which has
//! no placement, is copied into every new shard (its digest is tenant-scoped, so that cannot
//! match another tenant's id). Then the new count is recorded. Windows left in the old shards
//! are sealed and delivered as before (the largest count ever used is drained).

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

use super::{Conn, Store, StoreError};

/// Replicas seen within this many seconds count as running.
pub const LIVE_WITHIN_SECS: u64 = 60;

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
        let mut report = ReshardReport {
            from,
            to,
            ..Default::default()
        };
        if from != to {
            // Markers may sit in any shard ever used (an earlier reshard copied, not moved).
            for shard in 0..from.max(max.unwrap_or(0)) {
                self.move_markers(&mut conn, shard, to, &mut report).await?;
            }
        }
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

    async fn move_markers(
        &self,
        conn: &mut Conn,
        shard: u32,
        to: u32,
        report: &mut ReshardReport,
    ) -> Result<(), StoreError> {
        let pattern = format!("{}:seen:*", self.keys.base(shard));
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = match conn {
                Conn::Single(c) => scan.query_async(c).await?,
                // Every key of a shard shares its slot: ask the master that owns it.
                Conn::Cluster(c) => {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                        Route::with_key(self.keys.base(shard), SlotAddr::Master),
                    ));
                    redis::from_redis_value(c.route_command(scan, route).await?)
                        .map_err(redis::RedisError::from)?
                }
            };
            cursor = next;
            if !keys.is_empty() {
                let mut read = redis::pipe();
                for k in &keys {
                    read.cmd("GET").arg(k).cmd("PTTL").arg(k);
                }
                let values: Vec<(Option<i64>, i64)> = read.query_async(conn).await?;
                let mut write = redis::pipe();
                let mut writes = 0;
                for (k, (value, pttl)) in keys.iter().zip(values) {
                    let (Some(value), true) = (value, pttl > 0) else {
                        continue; // expired meanwhile
                    };
                    let digest = k.rsplit(':').next().unwrap_or_default();
                    let targets: Vec<u32> = if (0..1_000_000_000_000).contains(&value) {
                        // Written before markers carried a placement (its value was a window).
                        report.markers_copied_everywhere += 1;
                        (0..to).collect()
                    } else {
                        report.markers_moved += 1;
                        vec![(value as u64 % u64::from(to)) as u32]
                    };
                    for t in targets.into_iter().filter(|&t| t != shard) {
                        writes += 1;
                        write
                            .cmd("SET")
                            .arg(self.keys.seen(t, digest))
                            .arg(value)
                            .arg("PX")
                            .arg(pttl)
                            .arg("NX")
                            .ignore();
                    }
                }
                if writes > 0 {
                    write.query_async::<()>(conn).await?;
                }
            }
            if cursor == 0 {
                return Ok(());
            }
        }
    }
}
