//! Connections: one Redis, a Sentinel-discovered master, or a Redis Cluster, behind one
//! [`Conn`] type the scripts run on; the connection epoch that retires every long-lived
//! connection after any failure; and the round trips that are about the connection itself.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::{Store, StoreError};

/// A connection to one Redis or to a Redis Cluster. Both multiplex: clones share sockets and
/// pipeline their commands; the cluster one routes each command by its key's slot (following
/// `MOVED`/`ASK`), so every script lands on the master that owns its shard.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The pool of one Redis, or of a Redis Cluster (`REDIS_CLUSTER_URLS`).
#[derive(Clone)]
pub(super) enum Pools {
    Single(deadpool_redis::Pool),
    Cluster(Arc<ClusterPool>),
    Sentinel(Arc<SentinelPool>),
}

/// The master found through Redis Sentinel (redis-rs' `SentinelClient` asks the sentinels and
/// checks the role). One multiplexed connection, replaced whenever a connection failure — or a
/// `READONLY`/`MASTERDOWN` answer: the master changed — is seen, so that after a failover the
/// next commit asks the sentinels again.
pub(super) struct SentinelPool {
    pub(super) client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// The connection, the store epoch it was made in and the master's address.
    pub(super) conn: tokio::sync::Mutex<Option<(MultiplexedConnection, u64, String)>>,
}

/// One multiplexed cluster connection, made on first use. Built with redis-rs' own client so
/// that `REDIS_TIMEOUT` applies to every node (deadpool's cluster config cannot set it). The
/// client follows `MOVED`/`ASK` and may re-send a command after an I/O error; the write script
/// is made idempotent for that with a per-commit token (see `scripts/write.lua`).
pub(super) struct ClusterPool {
    pub(super) client: redis::cluster::ClusterClient,
    pub(super) conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl Store {
    /// A pooled multiplexed connection with the configured response timeout.
    ///
    /// The pooled object goes back to the pool at once; the returned clone shares its socket,
    /// which is how multiplexed connections are meant to be used.
    pub async fn conn(&self) -> Result<Conn, StoreError> {
        let c = self.pooled().await;
        if c.is_err() {
            self.invalidate();
        }
        c
    }

    /// A connection of its own, shared with nobody: for commits that `WAIT` for replicas.
    /// `WAIT` covers the writes made earlier on its connection and blocks that connection while
    /// it waits, so a commit and its `WAIT` go on one connection that no other work (other
    /// workers' commits, usage reads, the drain) is queued behind. On a cluster: a cluster
    /// connection of its own (its own socket per node). On Sentinel, the master is asked for
    /// again each time.
    /// `wait`: how long its `WAIT`s may block, added to the response timeout.
    pub async fn dedicated_conn(&self, wait: Duration) -> Result<Conn, StoreError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout + wait));
        let made = tokio::time::timeout(self.timeout * 2, async {
            match &self.pool {
                Pools::Single(_) => {
                    let client = self.direct.as_ref().expect("a single Redis has its client");
                    Ok::<_, StoreError>(Conn::Single(
                        client
                            .get_multiplexed_async_connection_with_config(&config)
                            .await?,
                    ))
                }
                Pools::Sentinel(p) => Ok(Conn::Single(
                    p.client
                        .lock()
                        .await
                        .get_async_connection_with_config(&config)
                        .await?,
                )),
                Pools::Cluster(p) => Ok(Conn::Cluster(p.client.get_async_connection().await?)),
            }
        })
        .await
        .map_err(|_| StoreError::Pool("timed out making a dedicated connection".into()))?;
        if made.is_err() {
            self.invalidate();
        }
        made
    }

    /// The connection epoch: it changes when a connection failure was seen.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks every connection taken before now as suspect.
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    async fn pooled(&self) -> Result<Conn, StoreError> {
        match &self.pool {
            Pools::Single(p) => {
                let mut c = p.get().await?;
                c.set_response_timeout(self.timeout);
                Ok(Conn::Single((*c).clone()))
            }
            Pools::Sentinel(p) => {
                let epoch = self.epoch();
                let mut slot = p.conn.lock().await;
                if let Some((c, e, _)) = slot.as_ref()
                    && *e == epoch
                {
                    return Ok(Conn::Single(c.clone()));
                }
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                let (c, addr) = tokio::time::timeout(self.timeout * 2, async {
                    let client = p.client.lock().await.async_get_client().await?;
                    let addr = client.get_connection_info().addr().to_string();
                    let c = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    Ok::<_, redis::RedisError>((c, addr))
                })
                .await
                .map_err(|_| {
                    StoreError::Pool("timed out asking the sentinels for the master".into())
                })??;
                *slot = Some((c.clone(), epoch, addr));
                Ok(Conn::Single(c))
            }
            Pools::Cluster(p) => {
                let mut slot = p.conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = tokio::time::timeout(self.timeout * 2, p.client.get_async_connection())
                    .await
                    .map_err(|_| {
                        StoreError::Pool("timed out connecting to the cluster".into())
                    })??;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    /// On Sentinel: asks the sentinels which node is the master now, and if it is not the one
    /// the shared connection talks to, retires every connection. A master cut off from its
    /// replicas answers everything it is asked, so nothing else would notice that another was
    /// promoted: reads (usage, pending), seals and the drain's first look would stay with it.
    /// Run every few seconds (the heartbeat task).
    pub async fn check_master(&self) {
        let Pools::Sentinel(p) = &self.pool else {
            return;
        };
        let current = match p.conn.lock().await.as_ref() {
            Some((_, e, addr)) if *e == self.epoch() => addr.clone(),
            _ => return, // the next use asks the sentinels anyway
        };
        let found = tokio::time::timeout(self.timeout * 2, async {
            p.client.lock().await.async_get_client().await
        })
        .await;
        if let Ok(Ok(client)) = found {
            let master = client.get_connection_info().addr().to_string();
            if master != current {
                tracing::warn!(%master, previous = %current, "Sentinel names another master: reconnecting");
                self.invalidate();
            }
        }
    }

    /// Waits until `replicas` replicas have this connection's writes (Redis `WAIT`), at most
    /// `timeout`; returns how many have them. On a cluster, asks the master of `shard`.
    pub async fn wait_replicas(
        &self,
        conn: &mut Conn,
        shard: u32,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, StoreError> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        match conn {
            Conn::Single(c) => Ok(cmd.query_async(c).await?),
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(self.keys.base(shard), SlotAddr::Master),
                ));
                let v = c.route_command(cmd, route).await?;
                Ok(redis::from_redis_value(v).map_err(redis::RedisError::from)?)
            }
        }
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.pool, Pools::Cluster(_))
    }

    /// Whether a commit is one script call per shard (always on a cluster) rather than one.
    pub fn commit_per_shard(&self) -> bool {
        self.commit_per_shard || self.is_cluster()
    }

    /// Round trip to Redis (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok(())
    }

    /// Redis' clock, in seconds — the one clock every replica agrees on.
    pub async fn time(&self, conn: &mut Conn) -> Result<u64, StoreError> {
        let (secs, _micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
        Ok(secs)
    }
}
