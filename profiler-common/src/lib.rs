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
    /// Read-only global: non-zero to sample only the tgids in [`MAP_PIDS`].
    pub const GLOBAL_FILTER: &str = "FILTER_PIDS";
    /// Read-only global: nanoseconds between two announcements of a process.
    pub const GLOBAL_REANNOUNCE_NS: &str = "REANNOUNCE_NS";
    /// Read-only global: non-zero to add the children of profiled processes
    /// to [`MAP_PIDS`] as they fork.
    pub const GLOBAL_FOLLOW_FORKS: &str = "FOLLOW_FORKS";
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
}

impl Counter {
    /// Number of counters (the size of [`names::MAP_COUNTERS`]).
    pub const COUNT: u32 = 8;
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
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers with no padding (sizes
    // asserted above); every bit pattern is a valid value.
    unsafe impl aya::Pod for super::StackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessEvent {}
}
