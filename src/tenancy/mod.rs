//! Tenant protection: API keys bound to tenants, and per-tenant rate limits.
//!
//! **Keys.** `API_KEYS_FILE` lists SHA-256 hashes of keys, never keys: one per line,
//! `<hex sha256 of the key> <tenant id | *> [label]`, `#` for comments. `*` marks a trusted
//! service allowed any tenant. The file is re-read when its modification time changes (checked
//! every 2 s) and on SIGHUP; a file that fails to parse keeps the previous set and is logged.
//! A presented key is hashed and compared with every known hash in constant time, so neither the
//! key nor its hash leaks through timing. Keys never reach logs or metrics — only labels do.
//!
//! **Limits.** A token bucket per tenant (GCRA): `RATE_LIMIT` pulses/s with
//! `RATE_LIMIT_BURST`, per-tenant overrides in `RATE_LIMIT_OVERRIDES`. A request takes from
//! all its tenants' buckets or from none, and a request refused later gives its tokens back. Each replica
//! enforces `1 / RATE_LIMIT_REPLICAS` of the limit locally — no Redis round trip on the ingest
//! path. Behind a balancer that spreads a tenant's requests evenly, the fleet admits about the
//! configured rate; if one replica receives all of a tenant's traffic, that tenant gets only its
//! share (the error is conservative, never above the limit by more than the burst per replica).

pub mod keys;
pub mod limits;

pub use keys::{ApiKeys, Grant, is_placeholder};
pub use limits::{Limit, LimitExceeded, RateLimits, Taken, parse_overrides};
