//! One batch's delivery: records built from a sealed window's fields, POSTed with a stable
//! `Idempotency-Key`, deleted after a 2xx (invariant 5), dead-lettered when rejected for good.

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::drain::Drainer;
use crate::processor::{ExactNumber, ProcessorClient, ProcessorError, Record, backoff, rfc3339};
use crate::store::keys::{decode_field, record_id};
use crate::store::{Conn, PendingWindow, StoreError};

/// What became of one batch.
pub(super) enum BatchResult {
    Delivered(u64),
    DeadLettered(u64),
    Failed,
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
                        record_id: record_id(w.start, shard, field, w.exact),
                        tenant_id: key.tenant,
                        product_sku: key.sku,
                        use_unit: key.unit,
                        used_amount: ExactNumber::new(amount),
                        used_amount_text: amount.clone(),
                        window_start: window_start.clone(),
                        window_end: window_end.clone(),
                    });
                    fields.push(field.as_str());
                }
                _ => undecodable.push(field.as_str()),
            }
        }
        let mut dead = 0;
        if !undecodable.is_empty() {
            let reason =
                serde_json::json!({"status": null, "error": "field or amount not readable"})
                    .to_string();
            dead += self
                .store
                .dead_letter(&mut conn, shard, w, &reason, &undecodable)
                .await?;
            self.metrics.dead_letters.inc_by(dead);
        }
        if records.is_empty() {
            return Ok(BatchResult::DeadLettered(dead));
        }
        let batch_id = batch_id(&records);
        let body = bytes::Bytes::from(serde_json::to_vec(&records).expect("records serialise"));
        let mut attempt = 0;
        loop {
            if stop.is_cancelled() {
                return Ok(BatchResult::Failed);
            }
            match processor.send(&batch_id, body.clone()).await {
                Ok(()) => {
                    self.store.delivered(&mut conn, shard, w, &fields).await?;
                    self.metrics.records_delivered.inc_by(records.len() as u64);
                    self.metrics.batches_delivered.inc();
                    return Ok(BatchResult::Delivered(records.len() as u64));
                }
                Err(ProcessorError::Rejected { status, body }) => {
                    self.metrics
                        .delivery_failures
                        .with_label_values(&["rejected"])
                        .inc();
                    warn!(
                        shard,
                        window_start = w.start,
                        status,
                        records = records.len(),
                        "processor rejected a batch; dead-lettering it"
                    );
                    let reason = serde_json::json!({"status": status, "error": body}).to_string();
                    let moved = self
                        .store
                        .dead_letter(&mut conn, shard, w, &reason, &fields)
                        .await?;
                    self.metrics.dead_letters.inc_by(moved);
                    return Ok(BatchResult::DeadLettered(dead + moved));
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
                        warn!(shard, window_start = w.start, reason, %detail, attempts = attempt, "batch not delivered; it stays pending for the next pass");
                        return Ok(BatchResult::Failed);
                    }
                    self.metrics.delivery_retries.inc();
                    let wait = retry_after
                        .map(|d| d.min(self.max_backoff))
                        .unwrap_or_else(|| backoff(attempt - 1, self.max_backoff));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return Ok(BatchResult::Failed),
                    }
                }
            }
        }
    }
}

/// A batch's id: derived from its record ids, so a re-sent batch carries the same key.
fn batch_id(records: &[Record]) -> String {
    let mut h = Sha256::new();
    for r in records {
        h.update(r.record_id.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}
