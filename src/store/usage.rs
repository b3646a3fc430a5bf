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
    indexed: bool,
    keys: HashMap<String, RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    lo: String,
    hi: String,
    dead: serde_json::Value,
}

impl Store {
    /// The usage index of a tenant in one window of a shard.
    pub fn usage_index(&self, shard: u32, start: u64, tenant: &str) -> String {
        format!("{}:x:idx:{start}:{tenant}", self.keys.base(shard))
    }

    /// A tenant's usage in one shard: one script call reading the tenant's keys only (plus a
    /// scan of a window whose index expired, if any).
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
            let mut keys: HashMap<String, KeyUsage> = w
                .keys
                .into_iter()
                .map(|(f, k)| {
                    let amount = exact_total(&k.lo, &k.hi);
                    let dead = k.dead.as_str().and_then(dead_letter_total);
                    (f, KeyUsage { amount, dead })
                })
                .collect();
            if !w.indexed {
                keys = HashMap::new();
            }
            Ok(WindowUsage {
                start,
                end: w.end.as_deref().map(num).transpose()?.unwrap_or(start),
                current,
                pending: w.pending,
                dead_lettered: w.dead_lettered,
                busy: w.busy,
                keys,
            })
        };
        let mut unindexed = Vec::new();
        if raw.current.is_object() {
            let w: RawWindow = serde_json::from_value(raw.current)
                .map_err(|e| StoreError::Reply(e.to_string()))?;
            windows.push(convert(w, true)?);
        }
        for (_, w) in raw.windows {
            let indexed = w.indexed;
            let u = convert(w, false)?;
            if !indexed {
                unindexed.push(windows.len());
            }
            windows.push(u);
        }
        // A sealed window older than the index's lifetime: scan its hash for the tenant's
        // fields (costs the hash's size, only for windows pending longer than a week).
        for i in unindexed {
            let start = windows[i].start;
            let key = format!("{base}:x:sealed:{start}");
            let keys = self.scan_tenant(conn, &key, tenant).await?;
            windows[i].keys = keys;
        }
        Ok(ShardUsage {
            redis_now: num(&raw.now)?,
            windows,
        })
    }

    async fn scan_tenant(
        &self,
        conn: &mut Conn,
        key: &str,
        tenant: &str,
    ) -> Result<HashMap<String, KeyUsage>, StoreError> {
        let prefix = serde_json::to_string(tenant).expect("strings serialise");
        let mut pattern = String::from("[");
        for c in prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str(",*");
        // The field is a JSON array: its first element is the tenant, so the prefix is exact.
        let pattern = format!("\\{pattern}");
        let mut out = HashMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(key)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            let mut it = flat.into_iter();
            while let (Some(f), Some(lo)) = (it.next(), it.next()) {
                let hi: Option<String> = redis::cmd("HGET")
                    .arg(format!("{key}:hi"))
                    .arg(&f)
                    .query_async(conn)
                    .await?;
                let amount = exact_total(&lo, hi.as_deref().unwrap_or("0"));
                out.insert(f, KeyUsage { amount, dead: None });
            }
            cursor = next;
            if cursor == 0 {
                return Ok(out);
            }
        }
    }
}
