//! The per-shard drain lock: a random token with a TTL, renewed while draining, released only
//! by its holder.

use std::time::Duration;

use super::scripts::{LOCK_RELEASE, LOCK_RENEW};
use super::{Conn, Store, StoreError};

impl Store {
    /// Takes the shard's drain lock if it is free.
    pub async fn try_lock(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let r: Option<String> = redis::cmd("SET")
            .arg(self.keys.lock(shard))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(conn)
            .await?;
        Ok(r.is_some())
    }

    /// Extends the lock if we still hold it; false means it was lost.
    pub async fn renew_lock(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let r: i64 = LOCK_RENEW
            .key(self.keys.lock(shard))
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(conn)
            .await?;
        Ok(r == 1)
    }

    /// Releases the lock if we still hold it.
    pub async fn release_lock(
        &self,
        conn: &mut Conn,
        shard: u32,
        token: &str,
    ) -> Result<(), StoreError> {
        LOCK_RELEASE
            .key(self.keys.lock(shard))
            .arg(token)
            .invoke_async::<i64>(conn)
            .await?;
        Ok(())
    }
}
