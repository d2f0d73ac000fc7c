//! The config parser: any TOML text becomes settings and then a validated configuration or an
//! error that names a field, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::{Config, RawSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = toml::from_str::<RawSettings>(text) else {
        return;
    };
    if let Err(e) = Config::try_from(raw) {
        assert!(!e.to_string().is_empty());
    }
});
