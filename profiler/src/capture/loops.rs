//! Event loops, loader side: the epoll wait syscalls' enter and exit
//! tracepoints, the stalls read off their ring, and at each window the
//! loop threads' turn counts and histograms. Kernel side:
//! `profiler-ebpf/src/loops.rs`; shared types: `profiler_common::loops`.

use super::kernel::Closing;
use std::collections::HashMap;

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::loops::{self, LoopThread, Stall, WAITS};

use super::{
    CaptureError, Setup, Signal,
    kernel::{Ring, Tracepoints, drain_ring, take_map, take_ring},
};
use crate::{
    model::{LoopThreadRaw, RawProfile, Second},
    procs::ProcessTable,
    tracefs::Format,
};

const LOOPS: &str = "event_loops";
/// Most stalls kept per window.
const MAX_STALLS: usize = 100_000;

/// The event-loop signal.
#[derive(Default)]
pub struct Loops {
    on: bool,
    tracepoints: Tracepoints,
    ring: Option<Ring>,
    map: Option<BpfHashMap<MapData, u32, LoopThread>>,
    stalls: Vec<Stall>,
    /// Stalls already counted in a [`Signal::second`].
    seen: usize,
    /// Each thread's cumulative record at the last window: windows get
    /// what was added since.
    prev: HashMap<u32, LoopThread>,
}

/// What `now` added to `prev` (the longest turn stays the longest since
/// the thread was first seen).
fn since(now: &LoopThread, prev: Option<&LoopThread>) -> LoopThread {
    let Some(p) = prev else {
        return *now;
    };
    let mut d = *now;
    d.turns = now.turns.saturating_sub(p.turns);
    d.total_ns = now.total_ns.saturating_sub(p.total_ns);
    for (a, b) in d.hist.iter_mut().zip(p.hist.iter()) {
        *a = a.saturating_sub(*b);
    }
    d
}

impl Signal for Loops {
    fn configure(&mut self, setup: &mut Setup<'_>) {
        self.on = setup.cfg.loops;
        if !self.on {
            setup.sizes.push((loops::LOOPS, 1));
            setup.sizes.push((loops::STALLS, 4096));
            return;
        }
        if let Err(e) = Format::read("syscalls", "sys_enter_epoll_wait") {
            setup.unavailable(
                LOOPS,
                format!(
                    "{e} (syscall tracepoints need a kernel built with CONFIG_FTRACE_SYSCALLS)"
                ),
            );
            self.on = false;
            return;
        }
        setup.config.loops = 1;
        setup.config.stall_ns = setup.cfg.stall_ns;
    }

    fn attach(&mut self, ebpf: &mut Ebpf, setup: &mut Setup<'_>) -> Result<(), CaptureError> {
        if !self.on {
            return Ok(());
        }
        self.ring = Some(take_ring(ebpf, loops::STALLS)?);
        self.map = Some(take_map(ebpf, loops::LOOPS)?);
        let names =
            |dir: &str| -> Vec<String> { WAITS.iter().map(|w| format!("sys_{dir}_{w}")).collect() };
        let (exits, enters) = (names("exit"), names("enter"));
        fn points(v: &[String]) -> Vec<(&str, &str)> {
            v.iter().map(|n| ("syscalls", n.as_str())).collect()
        }
        // epoll_pwait2 is 5.11+.
        let optional = ["sys_exit_epoll_pwait2", "sys_enter_epoll_pwait2"];
        if !self.tracepoints.attach(
            ebpf,
            setup,
            LOOPS,
            loops::PROG_ENTER,
            &points(&enters),
            &optional,
        )? || !self.tracepoints.attach(
            ebpf,
            setup,
            LOOPS,
            loops::PROG_EXIT,
            &points(&exits),
            &optional,
        )? {
            self.on = false;
        }
        Ok(())
    }

    fn rings(&self) -> Vec<&Ring> {
        self.ring.iter().collect()
    }

    fn drain(&mut self, _procs: &mut ProcessTable) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let stalls = &mut self.stalls;
        drain_ring(ring, |s: Stall| {
            if stalls.len() < MAX_STALLS {
                stalls.push(s);
            }
        });
    }

    fn second(&mut self, row: &mut Second) {
        let new = &self.stalls[self.seen.min(self.stalls.len())..];
        row.stalls = new.len() as u64;
        row.stall_ms = new.iter().fold(0.0, |t, s| {
            t + s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6
        });
        self.seen = self.stalls.len();
    }

    fn collect(
        &mut self,
        _ebpf: &mut Ebpf,
        out: &mut RawProfile,
        drain: bool,
    ) -> Result<(), CaptureError> {
        let Some(map) = self.map.as_mut() else {
            return Ok(());
        };
        out.loops_on = true;
        out.stalls.append(&mut self.stalls);
        self.seen = 0;
        let threads: Vec<(u32, LoopThread)> = map.iter().filter_map(Result::ok).collect();
        for (tid, now) in threads {
            out.loops.push(LoopThreadRaw {
                tid,
                turns: since(&now, self.prev.get(&tid)),
            });
            if drain {
                if crate::procs::Stat::read(tid).is_none_or(|s| s.exited()) {
                    // Gone: counted in this window for the last time.
                    let _ = map.remove(&tid);
                    self.prev.remove(&tid);
                } else {
                    self.prev.insert(tid, now);
                }
            }
        }
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf, closing: &mut Closing) -> Vec<CaptureError> {
        self.tracepoints.detach(ebpf, closing)
    }
}
