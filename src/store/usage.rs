//! Live usage: what one tenant has used, read from its own keys only (the usage index kept by
//! the write script), per window — the current one and every sealed one not yet delivered.

use std::collections::HashMap;

use serde::Deserialize;

use super::scripts::USAGE;
use super::{Conn, Store, StoreError, dead_letter_total, exact_total};

/// One key's totals in one window of one shard.
#[derive(Debug, Clone, Default)]
pub struct KeyUsage {
    /// Exact canonical decimal text: still to deliver (or being delivered).
    pub amount: Option<String>,
    /// Exact canonical decimal text: dead-lettered.
    pub dead: Option<String>,
}

/// One window of one shard, as the usage script saw it.
#[derive(Debug, Clone)]
pub struct WindowUsage {
    pub start: u64,
    pub end: u64,
    /// The live window (false: sealed, awaiting delivery or dead-lettered).
    pub current: bool,
    /// Still in the pending set.
    pub pending: bool,
    /// Listed in the dead-letter index.
    pub dead_lettered: bool,
    /// The shard's drain lock is held (a delivery is running).
    pub busy: bool,
    /// 0: the window; n: its n-th amendment (late pulses after its delivery began).
    pub amendment: u32,
    /// When it may be delivered: the window's end, or for an amendment the end of the window
    /// during which it gathered.
    pub due: u64,
    /// Field → totals.
    pub keys: HashMap<String, KeyUsage>,
}

/// A tenant's usage in one shard, and Redis' time when it was read.
#[derive(Debug, Clone)]
pub struct ShardUsage {
    pub redis_now: u64,
    pub windows: Vec<WindowUsage>,
}

#[derive(Deserialize)]
struct Raw {
    now: String,
    current: serde_json::Value,
    windows: HashMap<String, RawWindow>,
}

#[derive(Deserialize)]
struct RawWindow {
    start: String,
    #[serde(rename = "end", default)]
    end: Option<String>,
    #[serde(default)]
    pending: bool,
    #[serde(default)]
    dead_lettered: bool,
    #[serde(default)]
    busy: bool,
    #[serde(default)]
    amendment: u32,
    #[serde(default)]
    due: Option<String>,
    keys: HashMap<String, RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    lo: String,
    hi: String,
    dead: serde_json::Value,
}

impl Store {
    /// A tenant's usage in one shard: one script call reading the tenant's keys only, in
    /// every state of every window (the index lives until the window is gone).
    pub async fn tenant_usage(
        &self,
        conn: &mut Conn,
        shard: u32,
        tenant: &str,
    ) -> Result<ShardUsage, StoreError> {
        let base = self.keys.base(shard);
        let text: String = USAGE
            .key(format!("{base}:x:gen"))
            .key(format!("{base}:x:window"))
            .key(format!("{base}:x:window_len"))
            .key(self.keys.pending(shard))
            .key(self.keys.lock(shard))
            .key(self.keys.dead_index(shard))
            .arg(&base)
            .arg(tenant)
            .invoke_async(conn)
            .await?;
        let raw: Raw = serde_json::from_str(&text).map_err(|e| StoreError::Reply(e.to_string()))?;
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| StoreError::Reply(text.clone()))
        };
        let mut windows = Vec::new();
        let convert = |w: RawWindow, current: bool| -> Result<WindowUsage, StoreError> {
            let start = num(&w.start)?;
            let keys: HashMap<String, KeyUsage> = w
                .keys
                .into_iter()
                .map(|(f, k)| {
                    let amount = exact_total(&k.lo, &k.hi);
                    let dead = k.dead.as_str().and_then(dead_letter_total);
                    (f, KeyUsage { amount, dead })
                })
                .collect();
            Ok(WindowUsage {
                start,
                end: w.end.as_deref().map(num).transpose()?.unwrap_or(start),
                due: w
                    .due
                    .as_deref()
                    .or(w.end.as_deref())
                    .map(num)
                    .transpose()?
                    .unwrap_or(start),
                amendment: w.amendment,
                current,
                pending: w.pending,
                dead_lettered: w.dead_lettered,
                busy: w.busy,
                keys,
            })
        };
        if raw.current.is_object() {
            let w: RawWindow = serde_json::from_value(raw.current)
                .map_err(|e| StoreError::Reply(e.to_string()))?;
            windows.push(convert(w, true)?);
        }
        for (_, w) in raw.windows {
            windows.push(convert(w, false)?);
        }
        Ok(ShardUsage {
            redis_now: num(&raw.now)?,
            windows,
        })
    }
}
