//! /proc/PID/cgroup text, mountinfo text, cgroup paths and the ECS agent's
//! answer: parsed without panicking; a container found has a 64-hex id.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::{cgroups, containers};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = cgroups::parse_proc_cgroup(&text);
    let _ = cgroups::parse_memory_cgroup(&text);
    let _ = cgroups::parse_v1_memory_mount(&text);
    let _ = cgroups::parse_v1_mount(&text, "cpu");
    let _ = cgroups::parse_cpu_stat(&text);
    let _ = containers::parse_ecs_tasks(&text);
    for line in text.lines() {
        if let Some(c) = containers::from_cgroup(line) {
            assert_eq!(c.id.len(), 64);
            assert!(c.id.bytes().all(|b| b.is_ascii_hexdigit()));
            let _ = c.label();
        }
    }
});
