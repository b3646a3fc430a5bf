//! The one test harness: real `redis-server` and PostgreSQL processes on free loopback ports,
//! the service in-process or as its real binary, the Processor, and the books check. Split by
//! concern; everything is re-exported here, so a test module says `use crate::common::*`.

mod app;
mod books;
mod http;
mod postgres;
mod redis;
mod settings;

pub use app::*;
pub use books::*;
pub use http::*;
pub use postgres::*;
pub use pulse_producer::money::{self, Dec};
pub use redis::*;
pub use settings::*;
