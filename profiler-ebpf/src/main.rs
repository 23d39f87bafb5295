//! The profiler's kernel programs.
//!
//! Thin by design: each program records what happened into bounded maps and
//! counts what did not fit. Settings arrive as read-only globals set by the
//! loader before load. All symbolization and folding happen in userspace.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{map, perf_event, tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{PerfEventContext, TracePointContext, tracing::StackIdContext},
};
use profiler_common::{COMM_LEN, Counter, ProcessEvent, ProcessEventKind, StackKey};

/// Non-zero: sample only the thread groups listed in `PIDS`.
#[unsafe(no_mangle)]
static FILTER_PIDS: u8 = 0;
/// Non-zero: add the children of listed processes to `PIDS` when they fork.
#[unsafe(no_mangle)]
static FOLLOW_FORKS: u8 = 0;
/// Offset of `child_pid` in the sched_process_fork record (from its format
/// file: it moved when `parent_comm` became a `__data_loc` string).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

// Sizes here are defaults; the loader resizes the maps before load.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);
#[map]
static COUNTS: PerCpuHashMap<StackKey, u64> = PerCpuHashMap::with_max_entries(40960, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(8192, 0);
/// Nanoseconds between two announcements of the same process: userspace
/// re-reads the maps of processes that keep running (new JIT regions,
/// libraries loaded later), and only of those.
#[unsafe(no_mangle)]
static REANNOUNCE_NS: u64 = 1_000_000_000;

#[map]
static SEEN: HashMap<u32, u64> = HashMap::with_max_entries(32768, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

const EEXIST: i32 = 17;
const ENOMEM: i32 = 12;
const E2BIG: i32 = 7;

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, this program cannot be preempted by itself
        // on this CPU, so the increment is exact.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn global(v: &u8) -> bool {
    // SAFETY: reading a global that the loader set before load; volatile so
    // the compiler keeps the load instead of folding the default value.
    unsafe { core::ptr::read_volatile(v) != 0 }
}

/// True when a stack walk failed for lack of room rather than for lack of
/// a stack (-EFAULT: a kernel thread has no user stack, a sample taken in
/// user mode has no kernel stack).
#[inline(always)]
fn dropped(err: i32) -> bool {
    err == -EEXIST || err == -ENOMEM || err == -E2BIG
}

#[perf_event]
pub fn sample_stack(ctx: PerfEventContext) -> u32 {
    try_sample(&ctx);
    0
}

#[inline(always)]
fn try_sample(ctx: &PerfEventContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: lookups in a hash map of plain integers.
    if global(&FILTER_PIDS) && unsafe { PIDS.get(&tgid) }.is_none() {
        return;
    }
    bump(Counter::Samples);

    let user_stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as i32,
        Err(e) => {
            if dropped(e) {
                bump(Counter::UserStackDropped);
            }
            e
        }
    };
    let kernel_stack_id = match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(e) => {
            if dropped(e) {
                bump(Counter::KernelStackDropped);
            }
            e
        }
    };
    if user_stack_id < 0 && kernel_stack_id < 0 {
        bump(Counter::NoStack);
    }

    let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
    let key = StackKey {
        tgid,
        user_stack_id,
        kernel_stack_id,
        comm,
    };
    match COUNTS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU: no concurrent writer.
        Some(count) => unsafe { *count += 1 },
        None => {
            if COUNTS.insert(&key, &1, 0).is_err() {
                bump(Counter::CountMapFull);
            }
        }
    }

    // Tell userspace about a process when it is first sampled, and again
    // every REANNOUNCE_NS while it keeps being sampled, so that it reads the
    // process's memory maps while the process lives.
    if tgid != 0 {
        announce(tgid);
    }
}

#[inline(always)]
fn announce(tgid: u32) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: read-only global set before load.
    let every = unsafe { core::ptr::read_volatile(&REANNOUNCE_NS) };
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
                if now.wrapping_sub(*last) < every {
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

#[tracepoint]
pub fn follow_fork(ctx: TracePointContext) -> u32 {
    try_follow_fork(&ctx);
    0
}

#[inline(always)]
fn try_follow_fork(ctx: &TracePointContext) {
    if !global(&FOLLOW_FORKS) {
        return;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: lookup in a hash map of plain integers.
    if unsafe { PIDS.get(&parent) }.is_none() {
        return;
    }
    // SAFETY: the offset comes from the tracepoint's format file; read_at
    // is a bounds-checked probe read.
    let offset = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    let Ok(child) = (unsafe { ctx.read_at::<i32>(offset) }) else {
        return;
    };
    if PIDS.insert(&(child as u32), &1, 0).is_ok() {
        bump(Counter::ForksFollowed);
    } else {
        bump(Counter::ForksDropped);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
