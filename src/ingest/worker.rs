//! A commit worker: takes a group of queued requests and commits them, one script per shard.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{CommitError, ItemOutcome, Job, Outcome, Refused};
use crate::metrics::Metrics;
use crate::store::keys::{dedupe_digest, encode_field, placement_of, shard_of};
use crate::store::{Conn, Placement, Store, StoreError, WriteItem};

pub(crate) struct Worker {
    pub id: usize,
    pub rx: async_channel::Receiver<Job>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub max_batch: usize,
    /// See `COMMIT_LINGER`.
    pub linger: Duration,
    /// `REDIS_WAIT_REPLICAS` and `REDIS_WAIT_TIMEOUT`.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    /// Enqueued mode: nobody waits for the answer, so a failed commit is retried until it
    /// succeeds or the shutdown deadline passes.
    pub retry_forever: bool,
    pub hard_stop: CancellationToken,
    /// Per shard, the current window `[start, end)` as this worker's last commit saw it:
    /// stamped pulses without id that fall in it are summed like unstamped ones.
    pub known: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Which aggregations each key is billed by.
    pub meters: Arc<crate::meters::Meters>,
}

/// The pulses of one shard in one commit.
#[derive(Default)]
struct ShardBatch {
    items: Vec<WriteItem>,
    /// Per item, the pulses it carries as (job, index in the job): one for a pulse with an id;
    /// every pulse of a pre-aggregated key (and timestamp) otherwise.
    pulses: Vec<Vec<(usize, usize)>>,
    /// Item index of each pre-aggregated (key, timestamp) without id.
    merged: HashMap<(String, Option<i64>), usize>,
}

impl Worker {
    pub async fn run(self) {
        let mut conn: Option<(Conn, u64)> = None;
        // When this worker's last commit ended: a commit right after another means load.
        let mut last_commit: Option<Instant> = None;
        while let Ok(first) = self.rx.recv().await {
            let mut n = first.pulses.len();
            let mut jobs = vec![first];
            self.gather(&mut jobs, &mut n);
            // Adaptive group commit: under load, a nearly empty commit yields to the request
            // tasks for a bounded moment so that the ones already arriving join it. Each Redis
            // call costs about 10 µs of Redis CPU whatever it carries; idle, nobody waits.
            let busy = last_commit.is_some_and(|t| t.elapsed() < Duration::from_millis(1));
            if busy && n < LINGER_BELOW.min(self.max_batch) && !self.linger.is_zero() {
                let deadline = Instant::now() + self.linger;
                while n < LINGER_BELOW.min(self.max_batch) && Instant::now() < deadline {
                    tokio::task::yield_now().await;
                    self.gather(&mut jobs, &mut n);
                }
            }
            self.metrics.commit_batch.observe(n as f64);
            if let Some(e) = commit_once(&self, &mut conn, jobs).await {
                // Writing on with another SHARDS would look pulse ids up in the wrong shards
                // (a reshard happened while this replica was paused): stop the process.
                error!(worker = self.id, error = %e, "this replica's SHARDS no longer matches the deployment; stopping");
                return;
            }
            last_commit = Some(Instant::now());
        }
        debug!(worker = self.id, "ingest worker stopped");
    }

    /// Takes whatever is queued, up to the batch limit.
    fn gather(&self, jobs: &mut Vec<Job>, n: &mut usize) {
        while *n < self.max_batch {
            match self.rx.try_recv() {
                Ok(j) => {
                    *n += j.pulses.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
    }
}

/// A commit with fewer pulses than this may linger (`COMMIT_LINGER`) for more.
const LINGER_BELOW: usize = 64;

/// How long after a commit's first attempt its token is still certainly in Redis (nine tenths
/// of its lifetime): a re-send after the token expired would count again, so enqueued mode stops
/// retrying a commit before this.
fn token_safe() -> Duration {
    crate::store::commit_token_ttl() * 9 / 10
}

/// Commits one group of jobs and answers each of them. Returns the error that must stop this
/// replica, if one was seen (its `SHARDS` is no longer the deployment's).
pub(crate) async fn commit_once(
    w: &Worker,
    conn: &mut Option<(Conn, u64)>,
    mut jobs: Vec<Job>,
) -> Option<StoreError> {
    // A durable request whose client is gone (its request timed out and was answered) is not
    // committed: it was told nothing was counted.
    jobs.retain(|j| {
        let gone = j.reply.as_ref().is_some_and(|tx| tx.is_closed());
        if gone {
            w.metrics
                .pulses
                .with_label_values(&["abandoned"])
                .inc_by(j.pulses.len() as u64);
        }
        !gone
    });
    if jobs.is_empty() {
        return None;
    }
    if crate::supervise::fault("worker")
        && jobs
            .iter()
            .any(|j| j.pulses.iter().any(|p| p.tenant_id == "fault-panic"))
    {
        panic!("fault injected: commit worker");
    }
    let per_shard = w.store.commit_per_shard();
    let mut commit = Commit {
        outcomes: jobs
            .iter()
            .map(|j| Outcome {
                // A request that may be committed in parts is tracked pulse by pulse, so that
                // it can be answered with what was counted (see `Outcome::refused`).
                items: if j.detail || (per_shard && j.pulses.len() > 1) {
                    vec![ItemOutcome::default(); j.pulses.len()]
                } else {
                    Vec::new()
                },
                ..Outcome::default()
            })
            .collect(),
        failed: vec![None; jobs.len()],
        shards: group(w, &jobs, |_, _| true),
        fatal: None,
    };
    commit.run(w, conn, &jobs).await;
    answer(w, jobs, commit.outcomes, commit.failed);
    commit.fatal
}

/// One commit in progress: what each job got so far, and the shards still to write.
struct Commit {
    outcomes: Vec<Outcome>,
    failed: Vec<Option<CommitError>>,
    shards: Vec<(u32, ShardBatch)>,
    /// An error that must stop the replica.
    fatal: Option<StoreError>,
}

/// What one round of a commit's writes left to do.
#[derive(Default)]
struct Round {
    /// Shards to write again after a pause (transient failures, enqueued mode).
    retry: Vec<(u32, ShardBatch)>,
    /// Per job, the pulses refused with nothing of the call written: a key that would leave
    /// the exact range, or (stamped) a window that no longer takes it.
    refused: HashMap<usize, Vec<(usize, Refused)>>,
    /// Shards whose call refused something: their other pulses are written again at once.
    refused_shards: HashSet<u32>,
    any_ok: bool,
}

impl Commit {
    /// Writes every shard; refuses the requests carrying a key that would leave the exact
    /// range and writes the rest again; in enqueued mode retries what a later attempt can
    /// get past, while the commit's token is certainly remembered.
    async fn run(&mut self, w: &Worker, conn: &mut Option<(Conn, u64)>, jobs: &[Job]) {
        let mut backoff = Duration::from_millis(50);
        // One token per commit, kept across our own retries: a call that ran but whose reply
        // was lost answers the same flags again instead of counting twice.
        let token = hex::encode(rand::random::<[u8; 16]>());
        let first_sent = Instant::now();
        while !self.shards.is_empty() {
            let shards = std::mem::take(&mut self.shards);
            let results = match write_all(w, conn, &token, &shards).await {
                Ok(r) => r,
                Err(e) => shards
                    .iter()
                    .map(|_| Err(StoreError::Pool(e.to_string())))
                    .collect(),
            };
            let mut round = Round::default();
            for ((shard, b), res) in shards.into_iter().zip(results) {
                self.sort(w, first_sent, shard, b, res, &mut round);
            }
            let Round {
                mut retry,
                refused,
                refused_shards,
                any_ok,
            } = round;
            // Nothing of a refusing call was written: refuse the requests that carry a refused
            // pulse (a request others of whose pulses were counted already, in another shard's
            // call, only those pulses) and write the rest again, at once and under the same
            // token.
            if !refused_shards.is_empty() {
                for (j, items) in refused {
                    self.refuse(j, items);
                }
                let (failed, outcomes) = (&self.failed, &self.outcomes);
                retry.extend(
                    group(w, jobs, |j, x| {
                        failed[j].is_none() && !outcomes[j].refused.iter().any(|r| r.0 == x)
                    })
                    .into_iter()
                    .filter(|(s, _)| refused_shards.contains(s)),
                );
                if retry.iter().all(|(s, _)| refused_shards.contains(s)) {
                    self.shards = retry;
                    continue;
                }
            }
            if retry.is_empty() {
                break;
            }
            if any_ok {
                backoff = Duration::from_millis(50);
            }
            *conn = None;
            if !self.pause(w, &mut backoff, first_sent, &retry).await {
                break;
            }
            self.shards = retry;
        }
    }

    /// Takes one shard's write result into the round: counted, refused (a full key, a closed
    /// window: nothing of the call was written), retried, or failed.
    fn sort(
        &mut self,
        w: &Worker,
        first_sent: Instant,
        shard: u32,
        b: ShardBatch,
        res: Result<crate::store::WriteReply, StoreError>,
        round: &mut Round,
    ) {
        match res {
            Ok(reply) => {
                round.any_ok = true;
                self.tally(w, shard, &b, &reply);
            }
            Err(StoreError::Overflow(fields)) => {
                // A call reports the full keys of all its shards: this shard's items carrying
                // one name the pulses refused.
                let fields: HashSet<String> = fields.into_iter().collect();
                for (it, pulses) in b.items.iter().zip(&b.pulses) {
                    if fields.contains(&it.field) {
                        for &(j, x) in pulses {
                            round
                                .refused
                                .entry(j)
                                .or_default()
                                .push((x, Refused::Overflow));
                        }
                    }
                }
                round.refused_shards.insert(shard);
            }
            Err(StoreError::Closed(items)) => {
                // A call reports the items of all its shards: take this shard's.
                for (s, i, why) in items {
                    if s == shard {
                        for &(j, x) in b.pulses.get(i).into_iter().flatten() {
                            round
                                .refused
                                .entry(j)
                                .or_default()
                                .push((x, Refused::Late(why)));
                        }
                    }
                }
                round.refused_shards.insert(shard);
            }
            Err(e @ StoreError::ShardsChanged { .. }) => {
                self.fail(&b, &e);
                self.fatal = Some(e);
            }
            Err(e) => {
                w.metrics.redis_errors.with_label_values(&["write"]).inc();
                let may_retry = w.retry_forever
                    && e.is_transient()
                    && !w.hard_stop.is_cancelled()
                    && first_sent.elapsed() < token_safe();
                if e.is_ambiguous() || w.retry_forever {
                    warn!(worker = w.id, shard, error = %e, retry = may_retry, "commit failed");
                }
                if may_retry {
                    round.retry.push((shard, b));
                } else {
                    self.fail(&b, &e);
                }
            }
        }
    }

    /// Waits before writing `retry` again (doubling `backoff`); false, with its requests
    /// failed, when its commit token may have expired meanwhile.
    async fn pause(
        &mut self,
        w: &Worker,
        backoff: &mut Duration,
        first_sent: Instant,
        retry: &[(u32, ShardBatch)],
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = w.hard_stop.cancelled() => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(2));
        // Checked again after the wait: a commit is never re-sent once its token may have
        // expired, when the re-send would count it again.
        if first_sent.elapsed() < token_safe() {
            return true;
        }
        let e = StoreError::Shared {
            message: "not re-sent: its commit token may have expired".into(),
            ambiguous: true,
            suspect: false,
            transient: false,
        };
        for (_, b) in retry {
            self.fail(b, &e);
        }
        false
    }

    fn tally(&mut self, w: &Worker, shard: u32, b: &ShardBatch, reply: &crate::store::WriteReply) {
        w.metrics.observe_window(reply.window_start, None);
        if let Some(k) = w
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(shard as usize)
        {
            *k = (reply.window_start, reply.window_end);
        }
        let note = |o: &mut Outcome| match o.window_start {
            None => o.window_start = Some(reply.window_start),
            Some(s) if s != reply.window_start => o.windows_mixed = true,
            Some(_) => {}
        };
        for (i, counted) in reply.counted.iter().enumerate() {
            for &(j, x) in &b.pulses[i] {
                let o = &mut self.outcomes[j];
                if let Some(item) = o.items.get_mut(x) {
                    *item = ItemOutcome {
                        counted: *counted,
                        window_start: reply.placed[i].map_or(reply.window_start, |(_, w)| w),
                    };
                }
                match reply.placed[i] {
                    None => note(o),
                    Some((p, window)) => {
                        o.stamped_windows.insert(window);
                        if *counted {
                            match p {
                                Placement::SealedWindow => o.late_joined += 1,
                                Placement::Amendment => o.amended += 1,
                                Placement::Ahead => o.ahead += 1,
                                Placement::Current => {}
                            }
                        }
                    }
                }
                if *counted {
                    o.accepted += 1;
                } else {
                    o.duplicates += 1;
                }
            }
        }
    }

    /// Every job with pulses in this shard fails with `e`.
    fn fail(&mut self, b: &ShardBatch, e: &StoreError) {
        let msg = e.to_string();
        for &(j, _) in b.pulses.iter().flatten() {
            self.failed[j] = Some(if e.is_ambiguous() {
                CommitError::Partial(msg.clone())
            } else {
                CommitError::Unavailable(msg.clone())
            });
        }
    }

    /// Refuses job `j`'s pulses `items` (unless it already failed): the whole request when
    /// nothing of it was counted yet — with the overflowing pulses named if there are any, else
    /// the late ones — or, when others of its pulses were counted already, those pulses only.
    fn refuse(&mut self, j: usize, mut items: Vec<(usize, Refused)>) {
        if self.failed[j].is_some() {
            return;
        }
        items.sort_unstable_by_key(|r| r.0);
        items.dedup_by_key(|r| r.0);
        let o = &mut self.outcomes[j];
        if o.accepted + o.duplicates > 0 {
            o.refused.extend(items);
            return;
        }
        let full: Vec<usize> = items
            .iter()
            .filter(|r| r.1 == Refused::Overflow)
            .map(|r| r.0)
            .collect();
        self.failed[j] = Some(if full.is_empty() {
            CommitError::Closed {
                items: items
                    .into_iter()
                    .filter_map(|(x, r)| match r {
                        Refused::Late(why) => Some((x, why)),
                        Refused::Overflow => None,
                    })
                    .collect(),
            }
        } else {
            CommitError::Overflow { items: full }
        });
    }
}

/// The pulses `include` admits (by job and index in it), by shard, pulses without ids
/// pre-aggregated per key.
fn group(
    w: &Worker,
    jobs: &[Job],
    include: impl Fn(usize, usize) -> bool,
) -> Vec<(u32, ShardBatch)> {
    let mut shards: HashMap<u32, ShardBatch> = HashMap::new();
    let known = w.known.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let meters = w.meters.get();
    for (j, job) in jobs.iter().enumerate() {
        for (x, p) in job
            .pulses
            .iter()
            .enumerate()
            .filter(|(x, _)| include(j, *x))
        {
            let shard = shard_of(&p.tenant_id, w.store.shards);
            let b = shards.entry(shard).or_default();
            let field = encode_field(&p.tenant_id, &p.product_sku, &p.use_unit);
            let aggs = meters.of(&p.product_sku, &p.use_unit);
            if aggs != [crate::meters::Aggregation::Sum] {
                // A meter: every aggregation of the pulse in one item, applied by the script
                // in the same step as its dedupe and placement (not summed beforehand).
                b.items.push(WriteItem {
                    field,
                    amount: p.used_amount,
                    digest: p
                        .pulse_id
                        .as_ref()
                        .map(|id| dedupe_digest(&p.tenant_id, id)),
                    placement: placement_of(&p.tenant_id),
                    timestamp_ms: p.timestamp_ms,
                    ops: aggs.iter().map(|a| a.code()).collect(),
                });
                b.pulses.push(vec![(j, x)]);
                continue;
            }
            if let Some(id) = &p.pulse_id {
                b.items.push(WriteItem {
                    field,
                    amount: p.used_amount,
                    digest: Some(dedupe_digest(&p.tenant_id, id)),
                    placement: placement_of(&p.tenant_id),
                    timestamp_ms: p.timestamp_ms,
                    ops: String::new(),
                });
                b.pulses.push(vec![(j, x)]);
                continue;
            }
            // Without an id, pulses of one key (and one placement) are summed before they
            // reach Redis: unstamped ones, stamped ones with one timestamp, and stamped ones in
            // the shard's current window as the last commit saw it — sent with the window's
            // start as their time, which places them in that same window even if it has been
            // sealed since (a window's bounds never change once it is open).
            let ts = p.timestamp_ms.map(|t| {
                let (s, e) = known.get(shard as usize).copied().unwrap_or((0, 0));
                let (s_ms, e_ms) = (s as i64 * 1000, e as i64 * 1000);
                if t >= s_ms && t < e_ms { s_ms } else { t }
            });
            let key = (field, ts);
            if let Some(&i) = b.merged.get(&key) {
                // Exact; a commit is at most WORKER_BATCH pulses of at most MAX_AMOUNT, far
                // below u128's range.
                b.items[i].amount = b.items[i]
                    .amount
                    .checked_add(p.used_amount)
                    .expect("a commit's sum fits in u128");
                b.pulses[i].push((j, x));
            } else {
                b.merged.insert(key.clone(), b.items.len());
                b.items.push(WriteItem {
                    field: key.0,
                    amount: p.used_amount,
                    digest: None,
                    placement: 0,
                    timestamp_ms: key.1,
                    ops: String::new(),
                });
                b.pulses.push(vec![(j, x)]);
            }
        }
    }
    shards.into_iter().collect()
}

/// Answers every job; in enqueued mode, what could not be committed is counted and logged
/// with its amounts, key by key.
fn answer(
    w: &Worker,
    jobs: Vec<Job>,
    outcomes: Vec<Outcome>,
    mut failed: Vec<Option<CommitError>>,
) {
    for (j, job) in jobs.into_iter().enumerate() {
        let n = job.pulses.len() as u64;
        let result = match failed[j].take() {
            Some(e) => {
                // A multi-shard request whose other shards committed is partial too.
                let partial = outcomes[j].accepted + outcomes[j].duplicates > 0;
                let e = match e {
                    CommitError::Unavailable(m) if partial => CommitError::Partial(m),
                    e => e,
                };
                if job.reply.is_none() {
                    let mut lost: std::collections::BTreeMap<String, crate::amount::Amount> =
                        Default::default();
                    for p in &job.pulses {
                        let f = encode_field(&p.tenant_id, &p.product_sku, &p.use_unit);
                        let a = lost.entry(f).or_insert(crate::amount::Amount::ZERO);
                        *a = a.checked_add(p.used_amount).unwrap_or(*a);
                    }
                    let lost: Vec<String> = lost.iter().map(|(f, a)| format!("{f}={a}")).collect();
                    error!(pulses = n, error = %e, lost = %lost.join(" "), "enqueued pulses could not be committed; they are not counted");
                }
                w.metrics.pulses.with_label_values(&["failed"]).inc_by(n);
                Err(e)
            }
            None => {
                let o = outcomes[j].clone();
                w.metrics
                    .pulses
                    .with_label_values(&["accepted"])
                    .inc_by(o.accepted as u64);
                w.metrics
                    .pulses
                    .with_label_values(&["duplicate"])
                    .inc_by(o.duplicates as u64);
                Ok(o)
            }
        };
        if let Some(tx) = job.reply {
            let _ = tx.send(result);
        }
    }
}

/// Makes sure the worker holds a live connection: a connection failure seen anywhere (another
/// worker, the scheduler) retires its own too.
async fn ensure_conn(w: &Worker, conn: &mut Option<(Conn, u64)>) -> Result<(), StoreError> {
    if conn
        .as_ref()
        .is_some_and(|(_, epoch)| *epoch != w.store.epoch())
    {
        *conn = None;
    }
    if conn.is_none() {
        let epoch = w.store.epoch();
        // A commit that waits for replicas blocks its connection while it waits: on a
        // connection of this worker's own, so nothing else queues behind it.
        let c = if w.wait_replicas > 0 {
            w.store.dedicated_conn(w.wait_timeout).await?
        } else {
            w.store.conn().await?
        };
        *conn = Some((c, epoch));
    }
    Ok(())
}

/// REDIS_WAIT_REPLICAS: whether enough replicas confirmed the commit in time. Short of them
/// it was applied on the master but may not survive a failover — ambiguous (503, "may have
/// been counted"), which a retry with the same ids settles exactly.
async fn replicas_confirm(w: &Worker, c: &Conn, shards: &[(u32, ShardBatch)]) -> bool {
    let targets: Vec<u32> = if w.store.is_cluster() {
        shards.iter().map(|(s, _)| *s).collect()
    } else {
        shards.iter().take(1).map(|(s, _)| *s).collect()
    };
    let waits = join_all(targets.iter().map(|s| {
        let mut mc = c.clone();
        let store = &w.store;
        async move {
            store
                .wait_replicas(&mut mc, *s, w.wait_replicas, w.wait_timeout)
                .await
        }
    }))
    .await;
    let confirmed = waits
        .iter()
        .all(|r| matches!(r, Ok(n) if *n >= w.wait_replicas));
    if !confirmed {
        w.metrics.redis_wait_short.inc();
    }
    confirmed
}

/// The failure of a commit its replicas did not confirm in time.
fn wait_short(w: &Worker) -> StoreError {
    StoreError::Shared {
        message: format!(
            "fewer than {} replicas confirmed the commit within {:?}",
            w.wait_replicas, w.wait_timeout
        ),
        ambiguous: true,
        suspect: false,
        transient: true,
    }
}

/// Sends every shard's script call on one multiplexed connection (they are pipelined) and
/// collects each shard's result.
async fn write_all(
    w: &Worker,
    conn: &mut Option<(Conn, u64)>,
    token: &str,
    shards: &[(u32, ShardBatch)],
) -> Result<Vec<Result<crate::store::WriteReply, StoreError>>, StoreError> {
    ensure_conn(w, conn).await?;
    let c = &conn.as_ref().expect("connection was just set").0;
    let started = Instant::now();
    let results = if w.store.commit_per_shard() {
        // One slot per call on a cluster: each shard is its own call (pipelined).
        join_all(shards.iter().map(|(shard, b)| {
            let mut mc = c.clone();
            let store = &w.store;
            async move { store.write(&mut mc, *shard, token, &b.items).await }
        }))
        .await
    } else {
        // One Redis: the whole commit in one script call, all or nothing.
        let sections: Vec<(u32, &[WriteItem])> =
            shards.iter().map(|(s, b)| (*s, &b.items[..])).collect();
        match w.store.write_many(&mut c.clone(), token, &sections).await {
            Ok(replies) => replies.into_iter().map(Ok).collect(),
            Err(e) => shards.iter().map(|_| Err(e.fan_out())).collect(),
        }
    };
    let results = if w.wait_replicas > 0 && results.iter().any(|r| r.is_ok()) {
        let short = !replicas_confirm(w, c, shards).await;
        if short {
            // The next commit starts on a new connection: on Sentinel that asks for the master
            // again (a master cut off from its replicas may have been replaced).
            *conn = None;
        }
        results
            .into_iter()
            .map(|r| r.and_then(|reply| if short { Err(wait_short(w)) } else { Ok(reply) }))
            .collect()
    } else {
        results
    };
    w.metrics
        .redis_write_duration
        .observe(started.elapsed().as_secs_f64());
    if results
        .iter()
        .any(|r| matches!(r, Err(e) if e.connection_suspect()))
    {
        // Start the next commit on a fresh, checked connection from the pool: a multiplexed
        // connection whose server went away keeps failing until it is replaced.
        *conn = None;
        w.store.invalidate();
    }
    Ok(results)
}
