//! Reading and retiring sealed windows: the pending list, HSCAN steps with exact totals,
//! delete-after-ack and the one-step finish (invariant 5).

use super::keys::PendingWindow;
use super::scripts::{DELIVERED, FINISH_WINDOW};
use super::{Conn, Store, StoreError};

/// The exact total of a record from its two limbs, as canonical decimal text. `lo` may be
/// negative (by at most a few hundred units): releases before this one carried a low limb that
/// Lua's doubles rounded up to the carry threshold, leaving `lo` just below zero and `hi` 4,000
/// up — the total is still exact.
pub fn exact_total(lo: &str, hi: &str) -> Option<String> {
    let lo: i128 = lo.parse().ok()?;
    let hi: u128 = hi.parse().ok()?;
    let total = i128::try_from(hi.checked_mul(crate::amount::LIMB)?)
        .ok()?
        .checked_add(lo)?;
    let units = u128::try_from(total).ok()?;
    Some(crate::amount::Amount::from_units(units).to_string())
}

/// A shard's recorded `LATE_MAX_AGE` and its last change: when a window becomes final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateLimits {
    /// `LATE_MAX_AGE` (s).
    pub max: u64,
    /// The smallest value it had before its last change (s).
    pub prev: u64,
    /// When it last changed (Redis seconds; 0: never).
    pub changed: u64,
}

impl LateLimits {
    /// When the window ending at `end` becomes final: `end` plus how old a pulse for it may
    /// be — the smallest value `LATE_MAX_AGE` had for a window that ended before it last
    /// changed (as `max_age` in write.lua, which refuses pulses older than that).
    pub fn final_at(&self, end: u64) -> u64 {
        let age = if end <= self.changed {
            self.max.min(self.prev)
        } else {
            self.max
        };
        end + age
    }
}

impl Store {
    /// The shard's late-pulse limits as recorded (`conf`); this replica's `LATE_MAX_AGE` for a
    /// shard that recorded none.
    pub async fn late_limits(&self, conn: &mut Conn, shard: u32) -> Result<LateLimits, StoreError> {
        let (max, prev, changed): (Option<u64>, Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.keys.conf(shard))
            .arg("late_max")
            .arg("late_prev")
            .arg("late_changed")
            .query_async(conn)
            .await?;
        let max = max.unwrap_or(self.late_max_age_secs);
        Ok(LateLimits {
            max,
            prev: prev.unwrap_or(max),
            changed: changed.unwrap_or(0),
        })
    }

    /// Sealed windows of a shard awaiting delivery, oldest first.
    pub async fn pending(
        &self,
        conn: &mut Conn,
        shard: u32,
    ) -> Result<Vec<PendingWindow>, StoreError> {
        self.windows_in(conn, &self.keys.pending(shard)).await
    }

    /// The windows listed in a sorted set of window members (pending or dead-letter index),
    /// oldest first.
    pub(super) async fn windows_in(
        &self,
        conn: &mut Conn,
        index: &str,
    ) -> Result<Vec<PendingWindow>, StoreError> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(index)
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| PendingWindow::parse(m))
            .collect())
    }

    /// One `HSCAN` step: the next cursor and the (field, value) pairs.
    pub async fn hscan(
        &self,
        conn: &mut Conn,
        key: &str,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(String, String)>), StoreError> {
        let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?;
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            pairs.push((f, v));
        }
        Ok((next, pairs))
    }

    /// One step through a sealed window: the next cursor and each record's field with its exact
    /// total as canonical decimal text (`None` when the stored value cannot be read).
    pub async fn scan_window(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(String, Option<String>)>), StoreError> {
        let key = self.keys.sealed(shard, w);
        let (next, pairs) = self.hscan(conn, &key, cursor, count).await?;
        let his: Vec<Option<String>> = if pairs.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET")
                .arg(format!("{key}:hi"))
                .arg(pairs.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>())
                .query_async(conn)
                .await?
        };
        let out = pairs
            .into_iter()
            .zip(his)
            .map(|((f, lo), hi)| {
                let a = exact_total(&lo, hi.as_deref().unwrap_or("0"));
                (f, a)
            })
            .collect();
        Ok((next, out))
    }

    /// Deletes delivered records, both limbs in one step.
    pub async fn delivered(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        fields: &[&str],
    ) -> Result<(), StoreError> {
        if fields.is_empty() {
            return Ok(());
        }
        let key = self.keys.sealed(shard, w);
        DELIVERED
            .key(&key)
            .key(format!("{key}:hi"))
            .key(format!("{key}:ts"))
            .arg(fields)
            .invoke_async::<i64>(conn)
            .await?;
        Ok(())
    }

    /// Removes a window from the pending set once its hashes are gone, checked and removed in
    /// one script. Returns false if records are still there (a batch failed, or a replay put
    /// records back).
    pub async fn finish_window(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
    ) -> Result<bool, StoreError> {
        let key = self.keys.sealed(shard, w);
        let done: i64 = FINISH_WINDOW
            .key(&key)
            .key(format!("{key}:hi"))
            .key(self.keys.pending(shard))
            .key(self.keys.dead_index(shard))
            .key(self.keys.index_tenants(shard, w.start))
            .arg(&w.member)
            .arg(self.keys.base(shard))
            .arg(w.start)
            .invoke_async(conn)
            .await?;
        Ok(done == 1)
    }

    /// Marks that the delivery of a window (or amendment) begins: from now on the write script
    /// sends late pulses for it to its next amendment. Kept the deployment's recorded
    /// `LATE_MAX_AGE` plus a day (this replica's, for a shard that recorded none). Returns the
    /// window's `final_at` (Redis seconds), fixed by its first mark: every delivery of every
    /// record of the window carries the same.
    pub async fn mark_drain(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
    ) -> Result<u64, StoreError> {
        Ok(super::scripts::MARK_DRAIN
            .key(self.keys.late(shard, w.start))
            .key(self.keys.conf(shard))
            .arg(w.amendment)
            .arg(self.late_max_age_secs + 86_400)
            .arg(w.end)
            .arg(self.late_max_age_secs)
            .invoke_async(conn)
            .await?)
    }

    /// The event times (Unix ms) of `latest` meter fields of a window, as the write script kept
    /// them (`<sealed>:ts`).
    pub async fn latest_times(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        fields: &[&str],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        Ok(redis::cmd("HMGET")
            .arg(format!("{}:ts", self.keys.sealed(shard, w)))
            .arg(fields)
            .query_async(conn)
            .await?)
    }

    /// Length of a hash.
    pub async fn hlen(&self, conn: &mut Conn, key: &str) -> Result<u64, StoreError> {
        Ok(redis::cmd("HLEN").arg(key).query_async(conn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::exact_total;

    #[test]
    fn a_low_limb_left_just_below_zero_still_reads_exactly() {
        assert_eq!(
            exact_total("-200", "4000").as_deref(),
            Some("3999999.9999999998")
        );
        assert_eq!(exact_total("1500000000000", "0").as_deref(), Some("1.5"));
        assert_eq!(exact_total("-1", "0"), None);
        assert_eq!(exact_total("x", "0"), None);
    }
}
