//! Scheduler latency and depth: how long runnable tasks wait for a CPU
//! (sched_wakeup / sched_switch, a log2 histogram per CPU) and how many
//! wait at each cpu-clock tick (read in the sampler from the CPU's run
//! queue, offsets from BTF).

use crate::{MapDef, ProgDef};

/// Buckets of the log2 run-queue latency histogram: bucket `i` counts
/// latencies `d` (in microseconds) with `log2(d) == i` (`0` and `1` both
/// fall in bucket 0), as libbpf-tools' runqlat does.
pub const LATENCY_SLOTS: u32 = 27;

/// Buckets of the run-queue depth histogram: bucket `i` counts samples that
/// found `i` tasks waiting; the last bucket counts `>= DEPTH_SLOTS - 1`.
pub const DEPTH_SLOTS: u32 = 64;

/// Tracepoint program of sched_wakeup and sched_wakeup_new.
pub const PROG_WAKEUP: ProgDef = ProgDef {
    name: "sched_wakeup",
};
/// sched_switch program.
pub const PROG_SWITCH: ProgDef = ProgDef {
    name: "sched_switch",
};
/// Per-CPU array: run-queue latency histogram ([`LATENCY_SLOTS`] buckets,
/// then the longest wait in microseconds).
pub const RUNQ_LAT: MapDef = MapDef {
    name: "RUNQ_LAT",
    entries: LATENCY_SLOTS + 1,
};
/// Per-CPU array: run-queue depth histogram ([`DEPTH_SLOTS`]).
pub const RUNQ_DEPTH: MapDef = MapDef {
    name: "RUNQ_DEPTH",
    entries: DEPTH_SLOTS,
};
/// Hash map tid -> time it became runnable, 0 when it is not waiting:
/// an entry stays from a thread's first wakeup to its exit.
pub const RUNQ_START: MapDef = MapDef {
    name: "RUNQ_START",
    entries: 32768,
};
