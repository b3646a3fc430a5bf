//! The write and seal scripts: counting a commit exactly once into the current generation
//! (invariants 1, 2, 3, 11, 12), and sealing a shard at its window boundary.

use super::keys::marker_member;
use super::scripts::{SEAL, WRITE, WRITE_LIBRARY};
use super::{Conn, LateRefusal, Store, StoreError};

/// One pulse (or a pre-aggregated group of pulses without ids) for the write script.
#[derive(Debug, Clone)]
pub struct WriteItem {
    pub field: String,
    pub amount: crate::amount::Amount,
    /// Dedupe digest of the pulse id, if it has one.
    pub digest: Option<[u8; 16]>,
    /// The tenant's placement hash, kept as the marker's value so `reshard` can move it.
    pub placement: i64,
    /// When the usage happened (Unix ms); `None`: now, in the current window.
    pub timestamp_ms: Option<i64>,
    /// The aggregations to apply, as the script's letters (`meters::Aggregation::code`);
    /// empty: a sum.
    pub ops: String,
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

/// Where a stamped pulse was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the current window (its timestamp falls in it).
    Current,
    /// In a window sealed but not yet read by a drain: it joined it.
    SealedWindow,
    /// In an amendment of a window delivered or being delivered.
    Amendment,
    /// Ahead, in a future window (within MAX_FUTURE_SKEW).
    Ahead,
}

/// What the write script reports.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReply {
    /// Start of the current window (where unstamped items were counted).
    pub window_start: u64,
    /// Its end (start plus the length it was opened with).
    pub window_end: u64,
    /// Per item: counted (true) or a duplicate (false).
    pub counted: Vec<bool>,
    /// Per item: for a stamped one, where it went and the start of its window.
    pub placed: Vec<Option<(Placement, u64)>>,
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
        if !self.layout_checked() {
            return Err(StoreError::Shared {
                message: "the deployment's key layout is not checked yet (Redis was unreachable at start); nothing was written".into(),
                ambiguous: false,
                suspect: false,
                transient: true,
            });
        }
        let first = sections.first().map_or(0, |s| s.0);
        let mut inv = if self.is_cluster() {
            Call::Script(WRITE.prepare_invoke())
        } else {
            Call::function(&WRITE_LIBRARY.function)
        };
        inv.key(self.keys.commit(first, token));
        inv.arg(self.window_arg())
            .arg(self.dedupe_ttl_secs)
            .arg(sections.len())
            .arg(commit_token_ttl().as_secs())
            .arg(self.shards);
        inv.arg(self.late_max_age_secs)
            .arg(self.late_pulses.as_str())
            .arg(self.marker_sets_until())
            .arg(
                self.marks_per_slot
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
        let layouts: Vec<SectionLayout> = sections
            .iter()
            .map(|(shard, items)| self.push_section(&mut inv, *shard, items))
            .collect();
        let reply: redis::Value = inv.invoke(conn).await.map_err(|e| {
            match (e.code(), e.detail().and_then(|d| d.trim().parse().ok())) {
                (Some("SHARDSCHANGED"), Some(deployment)) => StoreError::ShardsChanged {
                    configured: self.shards,
                    deployment,
                },
                _ => StoreError::Redis(e),
            }
        })?;
        let reply = match reply {
            redis::Value::Array(items) => return Err(refusal(items, sections, &layouts)),
            v => redis::from_redis_value::<String>(v).map_err(redis::RedisError::from)?,
        };
        parse_reply(&reply, &layouts)
    }

    /// Adds one shard's section to a write script call: its keys (declared on a cluster only:
    /// one Redis routes nothing, and each declared key costs the call Redis CPU),
    /// its base and counts, then its items — without id (three values each), with an id, and
    /// stamped.
    fn push_section(&self, inv: &mut Call<'_>, shard: u32, items: &[WriteItem]) -> SectionLayout {
        if self.is_cluster() {
            for k in self.keys.generation_keys(shard) {
                inv.key(k);
            }
        }
        let layout = SectionLayout::of(items);
        inv.arg(self.keys.base(shard))
            .arg(layout.plain.len())
            .arg(layout.big.len())
            .arg(layout.ids.len())
            .arg(layout.stamped.len());
        // A plain pulse below 1,000 units (nearly all) has no high limb: two arguments, not three.
        for &i in &layout.plain {
            let (_, lo) = items[i].amount.limbs();
            inv.arg(&items[i].field).arg(lo);
        }
        for &i in &layout.big {
            let (hi, lo) = items[i].amount.limbs();
            inv.arg(&items[i].field).arg(lo).arg(hi);
        }
        for &i in &layout.ids {
            let it = &items[i];
            let d = it.digest.as_ref().expect("sorted on digest");
            let (hi, lo) = it.amount.limbs();
            inv.arg(&it.field)
                .arg(lo)
                .arg(hi)
                .arg(&marker_member(d, it.placement)[..]);
        }
        for &i in &layout.stamped {
            let it = &items[i];
            let (hi, lo) = it.amount.limbs();
            inv.arg(&it.field).arg(lo).arg(hi);
            match it.timestamp_ms {
                Some(t) => inv.arg(t),
                None => inv.arg(""),
            };
            match &it.digest {
                Some(d) => inv.arg(&marker_member(d, it.placement)[..]),
                None => inv.arg(""),
            };
            inv.arg(&it.ops);
        }
        layout
    }

    /// Until when (Redis seconds) the marker sets of the release before — one set per bucket —
    /// are consulted; 0 when none can exist.
    pub fn marker_sets_until(&self) -> u64 {
        self.marker_sets_until
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Learns (and on the first start after the release before records) until when that
    /// release's marker sets — one set per bucket — may hold live markers, so that they are
    /// consulted until then (`marker_sets_until`); 0 for a fresh deployment.
    pub async fn init_markers(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let (now, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await?;
        // A fresh deployment recorded 0 when it registered its shards; an older one that has
        // not recorded when its sets stop mattering does so now. Set markers live at most two
        // DEDUPE_TTLs; one more covers replicas of the release before still writing them while
        // the upgrade rolls out.
        let (sets_until,): (u64,) = redis::pipe()
            .cmd("HSETNX")
            .arg(self.keys.meta())
            .arg("marker_sets_until")
            .arg(now + 3 * self.dedupe_ttl_secs)
            .ignore()
            .cmd("HGET")
            .arg(self.keys.meta())
            .arg("marker_sets_until")
            .query_async(&mut c)
            .await?;
        self.marker_sets_until.store(
            if sets_until <= now { 0 } else { sets_until },
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Learns, once at start, how many dedupe markers a slot hash may take: 64, or a quarter
    /// of the entries Redis keeps a hash compact for if that is less, so that a bucket sized
    /// from one half as busy still fits, with room for the spread of markers over slots. Not
    /// more than 64: a listpack is searched linearly, and 64 fields of 14 bytes are already
    /// ~20 bytes an id. A Redis that refuses CONFIG (a managed one) keeps 64.
    pub async fn learn_listpack_limit(&self) {
        let Ok(mut c) = self.conn().await else {
            return;
        };
        let limit: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("hash-max-listpack-entries")
            .query_async(&mut c)
            .await;
        if let Some(n) = limit
            .ok()
            .and_then(|v| v.get(1).and_then(|n| n.parse::<u32>().ok()))
        {
            self.marks_per_slot
                .store((n / 4).clamp(1, 64), std::sync::atomic::Ordering::Relaxed);
        }
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
            .arg(self.window_arg())
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

/// How a section's items go to the script: indexes of the items without id, with an id, and
/// rich ones — stamped or metered, with or without an id — each in item order.
#[derive(Debug, Default, Clone, PartialEq)]
struct SectionLayout {
    size: usize,
    /// Plain items whose amount has no high limb (below 1,000 units), and those with one.
    plain: Vec<usize>,
    big: Vec<usize>,
    ids: Vec<usize>,
    stamped: Vec<usize>,
}

impl SectionLayout {
    fn of(items: &[WriteItem]) -> Self {
        let mut l = SectionLayout {
            size: items.len(),
            ..Default::default()
        };
        for (i, it) in items.iter().enumerate() {
            match (it.timestamp_ms.is_some() || !it.ops.is_empty(), &it.digest) {
                (true, _) => l.stamped.push(i),
                (false, Some(_)) => l.ids.push(i),
                (false, None) if it.amount.limbs().0 == 0 => l.plain.push(i),
                (false, None) => l.big.push(i),
            }
        }
        l
    }
}

/// A write call in the making: the script (`EVALSHA`, on a cluster) or the library's function
/// (`FCALL`, loaded on first use and again whenever Redis answers that it does not have it — a
/// restarted Redis without persistence, a `FUNCTION FLUSH`).
enum Call<'a> {
    Script(redis::ScriptInvocation<'a>),
    Function {
        keys: Vec<Vec<u8>>,
        args: Args,
        name: &'a str,
    },
}

impl<'a> Call<'a> {
    fn function(name: &'a str) -> Self {
        Call::Function {
            keys: Vec::new(),
            args: Args::default(),
            name,
        }
    }

    fn key<T: redis::ToRedisArgs>(&mut self, k: T) -> &mut Self {
        match self {
            Call::Script(i) => {
                i.key(k);
            }
            Call::Function { keys, .. } => keys.extend(k.to_redis_args()),
        }
        self
    }

    fn arg<T: redis::ToRedisArgs>(&mut self, a: T) -> &mut Self {
        match self {
            Call::Script(i) => {
                i.arg(a);
            }
            Call::Function { args, .. } => a.write_redis_args(args),
        }
        self
    }

    async fn invoke(&self, conn: &mut Conn) -> Result<redis::Value, redis::RedisError> {
        let (keys, args, name) = match self {
            Call::Script(i) => return i.invoke_async(conn).await,
            Call::Function { keys, args, name } => (keys, args, name),
        };
        let bytes = || args.iter();
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(*name).arg(keys.len()).arg(keys);
        for a in bytes() {
            cmd.arg(a);
        }
        // Nothing ran when the function is missing or may not be called: load the library and
        // call again; where it cannot be loaded (an ACL without FUNCTION, a proxy without
        // Functions) the same code runs as the script.
        let as_script = || {
            let mut inv = WRITE.prepare_invoke();
            for k in keys {
                inv.key(k);
            }
            for a in bytes() {
                inv.arg(a);
            }
            inv
        };
        match cmd.query_async(conn).await {
            Err(e) if e.to_string().contains("Function not found") => {
                let loaded = redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(&WRITE_LIBRARY.code)
                    .query_async::<String>(conn)
                    .await;
                match loaded {
                    Ok(_) => cmd.query_async(conn).await,
                    Err(e) if unavailable_function(&e) => as_script().invoke_async(conn).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) if unavailable_function(&e) => as_script().invoke_async(conn).await,
            r => r,
        }
    }
}

/// A call's arguments in one buffer: no allocation per argument (three per pulse).
#[derive(Default)]
struct Args {
    data: Vec<u8>,
    /// Where each argument ends in `data`.
    ends: Vec<usize>,
}

impl Args {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.ends.iter().scan(0, |start, &end| {
            let arg = &self.data[*start..end];
            *start = end;
            Some(arg)
        })
    }
}

impl redis::RedisWrite for Args {
    fn write_arg(&mut self, arg: &[u8]) {
        self.data.extend_from_slice(arg);
        self.ends.push(self.data.len());
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        self.ends.push(self.data.len());
        ArgWriter(self)
    }
}

/// Writes into the last argument of an [`Args`].
struct ArgWriter<'a>(&'a mut Args);

impl std::io::Write for ArgWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.data.extend_from_slice(buf);
        if let Some(end) = self.0.ends.last_mut() {
            *end = self.0.data.len();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Redis refused to run or load a function before running anything: no permission, or no such
/// command (a proxy without Functions).
fn unavailable_function(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("NOPERM"))
        || e.to_string().contains("unknown command")
        || e.to_string().contains("NOPERM")
}

/// The write script's refusal, `{"OVERFLOW", field...}` or
/// `{"CLOSED", "<section>:<item>:<closed|old|dedupe>"...}`
/// (nothing was written), as an error naming what it refused.
fn refusal(
    items: Vec<redis::Value>,
    sections: &[(u32, &[WriteItem])],
    layouts: &[SectionLayout],
) -> StoreError {
    let texts: Vec<String> = match items.into_iter().map(redis::from_redis_value).collect() {
        Ok(t) => t,
        Err(e) => return StoreError::Reply(e.to_string()),
    };
    match texts.split_first() {
        Some((tag, fields)) if tag == "OVERFLOW" => StoreError::Overflow(fields.to_vec()),
        Some((tag, refs)) if tag == "CLOSED" => {
            // "<section>:<stamped item>:<why>", both from 1: as (shard, item index, why).
            let closed = refs
                .iter()
                .map(|r| {
                    let mut parts = r.split(':');
                    let s: usize = parts.next()?.parse().ok()?;
                    let n: usize = parts.next()?.parse().ok()?;
                    let why = match parts.next() {
                        Some("old") => LateRefusal::TooOld,
                        Some("dedupe") => LateRefusal::OlderThanDedupe,
                        _ => LateRefusal::Closed,
                    };
                    let shard = sections.get(s.checked_sub(1)?)?.0;
                    let i = *layouts.get(s - 1)?.stamped.get(n.checked_sub(1)?)?;
                    Some((shard, i, why))
                })
                .collect::<Option<Vec<_>>>();
            match closed {
                Some(c) => StoreError::Closed(c),
                None => StoreError::Reply(texts.join(",")),
            }
        }
        _ => StoreError::Reply(texts.join(",")),
    }
}

/// The write script's reply — per section `"<window start>:<flags>:<stamped>"`, joined by `;`:
/// one flag per item with an id (`1` counted, `0` a re-send), and per stamped item its flag
/// (`1` current window, `L` joined a sealed window, `A` an amendment, `F` a future window, `0`
/// a re-send) and its window start, joined by `,` — as one [`WriteReply`] per section. It is a
/// string because the script also stores it under the commit's token and answers a re-sent call
/// with it.
fn parse_reply(reply: &str, layouts: &[SectionLayout]) -> Result<Vec<WriteReply>, StoreError> {
    let bad = || StoreError::Reply(reply.to_string());
    let parts: Vec<&str> = reply.split(';').collect();
    if parts.len() != layouts.len() {
        return Err(bad());
    }
    parts
        .iter()
        .zip(layouts)
        .map(|(part, l)| {
            let mut fields = part.splitn(3, ':');
            let (Some(start), Some(flags), Some(stamped)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad());
            };
            let (start, len) = start.split_once('+').ok_or_else(bad)?;
            let window_start: u64 = start.parse().map_err(|_| bad())?;
            let window_end = window_start + len.parse::<u64>().map_err(|_| bad())?;
            if flags.len() != l.ids.len() {
                return Err(bad());
            }
            let mut counted = vec![true; l.size];
            let mut placed = vec![None; l.size];
            for (flag, &i) in flags.bytes().zip(&l.ids) {
                counted[i] = flag == b'1';
            }
            let stamped: Vec<&str> = if stamped.is_empty() {
                Vec::new()
            } else {
                stamped.split(',').collect()
            };
            if stamped.len() != l.stamped.len() {
                return Err(bad());
            }
            for (one, &i) in stamped.iter().zip(&l.stamped) {
                let (flag, w) = one.split_at_checked(1).ok_or_else(bad)?;
                let w: u64 = w.parse().map_err(|_| bad())?;
                let p = match flag {
                    "1" | "0" => Placement::Current,
                    "L" => Placement::SealedWindow,
                    "A" => Placement::Amendment,
                    "F" => Placement::Ahead,
                    _ => return Err(bad()),
                };
                counted[i] = flag != "0";
                placed[i] = Some((p, w));
            }
            Ok(WriteReply {
                window_start,
                window_end,
                counted,
                placed,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, ids: &[usize], stamped: &[usize]) -> SectionLayout {
        SectionLayout {
            size,
            plain: (0..size)
                .filter(|i| !ids.contains(i) && !stamped.contains(i))
                .collect(),
            big: Vec::new(),
            ids: ids.to_vec(),
            stamped: stamped.to_vec(),
        }
    }

    #[test]
    fn a_reply_says_per_section_where_items_counted_and_which_ids_were_re_sent() {
        // Two sections: 4 items (ids on 0 and 2, item 3 stamped), then 1 item without id.
        let r = parse_reply(
            "3600+3600:10:A0;3600+3600::",
            &[layout(4, &[0, 2], &[3]), layout(1, &[], &[])],
        )
        .unwrap();
        assert_eq!(
            r,
            vec![
                WriteReply {
                    window_start: 3600,
                    window_end: 7200,
                    counted: vec![true, true, false, true],
                    placed: vec![None, None, None, Some((Placement::Amendment, 0))],
                },
                WriteReply {
                    window_start: 3600,
                    window_end: 7200,
                    counted: vec![true],
                    placed: vec![None],
                },
            ]
        );
    }

    #[test]
    fn a_reply_that_does_not_fit_the_commit_is_an_error_not_a_guess() {
        let ls = [layout(1, &[0], &[]), layout(1, &[], &[])];
        for bad in [
            "3600+1:1:",
            "3600+1:1:;x+1::",
            "3600+1:11:;3600+1::",
            "3600+1;3600+1::",
            "3600+1:1:;3600+1::;7+1::",
            "3600+1:1:L5;3600+1::",
            "3600:1:;3600::",
        ] {
            assert!(
                matches!(parse_reply(bad, &ls), Err(StoreError::Reply(_))),
                "{bad}"
            );
        }
        let one = [layout(1, &[], &[0])];
        assert!(
            parse_reply("3600::Z7", &one).is_err(),
            "an unknown placement"
        );
        assert!(
            parse_reply("3600::", &one).is_err(),
            "a stamped item missing"
        );
    }
}
