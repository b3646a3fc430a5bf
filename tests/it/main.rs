//! The integration and end-to-end tests: one test binary, one harness (`common`).
//!
//! Everything runs against real processes: `redis-server` (single, Sentinel, a 3-master
//! Cluster) on free loopback ports, the service in-process or as its real binary, the reference
//! Processor (in memory, or as its binary on a real PostgreSQL) and the producer. Nothing mocks
//! Redis or PostgreSQL. Each module reads as a specification of one area; the books must
//! balance exactly at the end of every scenario.

mod common;

mod batches;
mod changes;
mod cluster;
mod contract;
mod delivery;
mod edges;
mod event_time;
mod faults;
mod ingest;
mod isolation;
mod layout;
mod meters;
mod money;
mod operator;
mod postgres;
mod producer;
mod safety;
mod sentinel;
mod supervision;
mod tenancy;
mod usage;
