//! Stack sampling: the perf_event program on each CPU's cpu-clock. It
//! counts every tick (CPU utilization), reads the run-queue depth (see
//! [`crate::sched`]), then takes the sampled task's stacks: kernel and user
//! walked in the kernel and counted in [`COUNTS`] (`--unwind fp`), or the
//! user registers and a copy of the user stack sent through
//! [`STACK_SAMPLES`] for CFI unwinding in userspace.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id},
    macros::perf_event,
    maps::{Array, LruHashMap, PerCpuHashMap, RingBuf, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext},
};
use profiler_common::{
    COMM_LEN,
    config::Config,
    counters::Counter,
    stacks::{
        self, MAX_STACK_DEPTH, SAMPLE_HEADER_BYTES, STACK_AT_TOP, STACK_COPY_MAX, STACK_IN_TURN,
        STACK_IPS, STACK_PAGE, StackKey, StackSample,
    },
};

use aya_log_ebpf::warn;

use crate::{BPF_RB_NO_WAKEUP, EEXIST, EFAULT, bump, config, dropped, now};

map!(STACKS: StackTrace = with_max_entries(stacks::STACKS));
map!(COUNTS: PerCpuHashMap<StackKey, u64> = with_max_entries(stacks::COUNTS));
map!(
    /// Where a stack sample is assembled: one slot per CPU, sized by the
    /// loader to the possible CPUs.
    SCRATCH: Array<StackSample> = with_max_entries(stacks::SCRATCH)
);
map!(
    /// Thread (pid_tgid) -> [address, until ns]: the first page above its
    /// sp that failed to read in a recent copy (the end of the mapping
    /// holding the stack). Copies stop below it instead of taking that
    /// fault again, which costs about a microsecond a sample; an entry is
    /// trusted for a second, then the copy tries past it again (mappings
    /// change, tids are reused).
    STACK_TOPS: LruHashMap<u64, [u64; 2]> = with_max_entries(stacks::STACK_TOPS)
);
map!(STACK_SAMPLES: RingBuf = with_byte_size(stacks::STACK_SAMPLES));

/// How long a [`STACK_TOPS`] entry is trusted.
const STACK_TOP_TTL_NS: u64 = 1_000_000_000;

prog_named!(sample_stack, stacks::PROG_SAMPLE);
#[perf_event]
pub fn sample_stack(ctx: PerfEventContext) -> u32 {
    try_sample(&ctx);
    0
}

#[inline(always)]
fn try_sample(ctx: &PerfEventContext) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;

    // Utilization and run-queue depth see every tick, whatever the filter.
    bump(Counter::CpuTicks);
    if tid != 0 {
        bump(Counter::CpuBusyTicks);
    }
    if cfg.runqueue_depth != 0 {
        crate::sched::runqueue_depth(cfg, tid);
    }
    if cfg.take_stacks == 0 {
        return;
    }

    if cfg.filter_pids != 0 && !crate::procs::profiled(tgid) {
        return;
    }
    bump(Counter::Samples);
    // One clock read a sample, for its time, its slice and announcements.
    let t = now();

    // A sample inside an event-loop turn is sent with its time (the
    // stalls keep theirs), whatever the unwinding.
    let in_turn = cfg.loops != 0 && tgid != 0 && crate::loops::turn_of(tid).is_some();
    if cfg.copy_stacks != 0 && tgid != 0 {
        if copy_stack(ctx, cfg, tgid, tid, in_turn, t) {
            crate::procs::announce(cfg, tgid, t);
            return;
        }
        // No user registers (a kernel thread): count the kernel stack.
    }

    let kernel_stack_id = kernel_stack(ctx);
    if in_turn && cfg.send_collided != 0 && send_user_ips(ctx, tgid, tid, kernel_stack_id, true, t)
    {
        crate::procs::announce(cfg, tgid, t);
        return;
    }
    let user_stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as i32,
        Err(e) => {
            // Another stack holds this one's bucket: send its addresses
            // to userspace instead of losing it.
            if e == -EEXIST
                && cfg.send_collided != 0
                && tgid != 0
                && send_user_ips(ctx, tgid, tid, kernel_stack_id, false, t)
            {
                bump(Counter::UserStacksSentAside);
                crate::procs::announce(cfg, tgid, t);
                return;
            }
            if dropped(e) {
                bump(Counter::UserStackDropped);
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
        slice: (t / stacks::TIME_SLICE_NS) as u32,
    };
    match COUNTS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU: no concurrent writer.
        Some(count) => unsafe { *count += 1 },
        None => {
            if COUNTS.insert(&key, &1, 0).is_err() {
                bump(Counter::CountMapFull);
                warn!(ctx, "count map full: a sample of pid {} lost", tgid);
            }
        }
    }

    // Tell userspace about a process when it is first sampled, and again
    // while it keeps being sampled, so that it reads the process's memory
    // maps while the process lives.
    if tgid != 0 {
        crate::procs::announce(cfg, tgid, t);
    }
}

/// The kernel stack's id in [`STACKS`], or the walk's negative errno
/// (counted when the stack was dropped for lack of room). A sample that
/// interrupted user mode has none: -EFAULT without asking, which would
/// only cost the helper's setup.
#[inline(always)]
fn kernel_stack(ctx: &PerfEventContext) -> i32 {
    if crate::arch::sampled_in_user(ctx) {
        return -EFAULT;
    }
    match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(e) => {
            if dropped(e) {
                bump(Counter::KernelStackDropped);
            }
            e
        }
    }
}

/// This CPU's scratch record.
#[inline(always)]
fn scratch() -> Option<*mut StackSample> {
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    SCRATCH.get_ptr_mut(cpu)
}

/// Walks the user stack by frame pointer into this CPU's scratch record
/// and sends the addresses (`STACK_IPS`) through the stack ring. False
/// when nothing could be sent (then the sample is counted as dropped).
#[inline(always)]
fn send_user_ips(
    ctx: &PerfEventContext,
    tgid: u32,
    tid: u32,
    kernel_stack_id: i32,
    in_turn: bool,
    t: u64,
) -> bool {
    let Some(out) = scratch() else {
        return false;
    };
    // SAFETY: `out` is this CPU's scratch record; bpf_get_stack writes at
    // most the size given, which is inside `stack`.
    let len = unsafe {
        let n = aya_ebpf::helpers::generated::bpf_get_stack(
            ctx.as_ptr(),
            (*out).stack.as_mut_ptr().cast(),
            (MAX_STACK_DEPTH * 8) as u32,
            BPF_F_USER_STACK as u64,
        );
        if n <= 0 {
            return false;
        }
        (*out).tgid = tgid;
        (*out).tid = tid;
        (*out).kernel_stack_id = kernel_stack_id;
        (*out).len = n as u32;
        (*out).flags = STACK_IPS;
        (*out)._pad = 0;
        (*out).ip = 0;
        (*out).sp = 0;
        (*out).bp = 0;
        (*out).base = 0;
        (*out).comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
        n as usize
    };
    if len > MAX_STACK_DEPTH * 8 {
        return false;
    }
    send_scratch(ctx, out, SAMPLE_HEADER_BYTES + len, in_turn, t)
}

/// Sends the first `size` bytes of this CPU's scratch record through the
/// stack ring; a full ring is counted. No wakeup per sample: userspace
/// drains on a short timer, which saves a wakeup and two context switches
/// a sample.
#[inline(always)]
fn send_scratch(
    ctx: &PerfEventContext,
    out: *mut StackSample,
    size: usize,
    in_turn: bool,
    t: u64,
) -> bool {
    if size > core::mem::size_of::<StackSample>() {
        return false;
    }
    // SAFETY: `out` is this CPU's scratch record.
    unsafe {
        (*out).time_ns = t;
        if in_turn {
            (*out).flags |= STACK_IN_TURN;
        }
    }
    // SAFETY: `out` is this CPU's scratch record; `size` is bounded by it.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_ringbuf_output(
            core::ptr::addr_of!(STACK_SAMPLES).cast_mut().cast(),
            out.cast(),
            size as u64,
            BPF_RB_NO_WAKEUP,
        )
    };
    if rc != 0 {
        bump(Counter::StackCopiesLost);
        warn!(ctx, "stack ring full: a stack sample lost");
        return false;
    }
    true
}

/// Sends the user registers and a copy of the user stack to userspace for
/// unwinding with the binaries' CFI. Returns false when the task has no
/// user registers.
#[inline(always)]
fn copy_stack(
    ctx: &PerfEventContext,
    cfg: &Config,
    tgid: u32,
    tid: u32,
    in_turn: bool,
    t: u64,
) -> bool {
    let Some((ip, sp, bp)) = crate::arch::user_regs(ctx, cfg) else {
        bump(Counter::UserRegsMissing);
        return false;
    };
    let kernel_stack_id = kernel_stack(ctx);
    // Built in a per-CPU scratch record, then sent with only the pages
    // copied: the ring buffer carries what the stack holds, not the most
    // it could hold.
    let Some(out) = scratch() else {
        return true;
    };
    let pages = cfg.stack_pages as usize;
    // The first chunk runs from sp to the end of its page, the next ones
    // are whole pages: a chunk never crosses the stack's top, so the top
    // page is read whole, and nothing below sp is copied.
    let first = STACK_PAGE as u64 - (sp & (STACK_PAGE as u64 - 1));
    // Read back opaquely, so that the compiler cannot fold the
    // subtraction into the destination pointer (the verifier then sees a
    // negative variable offset and rejects the access); the check below
    // cannot fail, it gives the verifier the value's bounds again.
    // SAFETY: a read of a local.
    let first = unsafe { core::ptr::read_volatile(&first) };
    if first == 0 || first > STACK_PAGE as u64 {
        return true;
    }
    let thread = ((tgid as u64) << 32) | tid as u64;
    // A main thread's frames end at the stack's start: what lies above
    // (arguments, environment, auxiliary vector) is not copied.
    let start = if tid == tgid {
        stack_start(cfg)
    } else {
        u64::MAX
    };
    // When the copy would reach the start, sp is on the main stack, whose
    // mapping runs past the start: no chunk can fault, there is no top to
    // look up. (A main thread on another stack, Go's on a goroutine's, is
    // far from it and looks its top up like any thread.)
    let reaches_start = start > sp && start - sp <= (pages * STACK_PAGE) as u64;
    let limit = if reaches_start {
        start
    } else {
        // SAFETY: a lookup in a hash of plain integers.
        let top = match unsafe { STACK_TOPS.get(&thread) } {
            Some(&[addr, until]) if addr > sp && t < until => addr,
            _ => u64::MAX,
        };
        if start > sp && start < top {
            start
        } else {
            top
        }
    };
    let mut reached = false;
    let mut len = 0u32;
    let mut chunks = 0u32;
    // SAFETY: `out` is this CPU's scratch record; every write stays inside
    // it (offsets below first + 14 pages, sizes at most a page).
    unsafe {
        (*out).tgid = tgid;
        (*out).tid = tid;
        (*out).kernel_stack_id = kernel_stack_id;
        (*out).ip = ip;
        (*out).sp = sp;
        (*out).bp = bp;
        (*out).base = sp;
        (*out).comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
        let dst = (*out).stack.as_mut_ptr();
        // Upward from sp until the configured size or the first chunk that
        // does not read (the stack's top passed), as perf does: every page
        // above sp was touched by the frames that pushed it, and trying
        // the unmapped ones past the top costs a fault each.
        let mut i = 0;
        while i < STACK_COPY_MAX / STACK_PAGE {
            if i >= pages {
                break;
            }
            let (off, size) = if i == 0 {
                (0, first)
            } else {
                (first as usize + (i - 1) * STACK_PAGE, STACK_PAGE as u64)
            };
            let src = sp + off as u64;
            if src >= limit {
                break;
            }
            // The last chunk below the stack's start is cut there.
            let room = limit - src;
            let size = if room < STACK_PAGE as u64 && room < size {
                reached = true;
                room
            } else {
                size
            };
            let rc = aya_ebpf::helpers::generated::bpf_probe_read_user(
                dst.add(off).cast(),
                size as u32,
                src as *const core::ffi::c_void,
            );
            if rc != 0 {
                // A full LRU map evicts: the insert cannot fail for room,
                // and a lost hint only costs the next copy one fault.
                let _ = STACK_TOPS.insert(&thread, &[src, t + STACK_TOP_TTL_NS], 0);
                break;
            }
            len = (off as u64 + size) as u32;
            chunks += 1;
            // A chunk cut at the limit is the last one. Leaving here, not
            // at the next round's check, also spares the verifier a second
            // line of states through every later round.
            if reached {
                break;
            }
            i += 1;
        }
    }
    // Stopped before the configured size: the stack's top was reached.
    let at_top = reached || (chunks as usize) < pages;
    // SAFETY: as above.
    unsafe {
        (*out).len = len;
        (*out).flags = if at_top { STACK_AT_TOP } else { 0 };
        (*out)._pad = 0;
    }
    if at_top {
        bump(Counter::StackCopiesShort);
    }
    // A full ring is counted by send_scratch; the sample was taken.
    send_scratch(ctx, out, SAMPLE_HEADER_BYTES + len as usize, in_turn, t);
    true
}

/// Where the current process's main stack starts (`mm->start_stack`),
/// or u64::MAX when unknown.
#[inline(always)]
fn stack_start(cfg: &Config) -> u64 {
    if cfg.task_mm == 0 || cfg.mm_start_stack == 0 {
        return u64::MAX;
    }
    // SAFETY: probe reads at offsets from BTF; a bad pointer fails the
    // helper, it cannot fault.
    unsafe {
        let task = aya_ebpf::helpers::bpf_get_current_task() as *const u8;
        let Ok(mm) = aya_ebpf::helpers::bpf_probe_read_kernel(
            task.add(cfg.task_mm as usize) as *const *const u8
        ) else {
            return u64::MAX;
        };
        if mm.is_null() {
            return u64::MAX;
        }
        aya_ebpf::helpers::bpf_probe_read_kernel(mm.add(cfg.mm_start_stack as usize) as *const u64)
            .unwrap_or(u64::MAX)
    }
}
