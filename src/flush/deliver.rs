//! One batch's delivery: records built from a sealed window's fields, POSTed with a stable
//! `Idempotency-Key`, deleted after a 2xx (invariant 5), dead-lettered when rejected for good —
//! only the records the Processor refuses, never the batch around them.
//!
//! A permanent refusal is narrowed down to the records it is about:
//! - a body naming them (`{"rejected": [{"record_id", "reason"}]}`, every id in the batch):
//!   those are dead-lettered with their reasons and the rest is POSTed again as a batch of its
//!   own, deleted only after its own 2xx;
//! - an unstructured refusal (or one naming ids that are not in the batch) with a status that
//!   can be about single records (400, 409, 422: `policy::may_be_per_record`): the batch is halved and
//!   each half POSTed, recursively, within `policy::ISOLATION_BUDGET` extra POSTs per batch. When the
//!   two halves of the whole batch are refused alike (same status, same body), the refusal is
//!   about the batch: it is dead-lettered whole, as is whatever the budget could not settle;
//! - any other permanent status (a 410, a 413): the batch is dead-lettered whole. (A wrong
//!   URL's 404/405 is not a refusal: it is retried, `policy::classify`.)
//!
//! Dead letters stay inspectable and replayable record by record (`/admin/dead-letters`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::policy::{
    ENDPOINT, ISOLATION_BUDGET, ProcessorError, backoff, body_limit, classify, may_be_per_record,
    named_rejections,
};
use crate::metrics::Metrics;
use crate::processor::{ExactNumber, ProcessorClient, Record, rfc3339};
use crate::store::keys::{decode_field, record_id};
use crate::store::{Conn, PendingWindow, Store, StoreError};

/// What became of one batch.
#[derive(Debug, Default)]
pub(super) struct BatchResult {
    pub delivered: u64,
    pub dead_lettered: u64,
    /// Some records could not be delivered this pass (retryable failures); they stay.
    pub failed: bool,
}

/// The answer to one POST, after the retries of retryable failures.
enum Posted {
    Delivered,
    Refused {
        status: u16,
        body: String,
    },
    /// Retries exhausted or stopping: the records stay for the next pass.
    Failed,
}

/// Which part of a batch an answer is about: when both halves of the whole batch are refused
/// alike, the refusal is about the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Whole,
    Some,
}

/// What delivering needs from the drain: the store, the Processor, the metrics and the retry
/// limits of one pass.
pub(super) struct Courier<'a> {
    pub store: &'a Store,
    pub processor: &'a ProcessorClient,
    pub metrics: &'a Metrics,
    pub max_attempts: u32,
    pub max_backoff: Duration,
    pub stop: &'a CancellationToken,
    /// The window's `final_at` (RFC 3339), the same on each of its records.
    pub final_at: String,
}

/// One batch in delivery: its records, their fields, where they belong, and what is left of
/// its isolation budget.
struct Batch<'a> {
    shard: u32,
    w: &'a PendingWindow,
    records: Vec<Record>,
    fields: Vec<&'a str>,
    conn: Conn,
    budget: u32,
    result: BatchResult,
}

/// A sealed window's fields and totals as records; the fields that are not readable apart.
fn records_of<'a>(
    shard: u32,
    w: &PendingWindow,
    final_at: &str,
    batch: &'a [(String, Option<String>)],
) -> (Vec<Record>, Vec<&'a str>, Vec<&'a str>) {
    let (window_start, window_end) = (rfc3339(w.start), rfc3339(w.end));
    let mut records = Vec::with_capacity(batch.len());
    let mut fields = Vec::with_capacity(batch.len());
    let mut undecodable = Vec::new();
    for (field, value) in batch {
        match (decode_field(field.as_bytes()), value) {
            (Some(key), Some(amount)) => {
                records.push(Record {
                    record_id: record_id(w.start, shard, field, w.amendment),
                    tenant_id: key.tenant,
                    product_sku: key.sku,
                    use_unit: key.unit,
                    used_amount: ExactNumber::new(amount),
                    used_amount_text: amount.clone(),
                    window_start: window_start.clone(),
                    window_end: window_end.clone(),
                    amends: (w.amendment > 0).then_some(w.amendment),
                    aggregation: key.aggregation,
                    latest_at: None,
                    final_at: final_at.to_string(),
                });
                fields.push(field.as_str());
            }
            _ => undecodable.push(field.as_str()),
        }
    }
    (records, fields, undecodable)
}

impl Courier<'_> {
    /// Delivers one batch of a sealed window's `(field, total)`s: POSTs it, deletes what the
    /// Processor accepted, narrows a refusal down to its records and dead-letters those.
    pub(super) async fn deliver_batch(
        &self,
        mut conn: Conn,
        shard: u32,
        w: &PendingWindow,
        batch: &[(String, Option<String>)],
    ) -> Result<BatchResult, StoreError> {
        let (mut records, fields, undecodable) = records_of(shard, w, &self.final_at, batch);
        self.stamp_latest(&mut conn, shard, w, &mut records, &fields)
            .await?;
        let mut result = BatchResult::default();
        if !undecodable.is_empty() {
            let reason =
                serde_json::json!({"status": null, "error": "field or amount not readable"});
            result.dead_lettered += self
                .dead_letter_all(&mut conn, shard, w, &reason, &undecodable)
                .await?;
        }
        if records.is_empty() {
            return Ok(result);
        }
        let all: Vec<usize> = (0..records.len()).collect();
        let mut b = Batch {
            shard,
            w,
            records,
            fields,
            conn,
            budget: ISOLATION_BUDGET,
            result,
        };
        let first = self.post(&b, &all).await;
        self.settle(&mut b, all, first, Part::Whole).await?;
        Ok(b.result)
    }

    /// A `latest` meter's record says when its value was measured, so that a Processor can
    /// combine it with the window's other records (an amendment's is later).
    async fn stamp_latest(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        records: &mut [Record],
        fields: &[&str],
    ) -> Result<(), StoreError> {
        let latest: Vec<usize> = (0..records.len())
            .filter(|&i| records[i].aggregation == "latest")
            .collect();
        if latest.is_empty() {
            return Ok(());
        }
        let of: Vec<&str> = latest.iter().map(|&i| fields[i]).collect();
        let at = self.store.latest_times(conn, shard, w, &of).await?;
        for (&i, ms) in latest.iter().zip(at) {
            records[i].latest_at = ms.map(crate::processor::rfc3339_ms);
        }
        Ok(())
    }

    /// Settles one part of a batch given the Processor's answer to it: delete what was
    /// accepted, narrow a refusal down to its records.
    fn settle<'s>(
        &'s self,
        b: &'s mut Batch<'_>,
        part: Vec<usize>,
        answer: Posted,
        scope: Part,
    ) -> BoxFuture<'s, Result<(), StoreError>> {
        Box::pin(async move {
            let (status, body) = match answer {
                Posted::Delivered => {
                    let fields: Vec<&str> = part.iter().map(|&i| b.fields[i]).collect();
                    self.store
                        .delivered(&mut b.conn, b.shard, b.w, &fields)
                        .await?;
                    self.metrics.records_delivered.inc_by(part.len() as u64);
                    self.metrics.batches_delivered.inc();
                    b.result.delivered += part.len() as u64;
                    return Ok(());
                }
                Posted::Failed => {
                    b.result.failed = true;
                    return Ok(());
                }
                Posted::Refused { status, body } => (status, body),
            };
            self.metrics
                .delivery_failures
                .with_label_values(&["rejected"])
                .inc();
            if let Some(named) = named_in(b, &part, &body) {
                return self.refused_by_id(b, part, status, named).await;
            }
            let short: String = body.chars().take(512).collect();
            let reason = serde_json::json!({"status": status, "error": short});
            if !may_be_per_record(status) || part.len() < 2 || b.budget < 2 {
                warn!(
                    shard = b.shard,
                    window_start = b.w.start,
                    status,
                    records = part.len(),
                    "processor refused records; dead-lettering them"
                );
                return self.dead_letter_part(b, &part, &reason).await;
            }
            self.halve(b, part, scope, (status, &body), &reason).await
        })
    }

    /// The Processor named the records it refuses: dead-letter those with its reasons, POST
    /// the rest again as a batch of its own.
    async fn refused_by_id(
        &self,
        b: &mut Batch<'_>,
        part: Vec<usize>,
        status: u16,
        named: BTreeMap<usize, serde_json::Value>,
    ) -> Result<(), StoreError> {
        warn!(
            shard = b.shard,
            window_start = b.w.start,
            status,
            refused = named.len(),
            of = part.len(),
            "processor refused records by id; dead-lettering them, re-sending the rest"
        );
        for (&i, reason) in &named {
            let reason = serde_json::json!({"status": status, "error": reason});
            self.dead_letter_part(b, &[i], &reason).await?;
        }
        let rest: Vec<usize> = part
            .into_iter()
            .filter(|i| !named.contains_key(i))
            .collect();
        if !rest.is_empty() {
            let again = self.post(b, &rest).await;
            self.settle(b, rest, again, Part::Some).await?;
        }
        Ok(())
    }

    /// An unstructured refusal: each half of the part answers for itself — unless both halves
    /// of the whole batch are refused exactly as the batch was, a refusal of the batch.
    async fn halve(
        &self,
        b: &mut Batch<'_>,
        part: Vec<usize>,
        scope: Part,
        refusal: (u16, &str),
        reason: &serde_json::Value,
    ) -> Result<(), StoreError> {
        b.budget -= 2;
        self.metrics.delivery_isolation_posts.inc_by(2);
        let mut left = part;
        let right = left.split_off(left.len() / 2);
        let (l, r) = (self.post(b, &left).await, self.post(b, &right).await);
        let alike = |p: &Posted| matches!(p, Posted::Refused { status, body } if (*status, body.as_str()) == refusal);
        if scope == Part::Whole && alike(&l) && alike(&r) {
            warn!(
                shard = b.shard,
                window_start = b.w.start,
                status = refusal.0,
                records = left.len() + right.len(),
                "processor refused both halves of a batch alike: a refusal of the batch; dead-lettering it"
            );
            left.extend(right);
            return self.dead_letter_part(b, &left, reason).await;
        }
        self.settle(b, left, l, Part::Some).await?;
        self.settle(b, right, r, Part::Some).await
    }

    /// POSTs the records `part` of the batch, retrying retryable failures.
    async fn post(&self, b: &Batch<'_>, part: &[usize]) -> Posted {
        let records: Vec<&Record> = part.iter().map(|&i| &b.records[i]).collect();
        let batch_id = batch_id(&records);
        let body = bytes::Bytes::from(serde_json::to_vec(&records).expect("records serialise"));
        let mut attempt = 0;
        loop {
            if self.stop.is_cancelled() {
                return Posted::Failed;
            }
            let reply = self
                .processor
                .send(&batch_id, body.clone(), body_limit)
                .await;
            let health = self.processor.health();
            let (reason, detail, retry_after) = match classify(reply) {
                Ok(()) => {
                    health.succeeded();
                    return Posted::Delivered;
                }
                Err(ProcessorError::Rejected { status, body }) => {
                    health.failed(&format!("refused records with {status}: {body}"));
                    return Posted::Refused { status, body };
                }
                Err(ProcessorError::Retryable {
                    reason,
                    detail,
                    retry_after,
                }) => (reason, detail, retry_after),
            };
            self.metrics
                .delivery_failures
                .with_label_values(&[reason])
                .inc();
            match reason {
                "status_auth" => self.metrics.processor_auth_failures.inc(),
                ENDPOINT => {
                    self.metrics.processor_endpoint_errors.inc();
                    health.endpoint_wrong(&detail);
                }
                _ => health.failed(&format!("{reason}: {detail}")),
            }
            attempt += 1;
            if attempt >= self.max_attempts {
                warn!(shard = b.shard, window_start = b.w.start, reason, %detail, attempts = attempt, "batch not delivered; it stays pending for the next pass");
                return Posted::Failed;
            }
            self.metrics.delivery_retries.inc();
            let wait = retry_after
                .map(|d| d.min(self.max_backoff))
                .unwrap_or_else(|| backoff(attempt - 1, self.max_backoff));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => return Posted::Failed,
            }
        }
    }

    /// Dead-letters the records `part` of the batch with `reason`.
    async fn dead_letter_part(
        &self,
        b: &mut Batch<'_>,
        part: &[usize],
        reason: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let fields: Vec<&str> = part.iter().map(|&i| b.fields[i]).collect();
        b.result.dead_lettered += self
            .dead_letter_all(&mut b.conn, b.shard, b.w, reason, &fields)
            .await?;
        Ok(())
    }

    /// Dead-letters `fields` with `reason`; returns how many were moved.
    async fn dead_letter_all(
        &self,
        conn: &mut Conn,
        shard: u32,
        w: &PendingWindow,
        reason: &serde_json::Value,
        fields: &[&str],
    ) -> Result<u64, StoreError> {
        let moved = self
            .store
            .dead_letter(conn, shard, w, &reason.to_string(), fields)
            .await?;
        self.metrics.dead_letters.inc_by(moved);
        Ok(moved)
    }
}

/// The records a refusal names, if it names only records of this part.
fn named_in(
    b: &Batch<'_>,
    part: &[usize],
    body: &str,
) -> Option<BTreeMap<usize, serde_json::Value>> {
    let by_id: HashMap<&str, usize> = part
        .iter()
        .map(|&i| (b.records[i].record_id.as_str(), i))
        .collect();
    named_rejections(body)?
        .into_iter()
        .map(|(id, reason)| by_id.get(id.as_str()).map(|&i| (i, reason)))
        .collect()
}

/// A batch's id: derived from its record ids, so a re-sent batch carries the same key.
fn batch_id(records: &[&Record]) -> String {
    let mut h = Sha256::new();
    for r in records {
        h.update(r.record_id.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}
