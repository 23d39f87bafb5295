//! The per-CPU counters of what the kernel programs saw and of everything
//! they could not record: counted here, never dropped silently.

use crate::MapDef;

/// Per-CPU array of [`Counter`] values.
pub const COUNTERS: MapDef = MapDef {
    name: "COUNTERS",
    entries: Counter::COUNT,
};

/// Indexes of the per-CPU counters in [`COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Process and socket-owner notifications lost (ring buffer or
    /// seen-map full).
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
    /// instead ([`crate::stacks::STACK_IPS`]).
    UserStacksSentAside = 20,
    /// Threads whose time off the CPU was not timed: the start map was
    /// full.
    OffcpuStartFull = 21,
    /// Off-CPU nanoseconds not summed: the off-CPU count map was full.
    OffcpuLostNs = 22,
    /// Off-CPU stacks (user or kernel) dropped: the off-CPU stack map was
    /// full or two stacks collided in it.
    OffcpuStackDropped = 23,
    /// Threads waiting in epoll whose turns were not timed: the loop map
    /// was full.
    LoopsFull = 24,
    /// Stalls not reported: their ring was full.
    StallsLost = 25,
    /// Off-CPU blocks inside loop turns not reported: their ring was full.
    LoopBlocksLost = 26,
    /// Accepted connections not followed: the connection map was full.
    ConnsFull = 27,
    /// Request or response starts not reported: their ring was full.
    RequestEventsLost = 28,
    /// Threads that left the CPU and were timed (off-CPU).
    OffcpuSwitches = 29,
    /// Of those, user stacks walked (not found in the stack cache).
    OffcpuUserWalks = 30,
    /// Of those, kernel stacks walked.
    OffcpuKernelWalks = 31,
}

impl Counter {
    /// Number of counters (the size of [`COUNTERS`]).
    pub const COUNT: u32 = 32;
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
        Counter::OffcpuStartFull,
        Counter::OffcpuLostNs,
        Counter::OffcpuStackDropped,
        Counter::LoopsFull,
        Counter::StallsLost,
        Counter::LoopBlocksLost,
        Counter::ConnsFull,
        Counter::RequestEventsLost,
        Counter::OffcpuSwitches,
        Counter::OffcpuUserWalks,
        Counter::OffcpuKernelWalks,
    ];

    /// Stable name, used in reports and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Samples => "samples",
            Counter::NoStack => "samples_without_stack",
            Counter::UserStackDropped => "user_stacks_dropped",
            Counter::KernelStackDropped => "kernel_stacks_dropped",
            Counter::CountMapFull => "samples_lost_count_map_full",
            Counter::EventsLost => "process_events_lost",
            Counter::ForksFollowed => "forks_followed",
            Counter::ForksDropped => "forks_not_followed",
            Counter::CpuTicks => "cpu_ticks",
            Counter::CpuBusyTicks => "cpu_busy_ticks",
            Counter::RunqStartFull => "runqueue_wakeups_untimed_map_full",
            Counter::RunqDepthFailed => "runqueue_depth_reads_failed",
            Counter::RetransMapFull => "retransmit_connections_not_kept_map_full",
            Counter::Retransmits => "tcp_retransmits",
            Counter::OomKills => "oom_kills",
            Counter::OomEventsLost => "oom_events_lost",
            Counter::StackCopiesLost => "stack_copies_lost_ring_full",
            Counter::StackCopiesShort => "stack_copies_short",
            Counter::UserRegsMissing => "samples_without_user_registers",
            Counter::RunqLatencyTotalUs => "runqueue_latency_total_us",
            Counter::UserStacksSentAside => "user_stacks_sent_aside_on_collision",
            Counter::OffcpuStartFull => "offcpu_blocks_untimed_map_full",
            Counter::OffcpuLostNs => "offcpu_ns_lost_count_map_full",
            Counter::OffcpuStackDropped => "offcpu_stacks_dropped",
            Counter::LoopsFull => "event_loops_untimed_map_full",
            Counter::StallsLost => "stalls_lost_ring_full",
            Counter::LoopBlocksLost => "stall_blocks_lost_ring_full",
            Counter::ConnsFull => "connections_not_followed_map_full",
            Counter::RequestEventsLost => "request_events_lost_ring_full",
            Counter::OffcpuSwitches => "offcpu_switches_timed",
            Counter::OffcpuUserWalks => "offcpu_user_stacks_walked",
            Counter::OffcpuKernelWalks => "offcpu_kernel_stacks_walked",
        }
    }
}

// Every counter is listed once, at its index.
const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct() {
        for a in Counter::ALL {
            for b in Counter::ALL {
                assert!(a == b || a.name() != b.name(), "{a:?} and {b:?}");
            }
        }
    }
}
