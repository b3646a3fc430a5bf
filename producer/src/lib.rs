//! pulse-producer: the load simulator, the books check, and the reference Processor.
//!
//! - [`processor`]: the reference Processor — upserts records by `record_id`, keeps a JSONL
//!   journal, serves `/totals`, and fails on purpose when asked to.
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
