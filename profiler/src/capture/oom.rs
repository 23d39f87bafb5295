//! OOM kills, loader side: the mark_victim tracepoint (and, where the
//! kernel passes the victim's task, its raw tracepoint for the victim's
//! cgroups), each kill read off the ring with the victim's cgroup path
//! resolved at once (a dead container's cgroup goes soon). Kernel side:
//! `profiler-ebpf/src/oom.rs`; shared types: `profiler_common::oom`.

use super::kernel::Closing;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{RawTracePoint, raw_trace_point::RawTracePointLinkId},
};
use profiler_common::oom::{self, OomEvent, TaskCgroups, field};

use super::{
    CaptureError, Setup, Signal,
    kernel::{Ring, Tracepoints, drain_ring, program, take_map, take_ring},
};
use crate::{
    model::{OomKill, RawProfile},
    procs::ProcessTable,
    tracefs::Format,
};

const KILLS: &str = "oom_kills";
const IN_KERNEL: &str = "oom_victim_cgroup_in_kernel";

/// The OOM-kill signal.
#[derive(Default)]
pub struct Oom {
    tracepoints: Tracepoints,
    events: Option<Ring>,
    /// Whether mark_victim's first argument is the victim's task_struct.
    task_arg: bool,
    /// The raw tracepoint on mark_victim, where it is attached.
    task_link: Option<RawTracePointLinkId>,
    /// Victim pid -> cgroups, filled by that raw tracepoint.
    cgroups: Option<BpfHashMap<MapData, u32, TaskCgroups>>,
    kills: Vec<OomKill>,
}

impl Signal for Oom {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        match Format::read("oom", "mark_victim") {
            Ok(f) => setup.config.oom = f.offsets(&field::NAMES),
            Err(reason) => setup.unavailable(KILLS, reason),
        }
        if let Ok(btf) = setup.btf {
            match crate::kbtf::cgroup_offsets(btf) {
                Ok(offsets) => {
                    setup.config.cgroup = offsets;
                    self.task_arg = btf.tracepoint_arg_is("mark_victim", 0, "task_struct");
                }
                Err(reason) => setup.unavailable(
                    IN_KERNEL,
                    format!("{reason}; the victim's cgroup is read from /proc instead"),
                ),
            }
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        self.events = Some(take_ring(ebpf, oom::OOM_EVENTS)?);
        if setup.is_unavailable(KILLS) {
            return Ok(());
        }
        // Before the tracepoint program, so that it runs first: the
        // victim's cgroups, from the task the kernel passes (6.8+). Where
        // it cannot run, the tracepoint program reads them when the victim
        // is the task that ran out of memory, and /proc is the last resort.
        if self.task_arg {
            let prog: &mut RawTracePoint = program(ebpf, oom::PROG_OOM_TASK)?;
            let t = std::time::Instant::now();
            let loaded = prog.load();
            setup.verifying += t.elapsed();
            match loaded.and_then(|()| prog.attach("mark_victim")) {
                Ok(link) => {
                    self.task_link = Some(link);
                    self.cgroups = Some(take_map(ebpf, oom::OOM_CGROUPS)?);
                }
                Err(e) => setup.unavailable(
                    IN_KERNEL,
                    format!(
                        "raw tracepoint mark_victim: {e}; the victim's cgroup comes from \
                         the killing task or /proc instead"
                    ),
                ),
            }
        }
        self.tracepoints.attach(
            ebpf,
            setup,
            KILLS,
            oom::PROG_OOM,
            &[("oom", "mark_victim")],
            &[],
        )?;
        Ok(())
    }

    fn rings(&self) -> Vec<&Ring> {
        self.events.iter().collect()
    }

    fn drain(&mut self, _procs: &mut ProcessTable) {
        let Some(ring) = self.events.as_mut() else {
            return;
        };
        let (cgroups, kills) = (&mut self.cgroups, &mut self.kills);
        drain_ring(ring, |event: OomEvent| {
            // The kernel's record of the victim's cgroups first (read now:
            // a dead container's cgroup goes soon), then /proc.
            let from_task = cgroups
                .as_mut()
                .and_then(|m| {
                    let v = m.get(&event.pid, 0).ok();
                    // Not there (the raw tracepoint missed it): nothing to
                    // remove.
                    let _ = m.remove(&event.pid);
                    v
                })
                .unwrap_or(event.victim);
            let victim_cgroup = crate::cgroups::memory_path_of_id(from_task.memcg)
                .or_else(|| crate::cgroups::path_of_id(from_task.dfl))
                .or_else(|| crate::cgroups::memory_cgroup_of(event.pid));
            kills.push(OomKill {
                event,
                victim_cgroup,
            });
        });
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        _drain: bool,
    ) -> Result<(), CaptureError> {
        out.oom_kills = std::mem::take(&mut self.kills);
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        let mut errors = Vec::new();
        if let Some(link) = self.task_link.take() {
            let result = program::<RawTracePoint>(ebpf, oom::PROG_OOM_TASK).and_then(|prog| {
                prog.take_link(link)
                    .map_err(|source| CaptureError::Program {
                        what: format!("detach program {}", oom::PROG_OOM_TASK.name),
                        source,
                    })
            });
            match result {
                Ok(link) => closing.add(link),
                Err(e) => errors.push(e),
            }
        }
        errors.extend(self.tracepoints.detach(ebpf, closing));
        errors
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::oom::field;

    #[test]
    fn field_names_match_their_indexes() {
        assert_eq!(field::NAMES[field::PID], "pid");
        assert_eq!(field::NAMES[field::COMM], "comm");
        assert_eq!(field::NAMES[field::SCORE_ADJ], "oom_score_adj");
    }
}
