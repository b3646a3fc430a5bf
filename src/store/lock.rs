//! The per-shard drain lock: a random token with a TTL, renewed while draining, released only
//! by its holder.

use std::time::Duration;

use rand::Rng;

use super::scripts::{LOCK_RELEASE, LOCK_RENEW};
use super::{Conn, Store, StoreError};

/// One holder's claim on a shard's drain lock: the shard, a token no other holder has, and the
/// lock's lifetime (renewed every third of it while draining).
#[derive(Debug, Clone)]
pub struct DrainLock {
    pub shard: u32,
    token: String,
    pub ttl: Duration,
}

impl DrainLock {
    /// A claim with a fresh random token.
    pub fn new(shard: u32, ttl: Duration) -> Self {
        Self::with_token(shard, &hex::encode(rand::rng().random::<[u8; 16]>()), ttl)
    }

    /// A claim with a given token (tests hold a lock as another replica would).
    pub fn with_token(shard: u32, token: &str, ttl: Duration) -> Self {
        DrainLock {
            shard,
            token: token.to_string(),
            ttl,
        }
    }
}

impl Store {
    /// Takes the shard's drain lock if it is free.
    pub async fn try_lock(&self, conn: &mut Conn, lock: &DrainLock) -> Result<bool, StoreError> {
        let r: Option<String> = redis::cmd("SET")
            .arg(self.keys.lock(lock.shard))
            .arg(&lock.token)
            .arg("NX")
            .arg("PX")
            .arg(lock.ttl.as_millis() as u64)
            .query_async(conn)
            .await?;
        Ok(r.is_some())
    }

    /// Extends the lock if we still hold it; false means it was lost.
    pub async fn renew_lock(&self, conn: &mut Conn, lock: &DrainLock) -> Result<bool, StoreError> {
        let r: i64 = LOCK_RENEW
            .key(self.keys.lock(lock.shard))
            .arg(&lock.token)
            .arg(lock.ttl.as_millis() as u64)
            .invoke_async(conn)
            .await?;
        Ok(r == 1)
    }

    /// Releases the lock if we still hold it.
    pub async fn release_lock(&self, conn: &mut Conn, lock: &DrainLock) -> Result<(), StoreError> {
        LOCK_RELEASE
            .key(self.keys.lock(lock.shard))
            .arg(&lock.token)
            .invoke_async::<i64>(conn)
            .await?;
        Ok(())
    }
}
