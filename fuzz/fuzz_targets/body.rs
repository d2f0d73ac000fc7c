//! The request-body inspection that estimates tokens: any bytes, on every metered route, must
//! give an estimate or a 400's message, never a panic or an overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::estimate::{inspect, Endpoint, Estimator};

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let estimator = Estimator::new(256, 16);
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/fim/completions",
        "/v1/embeddings",
        "/v1/responses",
    ] {
        let Some(endpoint) = Endpoint::of_path(path) else {
            continue;
        };
        if let Ok(info) = inspect(endpoint, &body, 1_000_000) {
            let cost = estimator.estimate(1, &info);
            assert!(cost.estimate >= cost.prompt);
        }
    }
});
