//! Event loops: turns of every thread that waits in epoll, timed from the
//! return of one wait (sys_exit) to the next call (sys_enter); turns at
//! least the stall threshold long are sent to userspace.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    maps::{HashMap, RingBuf},
    programs::TracePointContext,
};
use profiler_common::{
    COMM_LEN,
    counters::Counter,
    loops::{self, LoopThread, Stall, TURN_SLOTS, slot_of},
};

use crate::{bump, config, now};

map!(LOOPS: HashMap<u32, LoopThread> = with_max_entries(loops::LOOPS));
map!(STALLS: RingBuf = with_byte_size(loops::STALLS));

/// A new thread's entry, copied in (too big to build on the BPF stack).
static EMPTY: LoopThread = LoopThread {
    tgid: 0,
    in_turn: 0,
    turn_start: 0,
    turns: 0,
    total_ns: 0,
    max_ns: 0,
    hist: [0; TURN_SLOTS as usize],
    comm: [0; COMM_LEN],
};

/// BPF_NOEXIST.
const NOEXIST: u64 = 1;

/// When the current thread's turn started, if it is in one.
#[inline(always)]
pub fn turn_of(tid: u32) -> Option<u64> {
    // SAFETY: read of a plain value; a torn read only misplaces one
    // sample.
    let t = unsafe { LOOPS.get(&tid) }?;
    (t.in_turn != 0).then_some(t.turn_start)
}

prog_named!(loop_exit, loops::PROG_EXIT);
/// sys_exit_epoll_*: the wait returned, a turn starts.
#[tracepoint]
pub fn loop_exit(_ctx: TracePointContext) -> u32 {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if (cfg.filter_pids != 0 && !crate::procs::profiled(tgid)) || tgid == cfg.own_tgid {
        return 0;
    }
    let p = match LOOPS.get_ptr_mut(&tid) {
        Some(p) => p,
        None => {
            if LOOPS.insert(&tid, &EMPTY, NOEXIST).is_err() {
                bump(Counter::LoopsFull);
                return 0;
            }
            let Some(p) = LOOPS.get_ptr_mut(&tid) else {
                return 0;
            };
            // SAFETY: the entry just made, this thread's own.
            unsafe {
                (*p).tgid = tgid;
                (*p).comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
            }
            p
        }
    };
    // SAFETY: this thread's own entry: no other writer.
    unsafe {
        (*p).turn_start = now();
        (*p).in_turn = 1;
    }
    0
}

prog_named!(loop_enter, loops::PROG_ENTER);
/// sys_enter_epoll_*: the loop waits again, its turn ends.
#[tracepoint]
pub fn loop_enter(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(p) = LOOPS.get_ptr_mut(&tid) else {
        return 0;
    };
    let t = now();
    // SAFETY: this thread's own entry: no other writer.
    unsafe {
        if (*p).in_turn == 0 {
            return 0;
        }
        (*p).in_turn = 0;
        let d = t.saturating_sub((*p).turn_start);
        (*p).turns += 1;
        (*p).total_ns += d;
        if d > (*p).max_ns {
            (*p).max_ns = d;
        }
        let slot = slot_of(d / 1000) as usize;
        if slot < TURN_SLOTS as usize {
            (*p).hist[slot] += 1;
        }
        if d >= config().stall_ns {
            let s = Stall {
                tgid: (*p).tgid,
                tid,
                start_ns: (*p).turn_start,
                end_ns: t,
                comm: (*p).comm,
            };
            if STALLS.output::<Stall>(&s, 0).is_err() {
                bump(Counter::StallsLost);
            }
        }
    }
    0
}
