//! Scheduler latency and depth, loader side: the wakeup and switch
//! tracepoints (their layouts from tracefs), the run-queue chain (from
//! BTF) the sampler reads the depth through, and per-window deltas of the
//! per-CPU histograms. Kernel side: `profiler-ebpf/src/sched.rs`; shared
//! types: `profiler_common::sched`.

use super::kernel::Closing;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
};
use profiler_common::sched::{self, DEPTH_SLOTS, LATENCY_SLOTS};

use super::{
    CaptureError, Setup, Signal,
    kernel::{Tracepoints, delta, monotonic_ns, per_cpu, take_map},
};
use crate::{
    model::{RawProfile, Second},
    tracefs::{Format, switch_runnable_mask},
};

/// The run-queue signal.
#[derive(Default)]
pub struct Sched {
    tracepoints: Tracepoints,
    /// Name of the cfs_rq count field the depth is read from.
    depth_field: Option<&'static str>,
    maps: Option<Maps>,
    /// Cumulative per-CPU slots at the last window (`[slot][cpu]`).
    prev_lat: Vec<Vec<u64>>,
    prev_depth: Vec<Vec<u64>>,
    /// Cumulative per-CPU depth slots at the last second.
    second_depth: Vec<Vec<u64>>,
}

struct Maps {
    lat: PerCpuArray<MapData, u64>,
    depth: PerCpuArray<MapData, u64>,
    start: BpfHashMap<MapData, u32, u64>,
}

/// `[slot][cpu]` to `[cpu][slot]`.
fn transpose(by_slot: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
    let ncpu = by_slot.iter().map(Vec::len).max().unwrap_or(0);
    (0..ncpu)
        .map(|cpu| {
            by_slot
                .iter()
                .map(|v| v.get(cpu).copied().unwrap_or(0))
                .collect()
        })
        .collect()
}

const LATENCY: &str = "runqueue_latency";

impl Signal for Sched {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        setup
            .sizes
            .push((sched::RUNQ_START, setup.host().thread_map()));
        match (
            Format::read("sched", "sched_switch"),
            Format::read("sched", "sched_wakeup"),
        ) {
            (Ok(sw), Ok(wk)) => {
                let c = &mut setup.config;
                c.switch_prev_pid = sw.offset_or_none("prev_pid");
                c.switch_prev_state = sw.offset_or_none("prev_state");
                c.switch_next_pid = sw.offset_or_none("next_pid");
                c.switch_runnable_mask = switch_runnable_mask(&sw.print_fmt);
                c.wakeup_pid = wk.offset_or_none("pid");
            }
            (Err(e), _) | (_, Err(e)) => setup.unavailable(LATENCY, e),
        }
        let depth = match setup.btf {
            Ok(btf) => crate::kbtf::depth_offsets(btf).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match depth {
            Ok(d) => {
                let c = &mut setup.config;
                c.runqueue_depth = 1;
                c.task_cfs_rq = d.task_cfs_rq;
                c.cfs_rq_rq = d.cfs_rq_rq;
                c.rq_nr_runnable = d.rq_nr_runnable;
                self.depth_field = Some(d.count_field);
            }
            Err(reason) => setup.unavailable("runqueue_depth", reason),
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        self.maps = Some(Maps {
            lat: take_map(ebpf, sched::RUNQ_LAT)?,
            depth: take_map(ebpf, sched::RUNQ_DEPTH)?,
            start: take_map(ebpf, sched::RUNQ_START)?,
        });
        if setup.is_unavailable(LATENCY) {
            return Ok(());
        }
        let wakeups = [("sched", "sched_wakeup"), ("sched", "sched_wakeup_new")];
        if self
            .tracepoints
            .attach(ebpf, setup, LATENCY, sched::PROG_WAKEUP, &wakeups, &[])?
        {
            let switch = [("sched", "sched_switch")];
            self.tracepoints
                .attach(ebpf, setup, LATENCY, sched::PROG_SWITCH, &switch, &[])?;
        }
        Ok(())
    }

    fn second(&mut self, row: &mut Second) {
        let Some(maps) = self.maps.as_ref() else {
            return;
        };
        self.second_depth.resize(DEPTH_SLOTS as usize, Vec::new());
        let (mut ticks, mut weighted) = (0u64, 0u64);
        for slot in 0..DEPTH_SLOTS {
            let d: u64 = delta(
                &mut self.second_depth[slot as usize],
                per_cpu(&maps.depth, slot),
            )
            .iter()
            .sum();
            ticks += d;
            weighted += d * u64::from(slot);
        }
        row.runq_depth = if ticks == 0 {
            0.0
        } else {
            weighted as f64 / ticks as f64
        };
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        let Some(maps) = self.maps.as_mut() else {
            return Ok(());
        };
        out.depth_field = self.depth_field;
        self.prev_lat.resize(LATENCY_SLOTS as usize, Vec::new());
        self.prev_depth.resize(DEPTH_SLOTS as usize, Vec::new());
        out.runq_latency = transpose(
            (0..LATENCY_SLOTS)
                .map(|s| delta(&mut self.prev_lat[s as usize], per_cpu(&maps.lat, s)))
                .collect(),
        );
        let max_per_cpu = per_cpu(&maps.lat, LATENCY_SLOTS);
        out.runq_latency_max_us = max_per_cpu.iter().copied().max().unwrap_or(0);
        if drain && out.runq_latency_max_us > 0 {
            // The longest wait is a maximum, not a count: start it over.
            let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; max_per_cpu.len()])
                .map_err(CaptureError::Io)?;
            maps.lat
                .set(LATENCY_SLOTS, zeros, 0)
                .map_err(|source| CaptureError::Map {
                    name: sched::RUNQ_LAT.name,
                    source,
                })?;
        }
        out.runq_depth = transpose(
            (0..DEPTH_SLOTS)
                .map(|s| delta(&mut self.prev_depth[s as usize], per_cpu(&maps.depth, s)))
                .collect(),
        );
        if drain {
            // A thread's entry stays from its first wakeup to its last
            // switch (0 while it is not waiting). A wakeup time older
            // than a minute is stale: the thread went without a switch
            // the program saw.
            let now = monotonic_ns();
            let stale: Vec<u32> = maps
                .start
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, t)| *t != 0 && now.saturating_sub(*t) > 60_000_000_000)
                .map(|(tid, _)| tid)
                .collect();
            for tid in stale {
                let _ = maps.start.remove(&tid);
            }
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf, closing)
    }
}
