//! A JIT's /tmp/perf-PID.map: parsed without panicking, looked up anywhere.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::perfmap::PerfMap;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let map = PerfMap::parse(&text);
    for addr in [0u64, 1, 0x1000, 0x7fff_ffff_ffff, u64::MAX] {
        let _ = map.lookup(addr);
    }
    if data.len() >= 8 {
        let _ = map.lookup(u64::from_le_bytes(data[..8].try_into().unwrap()));
    }
});
