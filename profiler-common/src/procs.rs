//! Process tracking: the sampler announces each process when it is first
//! sampled (and again while it keeps being sampled), so that userspace
//! reads its memory maps while it lives; with `--follow-forks`, children
//! of profiled processes join the pid filter as they fork.

use crate::{MapDef, ProgDef};

/// Tracepoint program (sched_process_fork) that follows forks.
pub const PROG_FORK: ProgDef = ProgDef {
    name: "follow_fork",
};
/// Hash map of the thread-group ids to profile (when filtering).
pub const PIDS: MapDef = MapDef {
    name: "PIDS",
    entries: 8192,
};
/// Hash map of thread-group ids announced to userspace -> when (ns).
pub const SEEN: MapDef = MapDef {
    name: "SEEN",
    entries: 32768,
};
/// Ring buffer of [`ProcessEvent`].
pub const EVENTS: MapDef = MapDef {
    name: "EVENTS",
    entries: 64 * 1024,
};

/// How often a process that keeps being sampled is announced again, so
/// that its maps are re-read (JIT regions and libraries mapped later).
pub const REANNOUNCE_NS: u64 = 1_000_000_000;

/// An event sent to userspace through the [`EVENTS`] ring buffer.
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

crate::pod!(ProcessEvent);
