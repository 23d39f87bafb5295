//! /proc/PID/maps text: parsed without panicking; every entry it keeps is
//! a well-formed range that normalizes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::procmaps::{normalize, parse_maps};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (maps, _errors) = parse_maps(&text);
    for m in &maps {
        assert!(m.start < m.end, "kept an empty or inverted range");
        let _ = normalize(&maps, m.start);
        let _ = normalize(&maps, m.end - 1);
    }
});
