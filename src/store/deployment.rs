//! Deployment-wide facts in Redis: the shard count in use (invariant 12), the live replicas,
//! the eviction policy readiness depends on, and the stream of refused requests.

use super::{Conn, PendingWindow, Store, StoreError, scripts::REGISTER_SHARDS};

/// The settings that move money, as a deployment recorded them (`{prefix}:meta`, for replicas
/// that leave them unset) or as a replica applies them (`Some`: set explicitly).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub window: Option<u64>,
    pub dedupe_ttl: Option<u64>,
    pub shards: Option<u32>,
    pub window_offset: Option<u64>,
    pub late_max_age: Option<u64>,
    pub late_pulses: Option<String>,
    pub max_future_skew: Option<u64>,
}

impl Recorded {
    /// The settings `cfg` sets explicitly (`SHARDS` is applied by `reshard`, not here).
    pub fn explicit_in(cfg: &crate::config::Config) -> Self {
        let e = cfg.explicit;
        Recorded {
            window: e.window.then(|| cfg.window_secs()),
            window_offset: e.window_offset.then_some(cfg.window_offset.as_secs()),
            dedupe_ttl: e.dedupe_ttl.then(|| cfg.dedupe_ttl.as_secs().max(1)),
            shards: None,
            late_max_age: e.late_max_age.then_some(cfg.late_max_age.as_secs()),
            late_pulses: e.late_pulses.then(|| cfg.late_pulses.as_str().to_string()),
            max_future_skew: e.max_future_skew.then_some(cfg.max_future_skew.as_secs()),
        }
    }
}

/// An optional setting as a script argument: '' when unset.
fn arg<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// The settings script's refusal, as a setting problem an operator can act on.
fn settings_error(e: redis::RedisError) -> StoreError {
    if e.code() != Some("TTLCHANGING") {
        return e.into();
    }
    let d: Vec<u64> = e
        .detail()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    StoreError::Setting(format!(
        "DEDUPE_TTL changed from {}s less than twice that ago; until Redis time {} only the current ({}s) or that value may be set (the markers of both are consulted until then)",
        d.first().copied().unwrap_or(0),
        d.get(1).copied().unwrap_or(0),
        d.get(2).copied().unwrap_or(0),
    ))
}

impl Store {
    /// Records this deployment's shard count and returns the largest one ever used, so that
    /// windows left in shards of an earlier, larger `SHARDS` are still drained.
    pub async fn shards_to_drain(&self) -> Result<u32, StoreError> {
        Ok(self.register_shards().await?.0.max(self.shards))
    }

    /// Records this replica's `SHARDS`; returns (largest count ever used, the deployment's
    /// count). A replica whose count differs from the deployment's must not write: its pulse
    /// ids would be looked up in other shards (see `reshard`).
    pub async fn register_shards(&self) -> Result<(u32, u32), StoreError> {
        let mut c = self.conn().await?;
        Ok(REGISTER_SHARDS
            .key(self.keys.meta())
            .arg(self.shards)
            .invoke_async(&mut c)
            .await?)
    }

    /// Appends a rejected request (status, reason, tenant — never a key) to a stream capped at
    /// about 1,000 entries.
    pub async fn record_rejection(
        &self,
        status: u16,
        reason: &str,
        tenant: &str,
    ) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("XADD")
            .arg(self.keys.rejections())
            .arg("MAXLEN")
            .arg("~")
            .arg(1000)
            .arg("*")
            .arg("status")
            .arg(status)
            .arg("reason")
            .arg(reason)
            .arg("tenant")
            .arg(tenant)
            .query_async::<String>(&mut c)
            .await?;
        Ok(())
    }

    /// The most recent rejections, newest first, as (id, fields).
    pub async fn recent_rejections(
        &self,
        count: usize,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, StoreError> {
        let mut c = self.conn().await?;
        Ok(redis::cmd("XREVRANGE")
            .arg(self.keys.rejections())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?)
    }

    /// Records that this process is alive (Redis seconds); `reshard` refuses to run while any
    /// replica was seen recently.
    pub async fn heartbeat(&self, conn: &mut Conn, now: u64) -> Result<(), StoreError> {
        redis::cmd("ZADD")
            .arg(self.keys.replicas())
            .arg(now)
            .arg(&*self.instance)
            .query_async::<i64>(conn)
            .await?;
        Ok(())
    }

    /// Records that this process is alive every few seconds until `shutdown`, so that `reshard`
    /// sees every running replica whatever the window length; on Sentinel, checks each time
    /// that the master has not changed under a connection that still answers.
    pub async fn heartbeats(self, shutdown: tokio_util::sync::CancellationToken) {
        let every = std::time::Duration::from_secs(super::reshard::HEARTBEAT_SECS);
        loop {
            self.check_master().await;
            if let Ok(mut c) = self.conn().await
                && let Ok(now) = self.time(&mut c).await
            {
                let _ = self.heartbeat(&mut c, now).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Applies this replica's explicit settings ([`Store::apply_settings`]) and checks the key
    /// layout ([`Store::check_layout`]): what a replica must have done before it writes. At
    /// start, or by the scheduler once Redis answers for a replica that started without it —
    /// so no shard's settings are ever first recorded by a write, from defaults.
    pub async fn prepare(&self) -> Result<(), StoreError> {
        self.apply_settings(&self.explicit.clone()).await?;
        self.check_layout().await
    }

    /// Records the settings a replica starts with: the ones set explicitly (`Some`) replace the
    /// deployment's in every shard — a new window length from the next window on, a new dedupe
    /// TTL with the previous one still consulted until its markers expire, a new
    /// `LATE_MAX_AGE` for windows that end from now on — and the values in force are kept in
    /// `{prefix}:meta` for replicas that leave them unset. (`shards` is not applied here.)
    pub async fn apply_settings(&self, set: &Recorded) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        for shard in 0..self.shards_to_drain().await? {
            let r: Result<String, redis::RedisError> = super::scripts::SETTINGS
                .key(self.keys.conf(shard))
                .arg(arg(&set.window))
                .arg(arg(&set.dedupe_ttl))
                .arg(self.window_secs)
                .arg(self.dedupe_ttl_secs)
                .arg(self.shards)
                .arg(arg(&set.window_offset))
                .arg(self.window_offset_secs)
                .arg(arg(&set.late_max_age))
                .arg(self.late_max_age_secs)
                .arg(arg(&set.late_pulses))
                .arg(self.late_pulses.as_str())
                .arg(arg(&set.max_future_skew))
                .arg(self.max_future_skew_secs)
                .invoke_async(&mut c)
                .await;
            if let Err(e) = r {
                return Err(settings_error(e));
            }
        }
        redis::cmd("HSET")
            .arg(self.keys.meta())
            .arg("window")
            .arg(set.window.unwrap_or(self.window_secs))
            .arg("dedupe_ttl")
            .arg(set.dedupe_ttl.unwrap_or(self.dedupe_ttl_secs))
            .arg("window_offset")
            .arg(set.window_offset.unwrap_or(self.window_offset_secs))
            .arg("late_max_age")
            .arg(set.late_max_age.unwrap_or(self.late_max_age_secs))
            .arg("late_pulses")
            .arg(
                set.late_pulses
                    .as_deref()
                    .unwrap_or(self.late_pulses.as_str()),
            )
            .arg("max_future_skew")
            .arg(set.max_future_skew.unwrap_or(self.max_future_skew_secs))
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// The settings the deployment recorded, for a replica that leaves them unset.
    pub async fn recorded_settings(&self) -> Result<Recorded, StoreError> {
        let mut c = self.conn().await?;
        #[allow(clippy::type_complexity)]
        let (window, dedupe_ttl, shards, window_offset, late_max_age, late_pulses, max_future_skew): (
            Option<u64>,
            Option<u64>,
            Option<u32>,
            Option<u64>,
            Option<u64>,
            Option<String>,
            Option<u64>,
        ) = redis::cmd("HMGET")
            .arg(self.keys.meta())
            .arg("window")
            .arg("dedupe_ttl")
            .arg("shards")
            .arg("window_offset")
            .arg("late_max_age")
            .arg("late_pulses")
            .arg("max_future_skew")
            .query_async(&mut c)
            .await?;
        Ok(Recorded {
            window,
            dedupe_ttl,
            shards,
            window_offset,
            late_max_age,
            late_pulses,
            max_future_skew,
        })
    }

    /// Removes this process from the live replicas (clean shutdown).
    pub async fn leave(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("ZREM")
            .arg(self.keys.replicas())
            .arg(&*self.instance)
            .query_async::<i64>(&mut c)
            .await?;
        Ok(())
    }

    /// The server's engine and version (`INFO server`): `("valkey", "9.0.0")`, or `("redis",
    /// "7.2.4")`.
    pub async fn engine(&self) -> Result<(String, String), StoreError> {
        let mut c = self.conn().await?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        match (field("valkey_version:"), field("redis_version:")) {
            (Some(v), _) => Ok(("valkey".into(), v)),
            (None, Some(v)) => Ok(("redis".into(), v)),
            _ => Err(StoreError::Reply("INFO server names no version".into())),
        }
    }

    /// Redis' `maxmemory-policy` (from `INFO memory`, which managed Redis services allow).
    pub async fn eviction_policy(&self) -> Result<String, StoreError> {
        let mut c = self.conn().await?;
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(|p| p.trim().to_string())
            .ok_or_else(|| StoreError::Reply("INFO memory has no maxmemory_policy".into()))
    }
}

impl Store {
    /// Checks that Redis holds nothing of the float layout (see [`Store::float_layout_left`]);
    /// from then on this replica may write. Anything found is a [`StoreError::Setting`] naming
    /// what is left where and how to drain it.
    pub async fn check_layout(&self) -> Result<(), StoreError> {
        let left = self.float_layout_left().await?;
        if !left.is_empty() {
            return Err(StoreError::Setting(format!(
                "Redis holds data of the float layout, which this release no longer reads: {}. Run the previous release until GET /admin/pending lists none of it (replay or set aside its dead letters) and its dedupe markers have expired (DEDUPE_TTL after it first started), then start this one (README: Upgrading)",
                left.join("; ")
            )));
        }
        self.layout_checked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`Store::check_layout`] has passed.
    pub fn layout_checked(&self) -> bool {
        self.layout_checked
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What Redis still holds of the float layout (`HINCRBYFLOAT` totals, before exact sums),
    /// which this release no longer reads: per shard, pending windows and dead letters of that
    /// layout and an unsealed generation, and whether its dedupe markers (one string key per
    /// pulse id) may still be live. Empty: nothing. Reads only; `App::build` refuses to start
    /// on anything found, so nothing of it is stranded.
    pub async fn float_layout_left(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        let (now, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await?;
        let (since, shards_max): (Option<u64>, Option<u32>) = redis::cmd("HMGET")
            .arg(self.keys.meta())
            .arg("marker_sets_since")
            .arg("shards_max")
            .query_async(&mut c)
            .await?;
        let mut left = Vec::new();
        match since {
            // A deployment nothing has registered yet holds nothing of any layout.
            None if shards_max.is_none() => {}
            None => left.push(
                "the deployment was last run by a release older than the one before this: its dedupe markers (one string key per pulse id) may be live".to_string(),
            ),
            Some(s) if s > 0 && s + self.dedupe_ttl_secs > now => left.push(format!(
                "dedupe markers of one string key per pulse id may be live until Redis time {}",
                s + self.dedupe_ttl_secs
            )),
            Some(_) => {}
        }
        for shard in 0..shards_max.unwrap_or(0).max(self.shards) {
            let base = self.keys.base(shard);
            let (pending, dead, unsealed): (Vec<String>, Vec<String>, u32) = redis::pipe()
                .cmd("ZRANGE")
                .arg(self.keys.pending(shard))
                .arg(0)
                .arg(-1)
                .cmd("ZRANGE")
                .arg(self.keys.dead_index(shard))
                .arg(0)
                .arg(-1)
                .cmd("EXISTS")
                .arg(format!("{base}:agg:A"))
                .arg(format!("{base}:agg:B"))
                .query_async(&mut c)
                .await?;
            let float = |members: &[String]| {
                members
                    .iter()
                    .filter(|m| PendingWindow::parse(m).is_none())
                    .count()
            };
            let (pending, dead) = (float(&pending), float(&dead));
            if pending + dead > 0 || unsealed > 0 {
                left.push(format!(
                    "shard {shard}: {pending} pending window(s), {dead} window(s) with dead letters, {unsealed} unsealed generation(s)"
                ));
            }
        }
        Ok(left)
    }
}

/// Whether the scripts run on this engine version: Redis 7.0 or newer (`EXPIRE … NX`,
/// `SET … EX` from scripts, listpack hashes), any Valkey (it forked from Redis 7.2).
pub fn engine_supported(engine: &str, version: &str) -> bool {
    if engine == "valkey" {
        return true;
    }
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    major >= 7
}

#[cfg(test)]
mod tests {
    use super::engine_supported;

    #[test]
    fn redis_7_and_every_valkey_run_the_scripts() {
        assert!(engine_supported("redis", "7.0.15"));
        assert!(engine_supported("redis", "8.2.1"));
        assert!(engine_supported("valkey", "9.0.0"));
        assert!(!engine_supported("redis", "6.2.14"));
        assert!(!engine_supported("redis", "garbage"));
    }
}
