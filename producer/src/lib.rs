//! pulse-producer: the load simulator, the books check, and the reference Processor.
//!
//! - [`processor`]: the Processor — upserts records by `record_id`: in memory (a JSONL journal,
//!   `/totals` per key and aggregation, failures on purpose) or into PostgreSQL
//!   ([`processor::postgres`]: one transaction per batch, conflicting records refused by name,
//!   billing periods in a time zone).
//! - [`ledger`]: what the producer got a 2xx for, per (tenant, sku, unit), and the comparison
//!   with the Processor's totals that `verify` prints.
//! - [`traffic`]: tenant/SKU/unit distributions, pulse bodies, duplicates and malformed input.
//! - [`load`]: the load modes (`tenants`, `rate`, `max`) and the report.

// Functions stay short (80 lines, clippy.toml), as in the service.
#![warn(clippy::too_many_lines)]

pub mod ledger;
pub mod load;
pub mod money;
pub mod processor;
pub mod traffic;
