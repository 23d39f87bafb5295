//! The kernel programs' settings: set once by the loader before load, as
//! the read-only global [`CONFIG`]. Offsets come from the tracepoints'
//! format files and the kernel's BTF, read at run time, so the programs
//! work across kernel versions.

use crate::{NO_FIELD, stacks};

/// Name of the read-only global holding the [`Config`].
pub const CONFIG: &str = "CONFIG";

/// Settings of the kernel programs (see the module's documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Non-zero: sample only the thread groups in `PIDS`.
    pub filter_pids: u8,
    /// Non-zero: add the children of profiled processes to `PIDS`.
    pub follow_forks: u8,
    /// Non-zero: take stacks in the sampler (zero: `--no-stacks`).
    pub take_stacks: u8,
    /// Non-zero: read the run-queue depth in the sampler.
    pub runqueue_depth: u8,
    /// sched_process_fork: offset of `child_pid`.
    pub fork_child_pid: u32,
    /// Nanoseconds between two announcements of the same process.
    pub reannounce_ns: u64,
    /// Run-queue depth: offset in `task_struct` of `se.cfs_rq` (a pointer
    /// to the task's CFS run queue).
    pub task_cfs_rq: u32,
    /// Offset in `cfs_rq` of `rq` (a pointer to the CPU's run queue).
    pub cfs_rq_rq: u32,
    /// Offset in `rq` of the count of runnable CFS tasks of the CPU:
    /// `cfs.h_nr_runnable` (6.14+), `cfs.h_nr_running` (older) or
    /// `cfs.h_nr_queued`; a u32.
    pub rq_nr_runnable: u32,
    /// sched_switch: offset of `prev_pid`.
    pub switch_prev_pid: u32,
    /// sched_switch: offset of `prev_state`.
    pub switch_prev_state: u32,
    /// sched_switch: offset of `next_pid`.
    pub switch_next_pid: u32,
    /// sched_wakeup(_new): offset of `pid`.
    pub wakeup_pid: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// `prev_state & runnable_mask == 0` means the task was preempted or
    /// yielded while still runnable (state R or R+).
    pub switch_runnable_mask: u64,
    /// oom:mark_victim offsets, indexed by [`crate::oom::field`];
    /// [`NO_FIELD`] for a field this kernel's tracepoint lacks.
    pub oom: [u32; 8],
    /// tcp_retransmit_skb offsets, indexed by [`crate::tcp::field`].
    pub retrans: [u32; 9],
    /// inet_sock_set_state / sock_send_length: offset of the socket pointer.
    pub sock_owner_sk: u32,
    /// Non-zero: copy user stacks for userspace unwinding instead of
    /// walking frame pointers in the kernel.
    pub copy_stacks: u8,
    /// Pages of user stack to copy (1..=STACK_COPY_MAX/STACK_PAGE).
    pub stack_pages: u8,
    /// Non-zero (`--unwind fp`): a user stack whose id collides in the
    /// stack map is sent through the stack ring as addresses
    /// ([`stacks::STACK_IPS`]).
    pub send_collided: u8,
    /// Padding, zero.
    pub _pad2: u8,
    /// Offset of `stack` (the kernel stack pointer) in `task_struct`, to find
    /// the user registers of a sample taken in kernel mode (0: unknown).
    pub task_stack: u32,
    /// Kernel stack size (THREAD_SIZE); the user registers (`pt_regs`) are
    /// at its top.
    pub thread_size: u32,
    /// Offset of `mm` in `task_struct` (0: unknown), with
    /// [`Config::mm_start_stack`]: a main thread's stack copy stops at the
    /// stack's start, below the arguments and environment.
    pub task_mm: u32,
    /// tcp_retransmit_synack offsets, indexed as [`Config::retrans`]
    /// (no `state` field: a SYN-ACK is retransmitted in SYN_RECV).
    pub synack: [u32; 9],
    /// Offsets (from BTF) for reading a task's cgroups, indexed by
    /// [`crate::oom::cgroup_field`]; [`NO_FIELD`] in `TASK_CGROUPS` when
    /// this kernel's layout could not be found.
    pub cgroup: [u32; 7],
    /// Non-zero: time threads off the CPU ([`crate::offcpu`]).
    pub offcpu: u8,
    /// Padding, zero.
    pub _pad4: [u8; 3],
    /// Offset in `cfs_rq` of `throttle_count` (non-zero while it or an
    /// ancestor is throttled); 0: unknown, throttling is not told apart.
    pub cfs_rq_throttle_count: u32,
    /// Blocks shorter than this (ns) are summed without their stacks.
    pub offcpu_min_ns: u64,
    /// Non-zero: time event-loop turns ([`crate::loops`]).
    pub loops: u8,
    /// Padding, zero.
    pub _pad5: [u8; 7],
    /// Turns at least this long (ns) are stalls.
    pub stall_ns: u64,
    /// Non-zero: follow accepted connections ([`crate::requests`]).
    pub requests: u8,
    /// Non-zero: follow outbound sockets' states (connect latency and
    /// failures) from `sock:inet_sock_set_state`.
    pub sock_states: u8,
    /// Padding, zero.
    pub _pad6: [u8; 2],
    /// Offset of `sk_err` in `struct sock` (0: unknown), for why a
    /// connection failed.
    pub sk_err: u32,
    /// The profiler's own thread-group id: its event loop (tokio's
    /// epoll) is not the user's, and is not timed.
    pub own_tgid: u32,
    /// Offset of `start_stack` in `mm_struct` (0: unknown): where the
    /// main thread's first frame is (`_start` runs with its sp there);
    /// above it lie only argv, envp, the auxiliary vector and their
    /// strings (6 KB of a 9 KB copy for the benches' Node.js; more in a
    /// pod with many environment variables).
    pub mm_start_stack: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 256);

impl Config {
    /// The settings before the loader has read anything: every signal off,
    /// every offset unknown. The kernel side's global starts as this, the
    /// loader starts from it.
    pub const DEFAULT: Config = Config {
        filter_pids: 0,
        follow_forks: 0,
        take_stacks: 0,
        runqueue_depth: 0,
        fork_child_pid: NO_FIELD,
        reannounce_ns: crate::procs::REANNOUNCE_NS,
        task_cfs_rq: 0,
        cfs_rq_rq: 0,
        rq_nr_runnable: 0,
        switch_prev_pid: NO_FIELD,
        switch_prev_state: NO_FIELD,
        switch_next_pid: NO_FIELD,
        wakeup_pid: NO_FIELD,
        _pad: 0,
        switch_runnable_mask: 0xff,
        oom: [NO_FIELD; 8],
        retrans: [NO_FIELD; 9],
        sock_owner_sk: NO_FIELD,
        copy_stacks: 0,
        stack_pages: (stacks::STACK_COPY_MAX / stacks::STACK_PAGE) as u8,
        send_collided: 0,
        _pad2: 0,
        task_stack: 0,
        thread_size: 16384,
        task_mm: 0,
        synack: [NO_FIELD; 9],
        cgroup: [NO_FIELD; 7],
        offcpu: 0,
        _pad4: [0; 3],
        cfs_rq_throttle_count: 0,
        offcpu_min_ns: crate::offcpu::MIN_NS,
        loops: 0,
        _pad5: [0; 7],
        stall_ns: crate::loops::STALL_NS,
        requests: 0,
        sock_states: 0,
        _pad6: [0; 2],
        sk_err: 0,
        own_tgid: 0,
        mm_start_stack: 0,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

crate::pod!(Config);
