//! pulse-ingestor: usage pulses in, one exact aggregate per (tenant, sku, unit) and window out.
//!
//! Module map — what each part owns and the invariant it keeps (numbers refer to the invariants
//! in ARCHITECTURE.md):
//!
//! - [`config`]: one typed [`Config`](config::Config) in sections (redis, delivery, limits,
//!   security), every setting declared once; every bad variable is reported at once.
//! - [`amount`]: exact decimal amounts as fixed-point integers (11); parsing never uses a float.
//! - `pulse`: the pulse type, its `Decoder` (one pulse, batches) and the request bodies'
//!   schemas. Pure and unit-tested.
//! - [`http`]: the axum router; maps every error to one documented status code.
//! - `ingest`: the bounded queue (7) and the workers that group-commit pulses to Redis.
//! - [`store`]: connections (one Redis, Sentinel, Cluster), the key layout and a pulse's storage
//!   identity — unambiguous field encoding (8), shard, dedupe digest, record id (6) — and the Lua
//!   scripts, one job per file, naming keys through `keys_lib.lua` as Rust does through `Keys`.
//!   Dedupe and increment happen in one script (1); the generation is read and written inside
//!   that script (2); windows come from Redis `TIME` (3); sealing renames the old generation to
//!   a per-window key (4); every key of a shard shares one hash tag (10).
//! - `flush`: the scheduler (seal at each boundary, drain after the stabilisation delay), the
//!   drain that deletes a record only after the Processor accepted it (5, 6), and the delivery
//!   policy (`flush::policy`: what each answer means, retries, narrowing a refusal down).
//! - `processor`: the record format and the Processor HTTP client; `delivery_health`: whether
//!   delivery works (last success, last failure, a URL that looks wrong), as shown to operators.
//! - `metrics`: every Prometheus metric, defined in one place.
//! - `tenancy`: API keys bound to tenants and per-tenant rate limits.
//! - `supervise`: every long-lived task runs under a `Supervisor`; a dead one stops the process
//!   (13).
//! - [`app`]: wires the parts together and orders a graceful shutdown (9).

// Functions stay short (80 lines, clippy.toml): ARCHITECTURE.md "Structure".
#![warn(clippy::too_many_lines)]

pub mod amount;
pub mod app;
pub mod config;
pub(crate) mod delivery_health;
#[cfg(test)]
mod docs_tables;
pub(crate) mod flush;
pub mod http;
pub(crate) mod ingest;
pub mod meters;
pub(crate) mod metrics;
pub(crate) mod processor;
pub(crate) mod pulse;
mod settle;
pub mod store;
pub(crate) mod supervise;
pub mod telemetry;
pub(crate) mod tenancy;
