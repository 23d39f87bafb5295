//! Event loops: every thread that waits in `epoll_wait`, `epoll_pwait` or
//! `epoll_pwait2` (Node's main and worker threads, nginx, Redis, asyncio)
//! has its turns timed in the kernel, from the return of one wait to the
//! next call: a count, a histogram and the longest ([`LoopThread`]); a
//! turn longer than the stall threshold is sent as a [`Stall`]. CPU
//! samples and off-CPU blocks taken inside a turn carry their time, so
//! that userspace keeps those of the stalls.

use crate::{COMM_LEN, MapDef, ProgDef};

/// sys_exit_epoll_* program: a turn starts.
pub const PROG_EXIT: ProgDef = ProgDef { name: "loop_exit" };
/// sys_enter_epoll_* program: the turn ends.
pub const PROG_ENTER: ProgDef = ProgDef { name: "loop_enter" };

/// The wait syscalls, by tracepoint name suffix; `epoll_pwait2` is
/// 5.11+.
pub const WAITS: [&str; 3] = ["epoll_wait", "epoll_pwait", "epoll_pwait2"];

/// Hash map tid -> [`LoopThread`].
pub const LOOPS: MapDef = MapDef {
    name: "LOOPS",
    entries: 4096,
};
/// Ring buffer of [`Stall`].
pub const STALLS: MapDef = MapDef {
    name: "STALLS",
    entries: 256 * 1024,
};

/// Default `--stall-threshold`: 50 ms.
pub const STALL_NS: u64 = 50_000_000;

/// Sub-buckets per power of two in the turn histogram.
pub const SUB_BUCKETS: u32 = 4;
/// Buckets of the turn histogram: 28 powers of two of microseconds (up
/// to 2^28 us, 4.5 minutes), [`SUB_BUCKETS`] each; the last takes longer.
pub const TURN_SLOTS: u32 = 28 * SUB_BUCKETS;

/// The histogram bucket of a turn of `us` microseconds: bucket
/// `4 * log2(us) + the next two bits`, so each is a quarter of its power
/// of two wide (25% resolution) from 4 us up.
#[inline(always)]
pub const fn slot_of(us: u64) -> u32 {
    if us < 2 {
        return 0;
    }
    let log = 63 - us.leading_zeros();
    // Below 4 us an octave is not split.
    let sub = if log >= 2 { (us >> (log - 2)) & 3 } else { 0 };
    let slot = log * SUB_BUCKETS + sub as u32;
    if slot >= TURN_SLOTS {
        TURN_SLOTS - 1
    } else {
        slot
    }
}

/// The upper bound (exclusive, microseconds) of bucket `slot`.
pub const fn slot_upper_us(slot: u32) -> u64 {
    let log = slot / SUB_BUCKETS;
    if log < 2 {
        return 2 << log;
    }
    let sub = (slot % SUB_BUCKETS) as u64;
    // (4 + sub + 1) / 4 * 2^log
    ((4 + sub + 1) << log) / 4
}

/// One loop thread's turns ([`LOOPS`]); written only by the thread's own
/// syscalls, so without races.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopThread {
    /// Thread-group id.
    pub tgid: u32,
    /// Non-zero between the return of a wait and the next call.
    pub in_turn: u32,
    /// When the current turn started (ktime ns).
    pub turn_start: u64,
    /// Turns ended.
    pub turns: u64,
    /// Nanoseconds in ended turns.
    pub total_ns: u64,
    /// Longest ended turn (ns).
    pub max_ns: u64,
    /// Turns per bucket ([`slot_of`]).
    pub hist: [u32; TURN_SLOTS as usize],
    /// Name of the thread.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<LoopThread>() == 40 + 4 * TURN_SLOTS as usize + 16);

/// A turn longer than the threshold ([`STALLS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Thread-group id.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// Its start and end (ktime ns).
    pub start_ns: u64,
    /// End.
    pub end_ns: u64,
    /// Name of the thread.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<Stall>() == 40);

crate::pod!(LoopThread, Stall);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_a_quarter_octave_wide() {
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(4), 8);
        assert_eq!(slot_of(5), 9);
        assert_eq!(slot_of(7), 11);
        assert_eq!(slot_of(8), 12);
        for us in [3u64, 10, 100, 999, 50_000, 123_456, 10_000_000] {
            let s = slot_of(us);
            assert!(us < slot_upper_us(s), "{us} in {s}");
            assert!(s == 0 || us >= slot_upper_us(s - 1), "{us} in {s}");
        }
        assert_eq!(slot_of(u64::MAX), TURN_SLOTS - 1);
    }
}
