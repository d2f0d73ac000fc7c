//! The stream scanner that reads usage from server-sent events: any bytes from the upstream, cut
//! into chunks anywhere, must pass through whole and in order (when nothing is stripped), never
//! grow past its bound, never panic; and a whole JSON answer's usage parse must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::upstream_usage::{usage_of_json, SseScanner};

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, stream)) = data.split_first() else {
        return;
    };
    let _ = usage_of_json(stream).map(|u| (u.total(), u.completion()));
    // Chunk lengths come from the first byte, so the fuzzer explores where chunks end.
    let step = usize::from(cuts % 17) + 1;
    for strip in [false, true] {
        let mut scanner = SseScanner::new(strip);
        let mut out = Vec::with_capacity(stream.len());
        for chunk in stream.chunks(step) {
            out.extend_from_slice(&scanner.feed(chunk));
        }
        out.extend_from_slice(&scanner.finish());
        if strip {
            assert!(out.len() <= stream.len());
        } else {
            assert_eq!(out, stream, "every byte passes once, in order");
        }
        let _ = scanner.usage().map(|u| u.total());
    }
});
