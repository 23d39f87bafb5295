//! Types shared by the kernel programs (`profiler-ebpf`) and the userspace
//! loader (`profiler`).
//!
//! Every type here crosses the kernel/user boundary through a BPF map, so each
//! is `#[repr(C)]`, `Copy`, built from fixed-width integers, and has no
//! implicit padding (a compile-time size check per struct guards that).
#![no_std]

/// Deepest stack the kernel's stack-trace map records (`PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Most bytes of user stack copied per sample for unwinding in userspace,
/// from the stack pointer upward.
pub const STACK_COPY_MAX: usize = 65536;
/// Page size the stack copy works in.
pub const STACK_PAGE: usize = 4096;
/// [`StackSample::flags`]: the copy holds everything up to the stack's top.
pub const STACK_AT_TOP: u32 = 1;
/// [`StackSample::flags`]: `stack` holds user return addresses the kernel
/// walked by frame pointer (u64 each, leaf first; `len` bytes of them),
/// not a stack copy: with `--unwind fp`, a stack whose id collided with
/// another's in the stack map is sent this way instead of being dropped.
pub const STACK_IPS: u32 = 2;

/// A sample for userspace unwinding (`--unwind dwarf|auto`): the user
/// registers the unwinder starts from and a copy of the user stack,
/// sent through [`names::MAP_STACK_SAMPLES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackSample {
    /// Thread-group id.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Kernel stack id in the stack map, or a negative errno.
    pub kernel_stack_id: i32,
    /// Bytes of `stack` copied, from `sp` upward (0 when nothing could be
    /// read).
    pub len: u32,
    /// [`STACK_AT_TOP`] when the copy ended at the stack's top rather than
    /// at the configured size.
    pub flags: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// User instruction pointer.
    pub ip: u64,
    /// User stack pointer.
    pub sp: u64,
    /// User frame pointer (rbp).
    pub bp: u64,
    /// Address `stack[0]` was copied from (`sp`).
    pub base: u64,
    /// Name of the thread.
    pub comm: [u8; COMM_LEN],
    /// The stack copy.
    pub stack: [u8; STACK_COPY_MAX],
}
const _: () = assert!(core::mem::size_of::<StackSample>() == 72 + STACK_COPY_MAX);

/// Names of the maps and globals of the eBPF object, so the loader and the
/// programs agree on them in one place.
pub mod names {
    /// perf_event program sampling stacks on every CPU.
    pub const PROG_SAMPLE: &str = "sample_stack";
    /// Tracepoint program that follows forks of profiled processes.
    pub const PROG_FORK: &str = "follow_fork";
    /// Stack-trace map (`BPF_MAP_TYPE_STACK_TRACE`).
    pub const MAP_STACKS: &str = "STACKS";
    /// Per-CPU hash map [`crate::StackKey`] -> sample count.
    pub const MAP_COUNTS: &str = "COUNTS";
    /// Per-CPU array of [`crate::Counter`] values.
    pub const MAP_COUNTERS: &str = "COUNTERS";
    /// Hash map of the thread-group ids to profile (when filtering).
    pub const MAP_PIDS: &str = "PIDS";
    /// Hash map of thread-group ids announced to userspace -> when (ns).
    pub const MAP_SEEN: &str = "SEEN";
    /// Ring buffer of [`crate::ProcessEvent`].
    pub const MAP_EVENTS: &str = "EVENTS";
    /// Read-only global [`crate::Config`].
    pub const GLOBAL_CONFIG: &str = "CONFIG";
    /// Tracepoint program of sched_wakeup and sched_wakeup_new.
    pub const PROG_WAKEUP: &str = "sched_wakeup";
    /// sched_switch program.
    pub const PROG_SWITCH: &str = "sched_switch";
    /// tcp_retransmit_skb program.
    pub const PROG_RETRANSMIT: &str = "tcp_retransmit";
    /// tcp_retransmit_synack program.
    pub const PROG_RETRANSMIT_SYNACK: &str = "tcp_retransmit_synack";
    /// Program recording which process uses a socket.
    pub const PROG_SOCK_OWNER: &str = "sock_owner";
    /// oom:mark_victim program.
    pub const PROG_OOM: &str = "oom_victim";
    /// Raw tracepoint on mark_victim (kernels whose tracepoint passes the
    /// victim's `task_struct`): records the victim's cgroups.
    pub const PROG_OOM_TASK: &str = "oom_victim_task";
    /// Per-CPU array: run-queue latency histogram ([`crate::LATENCY_SLOTS`]
    /// buckets, then the longest wait in microseconds).
    pub const MAP_RUNQ_LAT: &str = "RUNQ_LAT";
    /// Per-CPU array: run-queue depth histogram ([`crate::DEPTH_SLOTS`]).
    pub const MAP_RUNQ_DEPTH: &str = "RUNQ_DEPTH";
    /// Hash map tid -> time it became runnable.
    pub const MAP_RUNQ_START: &str = "RUNQ_START";
    /// Per-CPU hash map [`crate::RetransKey`] -> [`crate::RetransValue`].
    pub const MAP_RETRANS: &str = "RETRANS";
    /// LRU hash map socket address -> [`crate::SockOwner`].
    pub const MAP_SOCK_OWNERS: &str = "SOCK_OWNERS";
    /// Ring buffer of [`crate::OomEvent`].
    pub const MAP_OOM_EVENTS: &str = "OOM_EVENTS";
    /// LRU hash map victim pid -> [`crate::TaskCgroups`].
    pub const MAP_OOM_CGROUPS: &str = "OOM_CGROUPS";
    /// Array of one [`crate::StackSample`] per CPU, where samples are built.
    pub const MAP_SCRATCH: &str = "SCRATCH";
    /// Ring buffer of [`crate::StackSample`] (userspace unwinding).
    pub const MAP_STACK_SAMPLES: &str = "STACK_SAMPLES";
}

/// Key of the in-kernel aggregation: one entry per distinct
/// (process, thread name, user stack, kernel stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    /// Thread-group id (the process id seen in userspace); 0 for idle.
    pub tgid: u32,
    /// Id in the stack map of the user stack, or a negative errno when the
    /// sample has no user stack (kernel thread, or the stack walk failed).
    pub user_stack_id: i32,
    /// Id in the stack map of the kernel stack, or a negative errno.
    pub kernel_stack_id: i32,
    /// Name of the sampled thread, NUL-padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<StackKey>() == 28);

/// An event sent to userspace through the [`names::MAP_EVENTS`] ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    /// Thread-group id of the process.
    pub tgid: u32,
    /// What happened, one of [`ProcessEventKind`] as `u32`.
    pub kind: u32,
}
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 8);

/// Kinds of [`ProcessEvent`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessEventKind {
    /// First sample of this process: read its memory maps while it lives.
    FirstSample = 1,
    /// Sampled again a while after its last announcement: its maps may
    /// have grown (JIT code, libraries loaded since).
    StillRunning = 2,
    /// Owns a socket that just retransmitted for the first time: read its
    /// name and cgroup while it lives.
    SocketOwner = 3,
}

/// Indexes of the per-CPU counters in [`names::MAP_COUNTERS`]: everything
/// the programs could not record is counted here, never dropped silently.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// perf_event samples taken (after the pid filter).
    Samples = 0,
    /// Samples with neither a user nor a kernel stack.
    NoStack = 1,
    /// User stack walks that failed for lack of room (`-ENOMEM`) or a hash
    /// collision in the stack map (`-EEXIST`).
    UserStackDropped = 2,
    /// Kernel stack walks that failed the same ways.
    KernelStackDropped = 3,
    /// Samples lost because the count map was full.
    CountMapFull = 4,
    /// First-sample notifications lost (ring buffer or seen-map full).
    EventsLost = 5,
    /// Forked children added to the pid filter.
    ForksFollowed = 6,
    /// Forked children that did not fit in the pid filter.
    ForksDropped = 7,
    /// cpu-clock ticks seen on this CPU, before any filter.
    CpuTicks = 8,
    /// Of those, ticks that found a task other than idle running.
    CpuBusyTicks = 9,
    /// Wakeups not timed because the run-queue start map was full.
    RunqStartFull = 10,
    /// Run-queue depth reads that failed.
    RunqDepthFailed = 11,
    /// Retransmits on connections that did not fit in the map (counted
    /// in the total all the same).
    RetransMapFull = 12,
    /// Every TCP retransmit seen (exact, whatever fit in the maps).
    Retransmits = 13,
    /// OOM kills seen.
    OomKills = 14,
    /// OOM kill events lost (ring buffer full).
    OomEventsLost = 15,
    /// Stack copies lost because the ring buffer was full.
    StackCopiesLost = 16,
    /// Stack copies shorter than asked (the stack's top was nearer).
    StackCopiesShort = 17,
    /// Samples whose user registers could not be found.
    UserRegsMissing = 18,
    /// Sum of the run-queue latencies timed, in microseconds (the sum of
    /// the latency histogram).
    RunqLatencyTotalUs = 19,
    /// User stacks walked in the kernel (`--unwind fp`) that collided with
    /// another in the stack map and were sent to userspace as addresses
    /// instead ([`STACK_IPS`]).
    UserStacksSentAside = 20,
}

impl Counter {
    /// Number of counters (the size of [`names::MAP_COUNTERS`]).
    pub const COUNT: u32 = 21;
    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Samples,
        Counter::NoStack,
        Counter::UserStackDropped,
        Counter::KernelStackDropped,
        Counter::CountMapFull,
        Counter::EventsLost,
        Counter::ForksFollowed,
        Counter::ForksDropped,
        Counter::CpuTicks,
        Counter::CpuBusyTicks,
        Counter::RunqStartFull,
        Counter::RunqDepthFailed,
        Counter::RetransMapFull,
        Counter::Retransmits,
        Counter::OomKills,
        Counter::OomEventsLost,
        Counter::StackCopiesLost,
        Counter::StackCopiesShort,
        Counter::UserRegsMissing,
        Counter::RunqLatencyTotalUs,
        Counter::UserStacksSentAside,
    ];
}

/// Buckets of the log2 run-queue latency histogram: bucket `i` counts
/// latencies `d` (in microseconds) with `log2(d) == i` (`0` and `1` both
/// fall in bucket 0), as libbpf-tools' runqlat does.
pub const LATENCY_SLOTS: u32 = 27;

/// Buckets of the run-queue depth histogram: bucket `i` counts samples that
/// found `i` tasks waiting; the last bucket counts `>= DEPTH_SLOTS - 1`.
pub const DEPTH_SLOTS: u32 = 64;

/// Settings of the kernel programs, set once before load as the read-only
/// global [`names::GLOBAL_CONFIG`]. Offsets come from the tracepoints'
/// format files and the kernel's BTF, read at run time, so the programs
/// work across kernel versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// oom:mark_victim offsets: pid, comm (`__data_loc`, 0: none), total_vm,
    /// anon_rss, file_rss, shmem_rss, uid, oom_score_adj; `u32::MAX` for a
    /// field this kernel's tracepoint lacks.
    pub oom: [u32; 8],
    /// tcp_retransmit_skb offsets: skaddr, state, sport, dport, family,
    /// saddr, daddr, saddr_v6, daddr_v6.
    pub retrans: [u32; 9],
    /// inet_sock_set_state / sock_send_length: offset of the socket pointer.
    pub sock_owner_sk: u32,
    /// Non-zero: copy user stacks for userspace unwinding instead of
    /// walking frame pointers in the kernel.
    pub copy_stacks: u8,
    /// Pages of user stack to copy (1..=STACK_COPY_MAX/STACK_PAGE).
    pub stack_pages: u8,
    /// Non-zero (`--unwind fp`): a user stack whose id collides in the
    /// stack map is sent through [`names::MAP_STACK_SAMPLES`] as
    /// addresses ([`STACK_IPS`]).
    pub send_collided: u8,
    /// Padding, zero.
    pub _pad2: u8,
    /// Offset of `stack` (the kernel stack pointer) in `task_struct`, to find
    /// the user registers of a sample taken in kernel mode.
    pub task_stack: u32,
    /// Kernel stack size (THREAD_SIZE); the user registers (`pt_regs`) are
    /// at its top.
    pub thread_size: u32,
    /// Padding, zero.
    pub _pad3: u32,
    /// tcp_retransmit_synack offsets, indexed as [`Config::retrans`]
    /// (no `state` field: a SYN-ACK is retransmitted in SYN_RECV).
    pub synack: [u32; 9],
    /// Offsets (from BTF) for reading a task's cgroups, indexed by
    /// [`cgroup_field`]; `NO_FIELD` in [`cgroup_field::TASK_CGROUPS`] when
    /// this kernel's layout could not be found.
    pub cgroup: [u32; 7],
}
const _: () = assert!(core::mem::size_of::<Config>() == 208);

/// Indexes into [`Config::cgroup`]: the chain
/// `task_struct.cgroups` -> `css_set.subsys[memory_cgrp_id]` (or
/// `css_set.dfl_cgrp`) -> `cgroup_subsys_state.cgroup` -> `cgroup.kn` ->
/// `kernfs_node.id` (the inode number of the cgroup's directory).
pub mod cgroup_field {
    /// `task_struct.pid`.
    pub const TASK_PID: usize = 0;
    /// `task_struct.cgroups` (a `css_set *`).
    pub const TASK_CGROUPS: usize = 1;
    /// `css_set.subsys[memory_cgrp_id]` (a `cgroup_subsys_state *`);
    /// `NO_FIELD` when the kernel has no memory controller.
    pub const CSS_SET_MEMCG: usize = 2;
    /// `css_set.dfl_cgrp` (a `cgroup *`, the cgroup v2 group).
    pub const CSS_SET_DFL_CGRP: usize = 3;
    /// `cgroup_subsys_state.cgroup` (a `cgroup *`).
    pub const CSS_CGROUP: usize = 4;
    /// `cgroup.kn` (a `kernfs_node *`).
    pub const CGROUP_KN: usize = 5;
    /// `kernfs_node.id` (a u64).
    pub const KN_ID: usize = 6;
}

/// A victim's cgroups as read from its `task_struct` (0: unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskCgroups {
    /// Directory inode of its memory cgroup, in the hierarchy that holds
    /// the memory controller (v1 `memory`, or v2).
    pub memcg: u64,
    /// Directory inode of its cgroup v2 group.
    pub dfl: u64,
}

/// Indexes into [`Config::oom`].
pub mod oom_field {
    /// Field names in the tracepoint record, in index order.
    pub const NAMES: [&str; 8] = [
        "pid",
        "comm",
        "total_vm",
        "anon_rss",
        "file_rss",
        "shmem_rss",
        "uid",
        "oom_score_adj",
    ];
    /// pid
    pub const PID: usize = 0;
    /// comm (`__data_loc char[]`)
    pub const COMM: usize = 1;
    /// total_vm (pages)
    pub const TOTAL_VM: usize = 2;
    /// anon_rss (pages)
    pub const ANON_RSS: usize = 3;
    /// file_rss (pages)
    pub const FILE_RSS: usize = 4;
    /// shmem_rss (pages)
    pub const SHMEM_RSS: usize = 5;
    /// uid
    pub const UID: usize = 6;
    /// oom_score_adj (short)
    pub const SCORE_ADJ: usize = 7;
}

/// Indexes into [`Config::retrans`] and [`Config::synack`].
pub mod retrans_field {
    /// Field names in the tracepoint records, in index order.
    pub const NAMES: [&str; 9] = [
        "skaddr", "state", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6",
    ];
    /// skaddr
    pub const SKADDR: usize = 0;
    /// state
    pub const STATE: usize = 1;
    /// sport (host order)
    pub const SPORT: usize = 2;
    /// dport (host order)
    pub const DPORT: usize = 3;
    /// family
    pub const FAMILY: usize = 4;
    /// saddr (4 bytes)
    pub const SADDR: usize = 5;
    /// daddr (4 bytes)
    pub const DADDR: usize = 6;
    /// saddr_v6 (16 bytes)
    pub const SADDR6: usize = 7;
    /// daddr_v6 (16 bytes)
    pub const DADDR6: usize = 8;
}

/// A field a tracepoint of this kernel lacks.
pub const NO_FIELD: u32 = u32::MAX;

/// Key of the per-connection retransmit counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RetransKey {
    /// Source address (IPv4 in the first 4 bytes).
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// TCP state at the retransmit (TCP_ESTABLISHED = 1, ...).
    pub state: u16,
}
const _: () = assert!(core::mem::size_of::<RetransKey>() == 40);

/// Per-connection retransmit record: count, first/last time, and the
/// owner of the socket where known (recorded in process context).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransValue {
    /// Retransmits on this CPU.
    pub count: u64,
    /// First one (ns, CLOCK_MONOTONIC).
    pub first_ns: u64,
    /// Last one.
    pub last_ns: u64,
    /// Owning thread group, 0 if unknown.
    pub owner_tgid: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// Owner's cgroup (v2 id), 0 if unknown.
    pub owner_cgroup: u64,
    /// Owner's thread name when it used the socket, NUL-padded.
    pub owner_comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<RetransValue>() == 56);

/// The process that last used a socket in process context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    /// Thread-group id.
    pub tgid: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// cgroup v2 id of the task.
    pub cgroup: u64,
    /// Name of the thread that used the socket.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<SockOwner>() == 32);

/// An OOM kill, as the kernel reported it (oom:mark_victim).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomEvent {
    /// When (ns, CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Victim pid.
    pub pid: u32,
    /// Victim uid (`u32::MAX` if unknown).
    pub uid: u32,
    /// Pages of virtual memory.
    pub total_vm: u64,
    /// Pages of anonymous RSS.
    pub anon_rss: u64,
    /// Pages of file RSS.
    pub file_rss: u64,
    /// Pages of shared-memory RSS.
    pub shmem_rss: u64,
    /// cgroup v2 id of the task that triggered the kill.
    pub trigger_cgroup: u64,
    /// The victim's cgroups, when the task that triggered the kill is the
    /// victim (the usual case in a memory cgroup); zero otherwise.
    pub victim: TaskCgroups,
    /// oom_score_adj.
    pub oom_score_adj: i16,
    /// Padding, zero.
    pub _pad: [u8; 6],
    /// Victim's comm, NUL-padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<OomEvent>() == 96);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers with no padding (sizes
    // asserted above); every bit pattern is a valid value.
    unsafe impl aya::Pod for super::StackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RetransKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RetransValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockOwner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OomEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TaskCgroups {}
}
