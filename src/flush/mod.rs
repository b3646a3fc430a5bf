//! Seal and delivery: the scheduler every replica runs, and the drain it drives.
//!
//! At each window boundary (Redis clock) the scheduler calls the seal script for every shard —
//! idempotent, so with many replicas only the first call per shard toggles (invariant 3). A
//! window becomes due for delivery `STABILISATION_DELAY` after it ended; due windows are drained
//! under per-shard locks. The first pass runs at start-up, so windows a crashed replica left
//! pending are delivered; failed windows are retried every `DRAIN_INTERVAL`.

mod deliver;
pub mod drain;
pub(crate) mod policy;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::processor::ProcessorClient;
use crate::store::{Conn, PendingWindow, Store, StoreError};
pub use drain::{DrainReport, Drainer};

/// The result of sealing every shard once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SealSummary {
    /// Redis time when sealing, unix seconds.
    pub redis_now: u64,
    #[serde(skip)]
    pub redis_now_micros: u64,
    /// Start of the current window.
    pub window_start: u64,
    /// Its end (the next boundary).
    #[serde(skip)]
    pub window_end: u64,
    /// Shards this call toggled (0 when another replica or a write got there first).
    pub toggled: u32,
}

/// Pending windows across every shard.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PendingStatus {
    pub windows: Vec<ShardWindow>,
    pub dead_letters: Vec<ShardWindow>,
}

/// One shard's window awaiting delivery (or holding dead letters).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardWindow {
    pub shard: u32,
    pub window_start: u64,
    pub window_end: u64,
    /// 0: the window; n: its n-th amendment (late pulses after its delivery began).
    pub amendment: u32,
    /// When it may be delivered (before the stabilisation delay), Redis seconds.
    pub due: u64,
    pub records: u64,
    /// Seconds since it became due.
    pub age_seconds: u64,
}

/// When a window is due for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// `STABILISATION_DELAY` after it ended (the scheduler).
    AfterStabilisation,
    /// As soon as it ended (an operator's flush).
    WhenEnded,
}

/// Seals each window at its boundary and drains it once due; one per replica.
pub struct Scheduler {
    pub drainer: Drainer,
    /// Shards to seal and drain: the largest `SHARDS` any replica used, refreshed from Redis by
    /// each seal (one round trip per scheduler step instead of one per phase).
    shards: std::sync::atomic::AtomicU32,
    store: Store,
    metrics: Arc<Metrics>,
    stabilisation_delay: Duration,
    drain_interval: Duration,
    shard_parallelism: usize,
}

impl Scheduler {
    pub fn new(cfg: &Config, store: Store, metrics: Arc<Metrics>) -> Result<Self, reqwest::Error> {
        let processor = match &cfg.delivery.processor_url {
            Some(url) => Some(ProcessorClient::new(
                url,
                cfg.delivery.processor_token.clone(),
                cfg.delivery.processor_timeout,
            )?),
            None => None,
        };
        Ok(Scheduler {
            drainer: Drainer {
                store: store.clone(),
                processor,
                metrics: metrics.clone(),
                batch_size: cfg.delivery.batch_size,
                max_attempts: cfg.delivery.max_attempts,
                max_backoff: cfg.delivery.max_backoff,
                lock_ttl: cfg.delivery.lock_ttl,
                concurrency: cfg.delivery.concurrency,
                in_flight: Arc::new(Semaphore::new(cfg.delivery.concurrency)),
                wait_replicas: cfg.redis.wait_replicas,
                wait_timeout: cfg.redis.wait_timeout,
            },
            store,
            metrics,
            stabilisation_delay: cfg.stabilisation_delay,
            drain_interval: cfg.delivery.drain_interval,
            shard_parallelism: cfg.delivery.concurrency,
            shards: std::sync::atomic::AtomicU32::new(cfg.shards),
        })
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        self.store.conn().await
    }

    /// Every shard that may hold data: as of the last seal (this replica's `SHARDS` before it).
    pub fn shards(&self) -> u32 {
        self.shards.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs the seal script on every shard (pipelined on one connection).
    pub async fn seal_once(&self) -> Result<SealSummary, StoreError> {
        let conn = self.conn().await?;
        // Shards of an earlier, larger SHARDS are sealed too, or their last window would wait
        // for writes that no longer come.
        let (max_shards, deployment) = self.store.register_shards().await?;
        if deployment != self.store.shards {
            return Err(StoreError::ShardsChanged {
                configured: self.store.shards,
                deployment,
            });
        }
        let shards = max_shards.max(self.store.shards);
        if !self.store.layout_checked() {
            // Redis was unreachable at start: nothing is written until this replica's explicit
            // settings are recorded and the layout checked.
            self.store.prepare().await?;
        }
        if self.store.marker_sets_until() == u64::MAX {
            // Until it is known whether the release before's marker sets matter.
            self.store.init_markers().await?;
        }
        self.shards
            .store(shards, std::sync::atomic::Ordering::Relaxed);
        let replies = join_all((0..shards).map(|s| {
            let mut c = conn.clone();
            async move { self.store.seal(&mut c, s).await }
        }))
        .await;
        let mut summary = SealSummary {
            redis_now: 0,
            redis_now_micros: 0,
            window_start: 0,
            window_end: 0,
            toggled: 0,
        };
        for r in replies {
            let r =
                r.inspect_err(|_| self.metrics.redis_errors.with_label_values(&["seal"]).inc())?;
            if summary.redis_now == 0 {
                // Tell `reshard` this replica is alive (one entry per process).
                let _ = self.store.heartbeat(&mut conn.clone(), r.redis_now).await;
            }
            self.store.saw_redis_time(r.redis_now_micros);
            summary.redis_now = summary.redis_now.max(r.redis_now);
            summary.redis_now_micros = summary.redis_now_micros.max(r.redis_now_micros);
            if r.window_start >= summary.window_start {
                summary.window_start = r.window_start;
                summary.window_end = r.window_end;
                self.metrics
                    .observe_window(r.window_start, Some(&r.generation));
            }
            summary.toggled += u32::from(r.toggled);
        }
        self.metrics.seals.inc_by(u64::from(summary.toggled));
        if summary.toggled > 0 {
            info!(
                new_window_start = summary.window_start,
                new_window_end = summary.window_end,
                window_secs = summary.window_end - summary.window_start,
                shards = summary.toggled,
                "sealed the ended window; a new one opened"
            );
        }
        Ok(summary)
    }

    /// Drains every shard's windows that are due: ended at least the stabilisation delay ago,
    /// or simply ended with [`Due::WhenEnded`] (the admin flush).
    pub async fn drain_once(
        &self,
        redis_now: u64,
        due: Due,
        cancel: &CancellationToken,
    ) -> Result<DrainReport, StoreError> {
        let delay = match due {
            Due::WhenEnded => 0,
            Due::AfterStabilisation => self.stabilisation_delay.as_secs_f64().ceil() as u64,
        };
        let due_before = redis_now.saturating_sub(delay);
        // Shards of an earlier, larger SHARDS may still hold pending windows: drain them too.
        let reports: Vec<_> = futures::stream::iter(0..self.shards())
            .map(|s| async move { (s, self.drainer.drain_shard(s, due_before, cancel).await) })
            .buffer_unordered(self.shard_parallelism)
            .collect()
            .await;
        let mut total = DrainReport::default();
        for (shard, r) in reports {
            match r {
                Ok(r) => total += r,
                Err(e) => {
                    self.metrics
                        .redis_errors
                        .with_label_values(&["drain"])
                        .inc();
                    warn!(shard, error = %e, "drain failed; the window stays pending");
                    total.windows_left += 1;
                }
            }
        }
        Ok(total)
    }

    /// Every pending and dead-lettered window, with record counts and ages; updates the gauges.
    pub async fn pending_status(&self, redis_now: u64) -> Result<PendingStatus, StoreError> {
        let conn = self.conn().await?;
        let per_shard = join_all((0..self.shards()).map(|s| {
            let mut c = conn.clone();
            async move {
                let pending = self.store.pending(&mut c, s).await?;
                let dead = self.store.dead_windows(&mut c, s).await?;
                let mut out = (Vec::new(), Vec::new());
                for (list, key_of, into) in [(pending, 0, &mut out.0), (dead, 1, &mut out.1)] {
                    for w in list {
                        let key = if key_of == 0 {
                            self.store.keys.sealed(s, &w)
                        } else {
                            self.store.keys.dead(s, &w)
                        };
                        let records = self.store.hlen(&mut c, &key).await?;
                        into.push(window_row(s, &w, records, redis_now));
                    }
                }
                Ok::<_, StoreError>(out)
            }
        }))
        .await;
        let mut status = PendingStatus::default();
        for r in per_shard {
            let (p, d) = r?;
            status.windows.extend(p);
            status.dead_letters.extend(d);
        }
        status.windows.sort_by_key(|w| (w.window_start, w.shard));
        status
            .dead_letters
            .sort_by_key(|w| (w.window_start, w.shard));
        self.metrics
            .pending_windows
            .set(status.windows.len() as i64);
        self.metrics.oldest_pending_age.set(
            status
                .windows
                .iter()
                .map(|w| w.age_seconds)
                .max()
                .unwrap_or(0) as i64,
        );
        Ok(status)
    }

    /// Seals now (if a window ended) and drains every ended window without waiting for the
    /// stabilisation delay. It never cuts the current window short.
    pub async fn flush_now(
        &self,
        cancel: &CancellationToken,
    ) -> Result<(SealSummary, DrainReport), StoreError> {
        let seal = self.seal_once().await?;
        let report = self
            .drain_once(seal.redis_now, Due::WhenEnded, cancel)
            .await?;
        let _ = self.pending_status(seal.redis_now).await;
        Ok((seal, report))
    }

    /// One scheduler step: seal, drain what is due, refresh the gauges. Returns how long to
    /// sleep before the next step.
    pub async fn tick(&self, cancel: &CancellationToken) -> Result<Duration, StoreError> {
        let seal = self.seal_once().await?;
        let report = self
            .drain_once(seal.redis_now, Due::AfterStabilisation, cancel)
            .await?;
        let status = self.pending_status(seal.redis_now).await?;
        let delay = self.stabilisation_delay.as_secs_f64().ceil() as u64;
        // Next boundary, or the moment the earliest pending window becomes due.
        let mut wake = seal.window_end;
        for w in &status.windows {
            let due = w.due + delay;
            if due > seal.redis_now {
                wake = wake.min(due);
            }
        }
        let mut sleep =
            Duration::from_micros((wake * 1_000_000).saturating_sub(seal.redis_now_micros));
        if report.windows_left > 0 || report.busy || !status.windows.is_empty() {
            // Something due is still there (Processor failing, or another replica draining).
            sleep = sleep.min(self.drain_interval);
        }
        debug!(
            ?report,
            sleep_ms = sleep.as_millis() as u64,
            "scheduler tick"
        );
        // Land just after the boundary rather than just before it.
        Ok(sleep.max(Duration::from_millis(20)) + Duration::from_millis(20))
    }

    /// The scheduler loop; returns when `shutdown` fires.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if crate::supervise::fault("scheduler") {
            panic!("fault injected: scheduler");
        }
        loop {
            let sleep = match self.tick(&shutdown).await {
                Ok(d) => d,
                Err(e @ StoreError::ShardsChanged { .. }) => {
                    // Writing on with another SHARDS would miss pulse ids: stop the process.
                    tracing::error!(error = %e, "this replica's SHARDS no longer matches the deployment");
                    return;
                }
                Err(e @ StoreError::Setting(_)) => {
                    // Data of a layout this release does not read (checked once Redis came
                    // back): stop rather than strand it.
                    tracing::error!(error = %e, "this replica cannot serve this deployment");
                    return;
                }
                Err(e) => {
                    if e.connection_suspect() {
                        self.store.invalidate();
                    }
                    warn!(error = %e, "scheduler step failed; retrying");
                    self.drain_interval.min(Duration::from_secs(1))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        debug!("scheduler stopped");
    }
}

fn window_row(shard: u32, w: &PendingWindow, records: u64, now: u64) -> ShardWindow {
    ShardWindow {
        shard,
        window_start: w.start,
        window_end: w.end,
        amendment: w.amendment,
        due: w.due,
        records,
        age_seconds: now.saturating_sub(w.due),
    }
}
