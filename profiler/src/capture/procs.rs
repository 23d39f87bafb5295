//! Process tracking, loader side: reads the memory maps of each process
//! the sampler announces (first sample, then each second while it is
//! sampled), keeps the pid filter, and follows forks. Kernel side:
//! `profiler-ebpf/src/procs.rs`; shared types: `profiler_common::procs`.

use super::kernel::Closing;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::procs::{self, ProcessEvent};

use super::{
    CaptureError, Setup, Signal,
    kernel::{Ring, Tracepoints, drain_ring, take_map, take_ring},
};
use crate::{model::RawProfile, procs::ProcessTable, tracefs::Format};

/// The process-tracking signal.
#[derive(Default)]
pub struct Tracking {
    pids: Option<BpfHashMap<MapData, u32, u8>>,
    seen: Option<BpfHashMap<MapData, u32, u64>>,
    events: Option<Ring>,
    tracepoints: Tracepoints,
    follow_forks: bool,
}

impl Tracking {
    fn pids(&mut self) -> Result<&mut BpfHashMap<MapData, u32, u8>, CaptureError> {
        self.pids.as_mut().ok_or(CaptureError::Map {
            name: procs::PIDS.name,
            source: aya::maps::MapError::InvalidName {
                name: procs::PIDS.name.into(),
            },
        })
    }

    /// Adds a process to the pid filter.
    pub fn add_pid(&mut self, pid: u32) -> Result<(), CaptureError> {
        self.pids()?
            .insert(pid, 1, 0)
            .map_err(|source| CaptureError::Map {
                name: procs::PIDS.name,
                source,
            })
    }

    /// Removes a process from the pid filter.
    pub fn remove_pid(&mut self, pid: u32) -> Result<(), CaptureError> {
        self.pids()?
            .remove(&pid)
            .map_err(|source| CaptureError::Map {
                name: procs::PIDS.name,
                source,
            })
    }
}

impl Signal for Tracking {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        // Processes announced: at most the host's threads.
        setup.sizes.push((procs::SEEN, setup.host().thread_map()));
        let c = &mut setup.config;
        c.filter_pids = setup.cfg.filter.into();
        c.reannounce_ns = procs::REANNOUNCE_NS;
        self.follow_forks = setup.cfg.follow_forks;
        if !self.follow_forks {
            return;
        }
        match Format::read("sched", "sched_process_fork") {
            Ok(f) => {
                c.follow_forks = 1;
                c.fork_child_pid = f.offset_or_none("child_pid");
            }
            Err(reason) => {
                self.follow_forks = false;
                setup.unavailable("fork_following", reason);
            }
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        self.pids = Some(take_map(ebpf, procs::PIDS)?);
        self.seen = Some(take_map(ebpf, procs::SEEN)?);
        self.events = Some(take_ring(ebpf, procs::EVENTS)?);
        for &pid in &setup.cfg.pids {
            self.add_pid(pid)?;
        }
        if self.follow_forks {
            // Refused: listed as unavailable, the capture goes on with
            // the processes given.
            self.tracepoints.attach(
                ebpf,
                setup,
                "fork_following",
                procs::PROG_FORK,
                &[("sched", "sched_process_fork")],
                &[],
            )?;
        }
        Ok(())
    }

    fn rings(&self) -> Vec<&Ring> {
        self.events.iter().collect()
    }

    fn drain(&mut self, procs: &mut ProcessTable) {
        if let Some(ring) = self.events.as_mut() {
            drain_ring(ring, |ev: ProcessEvent| procs.observe(ev.tgid));
        }
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        _out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        // Announcements of processes that are gone.
        if drain && let Some(seen) = self.seen.as_mut() {
            let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
            let stale: Vec<u32> = seen
                .keys()
                .filter_map(Result::ok)
                .filter(|&p| !alive(p))
                .collect();
            for pid in stale {
                // Gone already when another window pruned it: nothing lost.
                let _ = seen.remove(&pid);
            }
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf, closing)
    }
}
