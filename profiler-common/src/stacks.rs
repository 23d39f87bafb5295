//! Stack sampling: a perf event on each CPU's cpu-clock takes the sampled
//! task's stacks (kernel walk in the kernel; user walk by frame pointer in
//! the kernel, or a copy of the user stack for CFI unwinding in
//! userspace), and counts every tick for CPU utilization.

use crate::{COMM_LEN, MapDef, ProgDef};

/// Deepest stack the kernel's stack-trace map records
/// (`PERF_MAX_STACK_DEPTH`), and the most addresses of a user stack sent
/// as [`STACK_IPS`].
pub const MAX_STACK_DEPTH: usize = 127;

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
/// [`StackSample::flags`]: taken in an event-loop turn of its thread
/// (`crate::loops`): kept with its time, for the stalls.
pub const STACK_IN_TURN: u32 = 4;

/// perf_event program sampling stacks on every CPU.
pub const PROG_SAMPLE: ProgDef = ProgDef {
    name: "sample_stack",
};

/// Stack-trace map (`BPF_MAP_TYPE_STACK_TRACE`): distinct stacks, user and
/// kernel.
pub const STACKS: MapDef = MapDef {
    name: "STACKS",
    entries: 16 * 1024,
};
/// Per-CPU hash map [`StackKey`] -> sample count.
pub const COUNTS: MapDef = MapDef {
    name: "COUNTS",
    entries: 40 * 1024,
};
/// Array of one [`StackSample`] per possible CPU, where samples are built
/// (too big for the BPF stack and for a per-CPU map's 32 KiB values).
pub const SCRATCH: MapDef = MapDef {
    name: "SCRATCH",
    entries: 1024,
};
/// Ring buffer of [`StackSample`] (userspace unwinding, and collided
/// frame-pointer stacks); resized by the loader for the rate and CPUs.
pub const STACK_SAMPLES: MapDef = MapDef {
    name: "STACK_SAMPLES",
    entries: 4 * 1024 * 1024,
};
/// LRU hash map thread (pid_tgid) -> [address, until ns]: the first page
/// above a thread's sp that failed to read in a recent copy.
pub const STACK_TOPS: MapDef = MapDef {
    name: "STACK_TOPS",
    entries: 8192,
};

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
    /// When: the monotonic clock in [`TIME_SLICE_NS`] slices, wrapping
    /// (userspace subtracts the capture's first slice, wrapping too).
    pub slice: u32,
}
const _: () = assert!(core::mem::size_of::<StackKey>() == 32);

/// Width of the time slices samples are counted in: a sample's time is
/// kept to this, so that any range of the capture can be folded alone
/// (the report's heat map, `profiler diff` of two ranges).
pub const TIME_SLICE_NS: u64 = 10_000_000;

/// The first and last time slice (wrapping) an interval `[from, to)` of
/// ktime ns covers; `to` > `from`.
#[inline(always)]
pub const fn slices_of(from: u64, to: u64) -> (u32, u32) {
    (
        (from / TIME_SLICE_NS) as u32,
        (to.saturating_sub(1) / TIME_SLICE_NS) as u32,
    )
}

/// A sample for userspace unwinding (`--unwind dwarf|auto`): the user
/// registers the unwinder starts from and a copy of the user stack,
/// sent through [`STACK_SAMPLES`].
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
    /// at the configured size; [`STACK_IPS`] for addresses.
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
    /// When it was taken (ktime ns).
    pub time_ns: u64,
    /// Name of the thread.
    pub comm: [u8; COMM_LEN],
    /// The stack copy.
    pub stack: [u8; STACK_COPY_MAX],
}
const _: () = assert!(core::mem::size_of::<StackSample>() == 80 + STACK_COPY_MAX);

/// Bytes of a [`StackSample`] before its stack copy: what every record of
/// the ring holds at least.
pub const SAMPLE_HEADER_BYTES: usize = core::mem::size_of::<StackSample>() - STACK_COPY_MAX;

crate::pod!(StackKey);
