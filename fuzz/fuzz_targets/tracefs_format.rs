//! A tracepoint's format file: parsed without panicking; offsets asked for.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::tracefs::{Format, switch_runnable_mask};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let f = Format::parse(&text);
    let _ = f.offsets(&["pid", "comm", "prev_state", "skaddr", "saddr_v6"]);
    let _ = f.offset_or_none("next_pid");
    let _ = switch_runnable_mask(&f.print_fmt);
});
