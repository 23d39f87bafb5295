//! OOM kills: one [`OomEvent`] per kill through [`OOM_EVENTS`], with the
//! victim's cgroups read from its task ([`OOM_CGROUPS`], by the raw
//! tracepoint where the kernel passes the victim).

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel,
    },
    macros::{raw_tracepoint, tracepoint},
    maps::{LruHashMap, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use profiler_common::{
    COMM_LEN, NO_FIELD,
    counters::Counter,
    oom::{self, OomEvent, TaskCgroups, cgroup_field, field},
};

use aya_log_ebpf::{info, warn};

use crate::{bump, config, now, read};

map!(OOM_EVENTS: RingBuf = with_byte_size(oom::OOM_EVENTS));
map!(
    /// Victim pid -> its cgroups, written by `oom_victim_task`.
    OOM_CGROUPS: LruHashMap<u32, TaskCgroups> = with_max_entries(oom::OOM_CGROUPS)
);

prog_named!(oom_victim, oom::PROG_OOM);
/// oom:mark_victim.
#[tracepoint]
pub fn oom_victim(ctx: TracePointContext) -> u32 {
    let f = &config().oom;
    bump(Counter::OomKills);
    let Some(mut entry) = OOM_EVENTS.reserve::<OomEvent>(0) else {
        bump(Counter::OomEventsLost);
        warn!(&ctx, "OOM event ring full: a kill not recorded");
        return 0;
    };
    let mut comm = [0u8; COMM_LEN];
    if let Some(loc) = read::<u32>(&ctx, f[field::COMM]) {
        // __data_loc: low 16 bits offset, high 16 bits length.
        let off = (loc & 0xffff) as usize;
        // SAFETY: bounds-checked probe read of the record.
        if let Ok(c) = unsafe { ctx.read_at::<[u8; COMM_LEN]>(off) } {
            comm = c;
        }
    }
    let mut event = OomEvent {
        ts_ns: now(),
        pid: read::<i32>(&ctx, f[field::PID]).unwrap_or(0) as u32,
        uid: read::<u32>(&ctx, f[field::UID]).unwrap_or(u32::MAX),
        total_vm: read::<u64>(&ctx, f[field::TOTAL_VM]).unwrap_or(0),
        anon_rss: read::<u64>(&ctx, f[field::ANON_RSS]).unwrap_or(0),
        file_rss: read::<u64>(&ctx, f[field::FILE_RSS]).unwrap_or(0),
        shmem_rss: read::<u64>(&ctx, f[field::SHMEM_RSS]).unwrap_or(0),
        // SAFETY: no preconditions.
        trigger_cgroup: unsafe { bpf_get_current_cgroup_id() },
        victim: TaskCgroups::default(),
        oom_score_adj: read::<i16>(&ctx, f[field::SCORE_ADJ]).unwrap_or(0),
        _pad: [0; 6],
        comm,
    };
    // In a memory cgroup's OOM the task that ran out is usually the one
    // killed: then its cgroups are the victim's.
    let tid_tgid = bpf_get_current_pid_tgid();
    if event.pid != 0 && (tid_tgid as u32 == event.pid || (tid_tgid >> 32) as u32 == event.pid) {
        // SAFETY: the current task is a valid task_struct.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        event.victim = task_cgroups(task);
    }
    info!(&ctx, "OOM kill of pid {}", event.pid);
    entry.write(event);
    entry.submit(0);
    0
}

/// The cgroups of `task`, by the BTF offsets in `Config::cgroup`; zero
/// for what could not be read.
#[inline(always)]
fn task_cgroups(task: *const u8) -> TaskCgroups {
    let c = &config().cgroup;
    let mut out = TaskCgroups::default();
    if c[cgroup_field::TASK_CGROUPS] == NO_FIELD || task.is_null() {
        return out;
    }
    // SAFETY: probe reads at offsets from BTF; a bad pointer makes the
    // helper fail, it cannot fault.
    unsafe {
        let Ok(cset) = bpf_probe_read_kernel(
            task.add(c[cgroup_field::TASK_CGROUPS] as usize) as *const *const u8
        ) else {
            return out;
        };
        let kn_id = |cgrp: *const u8| -> u64 {
            let Ok(kn) = bpf_probe_read_kernel(
                cgrp.add(c[cgroup_field::CGROUP_KN] as usize) as *const *const u8
            ) else {
                return 0;
            };
            bpf_probe_read_kernel(kn.add(c[cgroup_field::KN_ID] as usize) as *const u64)
                .unwrap_or(0)
        };
        if c[cgroup_field::CSS_SET_MEMCG] != NO_FIELD
            && let Ok(css) = bpf_probe_read_kernel(
                cset.add(c[cgroup_field::CSS_SET_MEMCG] as usize) as *const *const u8,
            )
            && !css.is_null()
            && let Ok(cgrp) = bpf_probe_read_kernel(
                css.add(c[cgroup_field::CSS_CGROUP] as usize) as *const *const u8
            )
        {
            out.memcg = kn_id(cgrp);
        }
        if let Ok(cgrp) = bpf_probe_read_kernel(
            cset.add(c[cgroup_field::CSS_SET_DFL_CGRP] as usize) as *const *const u8,
        ) {
            out.dfl = kn_id(cgrp);
        }
    }
    out
}

prog_named!(oom_victim_task, oom::PROG_OOM_TASK);
/// mark_victim as a raw tracepoint, attached only where its first argument
/// is the victim's `task_struct` (6.8+): records the victim's cgroups,
/// whichever task triggered the kill, for userspace to join by pid.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn oom_victim_task(ctx: RawTracePointContext) -> i32 {
    let c = &config().cgroup;
    // args[0] is the task (checked against BTF by the loader).
    let task = ctx.arg::<u64>(0) as *const u8;
    // SAFETY: probe read at a BTF offset.
    let Ok(pid) = (unsafe {
        bpf_probe_read_kernel(task.add(c[cgroup_field::TASK_PID] as usize) as *const i32)
    }) else {
        return 0;
    };
    let cg = task_cgroups(task);
    // An LRU map evicts: the insert does not fail for room; a lost entry
    // leaves the victim's cgroup to /proc.
    let _ = OOM_CGROUPS.insert(&(pid as u32), &cg, 0);
    0
}
