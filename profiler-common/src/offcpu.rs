//! Off-CPU time: at sched_switch a thread that leaves the CPU has its
//! stacks taken and its start kept ([`OFFCPU_START`]); when it runs again
//! the time away is added, in the kernel, to its key in [`OFFCPU_COUNTS`],
//! split at its wakeup into the time it was blocked and the time it then
//! waited, runnable, for a CPU. Userspace decides each key's cause from
//! its [`class`], the syscall it was in and its kernel frames.

use crate::{COMM_LEN, MapDef, ProgDef};

/// sched_switch program: the previous task leaves, the next returns.
pub const PROG_SWITCH: ProgDef = ProgDef {
    name: "offcpu_switch",
};
/// sched_wakeup(_new) program: a blocked task becomes runnable.
pub const PROG_WAKEUP: ProgDef = ProgDef {
    name: "offcpu_wakeup",
};

/// Stack-trace map of the stacks taken at switch-out (apart from the
/// sampler's, which windows empty on their own schedule).
pub const OFFCPU_STACKS: MapDef = MapDef {
    name: "OFFCPU_STACKS",
    entries: 16 * 1024,
};
/// Hash map tid -> [`OffStart`]: threads off the CPU now.
pub const OFFCPU_START: MapDef = MapDef {
    name: "OFFCPU_START",
    entries: 32 * 1024,
};
/// Per-CPU hash map [`OffSumKey`] -> [`OffValue`]: the time away of
/// each key, per span of time slices; userspace empties it a few times a
/// second.
pub const OFFCPU_COUNTS: MapDef = MapDef {
    name: "OFFCPU_COUNTS",
    entries: 16 * 1024,
};

/// Ring buffer of [`TurnBlock`]: blocks of threads inside an event-loop
/// turn ([`crate::loops`]).
pub const LOOP_BLOCKS: MapDef = MapDef {
    name: "LOOP_BLOCKS",
    entries: 256 * 1024,
};

/// LRU hash map [`SwitchSite`] -> [`CachedStacks`]: a thread that
/// leaves the CPU again from the same instruction, stack pointer and
/// frame pointer does so from the same user stack (two call chains would
/// have to reach the same instruction at the same depth with the same
/// frame pointer), so its stacks (the user one deep in Node.js: several
/// µs) are walked again only once [`STACK_TTL_NS`] has passed. One
/// lookup finds both. A sleep is keyed by its syscall and first argument
/// (file descriptor, futex address) too, and sleeps at the same place in
/// the kernel; a preemption, anywhere in user code, by its caller's
/// frame as well (its saved frame pointer and return address), which
/// two callers of one function at the same depth do not share.
pub const STACK_CACHE: MapDef = MapDef {
    name: "STACK_CACHE",
    entries: 16 * 1024,
};

/// How long cached stacks are reused.
pub const STACK_TTL_NS: u64 = 1_000_000_000;

/// Key of [`STACK_CACHE`]: where and how a thread left the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SwitchSite {
    /// Thread id.
    pub tid: u32,
    /// The syscall ([`NO_SYSCALL`] when preempted in user code).
    pub syscall: i32,
    /// Its first argument (0 outside a syscall).
    pub arg0: u64,
    /// User instruction pointer (after the syscall instruction).
    pub ip: u64,
    /// User stack pointer.
    pub sp: u64,
    /// User frame pointer (or whatever the register holds in code built
    /// without them).
    pub bp: u64,
    /// Preempted: the two words the frame pointer points at (the
    /// caller's frame pointer and the return address into it); 0 for a
    /// sleep.
    pub caller: [u64; 2],
    /// Its [`class`]: a sleep, an uninterruptible one and a preemption
    /// in the same place are at different places in the kernel.
    pub class: u32,
    /// Padding, zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SwitchSite>() == 64);

/// Value of [`STACK_CACHE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedStacks {
    /// User stack id in [`OFFCPU_STACKS`].
    pub user_stack_id: i32,
    /// Kernel stack id in [`OFFCPU_STACKS`].
    pub kernel_stack_id: i32,
    /// Trusted until (ktime ns).
    pub until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CachedStacks>() == 16);

/// How a thread left the CPU, and which part of its time away a key
/// counts ([`OffKey::class`]).
pub mod class {
    /// Blocked, interruptible (state S): waiting for an event.
    pub const SLEEPING: u8 = 0;
    /// Blocked, uninterruptible (state D): mostly I/O.
    pub const UNINTERRUPTIBLE: u8 = 1;
    /// Preempted while runnable: waiting for a CPU.
    pub const PREEMPTED: u8 = 2;
    /// Left the CPU runnable while its CFS group (or an ancestor) was
    /// throttled: its cgroup's CPU quota was spent.
    pub const THROTTLED: u8 = 3;
    /// The part of a block after its wakeup: runnable, waiting for a CPU.
    pub const WOKEN_WAITING: u8 = 4;
}

/// Default `--off-cpu-min`: 1 ms.
pub const MIN_NS: u64 = 1_000_000;

/// [`OffKey::user_stack_id`] of blocks shorter than `--off-cpu-min`:
/// counted for the per-cause totals, left out of the flame graph.
pub const SHORT: i32 = i32::MIN;

/// [`OffKey::kernel_stack_id`] of a thread preempted or throttled: its
/// kernel stack is the scheduler's own way in (an interrupt, or the
/// return to user mode), the same for every such switch, so it is not
/// walked (its cause is `cpu` or `throttled` whatever the frames).
pub const NOT_WALKED: i32 = i32::MIN + 1;

/// [`OffKey::syscall`] of a thread that was not in a syscall.
pub const NO_SYSCALL: i32 = -1;

/// Key of the in-kernel sum.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffKey {
    /// Thread-group id.
    pub tgid: u32,
    /// User stack id in [`OFFCPU_STACKS`], a negative errno, or [`SHORT`].
    pub user_stack_id: i32,
    /// Kernel stack id in [`OFFCPU_STACKS`], or a negative errno.
    pub kernel_stack_id: i32,
    /// The syscall the thread was in (x86_64 numbers), or
    /// [`NO_SYSCALL`]; after an exception (a page fault) the CPU's error
    /// code, which only the kernel frames tell apart.
    pub syscall: i32,
    /// One of [`class`].
    pub class: u8,
    /// For futex(2), the command (`op & 0x7f`); else 0.
    pub detail: u8,
    /// Padding, zero.
    pub _pad: [u8; 2],
    /// Name of the thread, NUL-padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<OffKey>() == 36);

/// Key of [`OFFCPU_COUNTS`]: what was away, and when. A block's time
/// away is one interval: it is summed with the first and last time slice
/// it covers ([`crate::stacks::TIME_SLICE_NS`] on the monotonic clock,
/// wrapping), so that userspace spreads it over the slices between them
/// and any range of the capture folds on its own. Short blocks, inside
/// one slice, still sum into one entry per slice.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffSumKey {
    /// What was away.
    pub key: OffKey,
    /// The slice the interval starts in.
    pub first: u32,
    /// The slice it ends in.
    pub last: u32,
}
const _: () = assert!(core::mem::size_of::<OffSumKey>() == 44);

/// Value of [`OFFCPU_COUNTS`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffValue {
    /// Nanoseconds off the CPU.
    pub ns: u64,
    /// Blocks.
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<OffValue>() == 16);

/// Value of [`OFFCPU_START`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffStart {
    /// When it left the CPU (ktime ns).
    pub start_ns: u64,
    /// When it was woken (0: not yet, or preempted).
    pub woken_ns: u64,
    /// Its key, stacks taken as it left.
    pub key: OffKey,
    /// Padding, zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OffStart>() == 56);

/// A block of a thread inside an event-loop turn, whatever its length:
/// the stalls' share of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnBlock {
    /// Thread id.
    pub tid: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// When it left the CPU (ktime ns).
    pub start_ns: u64,
    /// When it was woken (0: preempted, or not known).
    pub woken_ns: u64,
    /// When it ran again.
    pub end_ns: u64,
    /// Its key (stacks always kept).
    pub key: OffKey,
    /// Padding, zero.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<TurnBlock>() == 72);

crate::pod!(
    OffKey,
    OffSumKey,
    OffValue,
    OffStart,
    TurnBlock,
    SwitchSite,
    CachedStacks
);
