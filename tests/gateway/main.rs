//! End-to-end tests: real HTTP to a real tiergate on port 0, a real SQLite file, and the real
//! mock upstream. Limits are exercised with a manual clock, never by sleeping.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod admin_input;
mod bad_input;
mod browser;
mod budget;
mod console;
mod console_operator;
mod crash;
mod distributed;
mod errors;
mod faults;
mod harness;
mod headers;
mod key_enforcement;
mod keys;
mod limits;
mod metrics;
mod openapi;
mod operator;
mod process;
mod promotion;
mod routes;
mod shadow;
mod streaming;
mod upstream_connections;
mod upstream_proxy;
mod upstream_tls;
mod usage;
mod webhooks;
