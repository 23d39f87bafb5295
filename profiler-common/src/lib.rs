//! Types shared by the kernel programs (`profiler-ebpf`) and the userspace
//! loader (`profiler`), one module per signal:
//!
//! | signal | module | kernel programs | loader |
//! |---|---|---|---|
//! | stack sampling, CPU ticks | [`stacks`] | `profiler-ebpf/src/stacks.rs` | `profiler/src/capture/stacks.rs` |
//! | process tracking, fork following | [`procs`] | `profiler-ebpf/src/procs.rs` | `profiler/src/capture/procs.rs` |
//! | run-queue latency and depth | [`sched`] | `profiler-ebpf/src/sched.rs` | `profiler/src/capture/sched.rs` |
//! | TCP retransmits and socket owners | [`tcp`] | `profiler-ebpf/src/tcp.rs` | `profiler/src/capture/tcp.rs` |
//! | event-loop turns and stalls | [`loops`] | `profiler-ebpf/src/loops.rs` | `profiler/src/capture/loops.rs` |
//! | off-CPU time | [`offcpu`] | `profiler-ebpf/src/offcpu.rs` | `profiler/src/capture/offcpu.rs` |
//! | requests (HTTP/1.x RED) | [`requests`] | `profiler-ebpf/src/requests.rs` | `profiler/src/capture/requests.rs` |
//! | OOM kills | [`oom`] | `profiler-ebpf/src/oom.rs` | `profiler/src/capture/oom.rs` |
//! | counted events | none | none (perf events) | `profiler/src/capture/counted.rs` |
//!
//! plus what every signal uses: the programs' settings ([`config`]) and the
//! counters of what they could not record ([`counters`]).
//!
//! Every type here crosses the kernel/user boundary through a BPF map, so each
//! is `#[repr(C)]`, `Copy`, built from fixed-width integers, and has no
//! implicit padding (a compile-time size check per struct guards that).
#![no_std]

pub mod config;
pub mod counters;
pub mod loops;
pub mod offcpu;
pub mod oom;
pub mod procs;
pub mod requests;
pub mod sched;
pub mod stacks;
pub mod tcp;

/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// A field a tracepoint of this kernel lacks.
pub const NO_FIELD: u32 = u32::MAX;

/// A map of the eBPF object: its name, which is the name of the static
/// that declares it (the kernel side checks that at compile time), and
/// its default size (entries, or bytes for a ring buffer), which the
/// loader may change before load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// Name in the object.
    pub name: &'static str,
    /// Default entries (bytes for a ring buffer).
    pub entries: u32,
}

/// A program of the eBPF object: its name is the name of the function
/// that defines it (checked at compile time on the kernel side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgDef {
    /// Name in the object.
    pub name: &'static str,
}

/// `a == b`, in a `const` context (the compile-time name checks).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Marks shared structs as plain data for aya's map API (userspace).
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: a #[repr(C)] struct of integers with no padding (its
            // size is asserted next to it); every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn const_string_equality() {
        assert!(str_eq("STACKS", "STACKS"));
        assert!(!str_eq("STACKS", "STACK"));
        assert!(!str_eq("STACKS", "STOCKS"));
    }
}
