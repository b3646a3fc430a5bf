//! The window in force on a shard — the one the scripts are writing into, with the length it
//! was opened with (`conf`'s `start`, `len`) — and the recorded length that takes over at its
//! end (`conf`'s `window`, `offset`). This, not a replica's own `WINDOW`, is what runs
//! (invariant 15): a replica started with a new `WINDOW` records it, and it applies from the
//! next boundary on.

use serde::Serialize;

use super::{Conn, Store, StoreError};

/// The window running on a shard and what comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WindowInForce {
    /// Start of the window in force, Unix seconds (Redis time).
    pub start: u64,
    /// Its end: its start plus the length it was opened with.
    pub end: u64,
    /// The recorded window length (seconds): the windows after this one have it.
    pub recorded_secs: u64,
    /// The recorded `WINDOW_OFFSET` (seconds).
    pub recorded_offset_secs: u64,
}

impl WindowInForce {
    /// Length of the window in force, seconds.
    pub fn secs(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// When the recorded length takes over, if the window in force has another one.
    pub fn recorded_from(&self) -> Option<u64> {
        (self.secs() != self.recorded_secs).then_some(self.end)
    }
}

impl Store {
    /// The window in force on `shard`, as its scripts keep it; `None` before its first seal.
    pub async fn window_in_force(
        &self,
        conn: &mut Conn,
        shard: u32,
    ) -> Result<Option<WindowInForce>, StoreError> {
        let (start, len, window, offset): (Option<u64>, Option<u64>, Option<u64>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(self.keys.conf(shard))
                .arg("start")
                .arg("len")
                .arg("window")
                .arg("offset")
                .query_async(conn)
                .await?;
        Ok(match (start, len) {
            (Some(start), Some(len)) => Some(WindowInForce {
                start,
                end: start + len,
                recorded_secs: window.unwrap_or(len),
                recorded_offset_secs: offset.unwrap_or(0),
            }),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_length_takes_over_at_the_end_of_the_window_in_force() {
        let w = WindowInForce {
            start: 3600,
            end: 7200,
            recorded_secs: 10,
            recorded_offset_secs: 0,
        };
        assert_eq!((w.secs(), w.recorded_from()), (3600, Some(7200)));
        let same = WindowInForce {
            recorded_secs: 3600,
            ..w
        };
        assert_eq!(same.recorded_from(), None);
    }
}
