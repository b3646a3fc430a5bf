//! One batch's delivery: records built from a sealed window's fields, POSTed with a stable
//! `Idempotency-Key`, deleted after a 2xx (invariant 5), dead-lettered when rejected for good —
//! only the records the Processor refuses, never the batch around them.
//!
//! A permanent refusal is narrowed down to the records it is about:
//! - a body naming them (`{"rejected": [{"record_id", "reason"}]}`, every id in the batch):
//!   those are dead-lettered with their reasons and the rest is POSTed again as a batch of its
//!   own, deleted only after its own 2xx;
//! - an unstructured refusal (or one naming ids that are not in the batch) with a status that
//!   can be about single records (400, 409, 422: [`may_be_per_record`]): the batch is halved and
//!   each half POSTed, recursively, within [`ISOLATION_BUDGET`] extra POSTs per batch. When the
//!   two halves of the whole batch are refused alike (same status, same body), the refusal is
//!   about the batch: it is dead-lettered whole, as is whatever the budget could not settle;
//! - any other status (a wrong URL's 404, a 413): the batch is dead-lettered whole.
//!
//! Dead letters stay inspectable and replayable record by record (`/admin/dead-letters`).

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::drain::Drainer;
use crate::processor::{
    ExactNumber, ProcessorClient, ProcessorError, Record, backoff, may_be_per_record,
    named_rejections, rfc3339,
};
use crate::store::keys::{decode_field, record_id};
use crate::store::{Conn, PendingWindow, StoreError};

/// Extra POSTs one batch may spend finding the records a Processor refuses without naming
/// them: enough to isolate a few bad records in a batch of 500 (about 2·log2(n) each).
pub const ISOLATION_BUDGET: u32 = 64;

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

/// One batch in delivery: its records, their fields, and where they belong.
struct Batch<'a> {
    processor: &'a ProcessorClient,
    shard: u32,
    w: &'a PendingWindow,
    records: Vec<Record>,
    fields: Vec<&'a str>,
    stop: &'a CancellationToken,
}

impl Drainer {
    pub(super) async fn deliver_batch(
        &self,
        processor: &ProcessorClient,
        mut conn: Conn,
        shard: u32,
        w: &PendingWindow,
        batch: &[(String, Option<String>)],
        stop: &CancellationToken,
    ) -> Result<BatchResult, StoreError> {
        let (window_start, window_end) = (rfc3339(w.start), rfc3339(w.end));
        let mut records = Vec::with_capacity(batch.len());
        let mut fields = Vec::with_capacity(batch.len());
        let mut undecodable = Vec::new();
        for (field, value) in batch {
            match (decode_field(field.as_bytes()), value) {
                (Some(key), Some(amount)) => {
                    records.push(Record {
                        record_id: record_id(w.start, shard, field, w.exact, w.amendment),
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
                    });
                    fields.push(field.as_str());
                }
                _ => undecodable.push(field.as_str()),
            }
        }
        // A `latest` meter's record says when its value was measured, so that a Processor can
        // combine it with the window's other records (an amendment's is later).
        let latest: Vec<usize> = (0..records.len())
            .filter(|&i| records[i].aggregation == "latest")
            .collect();
        if !latest.is_empty() {
            let at = self
                .store
                .latest_times(
                    &mut conn,
                    shard,
                    w,
                    &latest.iter().map(|&i| fields[i]).collect::<Vec<_>>(),
                )
                .await?;
            for (&i, ms) in latest.iter().zip(at) {
                records[i].latest_at = ms.map(crate::processor::rfc3339_ms);
            }
        }
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
        let b = Batch {
            processor,
            shard,
            w,
            records,
            fields,
            stop,
        };
        let mut budget = ISOLATION_BUDGET;
        let first = self.post(&b, &all).await;
        self.settle(&b, &mut conn, all, first, true, &mut budget, &mut result)
            .await?;
        Ok(result)
    }

    /// Settles one part of a batch given the Processor's answer to it: delete what was
    /// accepted, narrow a refusal down to its records.
    #[allow(clippy::too_many_arguments)]
    fn settle<'s>(
        &'s self,
        b: &'s Batch<'s>,
        conn: &'s mut Conn,
        part: Vec<usize>,
        answer: Posted,
        whole: bool,
        budget: &'s mut u32,
        result: &'s mut BatchResult,
    ) -> BoxFuture<'s, Result<(), StoreError>> {
        Box::pin(async move {
            let (status, body) = match answer {
                Posted::Delivered => {
                    let fields: Vec<&str> = part.iter().map(|&i| b.fields[i]).collect();
                    self.store.delivered(conn, b.shard, b.w, &fields).await?;
                    self.metrics.records_delivered.inc_by(part.len() as u64);
                    self.metrics.batches_delivered.inc();
                    result.delivered += part.len() as u64;
                    return Ok(());
                }
                Posted::Failed => {
                    result.failed = true;
                    return Ok(());
                }
                Posted::Refused { status, body } => (status, body),
            };
            self.metrics
                .delivery_failures
                .with_label_values(&["rejected"])
                .inc();
            // The records the Processor names, if it names only records of this part.
            let by_id: HashMap<&str, usize> = part
                .iter()
                .map(|&i| (b.records[i].record_id.as_str(), i))
                .collect();
            let named = named_rejections(&body).and_then(|n| {
                n.into_iter()
                    .map(|(id, reason)| by_id.get(id.as_str()).map(|&i| (i, reason)))
                    .collect::<Option<BTreeMap<usize, serde_json::Value>>>()
            });
            if let Some(named) = named {
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
                    result.dead_lettered += self
                        .dead_letter_all(conn, b.shard, b.w, &reason, &[b.fields[i]])
                        .await?;
                }
                let rest: Vec<usize> = part
                    .into_iter()
                    .filter(|i| !named.contains_key(i))
                    .collect();
                if !rest.is_empty() {
                    let again = self.post(b, &rest).await;
                    self.settle(b, conn, rest, again, false, budget, result)
                        .await?;
                }
                return Ok(());
            }
            let short: String = body.chars().take(512).collect();
            let reason = serde_json::json!({"status": status, "error": short});
            if !may_be_per_record(status) || part.len() < 2 || *budget < 2 {
                warn!(
                    shard = b.shard,
                    window_start = b.w.start,
                    status,
                    records = part.len(),
                    "processor refused records; dead-lettering them"
                );
                let fields: Vec<&str> = part.iter().map(|&i| b.fields[i]).collect();
                result.dead_lettered += self
                    .dead_letter_all(conn, b.shard, b.w, &reason, &fields)
                    .await?;
                return Ok(());
            }
            // Halve it: each half answers for itself.
            *budget -= 2;
            self.metrics.delivery_isolation_posts.inc_by(2);
            let mut left = part;
            let right = left.split_off(left.len() / 2);
            let (l, r) = (self.post(b, &left).await, self.post(b, &right).await);
            if whole
                && let (
                    Posted::Refused {
                        status: s1,
                        body: b1,
                    },
                    Posted::Refused {
                        status: s2,
                        body: b2,
                    },
                ) = (&l, &r)
                && (*s1, b1) == (status, &body)
                && (*s2, b2) == (status, &body)
            {
                warn!(
                    shard = b.shard,
                    window_start = b.w.start,
                    status,
                    records = left.len() + right.len(),
                    "processor refused both halves of a batch alike: a refusal of the batch; dead-lettering it"
                );
                left.extend(right);
                let fields: Vec<&str> = left.iter().map(|&i| b.fields[i]).collect();
                result.dead_lettered += self
                    .dead_letter_all(conn, b.shard, b.w, &reason, &fields)
                    .await?;
                return Ok(());
            }
            self.settle(b, conn, left, l, false, budget, result).await?;
            self.settle(b, conn, right, r, false, budget, result).await
        })
    }

    /// POSTs the records `part` of the batch, retrying retryable failures.
    async fn post(&self, b: &Batch<'_>, part: &[usize]) -> Posted {
        let records: Vec<&Record> = part.iter().map(|&i| &b.records[i]).collect();
        let batch_id = batch_id(&records);
        let body = bytes::Bytes::from(serde_json::to_vec(&records).expect("records serialise"));
        let mut attempt = 0;
        loop {
            if b.stop.is_cancelled() {
                return Posted::Failed;
            }
            match b.processor.send(&batch_id, body.clone()).await {
                Ok(()) => return Posted::Delivered,
                Err(ProcessorError::Rejected { status, body }) => {
                    return Posted::Refused { status, body };
                }
                Err(ProcessorError::Retryable {
                    reason,
                    detail,
                    retry_after,
                }) => {
                    self.metrics
                        .delivery_failures
                        .with_label_values(&[reason])
                        .inc();
                    if reason == "status_auth" {
                        self.metrics.processor_auth_failures.inc();
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
                        _ = b.stop.cancelled() => return Posted::Failed,
                    }
                }
            }
        }
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

/// A batch's id: derived from its record ids, so a re-sent batch carries the same key.
fn batch_id(records: &[&Record]) -> String {
    let mut h = Sha256::new();
    for r in records {
        h.update(r.record_id.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}
