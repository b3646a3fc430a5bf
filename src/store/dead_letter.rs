//! Dead letters: records the Processor refused for good, kept per window with the reason, and
//! replayed under the shard's drain lock.

use super::keys::PendingWindow;
use super::scripts::{DEAD_LETTER, REPLAY};
use super::window::exact_total;
use super::{Conn, Store, StoreError};

/// The exact total of a dead-lettered record's stored value (either layout).
pub fn dead_letter_total(value: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(value).ok()?;
    match (v.get("lo"), v.get("hi"), v.get("amount")) {
        (Some(lo), Some(hi), _) => exact_total(lo.as_str()?, hi.as_str()?),
        (_, _, Some(a)) => crate::amount::canonical(a.as_str()?),
        _ => None,
    }
}

impl Store {
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
            .arg(reason_json)
            .arg(&w.member)
            .arg(w.start)
            .arg(if w.exact { "1" } else { "0" });
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
    pub async fn replay_dead(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
    ) -> Result<u64, StoreError> {
        let sealed = self.keys.sealed(shard, w);
        Ok(REPLAY
            .key(self.keys.dead(shard, w))
            .key(&sealed)
            .key(format!("{sealed}:hi"))
            .key(self.keys.pending(shard))
            .key(self.keys.dead_index(shard))
            .arg(&w.member)
            .arg(w.start)
            .arg(if w.exact { "1" } else { "0" })
            .invoke_async(conn)
            .await?)
    }
}
