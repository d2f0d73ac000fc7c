//! tiergate: a rate-limit and usage-tier gateway for OpenAI/Mistral-compatible LLM APIs.
//!
//! The binary is thin; everything is here so that `main` and the tests build the same `app()`.
//! See ARCHITECTURE.md for the map.

pub mod admin;
pub mod app;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod console;
pub mod demo;
pub mod estimate;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod mock_upstream;
pub mod model;
pub mod shadow;
pub mod store;
pub mod stream_options;
pub mod upstream_usage;
pub mod usage;
pub mod webhooks;

pub use app::{app, App, AppError, AppState};

/// Bytes as lowercase hex, two digits each: ids, digests and tokens that go into keys, headers
/// and cookies. Without `fmt`, since some are made on every request.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
pub use config::{Config, RawSettings};
