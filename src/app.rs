//! Builds the parts, binds the listener, and orders shutdown (invariant 9):
//! signal → stop accepting → finish in-flight requests → close the queue so workers commit what
//! is queued → stop the scheduler (drains stop, locks are released) → wait for every task, all
//! within `SHUTDOWN_TIMEOUT`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::flush::Scheduler;
use crate::http::{AppContext, AppState, router};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::pulse::Decoder;
use crate::store::{Store, StoreError};
use crate::supervise::{Health, Supervisor};

/// Why the service could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the Processor client: {0}")]
    Processor(#[from] reqwest::Error),
    #[error("cannot read the listener's address: {0}")]
    Serve(std::io::Error),
    #[error("API keys: {0}")]
    ApiKeys(String),
    #[error("shutdown did not finish within {0:?}")]
    ShutdownTimeout(std::time::Duration),
    /// A setting conflicts with the deployment's Redis (exit 64, like a bad variable).
    #[error("{0}")]
    Config(String),
    /// A long-lived task failed; the process stopped so it can be replaced.
    #[error("stopped because {0}")]
    TaskFailed(String),
}

/// A setting left unset adopts the value the deployment recorded in Redis, not the compiled
/// default: a release with a new default never changes a running deployment's `SHARDS`,
/// `WINDOW`, `DEDUPE_TTL` or late-pulse settings. (Redis down: the defaults stand; the scripts
/// still write by the shard's recorded settings, and a wrong `SHARDS` is refused at the first
/// seal.)
async fn adopt_recorded(cfg: &mut Config) -> Result<(), AppError> {
    let store = Store::new(cfg)?;
    let Ok(rec) = store.recorded_settings().await else {
        return Ok(());
    };
    let secs = std::time::Duration::from_secs;
    let adopt = |name: &str, explicit: bool, recorded: Option<u64>, current: u64| {
        let v = recorded.filter(|&v| !explicit && v != current)?;
        info!(
            setting = name,
            value = v,
            "unset: the deployment's recorded value applies"
        );
        Some(v)
    };
    let e = cfg.explicit;
    if let Some(o) = adopt(
        "WINDOW_OFFSET",
        e.window_offset,
        rec.window_offset,
        cfg.window_offset.as_secs(),
    ) {
        cfg.window_offset = secs(o);
    }
    if let Some(w) = adopt(
        "WINDOW",
        e.window,
        rec.window.filter(|&w| w > 0),
        cfg.window_secs(),
    ) {
        cfg.window = secs(w);
    }
    if let Some(t) = adopt(
        "DEDUPE_TTL",
        e.dedupe_ttl,
        rec.dedupe_ttl.filter(|&t| t > 0),
        cfg.dedupe_ttl.as_secs(),
    ) {
        cfg.dedupe_ttl = secs(t);
    }
    if let Some(n) = adopt(
        "SHARDS",
        e.shards,
        rec.shards.map(u64::from).filter(|&n| n > 0),
        u64::from(cfg.shards),
    ) {
        cfg.shards = n as u32;
    }
    if let Some(a) = adopt(
        "LATE_MAX_AGE",
        e.late_max_age,
        rec.late_max_age.filter(|&a| a > 0),
        cfg.late_max_age.as_secs(),
    ) {
        cfg.late_max_age = secs(a);
    }
    if let Some(s) = adopt(
        "MAX_FUTURE_SKEW",
        e.max_future_skew,
        rec.max_future_skew,
        cfg.max_future_skew.as_secs(),
    ) {
        cfg.max_future_skew = secs(s);
    }
    if let (false, Some(Ok(p))) = (
        e.late_pulses,
        rec.late_pulses
            .as_deref()
            .map(str::parse::<crate::config::LatePulses>),
    ) && p != cfg.late_pulses
    {
        info!(
            setting = "LATE_PULSES",
            value = p.as_str(),
            "unset: the deployment's recorded value applies"
        );
        cfg.late_pulses = p;
    }
    Ok(())
}

/// Says which window is in force when it is not what this replica's `WINDOW` says: a new
/// length recorded by this replica applies from the next boundary (invariant 15), and until
/// then nothing of the new length is sealed or delivered.
async fn log_window_in_force(cfg: &Config, store: &Store) {
    let Ok(mut conn) = store.conn().await else {
        return;
    };
    let (Ok(now), Ok(Some(w))) = (
        store.time(&mut conn).await,
        store.window_in_force(&mut conn, 0).await,
    ) else {
        return;
    };
    if w.end > now && w.secs() != cfg.window_secs() {
        warn!(
            window_start = w.start,
            window_end = w.end,
            window_secs = w.secs(),
            configured_window_secs = cfg.window_secs(),
            recorded_window_secs = w.recorded_secs,
            takes_over_in_s = w.end - now,
            "the window in force was opened with another length: it runs until window_end, and the recorded WINDOW takes over from then (until then nothing of this length is sealed or delivered; a demo wants a KEY_PREFIX of its own)"
        );
    }
}

/// Refuses to start while Redis holds data of the float layout, which this release no longer
/// reads: the release before it drains it (and its markers expire); nothing is stranded.
async fn refuse_float_layout(store: &Store) -> Result<(), AppError> {
    match store.check_layout().await {
        Err(StoreError::Setting(m)) => Err(AppError::Config(m)),
        Err(e) => {
            // The scheduler checks again before anything is written.
            warn!(error = %e, "could not check for the float layout's keys; will retry");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Checks, once at start-up, what would make this replica count wrongly: a `SHARDS` that
/// differs from the deployment's. A Redis that is down is not an error here: the scheduler and
/// `/readyz` keep checking.
async fn check_redis(cfg: &Config, store: &Store) -> Result<(), AppError> {
    if let Ok((engine, version)) = store.engine().await {
        if !crate::store::deployment::engine_supported(&engine, &version) {
            return Err(AppError::Config(format!(
                "{engine} {version} is too old: pulse-ingestor's scripts need Redis 7.0 or newer, or Valkey (docs/redis.md: Supported engines)"
            )));
        }
        info!(%engine, %version, "redis engine");
    }
    match store.register_shards().await {
        Ok((_, deployment)) if deployment != cfg.shards => Err(AppError::Config(
            StoreError::ShardsChanged {
                configured: cfg.shards,
                deployment,
            }
            .to_string(),
        )),
        Ok(_) => {
            let set = crate::store::deployment::Recorded::explicit_in(cfg);
            match store.apply_settings(&set).await {
                Err(StoreError::Setting(m)) => return Err(AppError::Config(m)),
                Err(e) => {
                    // Nothing is written until the scheduler has recorded them (Store::prepare).
                    warn!(error = %e, "could not record the settings yet; nothing is written until they are");
                }
                Ok(()) => refuse_float_layout(store).await?,
            }
            log_window_in_force(cfg, store).await;
            if let Err(e) = store.init_markers().await {
                warn!(error = %e, "could not read the dedupe marker layout; will retry");
            }
            store.learn_listpack_limit().await;
            match store.eviction_policy().await {
                Ok(p) if p != "noeviction" && !cfg.redis.allow_eviction => error!(
                    policy = %p,
                    "Redis maxmemory-policy is not noeviction: evicted dedupe markers count re-sends twice and evicted aggregates lose pulses; /readyz stays 503 until it is noeviction (or REDIS_ALLOW_EVICTION=true)"
                ),
                Ok(p) if p != "noeviction" => {
                    warn!(policy = %p, "REDIS_ALLOW_EVICTION=true: Redis may evict keys; exactly-once is not guaranteed")
                }
                _ => {}
            }
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "redis not reachable at start-up; will keep trying");
            Ok(())
        }
    }
}

/// A built, bound, not yet running service.
pub struct App {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
    supervisor: Supervisor,
    hard_stop: CancellationToken,
}

impl App {
    /// Builds every part and binds `cfg.listen_addr` (port 0 picks a free port).
    pub async fn build(mut cfg: Config) -> Result<App, AppError> {
        adopt_recorded(&mut cfg).await?;
        let store = Store::new(&cfg)?;
        check_redis(&cfg, &store).await?;
        let hard_stop = CancellationToken::new();
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { addr, source })
        };
        let listener = bind(cfg.listen_addr).await?;
        let metrics_listener = match cfg.metrics_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let (state, supervisor) = assemble(cfg, store, hard_stop.clone())?;
        Ok(App {
            listener,
            metrics_listener,
            state,
            supervisor,
            hard_stop,
        })
    }

    /// The bound address of the metrics listener, when `METRICS_ADDR` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `signal` resolves, then shuts down in order.
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let App {
            listener,
            metrics_listener,
            state,
            supervisor,
            hard_stop,
        } = self;
        let shutdown = state.shutdown.clone();
        let deadline = state.cfg.shutdown_timeout;
        info!(addr = %listener.local_addr().map_err(AppError::Serve)?, ack_mode = ?state.cfg.ack_mode, window = ?state.cfg.window, shards = state.cfg.shards, "pulse-ingestor listening");
        if state.cfg.security.admin_token.is_none() {
            warn!(
                "ADMIN_TOKEN is not set: /admin/* answers loopback clients only, and no dead letter can be set aside"
            );
        }

        start_tasks(&state, &supervisor, metrics_listener);
        stop_on(signal, &state, hard_stop.clone(), deadline);
        let started = Instant::now();
        let began_stopping = {
            let s = shutdown.clone();
            tokio::spawn(async move {
                s.cancelled().await;
                Instant::now()
            })
        };
        let ingest = state.ingest.clone();
        let serve = crate::http::serve(
            listener,
            router(state.clone()),
            state.cfg.limits.header_read_timeout,
            state.cfg.limits.max_connections,
            shutdown.clone(),
        );
        tokio::select! {
            _ = serve => {}
            _ = hard_stop.cancelled() => warn!("in-flight requests did not finish before the deadline"),
        }
        // No request can queue anything now: let the workers commit what is queued.
        ingest.close();
        let tracker = supervisor.tracker();
        tracker.close();
        tokio::select! {
            _ = tracker.wait() => {}
            _ = hard_stop.cancelled() => {}
        }
        if let Err(e) = state.store.leave().await {
            warn!(error = %e, "could not deregister from the live replicas; the entry ages out");
        }
        if let Some(why) = state.health.failure() {
            return Err(AppError::TaskFailed(why.to_string()));
        }
        if hard_stop.is_cancelled() && !tracker.is_empty() {
            error!(
                queued = ingest.depth(),
                "shutdown deadline reached before the queue was committed"
            );
            return Err(AppError::ShutdownTimeout(deadline));
        }
        // Measured from the request to stop, not from the start of the process.
        let stopping_since = match began_stopping.is_finished() {
            true => began_stopping.await.unwrap_or(started),
            false => started,
        };
        info!(
            shutdown_ms = stopping_since.elapsed().as_millis() as u64,
            uptime_s = started.elapsed().as_secs(),
            "shutdown complete"
        );
        Ok(())
    }
}

/// Starts the long-lived tasks beside the API listener, each under supervision.
fn start_tasks(state: &AppState, sup: &Supervisor, metrics_listener: Option<TcpListener>) {
    let shutdown = &state.shutdown;
    sup.spawn("scheduler", state.scheduler.clone().run(shutdown.clone()));
    if let Some(l) = metrics_listener {
        sup.spawn(
            "metrics_listener",
            crate::http::serve(
                l,
                crate::http::metrics_router(state.clone()),
                state.cfg.limits.header_read_timeout,
                64,
                shutdown.clone(),
            ),
        );
    }
    if state.cfg.meters_file.is_some() {
        sup.spawn(
            "meters_watcher",
            state.meters.clone().watch(shutdown.clone()),
        );
    }
    if let Some(keys) = &state.api_keys {
        sup.spawn("api_key_watcher", keys.clone().watch(shutdown.clone()));
    }
    match &state.scheduler.drainer.processor {
        Some(p) => {
            tokio::spawn(check_processor_url(p.clone()));
        }
        None => warn!(
            "PROCESSOR_URL is not set: windows are sealed and kept in Redis, nothing is delivered"
        ),
    }
    sup.spawn(
        "heartbeat",
        state.store.clone().heartbeats(shutdown.clone()),
    );
    if let Some(limits) = &state.rate_limits {
        sup.spawn(
            "rate_limit_cleanup",
            limits.clone().clean_up(shutdown.clone()),
        );
    }
}

/// Checks the Processor URL once at start (a GET: a Processor takes POST only) and says so
/// when it looks wrong — a path with nothing behind it, a host that does not resolve, TLS that
/// fails — instead of letting the first window find out. Deliveries check on their own.
async fn check_processor_url(p: crate::processor::ProcessorClient) {
    let url = crate::delivery_health::display_url(p.url());
    match crate::flush::policy::probe_verdict(p.probe().await) {
        Err(why) => {
            p.health().endpoint_wrong(&why);
            error!(processor_url = %url, reason = %why, "the Processor URL looks wrong: deliveries will be retried, never dead-lettered, until it is fixed");
        }
        Ok(Some(why)) => {
            p.health().failed(&why);
            warn!(processor_url = %url, reason = %why, "the Processor is not reachable yet; deliveries will be retried");
        }
        Ok(None) => info!(processor_url = %url, "the Processor URL answers"),
    }
}

/// Cancels the shutdown token when `signal` resolves or a task fails, and `hard_stop` once
/// `deadline` has passed after that. Shutdown never depends on logging or on another task:
/// cancel first, log after.
fn stop_on(
    signal: impl Future<Output = ()> + Send + 'static,
    state: &AppState,
    hard_stop: CancellationToken,
    deadline: std::time::Duration,
) {
    let (shutdown, health) = (state.shutdown.clone(), state.health.clone());
    tokio::spawn(async move {
        let failed = tokio::select! {
            _ = signal => false,
            _ = health.failed() => true,
        };
        shutdown.cancel();
        if failed {
            warn!("a task failed: stopping so this replica can be replaced");
        } else {
            info!("shutdown requested: no new connections, finishing in-flight requests");
        }
        tokio::time::sleep(deadline).await;
        hard_stop.cancel();
    });
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Every part the HTTP layer reaches, and the supervisor its commit workers were started
/// under; nothing is bound and Redis is not asked (the router's tests use it with no Redis).
pub(crate) fn assemble(
    cfg: Config,
    store: Store,
    hard_stop: CancellationToken,
) -> Result<(AppState, Supervisor), AppError> {
    let metrics = Arc::new(Metrics::new());
    metrics.window_seconds.set(cfg.window_secs() as i64);
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::default());
    let meters = match &cfg.meters_file {
        Some(p) => crate::meters::Meters::load(p).map_err(AppError::Config)?,
        None => crate::meters::Meters::none(),
    };
    let supervisor = Supervisor::new(
        TaskTracker::new(),
        health.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    let ingest = Ingest::start(
        &cfg,
        crate::ingest::Parts {
            store: store.clone(),
            metrics: metrics.clone(),
            meters: meters.clone(),
        },
        &supervisor,
        hard_stop,
    );
    let scheduler = Arc::new(Scheduler::new(&cfg, store.clone(), metrics.clone())?);
    if cfg.delivery.processor_url.is_none() {
        warn!("PROCESSOR_URL is not set: windows are sealed and kept in Redis, but not delivered");
    }
    let decoder = Arc::new(Decoder {
        max_field_len: cfg.limits.max_field_len,
        max_amount: cfg.limits.max_amount,
        decimals: cfg.limits.amount_decimals,
        allowed_units: cfg.limits.allowed_units.clone(),
    });
    let api_keys = match &cfg.security.api_keys_file {
        Some(p) => Some(crate::tenancy::ApiKeys::load(p).map_err(AppError::ApiKeys)?),
        None => None,
    };
    let security = &cfg.security;
    let rate_limits = (security.rate_limit.is_some() || !security.rate_limit_overrides.is_empty())
        .then(|| {
            Arc::new(crate::tenancy::RateLimits::new(
                security.rate_limit,
                &security.rate_limit_overrides,
                security.rate_limit_replicas,
            ))
        });
    let state = Arc::new(AppContext {
        cfg: Arc::new(cfg),
        decoder,
        ingest,
        store,
        scheduler,
        metrics,
        shutdown,
        health,
        api_keys,
        rate_limits,
        meters,
        rejection_slots: Arc::new(tokio::sync::Semaphore::new(64)),
    });
    Ok((state, supervisor))
}
