//! The profiler's kernel programs.
//!
//! Thin by design: each program records what happened into bounded maps and
//! counts what did not fit. Settings (including every field offset, read
//! from tracepoint format files and BTF at run time) arrive in the
//! read-only global `CONFIG`, set by the loader before load. All
//! symbolization, folding and statistics happen in userspace.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, perf_event, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::{
        PerfEventContext, RawTracePointContext, TracePointContext, tracing::StackIdContext,
    },
};
use profiler_common::{
    COMM_LEN, Config, Counter, DEPTH_SLOTS, LATENCY_SLOTS, MAX_STACK_DEPTH, NO_FIELD, OomEvent,
    ProcessEvent, ProcessEventKind, RetransKey, RetransValue, STACK_AT_TOP, STACK_COPY_MAX,
    STACK_IPS, STACK_PAGE, SockOwner, StackKey, StackSample, TaskCgroups, cgroup_field, oom_field,
    retrans_field,
};

/// Everything the loader tells the programs (see [`Config`]).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    filter_pids: 0,
    follow_forks: 0,
    take_stacks: 1,
    runqueue_depth: 0,
    fork_child_pid: 20,
    reannounce_ns: 1_000_000_000,
    task_cfs_rq: 0,
    cfs_rq_rq: 0,
    rq_nr_runnable: 0,
    switch_prev_pid: 24,
    switch_prev_state: 32,
    switch_next_pid: 56,
    wakeup_pid: 24,
    _pad: 0,
    switch_runnable_mask: 0xff,
    oom: [NO_FIELD; 8],
    retrans: [NO_FIELD; 9],
    sock_owner_sk: NO_FIELD,
    copy_stacks: 0,
    stack_pages: 4,
    send_collided: 0,
    _pad2: 0,
    task_stack: 0,
    thread_size: 16384,
    _pad3: 0,
    synack: [NO_FIELD; 9],
    cgroup: [NO_FIELD; 7],
};

// Sizes here are defaults; the loader resizes the maps before load.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);
#[map]
static COUNTS: PerCpuHashMap<StackKey, u64> = PerCpuHashMap::with_max_entries(40960, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(8192, 0);
#[map]
static SEEN: HashMap<u32, u64> = HashMap::with_max_entries(32768, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
#[map]
static RUNQ_LAT: PerCpuArray<u64> = PerCpuArray::with_max_entries(LATENCY_SLOTS + 1, 0);
#[map]
static RUNQ_DEPTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEPTH_SLOTS, 0);
#[map]
static RUNQ_START: HashMap<u32, u64> = HashMap::with_max_entries(32768, 0);
#[map]
static RETRANS: PerCpuHashMap<RetransKey, RetransValue> = PerCpuHashMap::with_max_entries(4096, 0);
#[map]
static SOCK_OWNERS: LruHashMap<u64, SockOwner> = LruHashMap::with_max_entries(65536, 0);
#[map]
static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// Victim pid -> its cgroups, written by `oom_victim_task`.
#[map]
static OOM_CGROUPS: LruHashMap<u32, TaskCgroups> = LruHashMap::with_max_entries(1024, 0);
/// Scratch space where a stack sample is assembled (too big for the BPF
/// stack, and for a per-CPU map's 32 KiB values): one slot per CPU, sized
/// by the loader to the possible CPUs.
#[map]
static SCRATCH: Array<StackSample> = Array::with_max_entries(1024, 0);
/// Thread (pid_tgid) -> [address, until ns]: the first page above its sp
/// that failed to read in a recent copy (the end of the mapping holding the
/// stack). Copies stop below it instead of taking that fault again, which
/// costs about a microsecond a sample; an entry is trusted for a second,
/// then the copy tries past it again (mappings change, tids are reused).
#[map]
static STACK_TOPS: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(8192, 0);
/// How long a [`STACK_TOPS`] entry is trusted.
const STACK_TOP_TTL_NS: u64 = 1_000_000_000;
/// Bytes of a [`StackSample`] before its stack copy.
const HEADER_BYTES: usize = core::mem::size_of::<StackSample>() - STACK_COPY_MAX;
/// Resized by the loader for the sample rate and CPU count.
#[map]
static STACK_SAMPLES: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

const EEXIST: i32 = 17;
/// bpf_ringbuf_output flag: do not wake the reader.
const BPF_RB_NO_WAKEUP: u64 = 1;
const ENOMEM: i32 = 12;
const E2BIG: i32 = 7;

#[inline(always)]
fn config() -> &'static Config {
    // SAFETY: read-only global set before load; volatile so the compiler
    // keeps the load instead of folding in the defaults above.
    unsafe { &*core::ptr::read_volatile(&&CONFIG) }
}

#[inline(always)]
fn bump(counter: Counter) {
    add(&COUNTERS, counter as u32, 1);
}

#[inline(always)]
fn add(map: &PerCpuArray<u64>, idx: u32, n: u64) {
    if let Some(v) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, and a program does not preempt itself on a
        // CPU, so the increment is exact.
        unsafe { *v += n };
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// floor(log2(v)), 0 for 0 and 1 (libbpf-tools' `log2l`).
#[inline(always)]
fn log2(v: u64) -> u32 {
    if v == 0 { 0 } else { 63 - v.leading_zeros() }
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
        runqueue_depth(cfg, tid);
    }
    if cfg.take_stacks == 0 {
        return;
    }

    // SAFETY: lookups in a hash map of plain integers.
    if cfg.filter_pids != 0 && unsafe { PIDS.get(&tgid) }.is_none() {
        return;
    }
    bump(Counter::Samples);

    if cfg.copy_stacks != 0 && tgid != 0 {
        if copy_stack(ctx, cfg, tgid, tid) {
            announce(cfg, tgid);
            return;
        }
        // No user registers (a kernel thread): count the kernel stack.
    }

    let kernel_stack_id = match ctx.get_stackid(&STACKS, 0) {
        Ok(id) => id as i32,
        Err(e) => {
            if dropped(e) {
                bump(Counter::KernelStackDropped);
            }
            e
        }
    };
    let user_stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as i32,
        Err(e) => {
            // Another stack holds this one's bucket: send its addresses
            // to userspace instead of losing it.
            if e == -EEXIST
                && cfg.send_collided != 0
                && tgid != 0
                && send_user_ips(ctx, tgid, tid, kernel_stack_id)
            {
                bump(Counter::UserStacksSentAside);
                announce(cfg, tgid);
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
    // every `reannounce_ns` while it keeps being sampled, so that it reads
    // the process's memory maps while the process lives.
    if tgid != 0 {
        announce(cfg, tgid);
    }
}

/// Walks the user stack by frame pointer into this CPU's scratch record
/// and sends the addresses (`STACK_IPS`) through the stack ring. False
/// when nothing could be sent (then the sample is counted as dropped).
#[inline(always)]
fn send_user_ips(ctx: &PerfEventContext, tgid: u32, tid: u32, kernel_stack_id: i32) -> bool {
    use aya_ebpf::EbpfContext;
    // SAFETY: no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    let Some(out) = SCRATCH.get_ptr_mut(cpu) else {
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
    send_scratch(out, HEADER_BYTES + len)
}

/// Sends the first `size` bytes of this CPU's scratch record through the
/// stack ring; a full ring is counted. No wakeup per sample: userspace
/// drains on a short timer, which saves a wakeup and two context switches
/// a sample.
#[inline(always)]
fn send_scratch(out: *mut StackSample, size: usize) -> bool {
    if size > core::mem::size_of::<StackSample>() {
        return false;
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
        return false;
    }
    true
}

/// User registers (ip, sp, bp) of the sampled task: the sample's own when
/// it interrupted user mode, else the ones saved at the top of the task's
/// kernel stack when it entered the kernel.
#[inline(always)]
fn user_regs(ctx: &PerfEventContext, cfg: &Config) -> Option<(u64, u64, u64)> {
    // SAFETY: ctx points at the kernel's bpf_perf_event_data for this run.
    let regs = unsafe { &(*ctx.ctx).regs };
    if regs.cs & 3 == 3 {
        return Some((regs.rip, regs.rsp, regs.rbp));
    }
    if cfg.task_stack == 0 {
        return None;
    }
    // SAFETY: probe reads at offsets from BTF; a bad pointer fails the
    // helper, it cannot fault.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let stack: *const u8 =
            bpf_probe_read_kernel(task.add(cfg.task_stack as usize) as *const *const u8).ok()?;
        if stack.is_null() {
            return None;
        }
        // x86_64: struct pt_regs (21 u64) ends the kernel stack.
        let pt = stack.add(cfg.thread_size as usize - 21 * 8) as *const u64;
        let cs = bpf_probe_read_kernel(pt.add(17)).ok()?;
        if cs & 3 != 3 {
            return None; // a kernel thread, or the layout is not what we think
        }
        let ip = bpf_probe_read_kernel(pt.add(16)).ok()?;
        let sp = bpf_probe_read_kernel(pt.add(19)).ok()?;
        let bp = bpf_probe_read_kernel(pt.add(4)).ok()?;
        Some((ip, sp, bp))
    }
}

/// Sends the user registers and a copy of the user stack to userspace for
/// unwinding with the binaries' CFI. Returns false when the task has no
/// user registers.
#[inline(always)]
fn copy_stack(ctx: &PerfEventContext, cfg: &Config, tgid: u32, tid: u32) -> bool {
    let Some((ip, sp, bp)) = user_regs(ctx, cfg) else {
        bump(Counter::UserRegsMissing);
        return false;
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
    // Built in a per-CPU scratch record, then sent with only the pages
    // copied: the ring buffer carries what the stack holds, not the most
    // it could hold.
    // SAFETY: no preconditions.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    let Some(out) = SCRATCH.get_ptr_mut(cpu) else {
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
    // SAFETY: a lookup in a hash of plain integers.
    let top = match unsafe { STACK_TOPS.get(&thread) } {
        Some(&[addr, until]) if addr > sp && now() < until => addr,
        _ => u64::MAX,
    };
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
            if src >= top {
                break;
            }
            let rc = aya_ebpf::helpers::generated::bpf_probe_read_user(
                dst.add(off).cast(),
                size as u32,
                src as *const core::ffi::c_void,
            );
            if rc != 0 {
                let _ = STACK_TOPS.insert(&thread, &[src, now() + STACK_TOP_TTL_NS], 0);
                break;
            }
            len = (off as u64 + size) as u32;
            chunks += 1;
            i += 1;
        }
    }
    // Stopped before the configured size: the stack's top was reached.
    let at_top = (chunks as usize) < pages;
    // SAFETY: as above.
    unsafe {
        (*out).len = len;
        (*out).flags = if at_top { STACK_AT_TOP } else { 0 };
        (*out)._pad = 0;
    }
    if at_top {
        bump(Counter::StackCopiesShort);
    }
    send_scratch(out, HEADER_BYTES + len as usize);
    true
}

/// Tasks waiting on this CPU's run queue, excluding the running one:
/// task->se.cfs_rq->rq->cfs.<h_nr_runnable | h_nr_running | h_nr_queued>
/// (every runnable CFS task of the CPU, whatever its cgroup), the offsets
/// of that chain found in BTF by the loader.
#[inline(always)]
fn runqueue_depth(cfg: &Config, tid: u32) {
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

#[inline(always)]
fn announce(cfg: &Config, tgid: u32) {
    let now = now();
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

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == NO_FIELD {
        return None;
    }
    // SAFETY: bounds-checked probe read of the tracepoint record.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[tracepoint]
pub fn follow_fork(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.follow_forks == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: lookup in a hash map of plain integers.
    if unsafe { PIDS.get(&parent) }.is_none() {
        return 0;
    }
    let Some(child) = read::<i32>(&ctx, cfg.fork_child_pid) else {
        return 0;
    };
    if PIDS.insert(&(child as u32), &1, 0).is_ok() {
        bump(Counter::ForksFollowed);
    } else {
        bump(Counter::ForksDropped);
    }
    0
}

/// sched_wakeup and sched_wakeup_new: the task becomes runnable.
#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    if let Some(pid) = read::<i32>(&ctx, config().wakeup_pid) {
        enqueued(pid as u32);
    }
    0
}

#[inline(always)]
fn enqueued(pid: u32) {
    if pid == 0 {
        return;
    }
    if RUNQ_START.insert(&pid, &now(), 0).is_err() {
        bump(Counter::RunqStartFull);
    }
}

/// sched_switch: a task preempted while runnable waits again; the next
/// task's wait ends.
#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if let (Some(state), Some(prev)) = (
        read::<i64>(&ctx, cfg.switch_prev_state),
        read::<i32>(&ctx, cfg.switch_prev_pid),
    ) && (state as u64) & cfg.switch_runnable_mask == 0
    {
        enqueued(prev as u32);
    }
    let Some(next) = read::<i32>(&ctx, cfg.switch_next_pid) else {
        return 0;
    };
    let next = next as u32;
    if next == 0 {
        return 0;
    }
    // SAFETY: lookup in a hash map of plain integers.
    let Some(&start) = (unsafe { RUNQ_START.get(&next) }) else {
        return 0;
    };
    let _ = RUNQ_START.remove(&next);
    let delta_us = now().saturating_sub(start) / 1000;
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

/// inet_sock_set_state and sock_send_length, in process context: remember
/// which process uses the socket, for the retransmits that fire later from
/// a timer.
#[tracepoint]
pub fn sock_owner(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == 0 {
        return 0; // softirq on an idle CPU: not the owner
    }
    let Some(sk) = read::<u64>(&ctx, config().sock_owner_sk) else {
        return 0;
    };
    let owner = SockOwner {
        tgid,
        _pad: 0,
        // SAFETY: no preconditions.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    let _ = SOCK_OWNERS.insert(&sk, &owner, 0);
    0
}

#[tracepoint]
pub fn tcp_retransmit(ctx: TracePointContext) -> u32 {
    count_retransmit(&ctx, &config().retrans, 0)
}

/// A SYN-ACK retransmitted by a listener (its own tracepoint; the kernel's
/// RetransSegs counts it too).
#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    const TCP_SYN_RECV: i32 = 3;
    count_retransmit(&ctx, &config().synack, TCP_SYN_RECV)
}

/// Counts one retransmit per connection and state; `state` when the record
/// has no state field.
#[inline(always)]
fn count_retransmit(ctx: &TracePointContext, f: &[u32; 9], state: i32) -> u32 {
    bump(Counter::Retransmits);
    let mut key = RetransKey {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: read::<u16>(ctx, f[retrans_field::SPORT]).unwrap_or(0),
        dport: read::<u16>(ctx, f[retrans_field::DPORT]).unwrap_or(0),
        family: read::<u16>(ctx, f[retrans_field::FAMILY]).unwrap_or(0),
        state: read::<i32>(ctx, f[retrans_field::STATE]).unwrap_or(state) as u16,
    };
    if key.family == 10 {
        key.saddr = read::<[u8; 16]>(ctx, f[retrans_field::SADDR6]).unwrap_or([0; 16]);
        key.daddr = read::<[u8; 16]>(ctx, f[retrans_field::DADDR6]).unwrap_or([0; 16]);
    } else {
        let s = read::<[u8; 4]>(ctx, f[retrans_field::SADDR]).unwrap_or([0; 4]);
        let d = read::<[u8; 4]>(ctx, f[retrans_field::DADDR]).unwrap_or([0; 4]);
        key.saddr[..4].copy_from_slice(&s);
        key.daddr[..4].copy_from_slice(&d);
    }
    let now = now();
    if let Some(v) = RETRANS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU: no concurrent writer.
        unsafe {
            // The key may have been made on another CPU: this CPU's value
            // then starts at zero.
            if (*v).count == 0 {
                (*v).first_ns = now;
            }
            (*v).count += 1;
            (*v).last_ns = now;
        }
        return 0;
    }
    let mut value = RetransValue {
        count: 1,
        first_ns: now,
        last_ns: now,
        ..RetransValue::default()
    };
    if let Some(sk) = read::<u64>(ctx, f[retrans_field::SKADDR])
        // SAFETY: lookup of a plain struct.
        && let Some(owner) = unsafe { SOCK_OWNERS.get(&sk) }
    {
        value.owner_tgid = owner.tgid;
        value.owner_cgroup = owner.cgroup;
        value.owner_comm = owner.comm;
    }
    if RETRANS.insert(&key, &value, 0).is_err() {
        bump(Counter::RetransMapFull);
    } else if value.owner_tgid != 0 {
        // A new connection: have userspace note its owner while it lives.
        let event = ProcessEvent {
            tgid: value.owner_tgid,
            kind: ProcessEventKind::SocketOwner as u32,
        };
        if EVENTS.output::<ProcessEvent>(&event, 0).is_err() {
            bump(Counter::EventsLost);
        }
    }
    0
}

#[tracepoint]
pub fn oom_victim(ctx: TracePointContext) -> u32 {
    let f = &config().oom;
    bump(Counter::OomKills);
    let Some(mut entry) = OOM_EVENTS.reserve::<OomEvent>(0) else {
        bump(Counter::OomEventsLost);
        return 0;
    };
    let mut comm = [0u8; COMM_LEN];
    if let Some(loc) = read::<u32>(&ctx, f[oom_field::COMM]) {
        // __data_loc: low 16 bits offset, high 16 bits length.
        let off = (loc & 0xffff) as usize;
        // SAFETY: bounds-checked probe read of the record.
        if let Ok(c) = unsafe { ctx.read_at::<[u8; COMM_LEN]>(off) } {
            comm = c;
        }
    }
    let event = OomEvent {
        ts_ns: now(),
        pid: read::<i32>(&ctx, f[oom_field::PID]).unwrap_or(0) as u32,
        uid: read::<u32>(&ctx, f[oom_field::UID]).unwrap_or(u32::MAX),
        total_vm: read::<u64>(&ctx, f[oom_field::TOTAL_VM]).unwrap_or(0),
        anon_rss: read::<u64>(&ctx, f[oom_field::ANON_RSS]).unwrap_or(0),
        file_rss: read::<u64>(&ctx, f[oom_field::FILE_RSS]).unwrap_or(0),
        shmem_rss: read::<u64>(&ctx, f[oom_field::SHMEM_RSS]).unwrap_or(0),
        // SAFETY: no preconditions.
        trigger_cgroup: unsafe { bpf_get_current_cgroup_id() },
        victim: TaskCgroups::default(),
        oom_score_adj: read::<i16>(&ctx, f[oom_field::SCORE_ADJ]).unwrap_or(0),
        _pad: [0; 6],
        comm,
    };
    let mut event = event;
    // In a memory cgroup's OOM the task that ran out is usually the one
    // killed: then its cgroups are the victim's.
    let tid_tgid = bpf_get_current_pid_tgid();
    if event.pid != 0 && (tid_tgid as u32 == event.pid || (tid_tgid >> 32) as u32 == event.pid) {
        // SAFETY: the current task is a valid task_struct.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        event.victim = task_cgroups(task);
    }
    entry.write(event);
    entry.submit(0);
    0
}

/// The cgroups of `task`, by the BTF offsets in [`Config::cgroup`]; zero
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
    let _ = OOM_CGROUPS.insert(&(pid as u32), &cg, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
