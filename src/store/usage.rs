//! Live usage: what one tenant has used, read from its own keys only (the usage index kept by
//! the write script), per window — the current one and every sealed one not yet delivered.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::keys::{FieldKey, decode_field};
use super::scripts::USAGE;
use super::{Conn, Store, StoreError, dead_letter_total, exact_total};
use crate::amount::Amount;

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

/// Where a window of a tenant's usage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WindowState {
    /// Being written.
    Live,
    /// Sealed, within `STABILISATION_DELAY` of being due.
    Waiting,
    /// A drain is running.
    Delivering,
    /// Due, not yet accepted by the Processor.
    Retrying,
    /// Refused by the Processor (see `/admin/dead-letters`).
    DeadLettered,
}

impl WindowUsage {
    /// Its state, `stabilisation` seconds being the wait after a window is due.
    pub fn state(&self, redis_now: u64, stabilisation: u64) -> WindowState {
        if self.current {
            WindowState::Live
        } else if !self.pending && self.dead_lettered {
            WindowState::DeadLettered
        } else if redis_now < self.due + stabilisation {
            WindowState::Waiting
        } else if self.busy {
            WindowState::Delivering
        } else {
            WindowState::Retrying
        }
    }
}

/// Which of a tenant's keys a usage query reads.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub sku: Option<String>,
    pub unit: Option<String>,
    /// Only the window starting at this second.
    pub window: Option<u64>,
}

/// `(sku, unit, aggregation)` → (total still to deliver, total dead-lettered).
pub type KeyTotals = BTreeMap<(String, String, String), (Amount, Amount)>;

/// One window (or amendment) of a tenant's usage, over every shard.
#[derive(Debug, Clone)]
pub struct TenantWindow {
    pub start: u64,
    pub end: u64,
    /// 0: the window; n: its n-th amendment.
    pub amendment: u32,
    pub state: WindowState,
    pub keys: KeyTotals,
}

/// A tenant's usage over every shard, and Redis' time when it was read.
#[derive(Debug, Clone)]
pub struct TenantUsage {
    pub redis_now: u64,
    /// Oldest first; a window with none of the tenant's keys only when it is live.
    pub windows: Vec<TenantWindow>,
}

impl Store {
    /// What `tenant` has used, exact, in every shard: the live window and each sealed one not
    /// yet delivered, with its state; `stabilisation` is `STABILISATION_DELAY` in seconds.
    pub async fn usage_of(
        &self,
        tenant: &str,
        filter: &UsageFilter,
        stabilisation: u64,
    ) -> Result<TenantUsage, StoreError> {
        let mut conn = self.conn().await?;
        let mut windows: BTreeMap<(u64, u32), TenantWindow> = BTreeMap::new();
        let mut redis_now = 0;
        for shard in 0..self.shards_to_drain().await? {
            let u = self.tenant_usage(&mut conn, shard, tenant).await?;
            redis_now = redis_now.max(u.redis_now);
            for w in u.windows {
                if filter.window.is_some_and(|s| s != w.start) {
                    continue;
                }
                let entry = windows
                    .entry((w.start, w.amendment))
                    .or_insert_with(|| TenantWindow {
                        start: w.start,
                        end: w.end,
                        amendment: w.amendment,
                        state: w.state(u.redis_now, stabilisation),
                        keys: BTreeMap::new(),
                    });
                add_keys(&mut entry.keys, tenant, filter, w.keys);
            }
        }
        let windows = windows
            .into_values()
            .filter(|w| !w.keys.is_empty() || w.state == WindowState::Live)
            .collect();
        Ok(TenantUsage { redis_now, windows })
    }
}

/// Adds one shard's keys of a window to the tenant's totals (those the filter selects).
fn add_keys(
    totals: &mut KeyTotals,
    tenant: &str,
    filter: &UsageFilter,
    keys: HashMap<String, KeyUsage>,
) {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|t| Amount::parse_decimal(t, 12, crate::amount::MAX_TOTAL).ok())
            .unwrap_or(Amount::ZERO)
    };
    for (field, k) in keys {
        let Some(FieldKey {
            tenant: t,
            sku,
            unit,
            aggregation,
        }) = decode_field(field.as_bytes())
        else {
            continue;
        };
        if t != tenant
            || filter.sku.as_ref().is_some_and(|s| *s != sku)
            || filter.unit.as_ref().is_some_and(|u| *u != unit)
        {
            continue;
        }
        let slot = totals.entry((sku, unit, aggregation)).or_default();
        slot.0 = slot.0.checked_add(parse(&k.amount)).unwrap_or(slot.0);
        slot.1 = slot.1.checked_add(parse(&k.dead)).unwrap_or(slot.1);
    }
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
