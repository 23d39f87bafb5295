//! Process tracking: announcements of sampled processes to userspace
//! ([`EVENTS`]), the pid filter ([`PIDS`]) and fork following.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::tracepoint,
    maps::{HashMap, RingBuf},
    programs::TracePointContext,
};
use profiler_common::{
    config::Config,
    counters::Counter,
    procs::{self, ProcessEvent, ProcessEventKind},
};

use aya_log_ebpf::warn;

use crate::{bump, config, read};

map!(PIDS: HashMap<u32, u8> = with_max_entries(procs::PIDS));
map!(SEEN: HashMap<u32, u64> = with_max_entries(procs::SEEN));
map!(EVENTS: RingBuf = with_byte_size(procs::EVENTS));

/// Whether a thread group is in the pid filter.
#[inline(always)]
pub fn profiled(tgid: u32) -> bool {
    // SAFETY: a lookup in a hash map of plain integers.
    unsafe { PIDS.get(&tgid) }.is_some()
}

/// Announces a sampled process to userspace when it is first sampled, and
/// again `reannounce_ns` after its last announcement while it keeps being
/// sampled.
#[inline(always)]
pub fn announce(cfg: &Config, tgid: u32, now: u64) {
    let kind = match SEEN.get_ptr_mut(&tgid) {
        None => {
            // BPF_NOEXIST: only the first CPU to insert announces it.
            if SEEN.insert(&tgid, &now, 1).is_err() {
                return;
            }
            ProcessEventKind::FirstSample
        }
        Some(last) => {
            // SAFETY: pointer into the map's value; a racing CPU at worst
            // announces the same process twice.
            unsafe {
                if now.wrapping_sub(*last) < cfg.reannounce_ns {
                    return;
                }
                *last = now;
            }
            ProcessEventKind::StillRunning
        }
    };
    let event = ProcessEvent {
        tgid,
        kind: kind as u32,
    };
    if EVENTS.output::<ProcessEvent>(&event, 0).is_err() {
        bump(Counter::EventsLost);
    }
}

prog_named!(follow_fork, procs::PROG_FORK);
/// sched_process_fork: a child of a profiled process joins the filter.
#[tracepoint]
pub fn follow_fork(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.follow_forks == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !profiled(parent) {
        return 0;
    }
    let Some(child) = read::<i32>(&ctx, cfg.fork_child_pid) else {
        return 0;
    };
    if PIDS.insert(&(child as u32), &1, 0).is_ok() {
        bump(Counter::ForksFollowed);
    } else {
        bump(Counter::ForksDropped);
        warn!(
            &ctx,
            "pid filter full: child {} of {} not followed", child, parent
        );
    }
    0
}
