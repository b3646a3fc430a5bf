//! The bounded ingest queue and the workers that group-commit it to Redis.
//!
//! A request reserves one permit per pulse from a semaphore of `QUEUE_CAPACITY` permits before
//! it is queued; with none left it is answered 503 at once (invariant 7) — nothing waits
//! unbounded and nothing is dropped silently. Permits return when the worker has committed, so
//! the bound covers queued *and* in-flight pulses. Workers take up to `WORKER_BATCH` pulses,
//! pre-aggregate pulses without ids that share a key, and commit one script call per shard; the
//! calls of one commit share a multiplexed connection and are pipelined.

mod worker;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{AckMode, Config};
use crate::metrics::Metrics;
use crate::pulse::Pulse;
use crate::store::Store;

/// What a committed request gets back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Pulses counted by this request.
    pub accepted: usize,
    /// Pulses recognised as re-sends of a pulse id already counted.
    pub duplicates: usize,
    /// The window (start, unix seconds) the pulses were counted in, when they all went to one
    /// window — always so for a single pulse.
    pub window_start: Option<u64>,
    /// Set when a batch's pulses went to different windows (it straddled a boundary).
    pub windows_mixed: bool,
    /// The windows stamped pulses were counted in (by their timestamps).
    pub stamped_windows: std::collections::BTreeSet<u64>,
    /// Stamped pulses that joined a sealed window before its delivery.
    pub late_joined: usize,
    /// Stamped pulses counted in an amendment of a delivered window.
    pub amended: usize,
    /// Stamped pulses counted ahead, in a window not yet open.
    pub ahead: usize,
    /// Per pulse of the request, when asked for (`submit(.., detail)`), or when the request
    /// may be committed in parts (several shards on a cluster): counted (or a re-send) and the
    /// window it went to.
    pub items: Vec<ItemOutcome>,
    /// Pulses refused after others of the request were counted — possible only when a commit
    /// is one call per shard (a cluster): a shard's call refused them after another shard's
    /// had counted. The request is answered with what was counted; each of these is named.
    pub refused: Vec<(usize, Refused)>,
}

/// Why a pulse of a request was refused by the write script (nothing of its call written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its key's window total would leave the exact range.
    Overflow,
    /// A stamped pulse its window no longer takes (`LATE_PULSES=refuse`, or older than the
    /// window's `LATE_MAX_AGE`).
    Late(crate::store::LateRefusal),
}

/// What became of one pulse of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ItemOutcome {
    /// Counted; false: a re-send of a pulse id already counted.
    pub counted: bool,
    /// The window it was counted in (or, for a re-send, would have been).
    pub window_start: u64,
}

/// Why a commit failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// Redis failed before counting anything of this request.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis failed for part of a batch spanning several shards, or timed out: some pulses may
    /// have been counted. A retry with the same pulse ids or `Idempotency-Key` completes it
    /// exactly.
    #[error("redis failed part-way: {0}")]
    Partial(String),
    /// A key's window total would leave the exact range; nothing of this request was counted
    /// (other requests of the commit were). `items`: the request's pulses of such keys.
    #[error("a key's window total would leave the exact range")]
    Overflow { items: Vec<usize> },
    /// Stamped pulses their windows no longer take (delivered, with `LATE_PULSES=refuse`; or
    /// older than the window's `LATE_MAX_AGE`); nothing of this request was counted. `items`:
    /// those pulses and why.
    #[error("a pulse's window no longer takes it")]
    Closed {
        items: Vec<(usize, crate::store::LateRefusal)>,
    },
}

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: answer 503 with `Retry-After`.
    Full,
    /// The service is shutting down.
    Closed,
}

pub(crate) struct Job {
    pulses: Vec<Pulse>,
    /// Answer per pulse ([`Outcome::items`]).
    detail: bool,
    reply: Option<oneshot::Sender<Result<Outcome, CommitError>>>,
    _permit: OwnedSemaphorePermit,
}

/// The handle request handlers use to queue pulses.
#[derive(Clone)]
pub struct Ingest {
    tx: async_channel::Sender<Job>,
    permits: Arc<Semaphore>,
    capacity: usize,
    ack: AckMode,
    metrics: Arc<Metrics>,
}

/// What the commit workers write with.
pub struct Parts {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub meters: Arc<crate::meters::Meters>,
}

impl Ingest {
    /// Starts `cfg.workers` workers under `supervisor`. `hard_stop` ends retries of enqueued
    /// pulses when the shutdown deadline is reached.
    pub fn start(
        cfg: &Config,
        parts: Parts,
        supervisor: &crate::supervise::Supervisor,
        hard_stop: CancellationToken,
    ) -> Self {
        let Parts {
            store,
            metrics,
            meters,
        } = parts;
        let (tx, rx) = async_channel::unbounded::<Job>();
        metrics.queue_capacity.set(cfg.queue_capacity as i64);
        let permits = Arc::new(Semaphore::new(cfg.queue_capacity));
        for id in 0..cfg.workers {
            let w = worker::Worker {
                id,
                rx: rx.clone(),
                store: store.clone(),
                metrics: metrics.clone(),
                max_batch: cfg.worker_batch,
                linger: cfg.commit_linger,
                wait_replicas: cfg.redis.wait_replicas,
                wait_timeout: cfg.redis.wait_timeout,
                retry_forever: cfg.ack_mode == AckMode::Enqueued,
                hard_stop: hard_stop.clone(),
                known: std::sync::Mutex::new(vec![(0, 0); cfg.shards as usize]),
                meters: meters.clone(),
            };
            supervisor.spawn("commit_worker", w.run());
        }
        Ingest {
            tx,
            permits,
            capacity: cfg.queue_capacity,
            ack: cfg.ack_mode,
            metrics,
        }
    }

    /// Pulses queued or being committed.
    pub fn depth(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues pulses. In durable mode the returned receiver resolves once they are committed.
    pub fn submit(
        &self,
        pulses: Vec<Pulse>,
        detail: bool,
    ) -> Result<Option<oneshot::Receiver<Result<Outcome, CommitError>>>, SubmitError> {
        let n = pulses.len() as u32;
        let permit = match self.permits.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.metrics
                    .pulses
                    .with_label_values(&["shed"])
                    .inc_by(u64::from(n));
                return Err(SubmitError::Full);
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SubmitError::Closed),
        };
        let (reply, rx) = match self.ack {
            AckMode::Durable => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            AckMode::Enqueued => (None, None),
        };
        self.tx
            .try_send(Job {
                pulses,
                detail,
                reply,
                _permit: permit,
            })
            .map_err(|_| SubmitError::Closed)?;
        Ok(rx)
    }

    /// Stops taking pulses. Workers commit what is queued, then exit.
    pub fn close(&self) {
        self.permits.close();
        self.tx.close();
    }
}
