//! The request-body inspection that estimates tokens: any bytes, on every metered route, must
//! give an estimate or a 400's message, never a panic or an overflow. A body it takes, with
//! `stream_options.include_usage` spliced in, must still be JSON that asks for usage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::estimate::{inspect, Endpoint, Estimator};
use tiergate::stream_options::with_include_usage;

fuzz_target!(|data: &[u8]| {
    let estimator = Estimator::new(256, 16);
    for endpoint in Endpoint::ALL {
        if let Ok(info) = inspect(endpoint, data, 1_000_000) {
            let cost = estimator.estimate(1, &info);
            assert!(cost.estimate >= cost.prompt);
            let spliced = with_include_usage(data);
            let body: serde_json::Value =
                serde_json::from_slice(&spliced).expect("the spliced body is JSON");
            assert_eq!(body["stream_options"]["include_usage"], true);
        }
    }
});
