//! The Processor's Prometheus metrics (`GET /metrics`): batches and records by outcome, refused
//! records, and how long a batch's transaction took.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// `outcome`: stored, refused (some records named), failed (retryable: database down).
    pub batches: IntCounterVec,
    /// `outcome`: inserted, duplicate (already held, unchanged), refused.
    pub records: IntCounterVec,
    /// Records refused by name; `reason`: conflict (another record under a stored id),
    /// invalid.
    pub refused: IntCounterVec,
    /// Seconds from `BEGIN` to `COMMIT` of a batch.
    pub transaction: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            for v in values {
                c.with_label_values(&[*v]);
            }
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let batches = counter(
            "processor_batches_total",
            "Batches answered, by outcome",
            "outcome",
            &["stored", "refused", "failed"],
        );
        let records = counter(
            "processor_records_total",
            "Records of answered batches, by outcome",
            "outcome",
            &["inserted", "duplicate", "refused"],
        );
        let refused = counter(
            "processor_refused_records_total",
            "Records refused by name, by reason",
            "reason",
            &["conflict", "invalid"],
        );
        let transaction = Histogram::with_opts(
            HistogramOpts::new(
                "processor_transaction_seconds",
                "Time from BEGIN to COMMIT of one batch",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid histogram");
        registry
            .register(Box::new(transaction.clone()))
            .expect("registered once");
        Metrics {
            registry,
            batches,
            records,
            refused,
            transaction,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
