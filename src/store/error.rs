//! The store's one error type.

/// A Redis failure, as the rest of the service sees it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    Pool(String),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// This replica's `SHARDS` is not the deployment's: it must not write (see `reshard`).
    #[error(
        "SHARDS={configured}, but this deployment's Redis uses SHARDS={deployment}; change it with `pulse-ingestor reshard --shards <n>` (README: Changing SHARDS)"
    )]
    ShardsChanged { configured: u32, deployment: u32 },
    /// Stamped pulses (shard, item index in its section) the write script would not place,
    /// and why; nothing of the call was written.
    #[error("a pulse's window is closed to it")]
    Closed(Vec<(u32, usize, LateRefusal)>),
    /// A setting this replica was started with cannot be applied to the deployment now.
    #[error("{0}")]
    Setting(String),
    /// These keys' (fields') window totals would leave the exact range; nothing of the call
    /// was written.
    #[error("a key's total for this window would exceed the exact range")]
    Overflow(Vec<String>),
    /// One failure of a call that carried several shards, as each shard sees it.
    #[error("{message}")]
    Shared {
        message: String,
        ambiguous: bool,
        suspect: bool,
        transient: bool,
    },
}

/// Why the write script refused a stamped pulse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateRefusal {
    /// Its window is delivered or being delivered, and `LATE_PULSES=refuse`.
    Closed,
    /// Older than its window's `LATE_MAX_AGE` as the deployment recorded it: the window is
    /// final (its records' `final_at` has passed).
    TooOld,
    /// A pulse with an id stamped too long ago for a re-send of it to be recognised (the
    /// deployment's `DEDUPE_TTL` less its `MAX_FUTURE_SKEW`).
    OlderThanDedupe,
}

impl StoreError {
    /// True when the command may have run although we saw an error (a timeout or a dropped
    /// connection after sending). Such a write is never retried by the service itself.
    /// True unless Redis itself answered with an error reply (OOM, NOSCRIPT...): the
    /// connection may be dead and should be replaced.
    pub fn connection_suspect(&self) -> bool {
        match self {
            // A server error means the connection works — unless the server is no longer the
            // master (a failover): then a new connection must find the new one.
            StoreError::Redis(e) => {
                !matches!(e.kind(), redis::ErrorKind::Server(_))
                    || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
            }
            StoreError::Overflow(_)
            | StoreError::Closed(_)
            | StoreError::ShardsChanged { .. }
            | StoreError::Setting(_) => false,
            StoreError::Shared { suspect, .. } => *suspect,
            _ => true,
        }
    }

    /// True for a failure a later attempt can get past: the connection, the pool, a timeout,
    /// a master that is changing or busy, replicas that did not confirm. False for what
    /// cannot succeed however often it is sent (an overflow, a script or argument error, an
    /// unreadable reply).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                !matches!(e.kind(), redis::ErrorKind::Server(_))
                    || matches!(
                        e.code(),
                        Some(
                            "READONLY"
                                | "MASTERDOWN"
                                | "LOADING"
                                | "BUSY"
                                | "OOM"
                                | "MISCONF"
                                | "NOSCRIPT"
                                | "TRYAGAIN"
                                | "CLUSTERDOWN"
                                | "MOVED"
                                | "ASK"
                        )
                    )
            }
            StoreError::Pool(_) => true,
            StoreError::Shared { transient, .. } => *transient,
            StoreError::Reply(_)
            | StoreError::ShardsChanged { .. }
            | StoreError::Overflow(_)
            | StoreError::Closed(_)
            | StoreError::Setting(_) => false,
        }
    }

    pub fn is_ambiguous(&self) -> bool {
        match self {
            StoreError::Redis(e) => e.is_timeout() || e.is_connection_dropped(),
            StoreError::Shared { ambiguous, .. } => *ambiguous,
            _ => false,
        }
    }

    /// This failure as each shard of a multi-shard call reports it.
    pub fn fan_out(&self) -> StoreError {
        match self {
            StoreError::Overflow(f) => StoreError::Overflow(f.clone()),
            StoreError::Closed(c) => StoreError::Closed(c.clone()),
            StoreError::ShardsChanged {
                configured,
                deployment,
            } => StoreError::ShardsChanged {
                configured: *configured,
                deployment: *deployment,
            },
            e => StoreError::Shared {
                message: e.to_string(),
                ambiguous: e.is_ambiguous(),
                suspect: e.connection_suspect(),
                transient: e.is_transient(),
            },
        }
    }
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        match e {
            deadpool_redis::PoolError::Backend(e) => StoreError::Redis(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}
