//! The write and seal scripts: counting a commit exactly once into the current generation
//! (invariants 1, 2, 3, 11, 12), and sealing a shard at its window boundary.

use super::keys::marker_member;
use super::scripts::{SEAL, WRITE};
use super::{Conn, Store, StoreError};

/// One pulse (or a pre-aggregated group of pulses without ids) for the write script.
#[derive(Debug, Clone)]
pub struct WriteItem {
    pub field: String,
    pub amount: crate::amount::Amount,
    /// Dedupe digest of the pulse id, if it has one.
    pub digest: Option<[u8; 16]>,
    /// The tenant's placement hash, kept as the marker's value so `reshard` can move it.
    pub placement: i64,
}

/// How long Redis keeps a commit's token (and reply): a re-sent call within it is answered from
/// it; after it, a re-send would count again, so nothing re-sends that late (see the worker).
/// 600 s; 3 s under the test fault hook `short-token`, so a test can watch it expire.
pub fn commit_token_ttl() -> std::time::Duration {
    if crate::supervise::fault("short-token") {
        std::time::Duration::from_secs(3)
    } else {
        std::time::Duration::from_secs(600)
    }
}

/// What the write script reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReply {
    /// Start of the window the items were counted in.
    pub window_start: u64,
    /// Per item: counted (true) or a duplicate (false).
    pub counted: Vec<bool>,
}

/// What the seal script reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SealReply {
    pub generation: String,
    pub window_start: u64,
    /// End of the current window (its start plus the length it was opened with).
    pub window_end: u64,
    pub toggled: bool,
    /// Redis time, seconds.
    pub redis_now: u64,
    /// Redis time, microseconds, for timing the next boundary precisely.
    pub redis_now_micros: u64,
}

impl Store {
    /// Counts items into the shard's current generation in one script call. `token` is unique
    /// to this commit: a re-sent call (a client library's retry after a lost reply) returns the
    /// first call's answer instead of counting again.
    pub async fn write(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
        items: &[WriteItem],
    ) -> Result<WriteReply, StoreError> {
        let mut replies = self.write_many(conn, token, &[(shard, items)]).await?;
        Ok(replies.pop().expect("one section, one reply"))
    }

    /// Counts a whole commit — several shards' items — in one script call. Only for one Redis:
    /// a cluster node takes one slot per call, so there each shard is its own call, and only
    /// there are the generation keys declared (one Redis routes nothing; each declared key
    /// costs the call about 0.1 µs of Redis CPU).
    pub async fn write_many(
        &self,
        conn: &mut Conn,
        token: &str,
        sections: &[(u32, &[WriteItem])],
    ) -> Result<Vec<WriteReply>, StoreError> {
        let first = sections.first().map_or(0, |s| s.0);
        let mut inv = WRITE.prepare_invoke();
        inv.key(self.keys.commit(first, token));
        let legacy_until = self.legacy_markers_until();
        let legacy = legacy_until > 0;
        inv.arg(self.window_secs)
            .arg(self.dedupe_ttl_secs)
            .arg(legacy_until)
            .arg(sections.len())
            .arg(commit_token_ttl().as_secs())
            .arg(self.shards);
        let declare = self.is_cluster();
        let mut with_id: Vec<Vec<usize>> = Vec::with_capacity(sections.len());
        for (shard, items) in sections {
            if declare {
                for k in self.keys.generation_keys(*shard) {
                    inv.key(k);
                }
            }
            let ids: Vec<usize> = (0..items.len())
                .filter(|&i| items[i].digest.is_some())
                .collect();
            inv.arg(self.keys.base(*shard))
                .arg(items.len() - ids.len())
                .arg(ids.len());
            // Items without id first (three values each), then those with an id.
            for it in items.iter().filter(|it| it.digest.is_none()) {
                let (hi, lo) = it.amount.limbs();
                inv.arg(&it.field).arg(lo).arg(hi.to_string());
            }
            for &i in &ids {
                let it = &items[i];
                let d = it.digest.as_ref().expect("filtered on digest");
                let (hi, lo) = it.amount.limbs();
                inv.arg(&it.field)
                    .arg(lo)
                    .arg(hi.to_string())
                    .arg(&marker_member(d, it.placement)[..]);
                if legacy {
                    inv.arg(hex::encode(d));
                }
            }
            with_id.push(ids);
        }
        let reply: redis::Value = inv.invoke_async(conn).await.map_err(|e| {
            match (e.code(), e.detail().and_then(|d| d.trim().parse().ok())) {
                (Some("SHARDSCHANGED"), Some(deployment)) => StoreError::ShardsChanged {
                    configured: self.shards,
                    deployment,
                },
                _ => StoreError::Redis(e),
            }
        })?;
        let reply = match reply {
            redis::Value::Array(items) => {
                // {"OVERFLOW", field...}: nothing was written.
                let texts: Vec<String> = items
                    .into_iter()
                    .map(redis::from_redis_value)
                    .collect::<Result<_, _>>()
                    .map_err(|e| StoreError::Reply(e.to_string()))?;
                return match texts.split_first() {
                    Some((tag, fields)) if tag == "OVERFLOW" => {
                        Err(StoreError::Overflow(fields.to_vec()))
                    }
                    _ => Err(StoreError::Reply(texts.join(","))),
                };
            }
            v => redis::from_redis_value::<String>(v).map_err(redis::RedisError::from)?,
        };
        let sizes: Vec<usize> = sections.iter().map(|(_, items)| items.len()).collect();
        parse_reply(&reply, &sizes, &with_id)
    }

    /// Until when (Redis seconds) markers of the previous layout — one string key per id —
    /// may still matter; 0 when none can exist.
    pub fn legacy_markers_until(&self) -> u64 {
        self.legacy_markers_until
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Learns (and on the first start of this layout records) since when dedupe markers are
    /// sets, so that markers the previous release left are consulted until they expire.
    pub async fn init_markers(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let (now, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await?;
        // A deployment the previous release used has `shards_max`; a new one has nothing to
        // consult.
        let old: bool = redis::cmd("HEXISTS")
            .arg(self.keys.meta())
            .arg("shards_max")
            .query_async(&mut c)
            .await?;
        let _: bool = redis::cmd("HSETNX")
            .arg(self.keys.meta())
            .arg("marker_sets_since")
            .arg(if old { now } else { 0 })
            .query_async(&mut c)
            .await?;
        let since: u64 = redis::cmd("HGET")
            .arg(self.keys.meta())
            .arg("marker_sets_since")
            .query_async(&mut c)
            .await?;
        let until = if since == 0 || since + self.dedupe_ttl_secs <= now {
            0
        } else {
            since + self.dedupe_ttl_secs
        };
        self.legacy_markers_until
            .store(until, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Seals the shard if its window has ended (idempotent).
    pub async fn seal(&self, conn: &mut Conn, shard: u32) -> Result<SealReply, StoreError> {
        let mut inv = SEAL.prepare_invoke();
        for k in self.keys.generation_keys(shard) {
            inv.key(k);
        }
        let (generation, window_start, toggled, redis_now, micros, window_end): (
            String,
            u64,
            u8,
            u64,
            u64,
            u64,
        ) = inv
            .arg(self.keys.base(shard))
            .arg(self.window_secs)
            .arg(self.dedupe_ttl_secs)
            .arg(self.shards)
            .invoke_async(conn)
            .await?;
        Ok(SealReply {
            generation,
            window_start,
            window_end,
            toggled: toggled == 1,
            redis_now,
            redis_now_micros: redis_now * 1_000_000 + micros,
        })
    }
}

/// The write script's reply — per section `"<window start>:<flags>"`, joined by `;`, one flag
/// per item with an id (`1` counted, `0` a re-send) — as one [`WriteReply`] per section. It is
/// a string because the script also stores it under the commit's token and answers a re-sent
/// call with it. `sizes[s]` is section `s`'s item count, `with_id[s]` the indexes of its items
/// with an id, in the order the script saw them.
fn parse_reply(
    reply: &str,
    sizes: &[usize],
    with_id: &[Vec<usize>],
) -> Result<Vec<WriteReply>, StoreError> {
    let bad = || StoreError::Reply(reply.to_string());
    let parts: Vec<&str> = reply.split(';').collect();
    if parts.len() != sizes.len() || with_id.len() != sizes.len() {
        return Err(bad());
    }
    parts
        .iter()
        .zip(sizes)
        .zip(with_id)
        .map(|((part, &size), ids)| {
            let (start, flags) = part.split_once(':').ok_or_else(bad)?;
            let window_start = start.parse().map_err(|_| bad())?;
            if flags.len() != ids.len() || ids.iter().any(|&i| i >= size) {
                return Err(bad());
            }
            let mut counted = vec![true; size];
            for (flag, &i) in flags.bytes().zip(ids) {
                counted[i] = flag == b'1';
            }
            Ok(WriteReply {
                window_start,
                counted,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_says_per_section_where_items_counted_and_which_ids_were_re_sent() {
        // Two sections: 3 items (ids on items 0 and 2), then 1 item without id.
        let r = parse_reply("3600:10;3600:", &[3, 1], &[vec![0, 2], vec![]]).unwrap();
        assert_eq!(
            r,
            vec![
                WriteReply {
                    window_start: 3600,
                    counted: vec![true, true, false],
                },
                WriteReply {
                    window_start: 3600,
                    counted: vec![true],
                },
            ]
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_the_commit_is_an_error_not_a_guess() {
        let ids = [vec![0], vec![]];
        for bad in [
            "3600:1",
            "3600:1;x:",
            "3600:11;3600:",
            "3600;3600:",
            "3600:1;3600:;7:",
        ] {
            assert!(
                matches!(parse_reply(bad, &[1, 1], &ids), Err(StoreError::Reply(_))),
                "{bad}"
            );
        }
        assert!(
            parse_reply("3600:1", &[1], &[vec![5]]).is_err(),
            "an id index past the section"
        );
    }
}
