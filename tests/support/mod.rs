//! Helpers shared by the integration-test binaries.
//!
//! A binary `tests/NAME.rs` includes them with `mod support;`; a binary `tests/NAME/main.rs`
//! (such as `tests/gateway/`) with `#[path = "../support/mod.rs"] mod support;`. Either way the
//! items are then `support::redis::RedisServer` and so on. Import the items rather than the
//! module (`use support::redis::{shared_redis, RedisServer};`), so that `redis` keeps naming the
//! `redis` crate in files that use both.

pub mod postgres;
pub mod redis;
