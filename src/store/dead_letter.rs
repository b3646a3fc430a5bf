//! Dead letters: records the Processor refused for good, kept per window with the reason, and
//! replayed under the shard's drain lock.

use super::keys::PendingWindow;
use super::keys::record_id;
use super::scripts::{DEAD_LETTER, REPLAY, SET_ASIDE};
use super::window::exact_total;
use super::{Conn, Store, StoreError};

/// The exact total of a dead-lettered record's stored value (`{"lo","hi","reason"}`).
pub fn dead_letter_total(value: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    exact_total(v.get("lo")?.as_str()?, v.get("hi")?.as_str()?)
}

/// One dead-lettered record, as an operator sees it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub shard: u32,
    pub window: PendingWindow,
    pub field: String,
    /// The record's id at the Processor (what it named in a refusal).
    pub record_id: String,
    /// The stored value: `{"lo","hi","reason"}`.
    pub value: String,
}

impl Store {
    /// Every dead-lettered record of one shard's window, read in HSCAN steps.
    pub async fn dead_letters_of(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let key = self.keys.dead(shard, w);
        let mut out = Vec::new();
        let mut cursor = 0;
        loop {
            let (next, pairs) = self.hscan(conn, &key, cursor, 1000).await?;
            for (field, value) in pairs {
                out.push(DeadLetter {
                    shard,
                    window: w.clone(),
                    record_id: record_id(w.start, shard, &field, w.amendment),
                    field,
                    value,
                });
            }
            cursor = next;
            if cursor == 0 || out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
        }
    }

    /// Finds a dead-lettered record by its record id, in any shard ever used.
    pub async fn find_dead_letter(&self, record: &str) -> Result<Option<DeadLetter>, StoreError> {
        let mut conn = self.conn().await?;
        for shard in 0..self.shards_to_drain().await? {
            for w in self.dead_windows(&mut conn, shard).await? {
                let found = self
                    .dead_letters_of(&mut conn, shard, &w, usize::MAX)
                    .await?
                    .into_iter()
                    .find(|d| d.record_id == record);
                if found.is_some() {
                    return Ok(found);
                }
            }
        }
        Ok(None)
    }

    /// Sets one dead letter aside for good, with an audit entry (`entry`: a JSON object) kept in
    /// the shard's audit list. Returns the stored value, `None` if it was no longer there.
    pub async fn set_aside(
        &self,
        d: &DeadLetter,
        entry: &serde_json::Value,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(SET_ASIDE
            .key(self.keys.dead(d.shard, &d.window))
            .key(self.keys.dead_index(d.shard))
            .key(self.keys.set_aside(d.shard))
            .key(self.keys.pending(d.shard))
            .key(self.keys.index_tenants(d.shard, d.window.start))
            .arg(&d.field)
            .arg(&d.window.member)
            .arg(entry.to_string())
            .arg(self.keys.base(d.shard))
            .arg(d.window.start)
            .invoke_async(&mut conn)
            .await?)
    }

    /// The audit entries of records set aside, newest first, per shard.
    pub async fn set_aside_log(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        let mut out = Vec::new();
        for shard in 0..self.shards_to_drain().await? {
            let entries: Vec<String> = redis::cmd("LRANGE")
                .arg(self.keys.set_aside(shard))
                .arg(0)
                .arg(limit.saturating_sub(1))
                .query_async(&mut conn)
                .await?;
            out.extend(entries);
        }
        Ok(out)
    }

    /// Moves rejected records to the window's dead-letter hash.
    pub async fn dead_letter(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        reason_json: &str,
        fields: &[&str],
    ) -> Result<u64, StoreError> {
        let sealed = self.keys.sealed(shard, w);
        let mut inv = DEAD_LETTER.key(&sealed);
        inv.key(format!("{sealed}:hi"))
            .key(self.keys.dead(shard, w))
            .key(self.keys.dead_index(shard))
            .key(format!("{sealed}:ts"))
            .arg(reason_json)
            .arg(&w.member)
            .arg(w.start);
        for f in fields {
            inv.arg(*f);
        }
        Ok(inv.invoke_async(conn).await?)
    }

    /// Windows of a shard holding dead-lettered records.
    pub async fn dead_windows(
        &self,
        conn: &mut Conn,
        shard: u32,
    ) -> Result<Vec<PendingWindow>, StoreError> {
        self.windows_in(conn, &self.keys.dead_index(shard)).await
    }

    /// Moves a window's dead letters back to its sealed hash and marks it pending again.
    /// `only`: just this field.
    pub async fn replay_dead(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        only: Option<&str>,
    ) -> Result<u64, StoreError> {
        let sealed = self.keys.sealed(shard, w);
        let mut inv = REPLAY.key(self.keys.dead(shard, w));
        inv.key(&sealed)
            .key(format!("{sealed}:hi"))
            .key(self.keys.pending(shard))
            .key(self.keys.dead_index(shard))
            .key(format!("{sealed}:ts"))
            .arg(&w.member)
            .arg(w.start);
        if let Some(f) = only {
            inv.arg(f);
        }
        Ok(inv.invoke_async(conn).await?)
    }
}
