//! Drain: deliver a shard's sealed windows to the Processor, deleting only what was accepted.
//!
//! Under the shard's lock (random token, `PX` ttl, renewed every third of it, released by
//! compare-and-delete) each pending window is streamed with `HSCAN` into batches of
//! `BATCH_SIZE`; at most `DELIVERY_CONCURRENCY` batches are in flight per replica, so memory is
//! bounded by batch size × in-flight whatever the hour's size (invariant 7). A batch's fields are
//! `HDEL`ed after its 2xx (invariant 5); a rejected batch is moved to dead-letter; a batch that
//! keeps failing stays and the window stays pending for the next pass.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::deliver::{BatchResult, Courier};
use crate::metrics::Metrics;
use crate::processor::ProcessorClient;
use crate::store::lock::DrainLock;
use crate::store::{Conn, PendingWindow, Store, StoreError};

/// What the drain needs; shared by the scheduler and the admin routes.
pub struct Drainer {
    pub store: Store,
    pub processor: Option<ProcessorClient>,
    pub metrics: Arc<Metrics>,
    pub batch_size: usize,
    pub max_attempts: u32,
    pub max_backoff: Duration,
    pub lock_ttl: Duration,
    /// Batches one window drain keeps in flight.
    pub concurrency: usize,
    /// Bounds the Processor requests in flight across every shard this replica drains.
    pub in_flight: Arc<Semaphore>,
    /// `REDIS_WAIT_REPLICAS` and `REDIS_WAIT_TIMEOUT`: a window is delivered only once that
    /// many replicas hold its drain mark (and so everything it holds).
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
}

/// The outcome of draining one shard.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DrainReport {
    /// Another replica held the lock.
    pub busy: bool,
    pub windows_finished: u64,
    pub records_delivered: u64,
    pub records_dead_lettered: u64,
    /// Windows still pending when the pass ended (failures, or not yet due).
    pub windows_left: u64,
}

impl std::ops::AddAssign for DrainReport {
    fn add_assign(&mut self, o: Self) {
        self.busy |= o.busy;
        self.windows_finished += o.windows_finished;
        self.records_delivered += o.records_delivered;
        self.records_dead_lettered += o.records_dead_lettered;
        self.windows_left += o.windows_left;
    }
}

impl Drainer {
    /// Drains the shard's windows that ended at or before `due_before` (Redis seconds), oldest
    /// first, under the shard's lock. Stops early, leaving data in place, when `cancel` fires.
    pub async fn drain_shard(
        &self,
        shard: u32,
        due_before: u64,
        cancel: &CancellationToken,
    ) -> Result<DrainReport, StoreError> {
        let Some(processor) = &self.processor else {
            return Ok(DrainReport::default());
        };
        let mut conn: Conn = self.store.conn().await?;
        let pending = self.store.pending(&mut conn, shard).await?;
        if !pending.iter().any(|w| w.due <= due_before) {
            return Ok(DrainReport {
                windows_left: pending.len() as u64,
                ..Default::default()
            });
        }
        if self.wait_replicas > 0 {
            // Its WAITs block the connection: one of the drain's own, and on Sentinel a fresh
            // look at who the master is.
            conn = self.store.dedicated_conn(self.wait_timeout).await?;
        }
        let lock = DrainLock::new(shard, self.lock_ttl);
        if !self.store.try_lock(&mut conn, &lock).await? {
            return Ok(DrainReport {
                busy: true,
                windows_left: pending.len() as u64,
                ..Default::default()
            });
        }
        self.metrics.locks_held.inc();
        let started = Instant::now();
        // Lost lock or shutdown: stop sending; what was not deleted stays for the next holder.
        let stop = cancel.child_token();
        let renewer = tokio::spawn(renew(
            self.store.clone(),
            conn.clone(),
            lock.clone(),
            stop.clone(),
        ));
        let result = self
            .drain_locked(processor, &mut conn, shard, due_before, &stop)
            .await;
        stop.cancel();
        let _ = renewer.await;
        self.release(&mut conn, &lock).await;
        self.metrics.locks_held.dec();
        self.metrics
            .drain_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Moves a shard's dead letters back into their windows, under the shard's drain lock
    /// (waiting up to a few seconds for a drain in progress). `None`: the lock stayed busy.
    pub async fn replay_shard(&self, shard: u32) -> Result<Option<u64>, StoreError> {
        self.replay(shard, None).await
    }

    /// Moves one dead-lettered record back into its window, under the shard's drain lock.
    pub async fn replay_record(
        &self,
        d: &crate::store::DeadLetter,
    ) -> Result<Option<u64>, StoreError> {
        self.replay(d.shard, Some((&d.window, &d.field))).await
    }

    async fn replay(
        &self,
        shard: u32,
        only: Option<(&PendingWindow, &str)>,
    ) -> Result<Option<u64>, StoreError> {
        let mut conn: Conn = self.store.conn().await?;
        if self.store.dead_windows(&mut conn, shard).await?.is_empty() {
            return Ok(Some(0));
        }
        let lock = DrainLock::new(shard, self.lock_ttl);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.store.try_lock(&mut conn, &lock).await? {
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut moved = 0;
        let result = async {
            match only {
                Some((w, field)) => {
                    moved += self
                        .store
                        .replay_dead(&mut conn, shard, w, Some(field))
                        .await?;
                }
                None => {
                    for w in self.store.dead_windows(&mut conn, shard).await? {
                        moved += self.store.replay_dead(&mut conn, shard, &w, None).await?;
                    }
                }
            }
            Ok::<_, StoreError>(())
        }
        .await;
        self.release(&mut conn, &lock).await;
        result.map(|()| Some(moved))
    }

    /// With `REDIS_WAIT_REPLICAS`: the replicas hold the window as this drain will read it
    /// (the drain mark and everything written before it). Short of them this master may have
    /// been cut off and replaced — what it holds beyond its replicas includes commits answered
    /// 503 and retried on the new master — so nothing is delivered from it: the pass ends and
    /// the next one asks for the master again.
    async fn replicas_hold(&self, conn: &mut Conn, shard: u32) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let n = self
            .store
            .wait_replicas(conn, shard, self.wait_replicas, self.wait_timeout)
            .await?;
        if n >= self.wait_replicas {
            return Ok(());
        }
        self.metrics.redis_wait_short.inc();
        self.store.invalidate();
        Err(StoreError::Shared {
            message: format!(
                "{n} of {} replicas confirmed the drain mark within {:?}: not delivering from this master",
                self.wait_replicas, self.wait_timeout
            ),
            ambiguous: false,
            suspect: true,
            transient: true,
        })
    }

    /// Releases the lock; if Redis does not answer, it expires by itself.
    async fn release(&self, conn: &mut Conn, lock: &DrainLock) {
        if let Err(e) = self.store.release_lock(conn, lock).await {
            warn!(shard = lock.shard, error = %e, "could not release drain lock; it expires by itself");
        }
    }

    async fn drain_locked(
        &self,
        processor: &ProcessorClient,
        conn: &mut Conn,
        shard: u32,
        due_before: u64,
        stop: &CancellationToken,
    ) -> Result<DrainReport, StoreError> {
        let mut report = DrainReport::default();
        // Read again under the lock: the previous holder may have finished some. Delivered in
        // the order they fell due, every one that is due (invariant 19): an amendment of an old
        // window (a backfill) sorts by its window's start in the pending set but is due only
        // when the window it gathered in ends — it must not hold back windows due before it.
        let mut pending = self.store.pending(conn, shard).await?;
        pending.sort_by_key(|w| (w.due, w.start, w.amendment));
        let mut stopped = false;
        for w in pending {
            if stopped || w.due > due_before || stop.is_cancelled() {
                report.windows_left += 1;
                continue;
            }
            // From here on, late pulses for this window go to its next amendment: what this
            // drain reads is all the window (or amendment) will ever hold.
            let final_at = self.store.mark_drain(conn, shard, &w).await?;
            self.replicas_hold(conn, shard).await?;
            let (delivered, dead) = self
                .drain_window(processor, conn, shard, &w, final_at, stop)
                .await?;
            report.records_delivered += delivered;
            report.records_dead_lettered += dead;
            if self.store.finish_window(conn, shard, &w).await? {
                report.windows_finished += 1;
                info!(
                    shard,
                    window_start = w.start,
                    amendment = w.amendment,
                    records = delivered,
                    dead_lettered = dead,
                    "window delivered"
                );
            } else {
                // Records failed to go (the Processor is failing): the rest waits for the next
                // pass rather than meet the same failure.
                report.windows_left += 1;
                stopped = true;
            }
        }
        Ok(report)
    }

    /// Streams one sealed window to the Processor. Returns (delivered, dead-lettered) records.
    async fn drain_window(
        &self,
        processor: &ProcessorClient,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        final_at: u64,
        stop: &CancellationToken,
    ) -> Result<(u64, u64), StoreError> {
        let courier = Courier {
            store: &self.store,
            processor,
            metrics: &self.metrics,
            max_attempts: self.max_attempts,
            max_backoff: self.max_backoff,
            stop,
            final_at: crate::processor::rfc3339(final_at),
        };
        let courier = &courier;
        let mut cursor = 0u64;
        let mut buffer: Vec<(String, Option<String>)> = Vec::with_capacity(self.batch_size);
        let mut inflight = FuturesUnordered::new();
        let (mut delivered, mut dead) = (0u64, 0u64);
        // Fields scanned but not yet deleted. HSCAN may return a field twice when the hash
        // shrinks under our HDELs; a field can only come back while it still exists, that is
        // while it is here, so skipping these keeps each record to one delivery per pass.
        let mut unsettled: HashSet<String> = HashSet::new();
        let mut tally = |(r, batch): (BatchResult, Vec<(String, Option<String>)>),
                         unsettled: &mut HashSet<String>| {
            for (f, _) in &batch {
                unsettled.remove(f);
            }
            delivered += r.delivered;
            dead += r.dead_lettered;
        };
        loop {
            let (next, pairs) = self
                .store
                // Two batches per scan step halves the scan round trips; memory stays bounded
                // by this chunk plus the batches in flight.
                .scan_window(conn, shard, w, cursor, self.batch_size * 2)
                .await?;
            cursor = next;
            for (f, v) in pairs {
                if unsettled.insert(f.clone()) {
                    buffer.push((f, v));
                }
            }
            while buffer.len() >= self.batch_size || (cursor == 0 && !buffer.is_empty()) {
                let take = buffer.len().min(self.batch_size);
                let batch: Vec<(String, Option<String>)> = buffer.drain(..take).collect();
                // Bound what this window holds in memory: one scan chunk plus `concurrency`
                // batches. The futures only make progress while polled, so wait here, not on
                // the semaphore.
                while inflight.len() >= self.concurrency {
                    if let Some(r) = inflight.next().await {
                        tally(r?, &mut unsettled);
                    }
                }
                let c = conn.clone();
                inflight.push(async move {
                    let _permit = self.in_flight.acquire().await.expect("never closed");
                    let r = courier.deliver_batch(c, shard, w, &batch).await;
                    r.map(|r| (r, batch))
                });
            }
            if cursor == 0 || stop.is_cancelled() {
                break;
            }
        }
        while let Some(r) = inflight.next().await {
            tally(r?, &mut unsettled);
        }
        Ok((delivered, dead))
    }
}

/// Renews the lock every third of its ttl; cancels `stop` if it was lost.
async fn renew(store: Store, mut conn: Conn, lock: DrainLock, stop: CancellationToken) {
    let shard = lock.shard;
    let mut failures = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(lock.ttl / 3) => {}
            _ = stop.cancelled() => return,
        }
        match store.renew_lock(&mut conn, &lock).await {
            Ok(true) => failures = 0,
            Ok(false) => {
                warn!(shard, "drain lock lost; stopping this drain");
                stop.cancel();
                return;
            }
            Err(e) => {
                failures += 1;
                // Two misses in a row leave a third of the ttl: stop before another replica can
                // take over, so two holders never send the same window at once.
                if failures >= 2 {
                    warn!(shard, error = %e, "cannot renew drain lock; stopping this drain");
                    stop.cancel();
                    return;
                }
            }
        }
    }
}
