//! Off-CPU time: sched_switch takes the stacks of a thread leaving the
//! CPU and keeps its start; when the thread runs again its time away is
//! summed per key in the kernel, split at its wakeup (sched_wakeup) into
//! the time blocked and the time it then waited for a CPU. Blocks shorter
//! than the minimum are summed without stacks. Kernel threads and the
//! idle task are left out; with a pid filter, only its processes count.

use aya_ebpf::programs::tracing::StackIdContext;
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::tracepoint,
    maps::{HashMap, LruHashMap, PerCpuHashMap, RingBuf, StackTrace},
    programs::TracePointContext,
};
use profiler_common::{
    COMM_LEN,
    config::Config,
    counters::Counter,
    offcpu::{
        self, CachedStacks, NO_SYSCALL, NOT_WALKED, OffKey, OffStart, OffSumKey, OffValue, SHORT,
        STACK_TTL_NS, SwitchSite, TurnBlock, class,
    },
    stacks::slices_of,
};

use crate::{BPF_RB_NO_WAKEUP, COUNTERS, STATE_EXITING, bump, config, dropped, now, read};

map!(OFFCPU_STACKS: StackTrace = with_max_entries(offcpu::OFFCPU_STACKS));
map!(OFFCPU_START: HashMap<u32, OffStart> = with_max_entries(offcpu::OFFCPU_START));
map!(OFFCPU_COUNTS: PerCpuHashMap<OffSumKey, OffValue> = with_max_entries(offcpu::OFFCPU_COUNTS));
map!(LOOP_BLOCKS: RingBuf = with_byte_size(offcpu::LOOP_BLOCKS));
map!(STACK_CACHE: LruHashMap<SwitchSite, CachedStacks> = with_max_entries(offcpu::STACK_CACHE));

/// `TASK_UNINTERRUPTIBLE` in sched_switch's `prev_state`.
const STATE_D: i64 = 2;
/// futex(2) on x86_64.
const SYS_FUTEX: i32 = 202;

/// Whether the current task's CFS group, or an ancestor, is throttled.
#[inline(always)]
fn throttled(cfg: &Config) -> bool {
    if cfg.cfs_rq_throttle_count == 0 || cfg.task_cfs_rq == 0 {
        return false;
    }
    // SAFETY: probe reads at offsets from BTF; a bad pointer fails the
    // helper, it cannot fault.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(cfs_rq) =
            bpf_probe_read_kernel(task.add(cfg.task_cfs_rq as usize) as *const *const u8)
        else {
            return false;
        };
        bpf_probe_read_kernel(cfs_rq.add(cfg.cfs_rq_throttle_count as usize) as *const i32)
            .is_ok_and(|n| n > 0)
    }
}

#[inline(always)]
fn stack_id(ctx: &TracePointContext, flags: u64) -> i32 {
    bump(if flags & BPF_F_USER_STACK as u64 != 0 {
        Counter::OffcpuUserWalks
    } else {
        Counter::OffcpuKernelWalks
    });
    match ctx.get_stackid(&OFFCPU_STACKS, flags) {
        Ok(id) => id as i32,
        Err(e) => {
            if dropped(e) {
                bump(Counter::OffcpuStackDropped);
            }
            e
        }
    }
}

/// The current task leaves the CPU: keep when, why and its stacks.
#[inline(always)]
fn leaving(ctx: &TracePointContext, cfg: &Config, t: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == 0 || (cfg.filter_pids != 0 && !crate::procs::profiled(tgid)) {
        return;
    }
    // No user registers: a kernel thread, left out.
    let Some(entry) = crate::arch::current_entry(cfg) else {
        return;
    };
    let (orig_ax, arg0, arg1) = (entry.nr, entry.arg0, entry.arg1);
    let Some(state) = read::<i64>(ctx, cfg.switch_prev_state) else {
        return;
    };
    // Exiting (EXIT_ZOMBIE or EXIT_DEAD): it never returns.
    if state & STATE_EXITING != 0 {
        return;
    }
    let class = if (state as u64) & cfg.switch_runnable_mask == 0 {
        if throttled(cfg) {
            class::THROTTLED
        } else {
            class::PREEMPTED
        }
    } else if state & STATE_D != 0 {
        class::UNINTERRUPTIBLE
    } else {
        class::SLEEPING
    };
    let syscall = if orig_ax < 0 || orig_ax > i32::MAX as i64 {
        NO_SYSCALL
    } else {
        orig_ax as i32
    };
    // A thread that leaves again from where it left before has the same
    // stacks (see STACK_CACHE); one preempted has no kernel stack worth
    // walking (it was preempted wherever it was).
    let sleeping = class == class::SLEEPING || class == class::UNINTERRUPTIBLE;
    let (user_stack_id, kernel_stack_id) = if syscall != NO_SYSCALL || !sleeping {
        let site = SwitchSite {
            tid,
            syscall,
            arg0: if syscall != NO_SYSCALL { arg0 } else { 0 },
            ip: entry.ip,
            sp: entry.sp,
            bp: entry.bp,
            caller: if sleeping {
                [0; 2]
            } else {
                // SAFETY: a probe read of the thread's own stack; it fails
                // (zeros) rather than faults.
                unsafe { bpf_probe_read_user(entry.bp as *const [u64; 2]) }.unwrap_or([0; 2])
            },
            class: u32::from(class),
            _pad: 0,
        };
        // SAFETY: a read of plain integers.
        match unsafe { STACK_CACHE.get(&site) } {
            Some(c) if t < c.until_ns => (c.user_stack_id, c.kernel_stack_id),
            _ => {
                let user = stack_id(ctx, BPF_F_USER_STACK as u64);
                let kernel = if sleeping {
                    stack_id(ctx, 0)
                } else {
                    NOT_WALKED
                };
                if user >= 0 && (kernel >= 0 || !sleeping) {
                    let c = CachedStacks {
                        user_stack_id: user,
                        kernel_stack_id: kernel,
                        until_ns: t + STACK_TTL_NS,
                    };
                    let _ = STACK_CACHE.insert(&site, &c, 0);
                }
                (user, kernel)
            }
        }
    } else {
        // Asleep outside a syscall (a page fault): walked each time.
        (stack_id(ctx, BPF_F_USER_STACK as u64), stack_id(ctx, 0))
    };
    let start = OffStart {
        start_ns: t,
        woken_ns: 0,
        key: OffKey {
            tgid,
            user_stack_id,
            kernel_stack_id,
            syscall,
            class,
            // futex: its command (FUTEX_WAIT for a lock, FUTEX_WAIT_BITSET
            // for a condition variable or semaphore).
            detail: if syscall == SYS_FUTEX {
                (arg1 & 0x7f) as u8
            } else {
                0
            },
            _pad: [0; 2],
            comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
        },
        _pad: 0,
    };
    bump(Counter::OffcpuSwitches);
    if OFFCPU_START.insert(&tid, &start, 0).is_err() {
        bump(Counter::OffcpuStartFull);
    }
}

/// Adds the interval `[from, to)` (ktime ns) away to `key`, with the
/// time slices it covers.
#[inline(always)]
fn sum(key: &OffKey, from: u64, to: u64) {
    let ns = to.saturating_sub(from);
    if ns == 0 {
        return;
    }
    let (first, last) = slices_of(from, to);
    let key = OffSumKey {
        key: *key,
        first,
        last,
    };
    let key = &key;
    match OFFCPU_COUNTS.get_ptr_mut(key) {
        // SAFETY: this CPU's value: no concurrent writer.
        Some(v) => unsafe {
            (*v).ns += ns;
            (*v).count += 1;
        },
        None => {
            if OFFCPU_COUNTS
                .insert(key, &OffValue { ns, count: 1 }, 0)
                .is_err()
            {
                crate::add(&COUNTERS, Counter::OffcpuLostNs as u32, ns);
            }
        }
    }
}

/// Thread `tid` runs again: sum its time away.
#[inline(always)]
fn returning(cfg: &Config, tid: u32, t: u64) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(s) = (unsafe { OFFCPU_START.get(&tid) }).copied() else {
        return;
    };
    // Only fails when another CPU removed it first.
    let _ = OFFCPU_START.remove(&tid);
    // Inside an event-loop turn: sent whole, for the stall it may be in.
    if cfg.loops != 0 && crate::loops::turn_of(tid).is_some() {
        let block = TurnBlock {
            tid,
            _pad: 0,
            start_ns: s.start_ns,
            woken_ns: s.woken_ns,
            end_ns: t,
            key: s.key,
            _pad2: 0,
        };
        if LOOP_BLOCKS
            .output::<TurnBlock>(&block, BPF_RB_NO_WAKEUP)
            .is_err()
        {
            bump(Counter::LoopBlocksLost);
        }
    }
    let total = t.saturating_sub(s.start_ns);
    let mut key = s.key;
    if total < cfg.offcpu_min_ns {
        key.user_stack_id = SHORT;
    }
    let blocked = matches!(key.class, class::SLEEPING | class::UNINTERRUPTIBLE);
    if blocked && s.woken_ns >= s.start_ns && s.woken_ns <= t {
        sum(&key, s.start_ns, s.woken_ns);
        key.class = class::WOKEN_WAITING;
        sum(&key, s.woken_ns, t);
    } else {
        sum(&key, s.start_ns, t);
    }
}

prog_named!(offcpu_switch, offcpu::PROG_SWITCH);
/// sched_switch: the previous task leaves the CPU, the next one returns.
#[tracepoint]
pub fn offcpu_switch(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let t = now();
    leaving(&ctx, cfg, t);
    if let Some(next) = read::<i32>(&ctx, cfg.switch_next_pid)
        && next > 0
    {
        returning(cfg, next as u32, t);
    }
    0
}

prog_named!(offcpu_wakeup, offcpu::PROG_WAKEUP);
/// sched_wakeup and sched_wakeup_new: a blocked task becomes runnable;
/// from now on it waits for a CPU.
#[tracepoint]
pub fn offcpu_wakeup(ctx: TracePointContext) -> u32 {
    let Some(pid) = read::<i32>(&ctx, config().wakeup_pid) else {
        return 0;
    };
    if pid <= 0 {
        return 0;
    }
    if let Some(s) = OFFCPU_START.get_ptr_mut(&(pid as u32)) {
        // SAFETY: a plain store into a live entry; a race with its
        // removal only loses this wakeup time.
        unsafe {
            if (*s).woken_ns == 0 {
                (*s).woken_ns = now();
            }
        }
    }
    0
}
