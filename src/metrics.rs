//! Every Prometheus metric of the service, defined in one place.
//!
//! Names follow Prometheus conventions (`ingestor_<what>_<unit>`, counters end in `_total`);
//! labels are low-cardinality — never a tenant id. The `ingestor_` namespace keeps the earlier
//! Go service's dashboards meaningful where a metric kept its meaning.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The service's metrics and the registry they live in.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    pub pulses_received: IntCounter,
    pub pulses: IntCounterVec,
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
    pub commit_batch: Histogram,
    pub redis_write_duration: Histogram,
    pub redis_errors: IntCounterVec,
    pub current_window_start: IntGauge,
    pub window_seconds: IntGauge,
    pub current_generation: IntGaugeVec,
    pub seals: IntCounter,
    pub pending_windows: IntGauge,
    pub oldest_pending_age: IntGauge,
    pub records_delivered: IntCounter,
    pub batches_delivered: IntCounter,
    pub delivery_failures: IntCounterVec,
    pub delivery_retries: IntCounter,
    pub dead_letters: IntCounter,
    pub late_pulses: IntCounterVec,
    pub timestamps_refused: IntCounterVec,
    pub delivery_isolation_posts: IntCounter,
    pub dead_letters_set_aside: IntCounter,
    pub drain_duration: Histogram,
    pub locks_held: IntGauge,
    pub build_info: IntGaugeVec,
    /// Long-lived tasks that ended or panicked while the service should have been running.
    pub task_failures: IntCounterVec,
    /// Request handlers that panicked (answered 500; the service kept running).
    pub handler_panics: IntCounter,
    /// Processor answers that mean our credentials are wrong (401/403): retried, alert-worthy.
    pub processor_auth_failures: IntCounter,
    pub processor_endpoint_errors: IntCounter,
    /// Commits that fewer than REDIS_WAIT_REPLICAS replicas confirmed in time (answered 503).
    pub redis_wait_short: IntCounter,
    /// The two ingest routes' series for their usual answer (202), bound once so that the
    /// request path does no label lookup for them.
    ingest_one: BoundRoute,
    ingest_batch: BoundRoute,
}

/// One route's latency histogram and its `202` counter.
struct BoundRoute {
    duration: Histogram,
    accepted: IntCounter,
}

impl BoundRoute {
    fn new(requests: &IntCounterVec, duration: &HistogramVec, route: &str) -> Self {
        BoundRoute {
            duration: duration.with_label_values(&[route]),
            accepted: requests.with_label_values(&[route, "202"]),
        }
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Registers each metric as it is defined.
struct Registering(Registry);

impl Registering {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, m: prometheus::Result<M>) -> M {
        let m = m.expect("metric definition is valid");
        self.0
            .register(Box::new(m.clone()))
            .expect("metric registered once");
        m
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help))
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help))
    }
    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }
    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }
    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        ))
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registering(Registry::new());
        let requests = r.counter_vec(
            "ingestor_http_requests_total",
            "HTTP requests by route and status code",
            &["route", "status"],
        );
        let duration = r.add(HistogramVec::new(
            HistogramOpts::new(
                "ingestor_http_request_duration_seconds",
                "HTTP request latency",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        ));
        let m = Metrics {
            http_requests: requests.clone(),
            http_duration: duration.clone(),
            pulses_received: r.counter("ingestor_pulses_received_total", "Pulses in well-formed requests, before validation"),
            pulses: r.counter_vec("ingestor_pulses_total", "Pulses by outcome: accepted, duplicate, rejected, limited (429), shed (queue full), failed (redis)", &["outcome"]),
            queue_depth: r.gauge("ingestor_queue_depth_pulses", "Pulses queued or being committed"),
            queue_capacity: r.gauge("ingestor_queue_capacity_pulses", "Capacity of the ingest queue"),
            commit_batch: r.histogram("ingestor_commit_batch_pulses", "Pulses per worker commit", &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0]),
            redis_write_duration: r.histogram("ingestor_redis_write_duration_seconds", "Latency of one worker commit to Redis", LATENCY_BUCKETS),
            redis_errors: r.counter_vec("ingestor_redis_errors_total", "Failed Redis operations by operation", &["op"]),
            current_window_start: r.gauge("ingestor_current_window_start_seconds", "Start (unix seconds) of the window this replica last wrote or sealed into"),
            window_seconds: r.gauge("ingestor_window_seconds", "Configured window length (WINDOW), for alerts relative to it"),
            current_generation: r.gauge_vec("ingestor_current_generation", "1 for the generation currently written (A or B)", &["generation"]),
            seals: r.counter("ingestor_seals_total", "Generation toggles performed by this replica (one per shard and window in the cluster)"),
            pending_windows: r.gauge("ingestor_pending_windows", "Sealed shard-windows awaiting delivery, as last seen by this replica"),
            oldest_pending_age: r.gauge("ingestor_oldest_pending_window_age_seconds", "Age of the oldest undelivered window, from its end (0 when none)"),
            records_delivered: r.counter("ingestor_records_delivered_total", "Records the Processor accepted (2xx)"),
            batches_delivered: r.counter("ingestor_batches_delivered_total", "Batches the Processor accepted (2xx)"),
            delivery_failures: r.counter_vec("ingestor_delivery_failures_total", "Failed Processor requests by reason", &["reason"]),
            delivery_retries: r.counter("ingestor_delivery_retries_total", "Processor requests retried after a retryable failure"),
            dead_letters: r.counter("ingestor_dead_letter_records_total", "Records moved to dead-letter after a permanent rejection"),
            late_pulses: r.counter_vec("ingestor_late_pulses_total", "Stamped pulses counted outside the current window, by placement", &["placement"]),
            timestamps_refused: r.counter_vec("ingestor_timestamps_refused_total", "Stamped pulses refused (422), by reason", &["reason"]),
            delivery_isolation_posts: r.counter("ingestor_delivery_isolation_posts_total", "Extra Processor requests spent halving refused batches to find the refused records"),
            dead_letters_set_aside: r.counter("ingestor_dead_letters_set_aside_total", "Dead-lettered records an operator set aside for good (audited)"),
            drain_duration: r.histogram("ingestor_drain_duration_seconds", "Duration of one shard drain", &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
            locks_held: r.gauge("ingestor_drain_locks_held", "Shard drain locks held by this replica"),
            build_info: r.gauge_vec("ingestor_build_info", "Build information; always 1", &["version", "commit"]),
            task_failures: r.counter_vec("ingestor_task_failures_total", "Long-lived tasks that panicked or ended unexpectedly, by task; the process then exits", &["task"]),
            handler_panics: r.counter("ingestor_handler_panics_total", "Request handlers that panicked; each was answered 500"),
            processor_auth_failures: r.counter("ingestor_processor_auth_failures_total", "Processor answers 401/403 (credentials rejected); batches are retried"),
            processor_endpoint_errors: r.counter("ingestor_processor_endpoint_errors_total", "Processor requests whose answer says PROCESSOR_URL is wrong (404/405, DNS, TLS); retried, never dead-lettered"),
            redis_wait_short: r.counter("ingestor_redis_wait_short_total", "Commits fewer than REDIS_WAIT_REPLICAS replicas confirmed in time (answered 503)"),
            ingest_one: BoundRoute::new(&requests, &duration, "/ingest"),
            ingest_batch: BoundRoute::new(&requests, &duration, "/ingest/batch"),
            registry: r.0,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("PULSE_GIT_COMMIT")])
            .set(1);
        let _ = m
            .registry
            .register(Box::new(crate::telemetry::LOG_WRITE_ERRORS.clone()));
        m.with_every_label();
        m
    }

    /// Every label value exists from the start, so rates and alerts see zeros, not gaps.
    fn with_every_label(&self) {
        let labels: [(&IntCounterVec, &[&str]); 5] = [
            (
                &self.pulses,
                &[
                    "accepted",
                    "duplicate",
                    "rejected",
                    "limited",
                    "shed",
                    "failed",
                    "abandoned",
                ],
            ),
            (
                &self.delivery_failures,
                &[
                    "connect",
                    "timeout",
                    "transport",
                    "status_408",
                    "status_429",
                    "status_3xx",
                    "status_auth",
                    "status_5xx",
                    "endpoint",
                    "rejected",
                ],
            ),
            (&self.redis_errors, &["write", "seal", "drain"]),
            (&self.late_pulses, &["sealed_window", "amendment", "ahead"]),
            (
                &self.timestamps_refused,
                &[
                    "too_old",
                    "too_far_ahead",
                    "older_than_dedupe",
                    "window_closed",
                ],
            ),
        ];
        for (vec, values) in labels {
            for v in values {
                vec.with_label_values(&[v]);
            }
        }
        for g in ["A", "B"] {
            self.current_generation.with_label_values(&[g]);
        }
    }

    /// Counts and times one HTTP request by the route it matched and its status.
    pub fn observe_request(&self, route: &str, status: axum::http::StatusCode, took: Duration) {
        let bound = match route {
            "/ingest" => Some(&self.ingest_one),
            "/ingest/batch" => Some(&self.ingest_batch),
            _ => None,
        };
        match bound {
            Some(b) => {
                b.duration.observe(took.as_secs_f64());
                if status == axum::http::StatusCode::ACCEPTED {
                    b.accepted.inc();
                } else {
                    self.http_requests
                        .with_label_values(&[route, status.as_str()])
                        .inc();
                }
            }
            None => {
                self.http_duration
                    .with_label_values(&[route])
                    .observe(took.as_secs_f64());
                self.http_requests
                    .with_label_values(&[route, status.as_str()])
                    .inc();
            }
        }
    }

    /// Records which window and generation this replica last saw.
    pub fn observe_window(&self, start: u64, generation: Option<&str>) {
        self.current_window_start.set(start as i64);
        if let Some(g) = generation {
            for x in ["A", "B"] {
                self.current_generation
                    .with_label_values(&[x])
                    .set(i64::from(x == g));
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
