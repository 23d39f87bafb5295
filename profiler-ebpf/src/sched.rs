//! Scheduler latency and depth: run-queue waits timed from wakeup (or
//! preemption) to switch-in, as a log2 histogram per CPU ([`RUNQ_LAT`]),
//! and the tasks waiting at each cpu-clock tick ([`RUNQ_DEPTH`], read by
//! the sampler in [`crate::stacks`]).

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::tracepoint,
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use profiler_common::{
    config::Config,
    counters::Counter,
    sched::{self, DEPTH_SLOTS, LATENCY_SLOTS},
};

use aya_log_ebpf::warn;

use crate::{COUNTERS, STATE_EXITING, add, bump, config, now, read};

map!(RUNQ_LAT: PerCpuArray<u64> = with_max_entries(sched::RUNQ_LAT));
map!(RUNQ_DEPTH: PerCpuArray<u64> = with_max_entries(sched::RUNQ_DEPTH));
map!(RUNQ_START: HashMap<u32, u64> = with_max_entries(sched::RUNQ_START));

/// floor(log2(v)), 0 for 0 and 1 (libbpf-tools' `log2l`).
#[inline(always)]
fn log2(v: u64) -> u32 {
    if v == 0 { 0 } else { 63 - v.leading_zeros() }
}

/// Tasks waiting on this CPU's run queue, excluding the running one:
/// task->se.cfs_rq->rq->cfs.<h_nr_runnable | h_nr_running | h_nr_queued>
/// (every runnable CFS task of the CPU, whatever its cgroup), the offsets
/// of that chain found in BTF by the loader.
#[inline(always)]
pub fn runqueue_depth(cfg: &Config, tid: u32) {
    // SAFETY: probe reads of kernel memory at offsets from BTF; a bad
    // pointer makes the helper fail, it cannot fault.
    let nr = unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(cfs_rq) =
            bpf_probe_read_kernel(task.add(cfg.task_cfs_rq as usize) as *const *const u8)
        else {
            bump(Counter::RunqDepthFailed);
            return;
        };
        let Ok(rq) = bpf_probe_read_kernel(cfs_rq.add(cfg.cfs_rq_rq as usize) as *const *const u8)
        else {
            bump(Counter::RunqDepthFailed);
            return;
        };
        match bpf_probe_read_kernel(rq.add(cfg.rq_nr_runnable as usize) as *const u32) {
            Ok(n) => n,
            Err(_) => {
                bump(Counter::RunqDepthFailed);
                return;
            }
        }
    };
    let waiting = if tid == 0 { nr } else { nr.saturating_sub(1) };
    let slot = if waiting >= DEPTH_SLOTS {
        DEPTH_SLOTS - 1
    } else {
        waiting
    };
    add(&RUNQ_DEPTH, slot, 1);
}

prog_named!(sched_wakeup, sched::PROG_WAKEUP);
/// sched_wakeup and sched_wakeup_new: the task becomes runnable.
#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    if let Some(pid) = read::<i32>(&ctx, config().wakeup_pid) {
        enqueued(&ctx, pid as u32, now());
    }
    0
}

/// Thread `pid` becomes runnable now. A thread's entry stays from its
/// first wakeup to its exit, 0 while it is not waiting: a store into it
/// costs a lookup, where an insert and a delete each cost a lookup, the
/// bucket's lock and the free list.
#[inline(always)]
fn enqueued(ctx: &TracePointContext, pid: u32, t: u64) {
    if pid == 0 {
        return;
    }
    if let Some(start) = RUNQ_START.get_ptr_mut(&pid) {
        // SAFETY: a plain store into a live entry of plain integers.
        unsafe { *start = t };
        return;
    }
    if RUNQ_START.insert(&pid, &t, 0).is_err() {
        bump(Counter::RunqStartFull);
        warn!(ctx, "run-queue start map full: wakeup of {} not timed", pid);
    }
}

prog_named!(sched_switch, sched::PROG_SWITCH);
/// sched_switch: a task preempted while runnable waits again; the next
/// task's wait ends.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let cfg = config();
    // One clock read a switch: the preempted thread's wait starts when
    // the next one's ends.
    let t = now();
    if let (Some(state), Some(prev)) = (
        read::<i64>(&ctx, cfg.switch_prev_state),
        read::<i32>(&ctx, cfg.switch_prev_pid),
    ) {
        if state & STATE_EXITING != 0 {
            // Its last switch: its entry goes with it.
            let _ = RUNQ_START.remove(&(prev as u32));
        } else if (state as u64) & cfg.switch_runnable_mask == 0 {
            enqueued(&ctx, prev as u32, t);
        }
    }
    let Some(next) = read::<i32>(&ctx, cfg.switch_next_pid) else {
        return 0;
    };
    let next = next as u32;
    if next == 0 {
        return 0;
    }
    let Some(entry) = RUNQ_START.get_ptr_mut(&next) else {
        return 0;
    };
    // SAFETY: a live entry of plain integers; a wakeup racing on another
    // CPU stores a later time, which is then taken for this wait or the
    // next.
    let start = unsafe { core::mem::replace(&mut *entry, 0) };
    if start == 0 {
        return 0;
    }
    let delta_us = t.saturating_sub(start) / 1000;
    let slot = log2(delta_us);
    let slot = if slot >= LATENCY_SLOTS {
        LATENCY_SLOTS - 1
    } else {
        slot
    };
    add(&RUNQ_LAT, slot, 1);
    add(&COUNTERS, Counter::RunqLatencyTotalUs as u32, delta_us);
    // The slot after the histogram keeps this CPU's longest wait.
    if let Some(max) = RUNQ_LAT.get_ptr_mut(LATENCY_SLOTS) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe {
            if delta_us > *max {
                *max = delta_us;
            }
        }
    }
    0
}
