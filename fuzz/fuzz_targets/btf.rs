//! Raw BTF: parsed without panicking or reading out of bounds; member,
//! enum and tracepoint look-ups on whatever it holds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use profiler::kbtf::{Btf, cgroup_offsets, depth_offsets};

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data.to_vec()) else {
        return;
    };
    let _ = btf.member_offset("task_struct", "se");
    let _ = btf.enum_value("memory_cgrp_id");
    let _ = btf.tracepoint_arg_is("mark_victim", 0, "task_struct");
    let _ = depth_offsets(&btf);
    let _ = cgroup_offsets(&btf);
});
