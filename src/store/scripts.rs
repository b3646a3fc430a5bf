//! The Lua scripts, each in its own `.lua` file. Every script that names a key of its own is
//! prefixed with `keys_lib.lua`, the scripts' one copy of the key layout (mirrored by
//! [`Keys`](super::Keys)); the ones that may toggle a generation or add exact amounts also with
//! `seal_lib.lua`, the only place the toggle is written (invariants 2, 3, 4).

use std::sync::LazyLock;

use redis::Script;

/// A script that may toggle a generation or add exact amounts: prefixed with the key layout
/// and the shared library.
macro_rules! with_lib {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("scripts/keys_lib.lua"),
                include_str!("scripts/seal_lib.lua"),
                include_str!($file)
            ))
        })
    };
}

/// A script that names keys of its own: prefixed with the key layout.
macro_rules! with_keys {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("scripts/keys_lib.lua"),
                include_str!($file)
            ))
        })
    };
}

pub(super) static WRITE: LazyLock<Script> = with_lib!("scripts/write.lua");

/// The write script as a Redis Functions library, loaded once per Redis (and replicated to its
/// replicas): the key layout's and the shared library's functions are defined once at load,
/// not again on every call as a script's chunk is — measured at 42.8 µs → 23.8 µs of Redis per
/// one-pulse commit, 77.6 → 43.4 µs per 20-pulse commit (BENCHMARKS.md, round four). Used on
/// one Redis and Sentinel; a cluster keeps `WRITE` (a library would have to be loaded on every
/// master, and again on each one added). Its name carries a digest of its text, so replicas of
/// two releases never replace each other's library during a rolling upgrade.
pub(super) struct Library {
    /// `FUNCTION LOAD` text.
    pub code: String,
    /// The function to `FCALL`.
    pub function: String,
}

pub(super) static WRITE_LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    use sha2::{Digest, Sha256};
    let body = concat!(
        include_str!("scripts/keys_lib.lua"),
        include_str!("scripts/seal_lib.lua"),
        "local function write(KEYS, ARGV)\n",
        include_str!("scripts/write.lua"),
        "\nend\n"
    );
    let tag = &hex::encode(Sha256::digest(body.as_bytes()))[..12];
    let function = format!("pulse_write_{tag}");
    Library {
        code: format!(
            "#!lua name=pulse_ingestor_{tag}\n{body}redis.register_function('{function}', write)\n"
        ),
        function,
    }
});
pub(super) static SEAL: LazyLock<Script> = with_lib!("scripts/seal.lua");
pub(super) static REPLAY: LazyLock<Script> = with_lib!("scripts/replay.lua");
pub(super) static DEAD_LETTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/dead_letter.lua")));
pub(super) static FINISH_WINDOW: LazyLock<Script> = with_keys!("scripts/finish_window.lua");
pub(super) static DELIVERED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/delivered.lua")));
pub(super) static REGISTER_SHARDS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/register_shards.lua")));
pub(super) static LOCK_RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lock_renew.lua")));
pub(super) static LOCK_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lock_release.lua")));
pub(super) static USAGE: LazyLock<Script> = with_keys!("scripts/usage.lua");
pub(super) static SET_ASIDE: LazyLock<Script> = with_keys!("scripts/set_aside.lua");
pub(super) static SETTINGS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/settings.lua")));
pub(super) static MARK_DRAIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/mark_drain.lua")));
