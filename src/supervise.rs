//! Supervision (invariant 13): no half-alive process.
//!
//! Every long-lived task — scheduler, commit workers, listeners, the key watcher — runs under
//! a [`Supervisor`]. If one panics, or ends while the service should be running, [`Health`] records
//! why: `/healthz` and `/readyz` answer 503, ingest answers 503 instead of acknowledging pulses
//! nobody would deliver, the task is counted in `ingestor_task_failures_total`, and the app
//! shuts down gracefully and exits non-zero so its supervisor (Kubernetes, systemd, compose
//! `restart:`) replaces it. The release build keeps `panic = "unwind"` so a panic is caught here
//! (and in request handlers, which answer 500 and keep the service running).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Whether the process can still do its job.
#[derive(Default)]
pub struct Health {
    failure: OnceLock<String>,
    failed: CancellationToken,
}

impl Health {
    /// Records the first failure and wakes whoever waits on [`Health::failed`].
    pub fn fail(&self, why: String) {
        let _ = self.failure.set(why);
        self.failed.cancel();
    }

    /// Why the process is failing, if it is.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Resolves once a failure was recorded.
    pub async fn failed(&self) {
        self.failed.cancelled().await
    }
}

/// Runs the long-lived tasks: each on one tracker, its failure recorded in one [`Health`] and
/// counted; "failure" is a panic, or an end before `shutdown`. Cloned into whatever starts
/// tasks (the app, the ingest workers), as mini-redis hands its shutdown around as a value.
#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(
        tracker: TaskTracker,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Supervisor {
            tracker,
            health,
            metrics,
            shutdown,
        }
    }

    /// Runs `task`, named `name` in logs and metrics, under supervision.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (health, metrics, shutdown) = (
            self.health.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        );
        self.tracker.spawn(async move {
            let why = match AssertUnwindSafe(task).catch_unwind().await {
                Err(panic) => format!("task {name} panicked: {}", panic_message(&*panic)),
                Ok(()) if !shutdown.is_cancelled() => format!("task {name} stopped unexpectedly"),
                Ok(()) => return,
            };
            metrics.task_failures.with_label_values(&[name]).inc();
            tracing::error!(task = name, reason = %why, "a long-lived task failed; the process stops");
            health.fail(why);
        });
    }

    /// The tasks, for the shutdown: close, then wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic".into())
}

/// Test-only fault hook, compiled in only with the cargo feature `fault-injection` (the tests
/// enable it; release builds never have it): `PULSE_INGESTOR_FAULT=<task>` makes that task
/// panic on purpose (`scheduler` on its first step, `worker` on a pulse of tenant
/// `fault-panic`), so the fault suite can prove a dead task stops the process; `short-token`
/// keeps commit tokens 3 s instead of 600 s. Without the feature: always false.
#[cfg(feature = "fault-injection")]
pub fn fault(task: &str) -> bool {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("PULSE_INGESTOR_FAULT").ok())
        .as_deref()
        == Some(task)
}

/// See the `fault-injection` build of this function: without the feature, no fault.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fault(_task: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parts() -> (TaskTracker, Arc<Health>, Arc<Metrics>, CancellationToken) {
        let metrics = Arc::new(Metrics::new());
        (
            TaskTracker::new(),
            Arc::default(),
            metrics,
            CancellationToken::new(),
        )
    }

    /// Supervision is about when tasks end: under tokio's paused clock an hour passes at once.
    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_returns_early_fails_health_once_shutdown_does_not() {
        let (tracker, health, metrics, shutdown) = parts();
        let sup = Supervisor::new(
            tracker.clone(),
            health.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        // A loop that ends only with the shutdown: healthy for an hour, and after it.
        let stop = shutdown.clone();
        sup.spawn("ticker", async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(health.failure(), None);
        // A task that panics after a minute.
        sup.spawn("worker", async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            panic!("boom");
        });
        tokio::time::timeout(Duration::from_secs(61), health.failed())
            .await
            .expect("the panic fails health within its minute");
        assert_eq!(health.failure(), Some("task worker panicked: boom"));
        // A second failure does not replace the first reason; both are counted.
        sup.spawn("watcher", async {});
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(health.failure(), Some("task worker panicked: boom"));
        let count = |t: &str| metrics.task_failures.with_label_values(&[t]).get();
        assert_eq!(
            (count("worker"), count("watcher"), count("ticker")),
            (1, 1, 0)
        );
        // The shutdown ends the ticker without a failure.
        shutdown.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(1), tracker.wait())
            .await
            .unwrap();
        assert_eq!(count("ticker"), 0);
    }
}
